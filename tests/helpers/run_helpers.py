"""Run helpers for tests: tiny text domains on disk, the overrides of a tiny run, records without timings."""

import json
from pathlib import Path


def make_domains(root: Path, n_docs: int = 30) -> dict[str, str]:
    words = {"alpha": "the cat sat on the mat. ", "beta": "0123456789+-*/= ", "gamma": "def f(x): return x\n"}
    out = {}
    for name, text in words.items():
        folder = root / name
        folder.mkdir(parents=True)
        with open(folder / "docs.jsonl", "w") as f:
            for i in range(n_docs):
                f.write(json.dumps({"text": f"{name} {i} " + text * (8 + i % 5)}) + "\n")
        out[name] = str(folder)
    return out


def overrides(tmp_path: Path, model_dir: Path, **extra) -> list[str]:
    domains = make_domains(tmp_path / "data")
    base = {
        "run_dir": str(tmp_path / "run"), "model.source": str(model_dir),
        "data.seq_len": 32, "data.eval_sequences": 3, "data.cache_dir": str(tmp_path / "cache"),
        "data.proportions": "[0.5,0.3,0.2]",
        "train.steps": 6, "train.batch_size": 4, "train.micro_batch_size": 2, "train.dtype": "float32",
        "train.eval_every": 2, "train.checkpoint_every": 2, "train.lr": 1e-3, "train.eval_batch_size": 2,
    }
    base.update(extra)
    items = [f"{k}={v}" for k, v in base.items()]
    items.append("data.domains={" + ", ".join(f"{k}: '{v}'" for k, v in domains.items()) + "}")
    return items


def strip(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("elapsed_s", "time_s", "model_dir")}
        out.append(r)
    return out
