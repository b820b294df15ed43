"""Wall time of the demo's stages, recipe against recipe, side by side on one machine in one run.

    .venv/bin/python bench/bench_demo_wall.py [--steps 20] [--rounds 2] [--recipes l0 t2]
    .venv/bin/python bench/bench_demo_wall.py --previous REV [--rounds 1]   # the demo, this code against REV's

With --previous, the two recipes are the demo itself (its configs as shipped, no overrides, at full length:
100 + 60 steps, nothing projected) run by this checkout's code (`current`) and by the code of git revision REV
(`previous`, from a temporary git worktree, its src/ first on PYTHONPATH): what a code change does to the
demo's wall time, train.compile's `auto` decision included.

Each recipe (a variant of bench/bench_quality.py) runs the demo's prune stage (demo_prune.yaml) and continued
stage (demo_cpt.yaml) through the CLI in a fresh process, shortened to --steps with the demo's proportions of
evaluations and checkpoints kept (one evaluation every 4 steps, 4 checkpoints per stage, the Lagrangian warmup
over 60% of the prune stage); recipes alternate within each round, so every recipe sees the same machine load.
Startup, data loading and the calibration pass are in every stage's time, as in the demo (the L0 recipe
calibrates too: its masks are importance-initialised). The figures are each stage's median wall seconds and
their ratio to the `l0` recipe (the demo's recipe until one-shot was chosen), as measured, and projected to
the demo's 100 + 60 steps: each stage's fixed part (wall time minus its training loop) plus its loop (steps,
evaluations, checkpoints; the metrics' elapsed_s) scaled to the demo's step count. Equal shortened stages
weigh the continued stage more than the demo does. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from bench_quality import VARIANTS  # the recipes: overrides of the demo's two stages

DEMO_STEPS = {"prune": 100, "cpt": 60}  # demo_prune.yaml, demo_cpt.yaml


def run_stage(config: str, run_dir: Path, overrides: list[str], steps: int | None,
              src: Path | None = None) -> tuple[float, float]:
    """(wall seconds, loop seconds) of one stage; `steps` None: the demo's own length; `src`: the code to run."""
    package = (src / "drpruning" / "configs") if src is not None else files("drpruning.configs")
    cmd = [sys.executable, "-m", "drpruning", "train", str(package / config), f"run_dir={run_dir}",
           "train.keep_checkpoints=1", *overrides]
    if steps is not None:
        cmd += [f"train.steps={steps}", "train.eval_every=4", f"train.checkpoint_every={max(1, steps // 4)}"]
    if config == "demo_prune.yaml" and steps is not None:  # the demo's warmup over 60% of the stage
        cmd += [f"pruning.lagrangian_warmup_steps={max(1, steps * 3 // 5)}", "force=true"]
    env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else None
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    ap.add_argument("--previous", metavar="REV", help="the demo as shipped, this code against REV's, full length")
    args = ap.parse_args()
    from drpruning.models import fetch_model

    source = str(fetch_model("smollm2-135m"))
    times: dict[tuple[str, str], list[float]] = {}
    demo: dict[tuple[str, str], list[float]] = {}  # projected to the demo's 100 + 60 steps
    steps = None if args.previous else args.steps
    recipes = {"previous": ([], []), "current": ([], [])} if args.previous else {n: VARIANTS[n] for n in args.recipes}
    with tempfile.TemporaryDirectory(prefix="bench_demo_wall_") as tmp:
        code: dict[str, Path | None] = {name: None for name in recipes}
        if args.previous:
            tree = Path(tmp) / "previous-code"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.previous], check=True,
                           stdout=subprocess.DEVNULL)
            code["previous"] = tree / "src"
        for k in range(args.rounds):
            for name, (prune_ov, cpt_ov) in recipes.items():
                base = Path(tmp) / f"{name}-{k}"
                for stage, config, ov in (
                        ("prune", "demo_prune.yaml", [f"model.source={source}", *prune_ov]),
                        ("cpt", "demo_cpt.yaml", [f"model.source={base / 'prune' / 'model'}",
                                                  f"train.distill.teacher={source}", *cpt_ov])):
                    wall, loop = run_stage(config, base / stage, ov, steps, code[name])
                    times.setdefault((name, stage), []).append(wall)
                    n = steps or DEMO_STEPS[stage]
                    demo.setdefault((name, stage), []).append(projected(wall, loop, n, DEMO_STEPS[stage]))
                print(name, k, {s: round(times[(name, s)][-1], 1) for s in ("prune", "cpt")},
                      {f"{s} at demo length": round(demo[(name, s)][-1]) for s in ("prune", "cpt")}, flush=True)
        if args.previous:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True)
    length = steps or "the demo's"
    print(f"\n{length} steps per stage, median of {args.rounds} rounds, recipes alternating; then each stage "
          f"projected to the demo's length ({DEMO_STEPS['prune']} + {DEMO_STEPS['cpt']} steps)")
    for label, table in (("measured", times), ("demo length", demo)):
        head = f"| recipe | prune s | cpt s | both s | both / {next(iter(recipes))} |"
        print(f"\n{label}\n{head}\n|---|---|---|---|---|")
        med = {key: statistics.median(v) for key, v in table.items()}
        first = next(iter(recipes))
        ref = med.get((first, "prune"), 0) + med.get((first, "cpt"), 0)
        for name in recipes:
            both = med[(name, "prune")] + med[(name, "cpt")]
            ratio = f"{both / ref:.2f}" if ref else "-"
            print(f"| {name} | {med[(name, 'prune')]:.0f} | {med[(name, 'cpt')]:.0f} | {both:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
