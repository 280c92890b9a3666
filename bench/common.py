"""What every benchmark shares: the build directory, statistics, timed child processes,
and a real key server with enrolled hosts on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_common import pinning
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import admin

REPO = Path(__file__).resolve().parent.parent
# Compiled helpers (loadgen, fakezfs) live here; bench/run.sh builds them.
BUILD = Path(os.environ.get("ZUA_BENCH_BUILD", REPO / "build" / "bench"))
VENV_BIN = Path(sys.executable).parent
SERVER_BIN = VENV_BIN / "zfs-unlock-server"
AGENT_BIN = VENV_BIN / "zfs-unlock-agent"
ALLOW_ROOT = ("--allow-root",) if os.geteuid() == 0 else ()


# Statistics


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    def text(self, unit: str = "", digits: int = 1) -> str:
        """'12.3 ms (11.9-13.0)': the median, then min-max."""
        return f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no measurements")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("inf")


# Child processes


# GNU time (Debian's package time) starts each measured command. A process forked from
# this interpreter inherits its peak RSS as a floor (Linux keeps the larger of the peaks
# before and after exec), so wait4 here would report this process's tens of MiB for even
# `true`; a command forked by the small `time` starts from about 1 MiB.
GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True)
class Timed:
    seconds: float
    max_rss_kib: int  # the peak resident set of the command and the children it waited for
    returncode: int
    stdout: bytes


def run_measured(
    argv: Sequence[str | Path],
    stdin_path: Path | None = None,
    env: dict[str, str] | None = None,
    stderr_path: Path | None = None,
) -> Timed:
    """Run ARGV once: wall time from fork to exit, and the peak RSS of that one command
    (GNU time's %M: ru_maxrss from its wait4, so its floor is time's own 1 MiB, not ours).
    Its output goes to /dev/null; its stdin comes from STDIN_PATH; its stderr is appended
    to STDERR_PATH (default: ours)."""
    if not os.access(GNU_TIME, os.X_OK):
        raise RuntimeError(f"{GNU_TIME} is missing (Debian's package time; bench/prepare.sh)")
    stdin = stdin_path.open("rb") if stdin_path else open(os.devnull, "rb")  # noqa: SIM115
    stderr = stderr_path.open("ab") if stderr_path else contextlib.nullcontext(None)
    with (
        stdin,
        open(os.devnull, "wb") as null,
        stderr as errors,
        tempfile.NamedTemporaryFile("r", prefix="zua-rss-") as peak,
    ):
        command = [GNU_TIME, "--quiet", "-o", peak.name, "-f", "%M", *(str(a) for a in argv)]
        start = time.perf_counter()
        returncode = subprocess.run(
            command, stdin=stdin, stdout=null, stderr=errors, env=env, check=False
        ).returncode
        seconds = time.perf_counter() - start
        lines = peak.read().split()
    # time prints nothing when it could not start the command at all.
    max_rss = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    return Timed(seconds, max_rss, returncode, b"")


def wait_for_port(port: int, address: str = "127.0.0.1", timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {address}:{port}") from None
            time.sleep(0.05)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a running process: its peak resident set so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system time so far of PIDS and of the children they have reaped (a
    listener that forks one process per connection); a process that is gone counts 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has been busy, summed over its cores (/proc/stat: user,
    nice, system, irq, softirq, steal): what every process and the kernel used."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """Connections the kernel dropped so far because a listen queue was full (TcpExt
    ListenOverflows in /proc/net/netstat, the whole machine's): each costs its client a
    retransmission, a second or more."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def raise_fd_limit() -> None:
    """The storm opens thousands of sockets at once."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# The machine


def machine() -> dict[str, str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    openssl = subprocess.run(
        ["openssl", "version"], check=False, capture_output=True, text=True
    ).stdout
    debian = Path("/etc/debian_version")
    return {
        "cpu": f"{os.cpu_count()} x {model}",
        "memory": memory,
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "python": platform.python_version(),
        "openssl": openssl.strip(),
    }


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Debian's version of each installed package (dpkg-query); "not installed" otherwise."""
    versions = {}
    for package in packages:
        answer = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            check=False,
            capture_output=True,
            text=True,
        )
        versions[package] = answer.stdout.strip() if answer.returncode == 0 else "not installed"
    return versions


# A real key server


@dataclass(frozen=True)
class Host:
    name: str
    machine_id: str
    cert: Path
    key: Path
    refs: tuple[DatasetRef, ...]


def machine_id_for(name: str) -> str:
    """A machine-id unique to NAME (names sharing a prefix must not collide)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def pin_hex(pin: str) -> str:
    """'sha256//BASE64' -> the hex digest the load generator takes."""
    return pinning.parse_pin(pin).hex()


class KeyServer:
    """A data directory made with the project's own CA and admin code; EC P-256 throughout."""

    def __init__(
        self, root: Path, rate_limits: dict[str, float] | None = None, *, reuse: bool = False
    ) -> None:
        """A new data directory under ROOT, or with REUSE the one an earlier run made there
        (the storm caches its enrolled hosts; enrolling 10,000 takes longer than serving them)."""
        self.root = root
        self.data = root / "data"
        self.hosts_dir = root / "hosts"
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        if reuse:
            cert = ssl.PEM_cert_to_DER_cert(self.server_cert.read_text())
            self.pin = pinning.pin_of_certificate(cert)
        else:
            self.pin = admin.init_data_dir(self.data, ["localhost", "127.0.0.1"])
        if rate_limits:
            table = "\n".join(f"{k} = {float(v)}" for k, v in rate_limits.items())
            (self.data / "server.toml").write_text(f"[rate_limits]\n{table}\n")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_cert(self) -> Path:
        return self.data / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.data / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.data / "server.key"

    def add_hosts(self, names: Sequence[str], datasets_per_host: int = 1) -> list[Host]:
        """Enroll hosts the way `host add --issue-key` does, each with active raw keys."""
        hosts = []
        session = admin.Admin.open(self.data)
        try:
            for name in names:
                machine_id = machine_id_for(name)
                directory = self.hosts_dir / name
                session.add_host(name, machine_id, [], [], None, None, directory)
                host = self.host(name, datasets_per_host)
                for index, ref in enumerate(host.refs):
                    session.create_key(name, ref, f"tank/bench/d{index:03d}", "raw", None)
                hosts.append(host)
        finally:
            session.close()
        return hosts

    def host(self, name: str, datasets_per_host: int = 1) -> Host:
        """The record of a host add_hosts enrolled (in this run or an earlier one)."""
        directory = self.hosts_dir / name
        refs = tuple(
            DatasetRef(str(1000 + index), str(2000 + index)) for index in range(datasets_per_host)
        )
        return Host(
            name, machine_id_for(name), directory / "client.crt", directory / "client.key", refs
        )

    @contextlib.contextmanager
    def serving(self, workers: int = 0) -> Iterator[KeyServer]:
        """Serve on a free port of 127.0.0.1 (WORKERS 0: the server's default)."""
        self.port = free_port()
        log = (self.root / "server.log").open("ab")
        command = [
            str(SERVER_BIN),
            "--data-dir",
            str(self.data),
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            *ALLOW_ROOT,
        ]
        if workers:
            command += ["--workers", str(workers)]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            wait_for_port(self.port)
            time.sleep(0.5)  # let every worker come up, not only the first
            yield self
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
            self.process = None

    def worker_pids(self) -> list[int]:
        if self.process is None:
            raise RuntimeError("the server is not running")
        return children_of(self.process.pid)

    def pids(self) -> list[int]:
        """The master and its workers: every process whose CPU time is the server's."""
        if self.process is None:
            raise RuntimeError("the server is not running")
        return [self.process.pid, *children_of(self.process.pid)]


def release_request(host: Host) -> bytes:
    """The agent's batch release, as raw HTTP/1.1 (Connection: close)."""
    body = json.dumps(
        {
            "machine_id": host.machine_id,
            "datasets": [
                {"pool_guid": r.pool_guid, "dataset_guid": r.dataset_guid} for r in host.refs
            ],
        },
        separators=(",", ":"),
    ).encode()
    head = (
        "POST /v1/keys/release HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def plain_install(venv: Path, modules: Sequence[Path]) -> Path:
    """A new virtual environment at VENV holding a plain copy of MODULES (package folders
    or single files) in its site-packages, as a regular (not editable) install leaves them:
    no .pth file, no import hook. Returns its interpreter."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_dir = Path(
        subprocess.run(
            [str(python), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    for module in modules:
        if module.is_dir():
            shutil.copytree(
                module, site_dir / module.name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(module, site_dir / module.name)
    return python
