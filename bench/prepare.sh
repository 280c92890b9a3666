#!/usr/bin/env bash
# What the benchmarks need besides the virtual environment (.venv, which
# scripts/bootstrap.sh makes): Debian's baselines (nginx, tang, clevis, jose, curl),
# systemd-socket-activate for tangd, GNU time, the compiler and OpenSSL headers; then the
# C helpers (in build/bench). Installs only what is missing (as root on Debian), builds
# only what is older than its source. The one place the benchmarks' packages are listed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/libexec/tangd ] || need+=(tang)
command -v clevis >/dev/null || need+=(clevis)
command -v jose >/dev/null || need+=(jose)
command -v curl >/dev/null || need+=(curl)
# GNU time: the peak RSS of a measured command (bench/common.py run_measured).
[ -x /usr/bin/time ] || need+=(time)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        # Installing nginx starts Debian's own instance on port 80; the benchmark runs its
        # own and wants no other on the CPUs. -s quit signals only the packaged one's pid.
        if [ -f /run/nginx.pid ]; then /usr/sbin/nginx -s quit || true; fi
    else
        echo "missing: ${need[*]} (install them, or run this as root on Debian)" >&2
        exit 69
    fi
fi

# The same place bench/common.py looks (ZUA_BENCH_BUILD, or build/bench).
out=${ZUA_BENCH_BUILD:-build/bench}
mkdir -p "$out"
build() {  # build OUTPUT SOURCE LIBS...: when OUTPUT is missing or older than SOURCE
    local output=$1 source=$2
    shift 2
    if [ ! -x "$output" ] || [ "$source" -nt "$output" ]; then
        echo "== building $output" >&2
        gcc -O2 -Wall -Wextra -Werror -o "$output" "$source" "$@"
    fi
}
build "$out/loadgen" bench/loadgen.c -lssl -lcrypto -lpthread
# The fake zfs is built by the code that runs it, with its flags (static: no loader work).
ZUA_BENCH_BUILD=$out .venv/bin/python -c 'from bench.agent import ensure_fakezfs; ensure_fakezfs()'
