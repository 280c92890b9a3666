#!/usr/bin/env bash
# Create .venv with the project and its development tools. As root on Debian,
# first installs what is missing: python3-venv (and so Python), curl, shellcheck, busybox.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv python3-pip)
# curl: tests check the SimpleZFSKeySystem route the way ZFS's libcurl fetches it.
command -v curl >/dev/null || need+=(curl)
# ShellCheck lints the initramfs scripts in tests/test_initramfs_scripts.py.
command -v shellcheck >/dev/null || need+=(shellcheck)
# busybox: the initramfs scripts are also run under an initramfs's own shell.
command -v busybox >/dev/null || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing: ${need[*]} (install them, or run this as root on Debian)" >&2
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
