"""The agent's side: a cold `zfs-unlock-agent unlock` measured from process start to the
last key piped into zfs, against clevis (the other network unlock) and curl (the floor:
one pinned mutual-TLS request, nothing else), with the agent's peak memory.

ZFS itself is replaced by bench/fakezfs.c, which answers from canned output and drains
each key from its stdin, so only the agent's own work is timed. Rounds are interleaved
(every kind once per round, the order rotated) so that a noisy moment hits all alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zfs_unlock_agent
import zfs_unlock_common
from bench import baselines
from bench.common import (
    AGENT_BIN,
    BUILD,
    REPO,
    Host,
    KeyServer,
    Timed,
    plain_install,
    ratio,
    release_request,
    run_measured,
    summarize,
)
from zfs_unlock_agent.zfs import LIST_COLUMNS, MANAGED_PROPERTIES
from zfs_unlock_common.protocol import ROUTE_RELEASE_BATCH

FAKEZFS_SOURCE = REPO / "bench" / "fakezfs.c"
FAKEZFS_BUILD = ("gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-static")
ROOTS_MANY = 100
FULL_ROUNDS = 10
QUICK_ROUNDS = 3
WARMUP_ROUNDS = 1  # compiles bytecode, fills the page cache; an operator's host has both
RAW_KEY_BYTES = 32
TOP_IMPORTS = 8

# The agent's targets (the Targets table of docs/benchmarks.md).
TARGET_VS_CLEVIS = 0.8
TARGET_MANY_VS_ONE = 1.3
TARGET_RSS_KIB = 35 * 1024


@dataclass
class AgentResults:
    """Raw measurements, one entry per round unless said otherwise.

    agent_1, agent_many: seconds of `zfs-unlock-agent -c CONFIG unlock --no-mount` from a
        regular install of the agent (ensure_installed_agent) for a host with 1 and with
        ROOTS_MANY (100) locked, managed encryption roots: process start to exit, after
        every key went into the fake zfs.
    agent_1_editable: the same as agent_1 with the development venv's `zfs-unlock-agent`,
        an editable install, whose import hook runs from site at every start.
    clevis: seconds of `clevis decrypt < JWE` of a secret bound to tangd (cold).
    curl: seconds of one curl fetching one key from the key server with the agent's
        request (pinned key, client certificate).
    agent_rss, agent_many_rss, curl_rss, clevis_rss: peak resident set in KiB of the same
        runs, as GNU time reports it (common.run_measured): the largest of the process and
        of the children it waited for (fake zfs, or clevis's jose and curl).
    python_start: seconds of `python -c pass` with the installed agent's interpreter
        (site included).
    agent_version: seconds of the installed `zfs-unlock-agent --version`: the interpreter
        and every module the command line imports, no work.
    imports: the top-level modules the unlock path imports, slowest first, as (name,
        cumulative milliseconds) from one `python -X importtime` unlock of 1 root.
    process_start: seconds one start of the fake zfs costs, to its exit and reaping, one
        after another (the mean of 100, once per round): what the kernel charges for each
        root's `zfs load-key` whatever the agent does.
    """

    rounds: int
    roots_many: int
    agent_1: list[float] = field(default_factory=list)
    agent_many: list[float] = field(default_factory=list)
    agent_1_editable: list[float] = field(default_factory=list)
    clevis: list[float] = field(default_factory=list)
    curl: list[float] = field(default_factory=list)
    agent_rss: list[int] = field(default_factory=list)
    agent_many_rss: list[int] = field(default_factory=list)
    curl_rss: list[int] = field(default_factory=list)
    clevis_rss: list[int] = field(default_factory=list)
    python_start: list[float] = field(default_factory=list)
    agent_version: list[float] = field(default_factory=list)
    imports: list[tuple[str, float]] = field(default_factory=list)
    process_start: list[float] = field(default_factory=list)

    @property
    def agent_100(self) -> list[float]:
        """agent_many under the name the targets use (ROOTS_MANY is 100)."""
        return self.agent_many


# The agent as a host installs it


# The entry point pyproject.toml names ([project.scripts]), as an installer writes it.
# What pip and dh-python write for pyproject's [project.scripts] entry.
ENTRY_POINT = "#!{python}\nimport sys\nfrom zfs_unlock_agent.cli import run\nsys.exit(run())\n"


def ensure_installed_agent(build: Path = BUILD) -> Path:
    """BUILD/agent-installed: a virtual environment holding a regular copy of the agent's
    packages (what `pip install` or a Debian package leaves), made afresh from this
    checkout, with the `zfs-unlock-agent` command; returns that command. The unlock path
    imports nothing from other packages.
    The development venv holds the project as an editable install, whose import hook
    (a .pth file) runs from site at every start of its interpreter; no host has it."""
    venv = build / "agent-installed"
    shutil.rmtree(venv, ignore_errors=True)
    packages = [Path(p.__file__ or "").parent for p in (zfs_unlock_agent, zfs_unlock_common)]
    python = plain_install(venv, packages)
    subprocess.run([str(python), "-I", "-m", "compileall", "-q", str(venv)], check=True)
    command = venv / "bin" / "zfs-unlock-agent"
    command.write_text(ENTRY_POINT.format(python=python))
    command.chmod(0o755)
    return command


# The fake zfs


def ensure_fakezfs(build: Path = BUILD) -> Path:
    """BUILD/fakezfs, compiled when missing or older than its source (bench/prepare.sh
    builds it first; this keeps a standalone run and the tests working). Static: no
    dynamic loader runs at each of the 100 starts a 100-root unlock makes, so what is
    left per root is the agent's own work and the kernel's process start."""
    binary = build / "fakezfs"
    if not binary.exists() or binary.stat().st_mtime < FAKEZFS_SOURCE.stat().st_mtime:
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run([*FAKEZFS_BUILD, "-o", str(binary), str(FAKEZFS_SOURCE)], check=True)
    return binary


def zfs_list_line(name: str, guid: str, managed: bool = True) -> str:
    """One line of the agent's `zfs list -H -p -o ...` (zfs.LIST_COLUMNS, in its order): an
    encryption root with keyformat=raw, keylocation=prompt and its key not loaded; a managed
    one as enroll leaves it."""
    values = {
        "name": name,
        "type": "filesystem",
        "guid": guid,
        "encryptionroot": name,  # itself
        "keystatus": "unavailable",
        "keyformat": "raw",
        "keylocation": "prompt",
        "mounted": "no",
        "canmount": "on",
        "mountpoint": f"/{name}",
        **{prop: value if managed else "-" for prop, value in MANAGED_PROPERTIES.items()},
    }
    return "\t".join(values[column] for column in LIST_COLUMNS) + "\n"


@dataclass(frozen=True)
class AgentHost:
    """A directory that is one ZFS host for the agent: agent.toml, machine-id, the fake
    zfs and zpool (links to fakezfs), their canned answers and their call log."""

    directory: Path
    host: Host
    command: Path  # the installed agent's zfs-unlock-agent (ensure_installed_agent)

    @classmethod
    def create(
        cls, directory: Path, host: Host, server: KeyServer, fakezfs: Path, command: Path
    ) -> AgentHost:
        bin_dir = directory / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in ("zfs", "zpool"):
            link = bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(fakezfs)
        # Each of the server's datasets as a root in the pool its GUID says.
        pools = {ref.pool_guid: f"pool{ref.pool_guid}" for ref in host.refs}
        (bin_dir / "zpool-list.out").write_text(
            "".join(f"{name}\t{guid}\n" for guid, name in pools.items())
        )
        (bin_dir / "zfs-list.out").write_text(
            "".join(
                zfs_list_line(f"{pools[ref.pool_guid]}/d{index:03d}", ref.dataset_guid)
                for index, ref in enumerate(host.refs)
            )
        )
        (directory / "machine-id").write_text(host.machine_id + "\n")
        (directory / "agent.toml").write_text(
            f'machine_id_file = "{directory / "machine-id"}"\n\n'
            "[[server]]\n"
            f'url = "https://127.0.0.1:{server.port}"\n'
            f'pins = ["{server.pin}"]\n\n'
            "[client]\n"
            f'certificate = "{host.cert}"\n'
            f'key = "{host.key}"\n\n'
            "[datasets]\n"
            "property = true\n\n"
            "[zfs]\n"
            f'zfs = "{bin_dir / "zfs"}"\n'
            f'zpool = "{bin_dir / "zpool"}"\n'
        )
        return cls(directory, host, command)

    @property
    def config(self) -> Path:
        return self.directory / "agent.toml"

    @property
    def calls(self) -> Path:
        return self.directory / "bin" / "calls.log"

    @property
    def log(self) -> Path:
        return self.directory / "agent.log"

    def argv(self) -> list[str]:
        """As an operator or the systemd unit runs it; keys only (mounting is not the
        comparison)."""
        return [str(self.command), *self.arguments()]

    def editable_argv(self) -> list[str]:
        """The same from the development venv's editable install."""
        return [str(AGENT_BIN), *self.arguments()]

    def arguments(self) -> list[str]:
        return ["-c", str(self.config), "unlock", "--no-mount"]

    def take_calls(self) -> list[str]:
        """The fake zfs's calls since the last take."""
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        self.calls.write_text("")
        return lines

    def check_every_key_loaded(self) -> None:
        """Fail unless the last run piped a 32-byte key into zfs for every root, once."""
        loads = [line.split() for line in self.take_calls() if " load-key " in line]
        loaded = sorted(fields[-2] for fields in loads if fields[-1] == str(RAW_KEY_BYTES))
        expected = sorted(f"pool{r.pool_guid}/d{i:03d}" for i, r in enumerate(self.host.refs))
        if loaded != expected or len(loads) != len(expected):
            raise RuntimeError(
                f"{self.directory.name}: {len(loaded)} of {len(expected)} keys loaded;"
                f" see {self.log}"
            )


# The runs


def curl_argv(server: KeyServer, host: Host, body: Path) -> list[str]:
    """Debian's curl making the agent's release request for one key. -k because, like
    the agent, it trusts no CA: --pinnedpubkey is checked all the same (a wrong pin fails
    with exit 90), and the client certificate is presented."""
    return [
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "-k",
        "--pinnedpubkey",
        server.pin,
        "--cert",
        str(host.cert),
        "--key",
        str(host.key),
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
        "--data-binary",
        f"@{body}",
        f"https://127.0.0.1:{server.port}{ROUTE_RELEASE_BATCH}",
    ]


def release_body(host: Host) -> bytes:
    """The agent's JSON body (common.release_request without the HTTP head)."""
    return release_request(host).split(b"\r\n\r\n", 1)[1]


def _checked(timed: Timed, what: str, log: Path | None = None) -> Timed:
    if timed.returncode != 0:
        where = f"; see {log}" if log else ""
        raise RuntimeError(f"{what} exited {timed.returncode}{where}")
    return timed


def _quiet_run(argv: Sequence[str | Path], log: Path, stdin_path: Path | None = None) -> Timed:
    """run_measured with the child's stderr in LOG: the agent logs a line per root."""
    return run_measured(argv, stdin_path=stdin_path, stderr_path=log)


def process_start_seconds(agent: AgentHost, count: int = 100) -> float:
    """The mean time to start the fake zfs, have it exit and reap it, COUNT times in a
    row, its output discarded."""
    zfs = str(agent.directory / "bin" / "zfs")
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        start = time.perf_counter()
        for _ in range(count):
            pid = os.posix_spawn(
                zfs, [zfs, "list"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)]
            )
            os.waitpid(pid, 0)
        return (time.perf_counter() - start) / count
    finally:
        os.close(devnull)
        agent.take_calls()


def top_imports(stderr: str, count: int = TOP_IMPORTS) -> list[tuple[str, float]]:
    """The packages with the largest import time in `python -X importtime` output, as (name,
    milliseconds): each package's cumulative time where something outside it imported it
    (what it imports from other packages included), the agent's own package left out."""
    pattern = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$")
    entries = []  # (depth, package, microseconds), in the order Python finished them
    for line in stderr.splitlines():
        if match := pattern.match(line):
            depth = len(match.group(2)) // 2
            entries.append((depth, match.group(3).split(".")[0], int(match.group(1))))
    totals: dict[str, int] = {}
    parents: list[tuple[int, str]] = []  # the enclosing imports; a parent follows its children
    for depth, package, micros in reversed(entries):
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if not parents or parents[-1][1] != package:
            totals[package] = totals.get(package, 0) + micros
        parents.append((depth, package))
    totals.pop("zfs_unlock_agent", None)
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return [(package, micros / 1000) for package, micros in ranked]


def importtime(agent: AgentHost) -> list[tuple[str, float]]:
    completed = subprocess.run(
        [str(agent.command.parent / "python"), "-X", "importtime", *agent.argv()],
        check=False,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the -X importtime unlock exited {completed.returncode}")
    agent.check_every_key_loaded()
    return top_imports(completed.stderr)


def run(root: Path, server: KeyServer, tang: baselines.Tang, quick: bool) -> AgentResults:
    """Measure everything AgentResults holds. SERVER may be serving already; if not, it
    serves for the duration. Hosts bench-agent-1, bench-agent-many and bench-curl are
    enrolled in it."""
    with contextlib.ExitStack() as stack:
        if server.process is None:
            stack.enter_context(server.serving())
        return _measure(root, server, tang, QUICK_ROUNDS if quick else FULL_ROUNDS)


@dataclass
class _Kind:
    """One thing measured each round: how to run it, where its stderr goes, how to prove
    it did the whole job, and which lists its seconds and peak RSS go to."""

    name: str
    argv: list[str]
    log: Path
    seconds: list[float]
    rss: list[int]
    stdin: Path | None = None
    check: Callable[[], None] = lambda: None

    def once(self) -> None:
        timed = _checked(_quiet_run(self.argv, self.log, self.stdin), self.name, self.log)
        self.check()
        self.seconds.append(timed.seconds)
        self.rss.append(timed.max_rss_kib)


def _measure(root: Path, server: KeyServer, tang: baselines.Tang, rounds: int) -> AgentResults:
    root.mkdir(parents=True, exist_ok=True)
    fakezfs = ensure_fakezfs()
    command = ensure_installed_agent()
    one = AgentHost.create(
        root / "agent-1", server.add_hosts(["bench-agent-1"])[0], server, fakezfs, command
    )
    many_host = server.add_hosts(["bench-agent-many"], datasets_per_host=ROOTS_MANY)[0]
    many = AgentHost.create(root / "agent-many", many_host, server, fakezfs, command)
    curl_host = server.add_hosts(["bench-curl"])[0]
    body = root / "release.json"
    body.write_bytes(release_body(curl_host))
    jwe = root / "secret.jwe"
    baselines.clevis_bind(tang, secrets.token_bytes(RAW_KEY_BYTES), jwe)
    results = AgentResults(rounds, ROOTS_MANY)
    kinds = [
        _Kind(
            "agent (1 root)",
            one.argv(),
            one.log,
            results.agent_1,
            results.agent_rss,
            check=one.check_every_key_loaded,
        ),
        _Kind(
            "agent (1 root, editable install)",
            one.editable_argv(),
            one.log,
            results.agent_1_editable,
            [],
            check=one.check_every_key_loaded,
        ),
        _Kind(
            "clevis decrypt",
            baselines.clevis_decrypt_argv(),
            root / "clevis.log",
            results.clevis,
            results.clevis_rss,
            stdin=jwe,
        ),
        _Kind(
            "curl",
            curl_argv(server, curl_host, body),
            root / "curl.log",
            results.curl,
            results.curl_rss,
        ),
        _Kind(
            f"agent ({ROOTS_MANY} roots)",
            many.argv(),
            many.log,
            results.agent_many,
            results.agent_many_rss,
            check=many.check_every_key_loaded,
        ),
    ]
    for number in range(WARMUP_ROUNDS + rounds):
        shift = number % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            kind.once()
        if number < WARMUP_ROUNDS:
            for kind in kinds:
                kind.seconds.clear()
                kind.rss.clear()

    python_start = [str(command.parent / "python"), "-c", "pass"]
    version = [str(command), "--version"]
    for _ in range(rounds):
        results.python_start.append(_checked(run_measured(python_start), "python -c pass").seconds)
        results.agent_version.append(_checked(run_measured(version), "agent --version").seconds)
        results.process_start.append(process_start_seconds(many))
    results.imports = importtime(one)
    return results


# The report's section


def _ms(values: Sequence[float]) -> str:
    return summarize([v * 1000 for v in values]).text(" ms")


def _mib(values: Sequence[int]) -> str:
    return summarize([v / 1024 for v in values]).text(" MiB")


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _against(value: float, target: float, unit: str = "") -> str:
    verdict = "met" if value <= target else "**missed**"
    return f"<= {target:g}{unit}: {verdict}"


def _per_root(results: AgentResults) -> str:
    """What each root beyond the first costs, against what starting a process costs."""
    n = results.roots_many
    one, many = summarize(results.agent_1).median, summarize(results.agent_many).median
    per_root = (many - one) / (n - 1) * 1000
    text = (
        f"Each root beyond the first costs the agent {per_root:.2f} ms: its key comes in the"
        f" same answer, and it needs its own `zfs load-key` process (zfs reads one key per"
        f" run); the agent runs several at once."
    )
    if results.process_start:
        start = summarize(results.process_start).median * 1000
        allowed = (TARGET_MANY_VS_ONE - 1) * one / (n - 1) * 1000
        text += (
            f" Starting the fake zfs, letting it exit and reaping it takes {start:.2f} ms here"
            f" one after another, on {os.cpu_count()} CPUs; the {TARGET_MANY_VS_ONE:g}x target"
            f" leaves {allowed:.2f} ms per root."
        )
    return text


def render_markdown(results: AgentResults) -> str:
    """The agent's section of docs/benchmarks.md: medians (min-max), ratios of medians
    with the targets, the slowest imports."""
    one, many = summarize(results.agent_1).median, summarize(results.agent_many).median
    clevis, curl = summarize(results.clevis).median, summarize(results.curl).median
    rss = summarize(results.agent_rss).median
    curl_rss = summarize(results.curl_rss).median
    n = results.roots_many
    imports = "; ".join(f"`{name}` {ms:.1f} ms" for name, ms in results.imports)
    lines = [
        "## Unlocking: the agent against clevis and curl",
        "",
        (
            f"Each a new process, {results.rounds} interleaved rounds after one warm-up round;"
            " median (min-max). ZFS is a stand-in that answers from canned output and drains"
            " each key (bench/fakezfs.c), so the agent's own work is what is timed. The agent"
            " runs from a regular install of its packages (what pip or a Debian package"
            " leaves) through its entry point; the development venv's editable install adds"
            " an import hook that site runs at every start."
        ),
        "",
        _row("what", "wall time", "peak RSS"),
        _row("---", "---", "---"),
        _row(
            "agent, 1 root: `zfs-unlock-agent unlock --no-mount`",
            _ms(results.agent_1),
            _mib(results.agent_rss),
        ),
        *(
            # Runs saved before this row was measured have none.
            [
                _row(
                    "the same from the development venv (an editable install)",
                    _ms(results.agent_1_editable),
                    "",
                )
            ]
            if results.agent_1_editable
            else []
        ),
        _row(
            f"agent, {n} roots: one request, {n} `zfs load-key`",
            _ms(results.agent_many),
            _mib(results.agent_many_rss),
        ),
        _row(
            "clevis: `clevis decrypt` of a secret bound to tangd",
            _ms(results.clevis),
            _mib(results.clevis_rss),
        ),
        _row(
            "curl: one key, the agent's request, pinned, client certificate",
            _ms(results.curl),
            _mib(results.curl_rss),
        ),
        _row("`python -c pass`, the agent's interpreter", _ms(results.python_start), ""),
        _row(
            "`zfs-unlock-agent --version`: its imports, no work",
            _ms(results.agent_version),
            "",
        ),
        "",
        _row("ratio of medians", "value", "target"),
        _row("---", "---", "---"),
        _row(
            "agent 1 root / clevis",
            f"{ratio(one, clevis):.2f}",
            _against(ratio(one, clevis), TARGET_VS_CLEVIS),
        ),
        _row(
            f"agent {n} roots / agent 1 root",
            f"{ratio(many, one):.2f}",
            _against(ratio(many, one), TARGET_MANY_VS_ONE),
        ),
        _row("agent 1 root / curl", f"{ratio(one, curl):.2f}", "none: curl is the floor"),
        _row(
            "agent peak RSS",
            f"{rss / 1024:.1f} MiB",
            _against(rss / 1024, TARGET_RSS_KIB / 1024, " MiB"),
        ),
        _row("agent peak RSS / curl's", f"{ratio(rss, curl_rss):.1f}", ""),
        "",
        _per_root(results),
        "",
        f"Slowest imports of one unlock (`python -X importtime`, cumulative): {imports}.",
        "",
    ]
    return "\n".join(lines)


def to_json(results: AgentResults) -> str:
    """Every raw list, for the record."""
    return json.dumps(
        {name: getattr(results, name) for name in AgentResults.__dataclass_fields__}, indent=1
    )
