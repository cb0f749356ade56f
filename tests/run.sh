#!/usr/bin/env bash
# Install what the tests need (idempotent) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
