#!/usr/bin/env bash
# need-debian-packages.sh PACKAGE...: install those of Debian's PACKAGEs that are missing
# (as root, with apt-get); exit 69 naming them when that cannot be done.
set -euo pipefail
missing=()
for package in "$@"; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$package")
done
[ ${#missing[@]} -gt 0 ] || exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
else
    echo "missing: ${missing[*]} (install them, or run this as root on Debian)" >&2
    exit 69
fi
