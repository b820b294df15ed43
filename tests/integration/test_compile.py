"""`train.compile`: compiled decoder layers give the eager run's losses, and `auto` compiles only where it pays."""

import pytest
import torch
from run_helpers import overrides
from tiny_models import save_tiny, tiny_model

from drpruning.config import ConfigError, load_config
from drpruning.pruning.importance import importance_scores
from drpruning.training import compiling
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import Trainer

STEPS = 20
PRUNE = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2",
         "pruning.target.intermediate_size=32", "pruning.lagrangian_warmup_steps=5"]
ONE_SHOT = ["pruning.enabled=true", "pruning.method=importance", "pruning.target.num_hidden_layers=2",
            "train.distill.weight=0.5", "train.distill.temperature=2.0"]


def _losses(tmp_path, model_dir, compile_: bool, extra: list[str]) -> tuple[list[float], list[float], Trainer]:
    # whole evaluation batches: a last batch of one would be one more graph to compile
    items = overrides(tmp_path, model_dir, **{"train.steps": STEPS, "train.dtype": "bfloat16",
                                              "train.eval_every": 5, "train.checkpoint_every": STEPS,
                                              "data.eval_sequences": 4, "train.compile": str(compile_).lower()}) + extra
    trainer = Trainer(load_config(None, items))
    trainer.run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    return ([r["loss"] for r in records if r["kind"] == "train"],
            [r["mean_loss"] for r in records if r["kind"] == "eval"], trainer)


@pytest.mark.parametrize("extra", [
    PRUNE,  # the masked model: the hooks and the custom autograd function inside the compiled layers
    pytest.param([], marks=pytest.mark.slow),  # each case compiles for ~30 s on 2 cores: the rest in the slow tier
    pytest.param(ONE_SHOT, marks=pytest.mark.slow),
], ids=["prune-l0", "train", "one-shot-distill"])
def test_compiled_run_matches_eager_over_20_steps(tmp_path, extra):
    torch._dynamo.reset()
    model_dir = save_tiny(tmp_path / "model", "llama")
    eager, eager_eval, _ = _losses(tmp_path / "eager", model_dir, False, extra)
    compiled, compiled_eval, trainer = _losses(tmp_path / "compiled", model_dir, True, extra)
    assert trainer.compiled and all(getattr(m, "_compiled_call_impl", None) is not None
                                    for m in trainer.model.model.layers)
    # a CPU run of 32-token sequences: the trained model's attention is matmul, softmax, matmul; the teacher's not
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.teacher is None or trainer.teacher.config._attn_implementation == "sdpa"
    print("largest train / eval loss difference:", max(abs(a - b) for a, b in zip(compiled, eager)),
          max(abs(a - b) for a, b in zip(compiled_eval, eager_eval)))
    assert len(eager) == len(compiled) == STEPS
    # bf16 autocast: fused kernels round differently (measured: at most 2e-4 nats apart over the 20 steps)
    assert compiled == pytest.approx(eager, abs=1e-2)
    assert compiled_eval == pytest.approx(eager_eval, abs=1e-2)


def test_calibration_through_compiled_layers_compiles_nothing():
    # its hooks guard on the layer index: compiled, a 30-layer model spent 30 of the recompile limit's graphs
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled, plain = tiny_model("llama"), tiny_model("llama")
    compiling.compile_layers(compiled)
    batches = [torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))]
    before = counters["stats"]["unique_graphs"]
    scores, massive = importance_scores(compiled, batches)
    assert counters["stats"]["unique_graphs"] == before
    expected, expected_massive = importance_scores(plain, batches)
    assert all(torch.equal(scores[k], expected[k]) for k in expected) and torch.equal(massive, expected_massive)


def test_math_attention_only_for_a_trained_model_on_a_cpu_at_short_sequences(tmp_path):
    from transformers import AutoModelForCausalLM

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compiling.math_attention_pays(cpu, compiling.MATH_ATTENTION_MAX_SEQ)
    assert not compiling.math_attention_pays(cpu, compiling.MATH_ATTENTION_MAX_SEQ + 1)
    assert not compiling.math_attention_pays(gpu, 128) and not compiling.math_attention_pays(cpu, None)
    model_dir = save_tiny(tmp_path / "model", "llama")
    short, long, teacher = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(3))
    compiling.compile_layers(short, 256)
    compiling.compile_layers(long, 512)
    compiling.compile_layers(teacher)
    assert [m.config._attn_implementation for m in (short, long, teacher)] == ["eager", "sdpa", "sdpa"]
    short.save_pretrained(tmp_path / "saved")  # the choice is the process's, never the exported model's
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_auto_compiles_only_where_the_compile_time_pays():
    cpu = torch.device("cpu")
    # the default suite's tiny runs: far below a minute of compute
    assert not compiling.compile_pays(1e5, 128, 8, cpu)
    # SmolLM2-135M, 1,000 steps of 2,048 tokens: hours of CPU compute
    assert compiling.compile_pays(135e6, 2048, 1000, cpu)
    # the break-even: saved time (SAVED_FRACTION of 6 N T steps / rate) equals COMPILE_SECONDS
    steps = compiling.COMPILE_SECONDS / compiling.SAVED_FRACTION * compiling.RATE["cpu"] / (6 * 135e6 * 1024)
    assert not compiling.compile_pays(135e6, 1024, int(steps) - 1, cpu)
    assert compiling.compile_pays(135e6, 1024, int(steps) + 2, cpu)
    assert compiling.use_compile(False, cpu, 1e9, 4096, 10_000) is False
    # multi-process: each process's share of the tokens decides
    assert compiling.use_compile("auto", cpu, 135e6, 2048, 1000, world=2) is compiling.have_compiler()
    assert compiling.use_compile("auto", cpu, 135e6, 2048, 80, world=1) is compiling.have_compiler()
    assert compiling.use_compile("auto", cpu, 135e6, 2048, 80, world=2) is False
    assert compiling.use_compile(True, cpu, 1, 1, 1) is compiling.have_compiler()


def test_compile_true_without_a_compiler_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "have_compiler", lambda: False)
    model_dir = save_tiny(tmp_path / "model", "llama")
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.compile": "true"})))


def test_compile_setting_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, [f"run_dir={tmp_path}", "train.compile=sometimes"])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_compiled_loss_kernels_match_the_eager_ones(temperature):
    from drpruning import loss

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 50) * 3
    teacher = torch.randn(2, 9, 50) * 3
    targets = torch.randint(50, (2, 8))

    def run():
        x = logits.detach().requires_grad_()
        nll, kl = loss.nll_and_kl(x, targets, teacher, temperature, chunk_rows=4)
        (nll.sum() + 0.5 * kl.sum()).backward()
        y = logits.detach().requires_grad_()
        ce = loss.nll_from_logits(y, targets, chunk_rows=4)
        (2 * ce).sum().backward()
        return nll, kl, x.grad, ce, y.grad

    try:
        loss.compile_loss(False)
        eager = run()
        loss.compile_loss(True)
        compiled = run()
    finally:
        loss.compile_loss(False)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
