"""Wall time of the demo's stages, recipe against recipe, side by side on one machine in one run (issue 11).

    .venv/bin/python bench/bench_demo_wall.py [--steps 20] [--rounds 2] [--recipes l0 t2]

Each recipe (a variant of bench/bench_quality.py) runs the demo's prune stage (demo_prune.yaml) and continued
stage (demo_cpt.yaml) through the CLI in a fresh process, shortened to --steps with the demo's proportions of
evaluations and checkpoints kept (one evaluation every 4 steps, 4 checkpoints per stage, the Lagrangian warmup
over 60% of the prune stage); recipes alternate within each round, so every recipe sees the same machine load.
Startup, data loading and the calibration pass are in every stage's time, as in the demo (the L0 recipe
calibrates too: its masks are importance-initialised). The figures are each stage's median wall seconds and
their ratio to the `l0` recipe (the demo's recipe until issue 11 chose one-shot), as measured, and projected to
the demo's 100 + 60 steps: each stage's fixed part (wall time minus its training loop) plus its loop (steps,
evaluations, checkpoints; the metrics' elapsed_s) scaled to the demo's step count. Equal shortened stages
weigh the continued stage more than the demo does. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from bench_quality import VARIANTS  # the recipes: overrides of the demo's two stages

DEMO_STEPS = {"prune": 100, "cpt": 60}  # demo_prune.yaml, demo_cpt.yaml


def run_stage(config: str, run_dir: Path, overrides: list[str], steps: int) -> float:
    every = max(1, steps // 4)
    cmd = [sys.executable, "-m", "drpruning", "train", str(files("drpruning.configs") / config), f"run_dir={run_dir}",
           f"train.steps={steps}", "train.eval_every=4", f"train.checkpoint_every={every}",
           "train.keep_checkpoints=1", *overrides]
    if config == "demo_prune.yaml":  # the demo's warmup over 60% of the stage; a short L0 run may miss the shape
        cmd += [f"pruning.lagrangian_warmup_steps={max(1, steps * 3 // 5)}", "force=true"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, loop_seconds(run_dir / "metrics.jsonl")


def loop_seconds(metrics: Path) -> float:
    """Seconds of the training loop (steps, evaluations, checkpoints): the last step's elapsed_s."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max(r["elapsed_s"] for r in records if r["kind"] == "train")


def projected(wall: float, loop: float, steps: int, demo_steps: int) -> float:
    """A stage's seconds at the demo's length: its fixed part (start-up, data, calibration, the first
    evaluation, export) plus its loop, scaled from `steps` to `demo_steps`."""
    return wall - loop + loop * demo_steps / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["l0", "t2"], choices=list(VARIANTS))
    args = ap.parse_args()
    from drpruning.models import fetch_model

    source = str(fetch_model("smollm2-135m"))
    times: dict[tuple[str, str], list[float]] = {}
    demo: dict[tuple[str, str], list[float]] = {}  # projected to the demo's 100 + 60 steps
    with tempfile.TemporaryDirectory(prefix="bench_demo_wall_") as tmp:
        for k in range(args.rounds):
            for name in args.recipes:
                prune_ov, cpt_ov = VARIANTS[name]
                base = Path(tmp) / f"{name}-{k}"
                for stage, config, ov in (
                        ("prune", "demo_prune.yaml", [f"model.source={source}", *prune_ov]),
                        ("cpt", "demo_cpt.yaml", [f"model.source={base / 'prune' / 'model'}",
                                                  f"train.distill.teacher={source}", *cpt_ov])):
                    wall, loop = run_stage(config, base / stage, ov, args.steps)
                    times.setdefault((name, stage), []).append(wall)
                    demo.setdefault((name, stage), []).append(projected(wall, loop, args.steps, DEMO_STEPS[stage]))
                print(name, k, {s: round(times[(name, s)][-1], 1) for s in ("prune", "cpt")},
                      {f"{s} at demo length": round(demo[(name, s)][-1]) for s in ("prune", "cpt")}, flush=True)
    print(f"\n{args.steps} steps per stage, median of {args.rounds} rounds, recipes alternating; then each stage "
          f"projected to the demo's length ({DEMO_STEPS['prune']} + {DEMO_STEPS['cpt']} steps)")
    for label, table in (("measured", times), ("demo length", demo)):
        print(f"\n{label}\n| recipe | prune s | cpt s | both s | both / l0 |\n|---|---|---|---|---|")
        med = {key: statistics.median(v) for key, v in table.items()}
        ref = med.get(("l0", "prune"), 0) + med.get(("l0", "cpt"), 0)
        for name in args.recipes:
            both = med[(name, "prune")] + med[(name, "cpt")]
            ratio = f"{both / ref:.2f}" if ref else "-"
            print(f"| {name} | {med[(name, 'prune')]:.0f} | {med[(name, 'cpt')]:.0f} | {both:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
