import json
import math
import re
from pathlib import Path

import pytest

from drpruning.report import ReportError, write_downstream, write_report

DOMAINS = ["wiki", "github", "book"]


def synthetic_run(run_dir: Path, seed: float, pruning: bool = True) -> list[dict]:
    """A metrics.jsonl with every record kind of docs/design.md."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, 11):
        q = [0.2 + 0.01 * step, 0.3, 0.5 - 0.01 * step]
        r = {"kind": "train", "step": step, "tokens": step * 1000, "lr": 1e-4,
             "loss": 3.0 - 0.1 * step + seed,
             "domain_loss": {d: (3.0 + i - 0.1 * step + seed if (step + i) % 3 else None)
                             for i, d in enumerate(DOMAINS)},
             "domain_tokens": dict.fromkeys(DOMAINS, 300),
             "proportions": dict(zip(DOMAINS, q, strict=True)),
             "elapsed_s": step * 0.5}
        if pruning:
            r |= {"lm_loss": r["loss"], "lagrangian": 0.01,
                  "expected_sparsity": {"head": 0.05 * step, "mlp": 0.04 * step},
                  "target_sparsity": {"head": 0.5, "mlp": 0.4}, "lambda1": {"head": 0.1},
                  "lambda2": {"head": 0.1},
                  "expected_params": 1_000_000 - 40_000 * step}
        records.append(r)
        if step % 5 == 0:
            loss = {d: 2.5 + 0.3 * i - 0.05 * step + seed for i, d in enumerate(DOMAINS)}
            worst = max(loss, key=loss.get)
            records.append({"kind": "eval", "step": step, "tokens": step * 1000, "eval_loss": loss,
                            "eval_ppl": {d: math.exp(v) for d, v in loss.items()},
                            "mean_loss": sum(loss.values()) / 3, "worst_loss": loss[worst],
                            "worst_domain": worst})
            records.append({"kind": "mix", "step": step, "method": "drpruning", "losses": loss,
                            "references": {d: v - 0.2 for d, v in loss.items()},
                            "excess": dict.fromkeys(DOMAINS, 0.2),
                            "weights": dict(zip(DOMAINS, q, strict=True)),
                            "ratio": dict(zip(DOMAINS, q, strict=True)), "fits": dict.fromkeys(DOMAINS),
                            "predictions": {d: (v - 0.1 if step > 5 else None) for d, v in loss.items()},
                            "time_s": 0.01})
    records.append({"kind": "final", "step": 10, "model_dir": str(run_dir / "model"),
                    "shape": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "model").mkdir()
    (run_dir / "model" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    return records


def md_rows(text: str) -> dict[str, list[str]]:
    """First table cell -> the other cells, for every markdown table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_report_renders_plots_and_exact_table_values(tmp_path):
    a = synthetic_run(tmp_path / "a", 0.0)
    b = synthetic_run(tmp_path / "b", 0.5, pruning=False)
    write_downstream(tmp_path / "a", {"copa": {"acc": 0.61, "acc_norm": 0.58, "n": 100}})
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    text = report.read_text()
    assert (tmp_path / "out" / "report.html").stat().st_size > 0

    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(pngs) == 4 + 3  # run b has no sparsity plot (no pruning records)
    for name in pngs:
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert name in (tmp_path / "out" / "report.html").read_text()

    rows = md_rows(text)
    last_a = [r for r in a if r["kind"] == "eval"][-1]
    last_b = [r for r in b if r["kind"] == "eval"][-1]
    assert rows["metric"] == ["a", "b"]
    assert rows["last eval step"] == [str(last_a["step"]), str(last_b["step"])]
    for d in DOMAINS:
        assert rows[f"ppl {d}"] == [f"{last_a['eval_ppl'][d]:.4f}", f"{last_b['eval_ppl'][d]:.4f}"]
    assert rows["mean loss"] == [f"{last_a['mean_loss']:.4f}", f"{last_b['mean_loss']:.4f}"]
    assert rows["worst loss"] == [f"{last_a['worst_loss']:.4f}", f"{last_b['worst_loss']:.4f}"]
    assert rows["worst domain"] == [last_a["worst_domain"], last_b["worst_domain"]]
    assert rows["copa acc"] == ["0.6100", "-"] and rows["copa acc_norm"] == ["0.5800", "-"]
    assert rows["final shape: num_hidden_layers"] == ["2"]
    assert rows["model config: num_attention_heads"] == ["4"]
    # the per-run eval table (first run's rows come first)
    assert rows["wiki"] == [f"{last_a['eval_loss']['wiki']:.4f}", f"{last_a['eval_ppl']['wiki']:.4f}"]


def test_report_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        write_report([tmp_path / "empty"])
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "missing"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no records"):
        write_report([tmp_path / "blank"])


def test_report_defaults_to_first_run_dir_and_same_names(tmp_path):
    synthetic_run(tmp_path / "x" / "run", 0.0)
    synthetic_run(tmp_path / "y" / "run", 0.1)
    report = write_report([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert report == tmp_path / "x" / "run" / "report.md"
    assert md_rows(report.read_text())["metric"] == ["x/run", "y/run"]
