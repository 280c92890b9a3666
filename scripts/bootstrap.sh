#!/usr/bin/env bash
# Create .venv with the project and its development tools. Installs Debian's
# python3-venv first when this Python cannot make a virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing python3-venv" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
    else
        echo "python3 cannot create virtual environments; install python3-venv" >&2
        exit 69
    fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "Python 3.11 or newer is required" >&2; exit 69; }

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Re-install every time: cheap, and a changed pyproject.toml takes effect.
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[server,dev]'
