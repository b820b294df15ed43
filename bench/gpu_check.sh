#!/usr/bin/env bash
# GPU check for one GPU, expected under 10 minutes (not yet run: no GPU was available to write it; timeouts of
# 280 s and 300 s stop its two parts): pruning vs plain training steps on a random ~1B Llama
# (hidden 2048, 16 layers, 32 heads / 8 KV, FFN 5632, vocab 32000; built in-process, nothing downloaded) in
# bf16 autocast, one process under torchrun (NCCL initialisation included). Prints tokens/s of each and their
# ratio, peak CUDA memory against `drpruning plan`'s estimate, and the activation formula against what
# autograd saves on this GPU's attention kernel. See bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                       # on the GPU machine, from the checkout
#   GPU_CHECK_SHAPE=tiny bash bench/gpu_check.sh  # the same code on a tiny shape: a CPU dry run (gloo, float32)
#
# Python: $PYTHON, else .venv/bin/python, else python3 (with torch and transformers); drpruning from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
start=$(date +%s)
timeout 280 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_check.py
echo "gpu_check: $(( $(date +%s) - start )) s"
# train.compile: eager against compiled decoder layers (plain, L0-masked, one-shot + distillation steps of
# SmolLM2-135M's architecture, random weights), pairs alternating in one process; see bench/bench_compile.py
start=$(date +%s)
timeout 300 "$PY" bench/bench_train_step.py --compile --random-weights --steps 6 --batch 8 --seq 1024
echo "gpu_check compile: $(( $(date +%s) - start )) s"
