"""`drpruning train` with train.compile=false against =true on the same config, from the runs' own records.

    .venv/bin/python bench/bench_compile_run.py [--config demo_prune.yaml] [--steps 16] [--rounds 2]

Each run is a fresh `drpruning train` process on the config (a packaged config name or a path), shortened to
--steps with one evaluation and one checkpoint, both at the end. The figure is the seconds per step over steps
6..steps, from metrics.jsonl: (elapsed_s at the last step - elapsed_s at step 6) / (steps - 6), so start-up,
the compiling first steps and the final evaluation are outside it. Runs alternate false, true, true, false, ...
so drifting machine load hits both; the medians per setting and their ratio are printed. Nothing else may run
meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

FIRST = 6  # steps 1-5 hold the compiling and warm-up


def step_seconds(metrics: Path, last: int) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    at = {r["step"]: r["elapsed_s"] for r in records if r["kind"] == "train"}
    return (at[last] - at[FIRST]) / (last - FIRST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_prune.yaml")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both settings")
    args = ap.parse_args()
    config = args.config if Path(args.config).is_file() else str(files("drpruning.configs") / args.config)
    order = [s for i in range(args.rounds) for s in (("false", "true") if i % 2 == 0 else ("true", "false"))]
    per_step: dict[str, list[float]] = {"false": [], "true": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(order):
            run_dir = Path(tmp) / f"run-{i}"
            cmd = [sys.executable, "-m", "drpruning", "train", config, f"run_dir={run_dir}",
                   f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                   f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1", "force=true",
                   f"pruning.lagrangian_warmup_steps={args.steps // 2}",  # (used by L0 configs only)
                   f"train.compile={setting}", *args.overrides]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            per_step[setting].append(step_seconds(run_dir / "metrics.jsonl", args.steps))
            print(f"run {i + 1}: train.compile={setting}: {per_step[setting][-1]:.2f} s/step", flush=True)
    eager, compiled = (statistics.median(per_step[s]) for s in ("false", "true"))
    print(f"\n{args.config}, steps {FIRST}-{args.steps}, median of {args.rounds} runs each")
    print("| train.compile | s/step (each run) | median s/step |\n|---|---|---|")
    for s in ("false", "true"):
        print(f"| {s} | {', '.join(f'{x:.2f}' for x in per_step[s])} | {statistics.median(per_step[s]):.2f} |")
    print(f"compiled steps are {eager / compiled:.2f}x as fast")


if __name__ == "__main__":
    main()
