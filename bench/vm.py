"""docs/benchmarks-vm.md, from the data of the benchmark case bench_native_vs_agent, which
runs inside the real-OpenZFS test guest (tests/vm/guest/cases/bench_native_vs_agent.py).

tests/vm/test_real_zfs.py renders it after every run of that tier and writes it only when
ZUA_WRITE_BENCHMARKS=1, so an ordinary run never rewrites the tracked file.
"""

from __future__ import annotations

import re
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("native_1", "agent_1", "native_20", "agent_20")


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} s ({self.low:.2f}-{self.high:.2f})"


def summarize(values: Sequence[float]) -> Summary:
    return Summary(statistics.median(values), min(values), max(values))


def check_data(data: Mapping[str, Any]) -> None:
    """Raise ValueError unless DATA holds every measurement, each `rounds` times."""
    seconds = data.get("seconds", {})
    for kind in KINDS:
        values = seconds.get(kind)
        if not isinstance(values, list) or len(values) != data.get("rounds"):
            raise ValueError(f"{kind}: expected {data.get('rounds')} timings, got {values!r}")
    for kind in ("python_start", "agent_start"):
        if not seconds.get(kind):
            raise ValueError(f"{kind}: no timings")


@dataclass(frozen=True)
class Machine:
    kernel: str
    zfs_version: str
    host_cpus: int
    host_cpu_model: str
    date: str


def render(data: Mapping[str, Any], machine: Machine) -> str:
    check_data(data)
    times: Mapping[str, list[float]] = data["seconds"]
    s = {kind: summarize(values) for kind, values in times.items()}
    roots, rounds = int(data["roots"]), int(data["rounds"])
    many = f"{roots} roots"
    ratio_1 = s["agent_1"].median / s["native_1"].median
    ratio_n = s["agent_20"].median / s["native_20"].median
    per_native = (s["native_20"].median - s["native_1"].median) / (roots - 1)
    per_agent = (s["agent_20"].median - s["agent_1"].median) / (roots - 1)
    extra = s["agent_1"].median - s["native_1"].median
    start, python = s["agent_start"], s["python_start"]

    if per_native > per_agent:
        crossing = 1 + extra / (per_native - per_agent)
        verdict = (
            f"With these slopes the two lines cross at about {crossing:.0f} roots (a straight"
            " line through two points, so a rough figure): below it native ZFS is faster, above"
            " it the agent is."
        )
    else:
        verdict = "Here the agent's cost per root is not below native's, so native stays faster."
    if extra > 0:
        fixed = (
            f"For one root the agent takes {extra:.2f} s more than native ZFS"
            f" ({ratio_1:.1f} times its time). Python starting and importing the agent"
            f" (requests, urllib3, cryptography) alone takes {start.median:.2f} s"
            f" ({start.median / extra:.0%} of the difference; a bare `python3 -c pass`"
            f" {python.median:.2f} s), which emulation makes expensive; the rest is the"
            " agent's inventory (`zpool list`, and one `zfs list` of every dataset), the"
            " pinned mutual-TLS request and `zfs load-key` itself."
        )
    else:
        fixed = "For one root the agent is not slower than native ZFS here."
    faster_at_n = (
        f"at {roots} roots the agent takes {ratio_n:.2f} times native's time"
        if ratio_n < 1
        else f"at {roots} roots the agent still takes {ratio_n:.2f} times native's time"
    )

    last = f"{roots - 1:02d}"
    what_ran = table(
        ("", "native ZFS", "agent"),
        (
            "encryption roots",
            (
                f"`tank2/bn/n00`..`n{last}`: keyformat=raw,"
                " `keylocation=https://10.0.2.100:8443/MACHINE_ID/POOL_GUID/bench-nNN`, the key"
                " server's SimpleZFSKeySystem route (keys imported on the host with"
                " `zfs-unlock-server import-simplezfs`)"
            ),
            (
                f"`tank2/ba/a00`..`a{last}`: keyformat=raw, keylocation=prompt,"
                " `zfs-unlock-agent:managed=on`, an active key on the server each (the state"
                " `enroll` leaves)"
            ),
        ),
        (
            "trusting the server",
            (
                f"its certificate appended to the guest's trust store `{data['trust_store']}`"
                f" ({data['trust_store_certificates']} certificates), libcurl's default CA file;"
                " no `SSL_CA_CERT_FILE`"
            ),
            "the pin of its public key in `agent.toml`",
        ),
        (
            "client identity",
            "`SSL_CLIENT_CERT_FILE`, `SSL_CLIENT_KEY_FILE` in the environment of `zfs`",
            "`[client]` certificate and key in `agent.toml`",
        ),
        (
            "1 root",
            "`zfs load-key tank2/bn/n00`",
            "`zfs-unlock-agent unlock --no-mount --dataset tank2/ba/a00`",
        ),
        (
            many,
            (
                f"`{data['native_all']}`: the {roots} were the only locked encryption roots in the"
                f' system, and it had to report "{roots} / {roots} key(s) successfully loaded"'
            ),
            f"`zfs-unlock-agent unlock --no-mount` with {roots} `--dataset`",
        ),
        (
            "on the wire",
            "one TLS connection and request per root",
            "one TLS connection, one batch request for every root",
        ),
    )
    raw_rows = "\n".join(
        f"| {kind} | " + " | ".join(f"{v:.3f}" for v in times[kind]) + " |" for kind in KINDS
    )
    header = "| | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |"
    rule = "|---|" + "---|" * rounds
    setup = data.get("setup_seconds", {})

    return reflow(f"""# Benchmarks in the test VM

<!-- Written by the real-OpenZFS tier: ZUA_WRITE_BENCHMARKS=1 .venv/bin/pytest -q tests/vm
     (the benchmark case tests/vm/guest/cases/bench_native_vs_agent.py; renderer
     bench/vm.py). Edit those, not this file. -->

## Native `keylocation=https://` against the agent, in the test guest

> **These are timings in a software-emulated guest** (QEMU TCG, no KVM): every guest
> instruction, kernel and user space, is translated and emulated, so everything runs
> many times slower than on real hardware, and not uniformly so. The ratio between the
> columns is the result; the seconds are not what a real host sees. The benchmark
> suite `bench/` measures on the host, without emulation: [benchmarks.md](benchmarks.md).

Measured {machine.date}, as the last scenario of one boot of the real-OpenZFS tier
([tests/vm](../tests/vm/README.md)).

| roots | native ZFS, median (min-max) | agent, median (min-max) | agent / native |
|---|---|---|---|
| 1 | {s["native_1"]} | {s["agent_1"]} | {ratio_1:.2f} |
| {roots} | {s["native_20"]} | {s["agent_20"]} | {ratio_n:.2f} |

{rounds} runs of each, wall-clock time of the whole command (process start-up included on
both sides), keys loaded only (neither side mounts). Per extra root (the {roots}-root
median less the 1-root median, over {roots - 1}): native {per_native:.3f} s, agent
{per_agent:.3f} s. The agent's start-up alone, median of {len(times["agent_start"])}:
`python3 -c pass` {python.median:.2f} s, `zfs-unlock-agent --version` (the interpreter
plus the agent's imports, no work) {start.median:.2f} s.

### What ran

{what_ran}

Rounds were interleaved (native 1, agent 1, agent {roots}, native {roots}), the keys
unloaded between commands. The agent ran as an operator runs it, `python3 -m
zfs_unlock_agent -c /etc/zfs-unlock-agent/agent.toml`, its bytecode already compiled
by the scenarios before. {data["datasets"]} datasets existed in the guest; both sides
list them (the agent's inventory, `zfs load-key -a`'s walk). Set-up, not timed above:
{setup.get("legacy_imports", 0):.0f} s for the host to import {roots} keys,
{setup.get("native_create", 0):.0f} s to create the native roots (each fetches its key),
{setup.get("agent_import", 0):.0f} s to create the agent's and import their keys.

### The machine

- Guest: QEMU TCG (multi-threaded), {data["cpus"]} vCPUs, 1 GiB; Debian's kernel
  {machine.kernel}; OpenZFS {machine.zfs_version} (Debian bookworm-backports, DKMS);
  Debian 12's Python {data["python"]} for the agent and its libcurl for ZFS.
- The key server: gunicorn, 2 workers, on the host's 127.0.0.1, reached through QEMU's
  user network and a relay process per connection, on the same {machine.host_cpus}
  CPUs ({machine.host_cpu_model}) as the emulator.
- Disks: sparse files on the host (virtio-blk, cache=unsafe); pool `tank2` of 1 GiB.

### Raw timings (seconds)

{header}
{rule}
{raw_rows}

### Reading it

- **The agent's fixed cost.** {fixed}
- **The cost per root.** Native ZFS fetches each key on its own: libzfs opens a new
  libcurl handle per root, so every root costs a TCP connection, a full TLS handshake
  with the client certificate and a request: {per_native:.2f} s per root here. The
  agent asks for every key in one request over one connection and then runs one `zfs
  load-key` per root: {per_agent:.2f} s per root. So {faster_at_n}. {verdict}
- **What the fixed cost buys.** The server is checked against a pinned public key, not
  against whatever the trust store accepts (the native side needed the server's
  certificate in the system-wide trust store, where every program trusts it, or a CA
  file in the environment of every `zfs` call); the client certificate and key come
  from the agent's configuration, not from environment variables; one TLS handshake
  serves all roots; redirects are refused (libzfs tells libcurl to follow them);
  failures are retried with backoff within a deadline, across several servers, and the
  exit status and log say which roots failed and why; keys reach `zfs` on standard
  input only (libzfs downloads each into an unlinked temporary file in `$TMPDIR`);
  roots are found by a property, not by a URL stored in each dataset.
- **How far to trust it.** One boot, {rounds} runs each, in an emulator that shares its
  {machine.host_cpus} CPUs with the key server; the min-max spread shows the noise.
  Without emulation both sides get faster, but not equally (Python's start-up is among
  what emulation slows most), so the ratios may move as well; `bench/` measures that
  on the host ([benchmarks.md](benchmarks.md)).
""")


def table(header: Sequence[str], *rows: Sequence[str]) -> str:
    """A Markdown table, laid out as the other documents' tables are."""
    lines = [
        "|" + "".join(f" {cell} |" if cell else " |" for cell in cells) for cells in (header, *rows)
    ]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines)


def reflow(markdown: str, width: int = 90) -> str:
    """Re-wrap plain paragraphs and list items to WIDTH; leave headings, tables, quotes,
    comments and blank lines as they are."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if block:
            # a number stays on the line of its unit: "0.13 s", never "0.13" / "s"
            text = re.sub(r"(\d) s\b", "\\1\0s", " ".join(line.strip() for line in block))
            indent = "  " if text.startswith("- ") else ""
            wrapped = textwrap.wrap(
                text,
                width,
                subsequent_indent=indent,
                break_on_hyphens=False,
                break_long_words=False,
            )
            out.extend(line.replace("\0", " ") for line in wrapped)
            block.clear()

    in_comment = False
    for line in markdown.splitlines():
        verbatim = in_comment or not line.strip() or line.startswith(("#", "|", ">", "<!--"))
        in_comment = (in_comment or line.startswith("<!--")) and "-->" not in line
        if verbatim:
            flush()
            out.append(line)
        elif line.startswith("- "):
            flush()
            block.append(line)
        else:
            block.append(line)
    flush()
    return "\n".join(out) + "\n"
