#!/usr/bin/env bash
# Train on several machines: run this once on every node, with the same settings except NODE_RANK.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_ID=ebft70b GPUS=8 \
#     bash examples/train_multi_node.sh CONFIG [section.key=value ...]
#
# Environment (all required except GPUS and PYTHON):
#   NNODES       number of nodes
#   NODE_RANK    this node's index, 0 .. NNODES-1
#   MASTER_ADDR  address of the node that hosts the rendezvous (any node all others can reach)
#   MASTER_PORT  a free TCP port on MASTER_ADDR
#   RUN_ID       the same string on every node, different for every job (e.g. the Slurm job id)
#   GPUS         processes per node (default 8)
#   PYTHON       interpreter with torch and this package (default ./.venv/bin/python, else python3)
#   MAX_RESTARTS times torchrun restarts the job after a process or node fails or a stall is detected;
#                each restart resumes from the last checkpoint in train.save (default 3, 0 = off)
#   SKIP_CHECK   1: skip the check of settings, checkpoints and data before launching
# examples/train_slurm.sbatch sets all of these from Slurm's variables.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
CONFIG=$1
shift

# Say every missing variable at once: a node that dies here would otherwise leave the other nodes
# waiting in the rendezvous until its timeout.
missing=()
for name in NNODES NODE_RANK MASTER_ADDR MASTER_PORT RUN_ID; do
  [[ -n ${!name:-} ]] || missing+=("$name")
done
if (( ${#missing[@]} )); then
  echo "error: set ${missing[*]} in the environment (see the top of $0); e.g." >&2
  echo "  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_ID=job1 bash $0 $CONFIG" >&2
  exit 2
fi
GPUS=${GPUS:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
for name in NNODES NODE_RANK MASTER_PORT GPUS MAX_RESTARTS; do
  [[ ${!name} =~ ^[0-9]+$ ]] || { echo "error: $name must be a whole number, got '${!name}'" >&2; exit 2; }
done
(( NODE_RANK < NNODES )) || { echo "error: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2; exit 2; }
[[ -f $CONFIG ]] || { echo "error: config file $CONFIG does not exist" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Settings, checkpoints and data are checked here, before the rendezvous, so that a bad configuration
# stops every node with one error line instead of one traceback per process.
if [[ ${SKIP_CHECK:-0} != 1 ]]; then
  "$PYTHON" -m ebft_megatron.train --check --gpus $((GPUS * NNODES)) --config "$CONFIG" "$@" || exit $?
fi

# c10d rendezvous: the agent on MASTER_ADDR hosts a TCP store that every node's agent joins, so the
# job needs no shared file system and a restarted node rejoins under the same RUN_ID. Under c10d,
# torchrun numbers the nodes itself (sorted by host name) and warns that --node_rank is ignored;
# NODE_RANK is still required and passed so that each node's command says which node it is meant
# to be, and so that switching to --rdzv-backend=static (fixed node ranks) needs no other change.
# Rank order inside a node is consecutive, and megatron builds tensor-parallel groups from
# consecutive ranks, so TP <= GPUS keeps tensor parallelism on the node's own links.
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID" \
  -m ebft_megatron.train --config "$CONFIG" "$@"
