import pytest

from drpruning.config import ConfigError, load_config


def err(*overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, ["run_dir=/tmp/x", *overrides])
    return str(e.value)


def test_defaults_load():
    cfg = load_config(None, ["run_dir=/tmp/x", "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.mixing.method == "constant"


def test_unknown_key_names_key_and_suggests():
    msg = err("train.stepz=3")
    assert "train.stepz" in msg and "steps" in msg


def test_missing_run_dir():
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(None, [])


@pytest.mark.parametrize("key", ["train.steps", "train.batch_size", "train.micro_batch_size", "data.seq_len",
                                 "train.eval_limit"])
def test_non_positive(key):
    assert key in err(f"{key}=0")


def test_proportions_wrong_length():
    msg = err("data.domains={a: x, b: y}", "data.proportions=[1.0]")
    assert "data.proportions" in msg and "2 domains" in msg


def test_proportions_not_summing_to_one():
    msg = err("data.domains={a: x, b: y}", "data.proportions=[0.5,0.6]")
    assert "sums to 1.1" in msg and "rescale" in msg


def test_bad_method_and_rho():
    assert "mixing.method" in err("mixing.method=magic")
    assert "mixing.rho" in err("mixing.rho=0")
    assert "mixing.min_prob" in err("mixing.min_prob=1.0")


def test_batch_not_multiple_of_micro():
    assert "micro_batch_size" in err("train.batch_size=6", "train.micro_batch_size=4")


def test_warmup_longer_than_run():
    msg = err("pruning.enabled=true", "pruning.target.hidden_size=16", "train.steps=10",
              "pruning.lagrangian_warmup_steps=20")
    assert "lagrangian_warmup_steps" in msg


def test_mask_phase_steps_need_l0_and_room_for_the_compact_model():
    prune = ["pruning.enabled=true", "pruning.target.num_hidden_layers=2", "train.steps=10"]
    assert "with pruning.method=l0" in err(*prune, "pruning.mask_phase_steps=4")  # the default method: one-shot
    assert "below train.steps (10)" in err(*prune, "pruning.method=l0", "pruning.mask_phase_steps=10")
    assert "below train.steps (10)" in err(*prune, "pruning.method=l0", "pruning.mask_phase_steps=-1")
    # the mask settings must fit in the mask phase, not merely in the run
    msg = err(*prune, "pruning.method=l0", "pruning.mask_phase_steps=4", "pruning.hardening_steps=4")
    assert "'pruning.hardening_steps' is 4" in msg and "the 4 steps the masks learn over" in msg
    msg = err(*prune, "pruning.method=l0", "pruning.mask_phase_steps=4", "pruning.lagrangian_warmup_steps=5")
    assert "'pruning.lagrangian_warmup_steps' is 5" in msg
    cfg = load_config(None, ["run_dir=/tmp/x", *prune, "pruning.method=l0", "pruning.mask_phase_steps=4",
                             "pruning.hardening_steps=3"])
    assert cfg.pruning.mask_phase_steps == 4


def test_log_alpha_bound_needs_deterministic_gates():
    prune = ["pruning.enabled=true", "pruning.target.num_hidden_layers=2"]
    assert "set pruning.gates=deterministic" in err(*prune, "pruning.log_alpha_bound=temperature")
    msg = err(*prune, "pruning.gates=deterministic", "pruning.log_alpha_bound=tight")
    assert "'pruning.log_alpha_bound' is 'tight': use fixed or temperature" in msg


def test_yaml_file_and_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run_dir: r\ntrain:\n  steps: 5\nmixing:\n  method: drpruning\n")
    cfg = load_config(f, ["train.steps=9"])
    assert cfg.train.steps == 9 and cfg.mixing.method == "drpruning" and cfg.run_dir == "r"


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml", ["run_dir=x"])


@pytest.mark.parametrize("name", ["demo_prune.yaml", "demo_cpt.yaml"])
def test_packaged_demo_configs_validate(name):
    from importlib.resources import files

    cfg = load_config(str(files("drpruning.configs") / name), ["run_dir=r"])  # raises if invalid
    if name == "demo_cpt.yaml" and cfg.train.distill.weight > 0:
        # its model.source is the pruned model: without a teacher it would distil from itself
        assert cfg.train.distill.teacher == "smollm2-135m"
