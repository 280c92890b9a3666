#!/usr/bin/env bash
# Build the Debian packages (debian/) from this checkout's files, tracked or new but not
# ignored, into build/deb/: dpkg-buildpackage -us -uc -b on a copy of the tree, then
# lintian, which must report no error and no warning. As root on Debian, first installs
# the build dependencies that are missing (debian/control's Build-Depends) and lintian.
set -euo pipefail
cd "$(dirname "$0")/.."

out=build/deb
tools=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
    dpkg-dev fakeroot lintian)
bash scripts/need-debian-packages.sh "${tools[@]}"

rm -rf "$out"
mkdir -p "$out/src"
git ls-files -z --cached --others --exclude-standard |
    xargs -0 -I{} sh -c 'test -e "{}" || test -L "{}" && printf "%s\0" "{}"' |
    tar --null -T - -cf - | tar -xf - -C "$out/src"
# Debian's own interpreter and tools, whatever else comes first on PATH (pyenv, a venv).
(cd "$out/src" && export PATH=/usr/sbin:/usr/bin:/sbin:/bin &&
    dpkg-checkbuilddeps && dpkg-buildpackage -us -uc -b)
rm -rf "$out/src"
ls -l "$out"/*.deb
# --fail-on: a warning fails the build too; each override in debian/*lintian-overrides
# says why.
lintian --fail-on error,warning --info "$out"/*.changes
