#!/usr/bin/env bash
# Train on one machine: one process per GPU under torchrun.
#
#   bash examples/train_single_node.sh CONFIG [section.key=value ...]
#   GPUS=4 bash examples/train_single_node.sh examples/ebft_qwen2.5_7b.yaml parallel.tp=4 train.steps=200
#
# Environment: GPUS (processes, default 8), PYTHON (interpreter that has torch and this package;
# default ./.venv/bin/python when it exists, else python3), MAX_RESTARTS (times torchrun restarts the
# job after a process dies or a stall is detected; each restart resumes from the last checkpoint in
# train.save; default 3, 0 = off), SKIP_CHECK=1 (skip the check before launching).
# Run it from the repository root, or anywhere else: relative paths in the config and in the
# overrides are read from the current folder, not from the script's.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
CONFIG=$1
shift
[[ -f $CONFIG ]] || { echo "error: config file $CONFIG does not exist" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# The package is imported from this checkout even when the interpreter has no editable install.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

MAX_RESTARTS=${MAX_RESTARTS:-3}
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || { echo "error: MAX_RESTARTS must be a whole number, got '$MAX_RESTARTS'" >&2; exit 2; }

# Settings, checkpoints and data are checked once here, so that a bad configuration stops with one
# error line before torchrun starts a process per GPU.
if [[ ${SKIP_CHECK:-0} != 1 ]]; then
  "$PYTHON" -m ebft_megatron.train --check --gpus "${GPUS:-8}" --config "$CONFIG" "$@" || exit $?
fi

# --standalone: a private rendezvous on a free local port, so two jobs on one machine never clash.
# `python -m torch.distributed.run` is torchrun, taken from the chosen interpreter (a bare
# `torchrun` on PATH may belong to another environment).
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="${GPUS:-8}" --max-restarts="$MAX_RESTARTS" \
  -m ebft_megatron.train --config "$CONFIG" "$@"
