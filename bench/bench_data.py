"""Prepared data at scale, side by side in one run: tokenisation throughput, `prepare`'s memory, and a
training process over prepared corpora of growing size.

    .venv/bin/python bench/bench_data.py [--text-mb 64] [--sizes 10M,100M,1B] [--steps 12] [--work DIR]

1. Tokenisation: real text (../shared/data/redpajama-sample, every document repeated with a distinct
   suffix up to --text-mb of JSONL) prepared with the SmolLM2-135M tokenizer by `prepare_domain` in one
   process and in two, alternately, twice each, each in a fresh subprocess: tokens/s end to end (reading,
   hashing for the split, tokenising, writing), peak RSS of the main process and of its workers, and a check
   that both wrote the same bytes.
2. Training over prepared corpora of --sizes tokens. These are *synthetic* (uniform random token ids
   written straight into a prepared folder with a matching index, marked `synthetic`), since tokenising 1B
   tokens would take hours here; what is measured does not depend on the ids. Each run trains a small
   random Llama with SmolLM2's tokenizer for --steps steps in a fresh subprocess and reports its peak RSS
   (VmHWM) and the median step time after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rss import MB, peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "redpajama-sample"


def _parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def write_text_corpus(out: Path, megabytes: int) -> int:
    from drpruning.data import iter_documents

    docs = list(iter_documents(SHARED))
    out.mkdir(parents=True, exist_ok=True)
    written, copy = 0, 0
    with open(out / "text.jsonl", "w") as f:
        while written < megabytes << 20:
            for d in docs:
                line = json.dumps({"text": f"{d}\n[copy {copy}]"}) + "\n"
                f.write(line)
                written += len(line)
            copy += 1
    return written


def child_prepare(args: argparse.Namespace) -> None:
    from drpruning.config import DataConfig
    from drpruning.data.prepared import prepare_domain
    from drpruning.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = DataConfig(seq_len=1024, eval_sequences=8, cache_dir=args.cache)
    start = time.perf_counter()
    folder = prepare_domain("text", args.source, tok, cfg, num_proc=args.nproc)
    wall = time.perf_counter() - start
    index = json.loads((folder / "index.json").read_text())
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"tokens": index["tokens"]["train"], "wall_s": wall, "main_rss_mb": peak_rss_bytes() / MB,
                      "worker_rss_mb": workers, "folder": str(folder)}))


def bench_tokenisation(work: Path, megabytes: int) -> list[dict]:
    text_bytes = write_text_corpus(work / "text", megabytes)
    rows = []
    for rnd in range(2):
        for nproc in (1, 2):
            cache = work / f"cache-{nproc}-{rnd}"
            out = subprocess.run([sys.executable, __file__, "--child", "prepare", "--source", str(work / "text"),
                                  "--cache", str(cache), "--nproc", str(nproc)], check=True, capture_output=True,
                                 text=True).stdout.splitlines()[-1]
            rows.append({"nproc": nproc, "round": rnd, "text_mb": text_bytes / 2**20, **json.loads(out)})
    same = {(Path(r["folder"]) / "train.bin").read_bytes() == (Path(rows[0]["folder"]) / "train.bin").read_bytes()
            for r in rows}
    for r in rows:
        r["identical_to_first"] = same == {True}
    return rows


def write_synthetic(folder: Path, tokens: int, vocab: int, fingerprint: str, seq_len: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "train.bin", "wb") as f:
        left = tokens
        while left:
            n = min(left, 1 << 26)
            rng.integers(0, vocab, n, dtype=np.uint16).tofile(f)
            left -= n
    ev = 8 * seq_len
    rng.integers(0, vocab, ev, dtype=np.uint16).tofile(folder / "eval.bin")
    index = {"format": 1, "domain": folder.name, "source": "synthetic", "files": [], "synthetic": True,
             "tokenizer": fingerprint, "vocab_size": vocab, "dtype": "uint16", "seq_len": seq_len, "pieces": False,
             "documents": {"train": 0, "eval": 0}, "tokens": {"train": tokens, "eval": ev},
             "eval_bytes": ev * 4, "eval_chars": ev * 4}
    (folder / "index.json").write_text(json.dumps(index))


def child_train(args: argparse.Namespace) -> None:
    from drpruning.config import load_config
    from drpruning.training.trainer import train

    cfg = load_config(None, [f"run_dir={args.run}", f"model.source={args.model}",
                             f"data.domains={{big: {args.source}}}", "data.seq_len=256", "data.eval_sequences=8",
                             f"train.steps={args.steps}",
                             "train.batch_size=8", "train.micro_batch_size=8", "train.dtype=float32",
                             f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
                             "train.keep_checkpoints=1"])
    train(cfg)
    records = [json.loads(x) for x in (Path(args.run) / "metrics.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in records if r["kind"] == "train"]
    steps = [b - a for a, b in zip(times, times[1:])][2:]
    print(json.dumps({"rss_mb": peak_rss_bytes() / MB, "step_s": statistics.median(steps)}))


def bench_training(work: Path, sizes: list[int], steps: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from drpruning.data.prepared import tokenizer_fingerprint
    from drpruning.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model_dir = work / "model"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for n in sizes:
        data = work / f"synthetic-{n}"
        write_synthetic(data, n, len(tok), tokenizer_fingerprint(tok), 256)
        out = subprocess.run([sys.executable, __file__, "--child", "train", "--source", str(data), "--run",
                              str(work / f"run-{n}"), "--model", str(model_dir), "--steps", str(steps)],
                             check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        rows.append({"tokens": n, "file_gb": n * 2 / 1e9, **json.loads(out)})
        (data / "train.bin").unlink()  # the next size needs the disk
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-mb", type=int, default=64)
    ap.add_argument("--sizes", default="10M,100M,1B")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", help="working folder (default: a temporary one, removed)")
    ap.add_argument("--skip", choices=["tokenise", "train"], help="run only the other part")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for name in ("source", "cache", "run", "model"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "prepare":
        return child_prepare(args)
    if args.child == "train":
        return child_train(args)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.skip != "tokenise":
            rows = bench_tokenisation(work, args.text_mb)
            print("| processes | round | text MB | tokens | wall s | tokens/s | main peak RSS MB "
                  "| worker peak RSS MB |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['nproc']} | {r['round']} | {r['text_mb']:.0f} | {r['tokens']} | {r['wall_s']:.1f} | "
                      f"{r['tokens'] / r['wall_s']:.0f} | {r['main_rss_mb']:.0f} | {r['worker_rss_mb']:.0f} |")
            rate = {p: statistics.mean(r["tokens"] / r["wall_s"] for r in rows if r["nproc"] == p) for p in (1, 2)}
            print(f"\n2 processes / 1 process: {rate[2] / rate[1]:.2f}x tokens/s; "
                  f"identical files: {all(r['identical_to_first'] for r in rows)}\n")
        if args.skip != "train":
            rows = bench_training(work, [_parse_size(s) for s in args.sizes.split(",")], args.steps)
            print("| prepared tokens (synthetic) | file GB | training peak RSS MB | median step s |")
            print("|---|---|---|---|")
            for r in rows:
                print(f"| {r['tokens']:,} | {r['file_gb']:.2f} | {r['rss_mb']:.0f} | {r['step_s']:.3f} |")
            print(f"\nRSS, largest minus smallest corpus: {rows[-1]['rss_mb'] - rows[0]['rss_mb']:+.0f} MB; "
                  f"step time ratio: {rows[-1]['step_s'] / rows[0]['step_s']:.2f}")


if __name__ == "__main__":
    main()
