#!/usr/bin/env bash
# The fast test tier once more, on Debian 12's own Python and its packages of our
# dependencies (python3-cryptography, -gunicorn, -pyudev, -sdnotify, -psycopg,
# -prometheus-client): what the Debian packages run on, and the lower bounds of
# pyproject.toml's ranges. A virtual
# environment in build/floor sees the system's site-packages and adds only the test
# tools and this checkout. As root on Debian, first installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=/usr/bin/python3
packages=(python3-venv python3-cryptography python3-gunicorn python3-pyudev python3-sdnotify
    python3-psycopg python3-prometheus-client age postgresql prometheus)
bash scripts/need-debian-packages.sh "${packages[@]}"

venv=build/floor
[ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "pytest>=8" "pytest-mock>=3.12" "requests>=2.31"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
# The point of this tier: each dependency must be Debian's, not one pip brought along.
"$venv/bin/python" - <<'PY'
import importlib, sys
for name in ("cryptography", "gunicorn", "pyudev", "sdnotify", "psycopg", "prometheus_client"):
    module = importlib.import_module(name)
    where = module.__file__ or ""
    version = getattr(module, "__version__", "?")
    print(f"== {name} {version} from {where}", file=sys.stderr)
    if not where.startswith("/usr/lib/python3/dist-packages/"):
        sys.exit(f"{name} does not come from Debian's python3-{name}")
PY
echo "== pytest, fast tier, on Debian's dependencies" >&2
# Left out, beside the slow and VM tiers: what none of those dependencies is part of (the
# shell scripts of the initramfs, the systemd units, the initramfs race's console).
exec "$venv/bin/python" -m pytest -p no:cacheprovider -m "not slow and not vm" \
    --ignore=tests/bench --ignore=tests/vm --ignore=tests/deb \
    --ignore=tests/test_initramfs_scripts.py --ignore=tests/test_systemd_units.py \
    --ignore=tests/test_network_stacks.py --ignore=tests/agent/test_boot_race.py "$@"
