#!/usr/bin/env bash
# The whole test suite: lint, strict type check, every test. Exit status is the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== import contracts (pyproject.toml [tool.importlinter])" >&2
.venv/bin/lint-imports --no-cache
echo "== mypy --strict" >&2
.venv/bin/mypy -p zfs_unlock_common -p zfs_unlock_agent -p zfs_unlock_server
.venv/bin/mypy tests scripts bench
# libfaketime: tests that move a program's wall clock (tests/faketime.py); age: the
# recovery kit's and master-key export's tests run the real age and age-keygen;
# postgresql: the key server's PostgreSQL tests start their own throwaway clusters
# (tests/postgres.py) with Debian's server; prometheus: its promtool checks a live scrape
# of the key server's metrics; logrotate: the package's configuration, on a live audit log;
# chromium, its driver and NSS's tools: the approval page, used in a headless browser.
bash scripts/need-debian-packages.sh libfaketime age postgresql prometheus logrotate \
    chromium chromium-driver libnss3-tools
echo "== pytest" >&2
.venv/bin/pytest "$@"
# The whole suite (no arguments) also runs the fast tier on Debian 12's dependencies.
if [ $# -eq 0 ]; then
    echo "== pytest on Debian 12's python3-cryptography, -gunicorn, -pyudev, -sdnotify, -psycopg," \
        "-prometheus-client" >&2
    bash scripts/floor.sh -q
fi
