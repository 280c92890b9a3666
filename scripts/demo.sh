#!/usr/bin/env bash
# The main job: set up, then run the full flow on embedded defaults (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py
