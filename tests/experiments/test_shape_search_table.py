"""experiments/shape_search/table.py: its README table from committed results, and with none yet."""

import gzip
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "experiments" / "shape_search"
sys.path.insert(0, str(ROOT / "experiments"))


def load_table(monkeypatch, tmp_path):
    folder = tmp_path / "shape_search"
    folder.mkdir()
    for name in ("study.yaml", "base.yaml", "README.md"):
        shutil.copy(STUDY / name, folder / name)
    spec = importlib.util.spec_from_file_location("shape_search_table", STUDY / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", folder)
    return module, folder


def write_unit(folder: Path, arm: str, seed: int, losses: dict[str, dict[str, float]]) -> None:
    out = folder / "results" / arm / f"seed-{seed}"
    out.mkdir(parents=True)
    for stage, domain_losses in losses.items():
        records = [{"kind": "train", "step": 1, "elapsed_s": 10.0}]
        if stage == "prune":
            records.append({"kind": "final", "step": 100, "shape": {
                "num_hidden_layers": 27, "hidden_size": 504, "num_attention_heads": 6, "num_key_value_heads": 2,
                "intermediate_size": 520}})
        with gzip.open(out / f"{stage}.metrics.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        held = {"domains": {d: {"loss": x} for d, x in domain_losses.items()}, "params": 59_960_000}
        (out / f"{stage}.heldout.json").write_text(json.dumps(held))


def test_the_table_says_when_there_are_no_results(monkeypatch, tmp_path, capsys):
    module, folder = load_table(monkeypatch, tmp_path)
    module.main()
    text = (folder / "README.md").read_text()
    assert "No results yet" in text and "- search_60m seed 1: not finished" in text


def test_the_table_rows_come_from_the_results(monkeypatch, tmp_path, capsys):
    module, folder = load_table(monkeypatch, tmp_path)
    write_unit(folder, "search_60m", 0, {"prune": {"a": 3.0, "b": 4.0}, "cpt": {"a": 2.5, "b": 3.5}})
    module.main()
    text = (folder / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| search_60m"))
    assert row == "| search_60m | 1 | 27, 504, 6 / 2, 520 | 59.96M | 3.500 | 4.000 | 3.000 | 3.500 | 20 |"
    assert "- search_60m seed 0: finished" in text
