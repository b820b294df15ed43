"""Slow: `drpruning prune` and `drpruning train` with every mixing method on the real data in ../shared,
with the default model; the proportions in metrics.jsonl move (and stay put for `constant`).

Every method prunes on the 7-domain RedPajama sample; the 8-language corpus runs with the paper's method only
(a rule does not depend on the data it mixes; the corpus is what that case checks). Continued pretraining
runs the two rules that behave differently there: sheared (its clipped excess mostly vanishes once losses
fall below the source's) and drpruning (its scaling law has no sparsity term without pruning); constant
and dro do the same in both stages. This keeps the slow tier within
CI's time."""

import pytest

from drpruning.config import load_config
from drpruning.loss import cpu_has_fast_bf16
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import Trainer

pytestmark = pytest.mark.slow

SETTINGS = {
    "redpajama": ("redpajama-sample", ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4-rp"],
                  [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]),
    "multilingual": ("multilingual", ["en", "ru", "zh", "ja", "ar", "tr", "ko", "th"],
                     [0.2770, 0.1847, 0.1297, 0.1038, 0.0909, 0.0889, 0.0667, 0.0582]),
}


CASES = [("redpajama", m, "prune") for m in ("constant", "sheared", "dro", "drpruning")] + [
    ("multilingual", "drpruning", "prune"), ("redpajama", "sheared", "train"), ("redpajama", "drpruning", "train")]


@pytest.mark.parametrize("setting,method,stage", CASES)
def test_mixing_methods_on_real_data(shared_dir, default_model_dir, tmp_path, setting, method, stage):
    folder, names, proportions = SETTINGS[setting]
    root = shared_dir / "data" / folder
    total = sum(proportions)
    proportions = [p / total for p in proportions]
    items = [f"run_dir={tmp_path / 'run'}", f"model.source={default_model_dir}",
             "data.domains={" + ", ".join(f"{n}: '{root / n}'" for n in names) + "}",
             f"data.proportions=[{','.join(map(str, proportions))}]", "data.seq_len=64", "data.eval_sequences=1",
             f"data.cache_dir={tmp_path.parent / 'token-cache'}",
             "train.steps=3", "train.batch_size=2", "train.micro_batch_size=2", "train.eval_every=1",
             "train.checkpoint_every=3", "train.eval_batch_size=8", f"mixing.method={method}",
             # pure bf16 halves the checkpoint bytes on disk, but only CPUs with native bf16 run it fast
             f"model.dtype={'bfloat16' if cpu_has_fast_bf16() else 'float32'}"]
    if stage == "prune":
        items += ["pruning.enabled=true", "pruning.method=l0", "pruning.structures=[layer,head,intermediate]",
                  "pruning.target.num_hidden_layers=28", "pruning.target.intermediate_size=1280"]
    Trainer(load_config(None, items)).run()
    mixes = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "mix"]
    assert len(mixes) == 3 and all(set(r["weights"]) == set(names) for r in mixes)
    final = [mixes[-1]["weights"][n] for n in names]
    moved = max(abs(a - b) for a, b in zip(final, proportions))
    if method == "constant":
        assert moved < 1e-9
    else:
        # (sheared moves little in continued pretraining: losses fall below the source references and
        # max(loss - ref, 0) clips most of the signal)
        assert moved > 1e-5, f"{method} left the proportions at {final}"
    assert abs(sum(final) - 1) < 1e-9
