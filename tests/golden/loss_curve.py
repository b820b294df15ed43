"""The golden run: a tiny random Llama pruned for 20 steps with `drpruning` mixing, then 10 steps of continued
pretraining of the exported model, on one CPU thread in float32. Only public entry points are used (the CLI),
so the curve survives any restructuring; it changes only when the numbers are meant to change.

Regenerate (in a commit that says why the numbers moved):
    .venv/bin/python tests/golden/loss_curve.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "helpers"))
from run_helpers import make_domains  # noqa: E402
from tiny_models import save_tiny  # noqa: E402

ASSET = HERE / "assets" / "tiny_llama_cpu.json"
def _common(root: Path, domains: dict[str, str]) -> list[str]:
    return [
        "data.domains={" + ", ".join(f"{k}: '{v}'" for k, v in domains.items()) + "}",
        "data.seq_len=32", "data.eval_sequences=3", f"data.cache_dir={root / 'cache'}",
        "data.proportions=[0.5,0.3,0.2]", "train.dtype=float32", "train.batch_size=4", "train.micro_batch_size=2",
        "train.lr=1e-3", "train.eval_batch_size=2", "train.eval_every=1", "train.checkpoint_every=100",
        "mixing.method=drpruning",
    ]


def _curve(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "train_loss": [r["loss"] for r in records if r["kind"] == "train"],
        "proportions": [r["proportions"] for r in records if r["kind"] == "train"],
        "eval_loss": [r["eval_loss"] for r in records if r["kind"] == "eval"],
        "mix_weights": [r["weights"] for r in records if r["kind"] == "mix"],
    }


def run(root: Path) -> dict:
    """Both stages in `root`; returns {"prune": curve, "cpt": curve}."""
    from drpruning.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order
    try:
        model = save_tiny(root / "model", "llama")
        common = _common(root, make_domains(root / "data", n_docs=40))
        prune = ["prune", f"run_dir={root / 'prune'}", f"model.source={model}", "train.steps=20",
                 "pruning.target.num_hidden_layers=2", "pruning.target.hidden_size=24",
                 "pruning.target.intermediate_size=32", "pruning.target.num_attention_heads=2",
                 "pruning.target.num_key_value_heads=1", "pruning.lagrangian_warmup_steps=8", "pruning.method=l0",
                 *common]
        if main(prune) != 0:
            raise RuntimeError("golden pruning run failed")
        cpt = ["train", f"run_dir={root / 'cpt'}", f"model.source={root / 'prune' / 'model'}", "train.steps=10",
               *common]
        if main(cpt) != 0:
            raise RuntimeError("golden continued-pretraining run failed")
    finally:
        torch.set_num_threads(threads)
    return {"prune": _curve(root / "prune"), "cpt": _curve(root / "cpt")}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: loss_curve.py --write  (regenerates tests/golden/assets/tiny_llama_cpu.json)")
    with tempfile.TemporaryDirectory() as tmp:
        curve = run(Path(tmp))
    ASSET.write_text(json.dumps(curve, indent=1) + "\n")
    print(f"wrote {ASSET}")
