#!/usr/bin/env bash
# The main job: set up (.venv), then the full demo (scripts/demo.py): a key server on
# embedded defaults unlocks real encrypted ZFS datasets, here or in a QEMU VM.
# Usage: bash scripts/demo.sh [--vm]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
