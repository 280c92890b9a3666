#!/usr/bin/env bash
# The benchmark suite's one entry point (make bench; make bench-quick passes --quick):
# the virtual environment, the baselines and helpers, then every benchmark and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash bench/prepare.sh
exec .venv/bin/python -m bench "$@"
