"""The systemd units under systemd/: systemd itself accepts them, the key server's unit
keeps its hardening promises, the server works under them, install.sh installs them.

`systemd-analyze verify` checks that every command a unit runs exists, so it runs
against a stand-in root: the host's own system units (for the targets ours name),
ours in its /etc/systemd/system, and a stub executable wherever ours point.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.keyserver import KeyServer, enroll, release, running, wait_for
from zfs_unlock_server import config as server_config
from zfs_unlock_server import sealing

ROOT = Path(__file__).parents[1]
UNITS = ROOT / "systemd"
SERVER_UNIT = UNITS / "zfs-unlock-server.service"
BACKUP_UNIT = UNITS / "zfs-unlock-server-backup.service"
BACKUP_TIMER = UNITS / "zfs-unlock-server-backup.timer"
PRUNE_UNIT = UNITS / "zfs-unlock-server-audit-prune.service"
PRUNE_TIMER = UNITS / "zfs-unlock-server-audit-prune.timer"
SYSUSERS = UNITS / "sysusers.d" / "zfs-unlock-server.conf"
INSTALL = UNITS / "install.sh"
HOST_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_files() -> list[Path]:
    return sorted(
        p
        for p in UNITS.iterdir()
        if p.is_file() and p.suffix in {".service", ".target", ".timer", ".path"}
    )


def drop_ins() -> list[Path]:
    """Drop-in files: systemd/UNIT.d/*.conf, for the unit UNIT (sysusers.d is no unit)."""
    return sorted(p for p in UNITS.glob("*.d/*.conf") if p.parent.suffixes[-2:-1] == [".service"])


def directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; a key may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in directives(path).get(section, []) if k == key]


def executables(path: Path) -> set[str]:
    """The programs a unit or drop-in runs (Exec*= lines, prefixes such as '-' removed)."""
    found = set()
    for entries in directives(path).values():
        for key, value in entries:
            if key.startswith("Exec") and value:
                found.add(value.lstrip("@-:+!").split()[0])
    return found


def stub(root: Path, program: str) -> None:
    """An executable at PROGRAM inside ROOT (a bare name: where systemd would look)."""
    path = root / program.lstrip("/") if program.startswith("/") else root / "usr/bin" / program
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


# A stand-in for the template OpenZFS's zfs-mount-generator writes at boot, for the
# drop-ins to attach to.
GENERATED_LOAD_KEY = """\
[Unit]
Description=Load ZFS key for %I (stand-in)
[Service]
Type=oneshot
ExecStart=/usr/sbin/zfs load-key %I
"""


@pytest.fixture(scope="module")
def analyze_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analyze-root")
    shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for unit in unit_files():
        shutil.copy(unit, installed / unit.name)
    for conf in drop_ins():
        (installed / conf.parent.name).mkdir(exist_ok=True)
        shutil.copy(conf, installed / conf.parent.name / conf.name)
    template = root / HOST_UNITS.relative_to("/") / "zfs-load-key@.service"
    if not template.exists():
        template.write_text(GENERATED_LOAD_KEY)
    for program in {p for f in [*unit_files(), *drop_ins(), template] for p in executables(f)}:
        stub(root, program)
    return root


def verify(root: Path, *units: str) -> tuple[int, str]:
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", "--generators=no", *units],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def verified_names() -> list[str]:
    """Every unit of ours, and an instance of each template a drop-in of ours extends."""
    names = [u.name for u in unit_files()]
    for directory in {c.parent.name.removesuffix(".d") for c in drop_ins()}:
        names.append(directory.replace("@.", "@tank.", 1) if "@." in directory else directory)
    return names


def complaints(output: str) -> list[str]:
    """Lines of systemd's output about our units or files."""
    ours = [n.split("@")[0] for n in verified_names()]
    return [line for line in output.splitlines() if any(name in line for name in ours)]


# systemd accepts every unit


@needs_analyze
def test_systemd_analyze_verify_accepts_every_unit_and_drop_in(analyze_root: Path) -> None:
    assert SERVER_UNIT in unit_files()
    code, output = verify(analyze_root, *verified_names())
    assert code == 0, output
    assert not complaints(output), output


@needs_analyze
def test_verify_would_catch_a_broken_directive(analyze_root: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: systemd warns without failing, and we catch it."""
    root = tmp_path / "root"
    shutil.copytree(analyze_root, root, symlinks=True)
    broken = root / "etc/systemd/system" / SERVER_UNIT.name
    broken.write_text(broken.read_text().replace("[Service]\n", "[Service]\nProtectSytem=strict\n"))
    code, output = verify(root, SERVER_UNIT.name)
    assert complaints(output), (code, output)
    (root / "usr/bin/zfs-unlock-server").unlink()
    assert verify(root, SERVER_UNIT.name)[0] != 0  # a missing program fails outright


def exposure(unit: Path = SERVER_UNIT) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    if found is None and "--offline" in done.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    assert found, done.stdout + done.stderr
    return float(found.group(1))


@needs_analyze
def test_server_unit_exposure_is_low() -> None:
    score = exposure()
    print(f"systemd-analyze security: {SERVER_UNIT.name} exposure {score}")
    assert score <= MAX_EXPOSURE


@needs_analyze
@pytest.mark.parametrize("unit", [BACKUP_UNIT, PRUNE_UNIT], ids=lambda u: u.name)
def test_timer_services_exposure_is_low(unit: Path) -> None:
    score = exposure(unit)
    print(f"systemd-analyze security: {unit.name} exposure {score}")
    assert score <= MAX_EXPOSURE


# What the server's unit promises

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LimitCORE": "0",
    "MemorySwapMax": "0",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RemoveIPC": "yes",
}


def service(key: str) -> list[str]:
    return values(SERVER_UNIT, "Service", key)


def test_server_unit_is_hardened() -> None:
    for key, expected in HARDENING.items():
        assert service(key) == [expected], key
    # An allow list first (a deny list first would make the whole filter a deny list).
    assert service("SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert not service("AmbientCapabilities")
    assert not service("ReadWritePaths")  # StateDirectory= and LogsDirectory= are writable


def test_the_default_port_needs_no_capability() -> None:
    ports = [int(a.rsplit(":", 1)[1]) for a in server_config.ServerConfig().listen]
    assert min(ports) >= 1024
    assert service("CapabilityBoundingSet") == [""]


def test_server_runs_as_its_own_user_from_sysusers() -> None:
    (user,) = service("User")
    assert user not in {"root", "0", ""}
    assert not service("DynamicUser")
    entries = [line.split() for line in SYSUSERS.read_text().splitlines() if line[:1] == "u"]
    assert [e[1] for e in entries] == [user]
    assert service("Group") == [user]  # sysusers' 'u' makes the group of the same name


def test_server_unit_serves_the_state_directory_with_the_master_key_credential() -> None:
    (state,) = service("StateDirectory")
    assert service("StateDirectoryMode") == ["0700"]
    (command,) = service("ExecStart")
    argv = command.split()
    assert (
        Path(argv[0]).name
        in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    )
    assert argv[1:] == ["--data-dir", f"/var/lib/{state}", "serve"]  # never --allow-root
    (credential,) = service("LoadCredential")
    name, _, source = credential.partition(":")
    assert name == sealing.CREDENTIAL_NAME
    assert Path(source) == sealing.DEFAULT_CREDENTIAL_FILE


# The daily backup


def test_backup_unit_runs_backup_as_the_servers_user_hardened_without_the_master_key() -> None:
    def backup(key: str) -> list[str]:
        return values(BACKUP_UNIT, "Service", key)

    assert backup("Type") == ["oneshot"]
    assert backup("User") == service("User") and backup("Group") == service("Group")
    assert backup("StateDirectory") == service("StateDirectory")
    (command,) = backup("ExecStart")
    argv = command.split()
    assert argv[1:] == [
        "--data-dir",
        f"/var/lib/{service('StateDirectory')[0]}",
        "backup",
        "--dir",
        "${BACKUP_DIR}",
        "--keep",
        "${KEEP}",
    ]
    assert backup("Environment") == ["BACKUP_DIR=/var/backups/zfs-unlock-server KEEP=14"]
    assert backup("EnvironmentFile") == ["-/etc/default/zfs-unlock-server-backup"]
    assert backup("ReadWritePaths") == ["/var/backups/zfs-unlock-server"]
    assert not backup("LoadCredential")  # a backup never holds the master key
    assert not values(BACKUP_UNIT, "Install", "WantedBy")  # the timer starts it
    assert values(BACKUP_UNIT, "Unit", "ConditionPathExists") == [
        "/var/lib/zfs-unlock-server/keys.db"
    ]
    for key, expected in HARDENING.items():
        if key not in {"RestrictAddressFamilies", "MemorySwapMax"}:
            assert backup(key) == [expected], key
    assert backup("RestrictAddressFamilies") == ["AF_UNIX"]
    assert backup("PrivateNetwork") == ["yes"]
    assert backup("SystemCallFilter") == service("SystemCallFilter")


@pytest.mark.parametrize("timer", [BACKUP_TIMER, PRUNE_TIMER], ids=lambda u: u.name)
def test_timers_are_daily_persistent_randomized_and_enabled(timer: Path) -> None:
    assert values(timer, "Timer", "OnCalendar") == ["daily"]
    assert values(timer, "Timer", "Persistent") == ["true"]
    assert values(timer, "Timer", "RandomizedDelaySec") == ["1h"]
    assert values(timer, "Install", "WantedBy") == ["timers.target"]
    assert not values(timer, "Timer", "Unit")  # the service of its own name


def test_audit_prune_unit_runs_as_the_servers_user_hardened_with_the_network() -> None:
    def prune(key: str) -> list[str]:
        return values(PRUNE_UNIT, "Service", key)

    assert prune("Type") == ["oneshot"]
    assert prune("User") == service("User") and prune("Group") == service("Group")
    (command,) = prune("ExecStart")
    assert command.split()[1:] == [
        "--data-dir",
        f"/var/lib/{service('StateDirectory')[0]}",
        "audit-prune",
        "--export-dir",
        f"/var/log/{service('LogsDirectory')[0]}",
    ]
    assert prune("LogsDirectory") == service("LogsDirectory")
    assert not prune("LoadCredential")  # it opens no key
    assert not values(PRUNE_UNIT, "Install", "WantedBy")  # the timer starts it
    assert values(PRUNE_UNIT, "Unit", "ConditionPathExists") == [
        "/var/lib/zfs-unlock-server/server.toml"
    ]
    for key, expected in HARDENING.items():
        if key != "MemorySwapMax":
            assert prune(key) == [expected], key
    assert prune("SystemCallFilter") == service("SystemCallFilter")


def test_the_debian_package_installs_the_timers_and_never_starts_their_services() -> None:
    install = (ROOT / "debian/zfs-unlock-server.install").read_text().splitlines()
    for unit in (SERVER_UNIT, BACKUP_UNIT, BACKUP_TIMER, PRUNE_UNIT, PRUNE_TIMER):
        assert f"systemd/{unit.name} lib/systemd/system" in install
    rules = (ROOT / "debian/rules").read_text()
    assert f"dh_installsystemd -X{BACKUP_UNIT.name} -X{PRUNE_UNIT.name}\n" in rules
    postinst = (ROOT / "debian/zfs-unlock-server.postinst").read_text()
    assert "-m 0700 -o zfs-unlock -g zfs-unlock /var/backups/zfs-unlock-server" in postinst


def test_server_unit_is_notify_reloadable_and_restarts() -> None:
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service("Restart") == ["on-failure"]
    assert values(SERVER_UNIT, "Install", "WantedBy") == ["multi-user.target"]


# The server works the way the unit runs it


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
# Execs its arguments with writable+executable memory refused, as MemoryDenyWriteExecute=.
MDWE_LAUNCHER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):\n"
    "    sys.exit(f'PR_SET_MDWE: {os.strerror(ctypes.get_errno())}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def mdwe_supported() -> bool:
    """Whether the kernel has PR_SET_MDWE (6.3 and newer); asked in a child, which it binds."""
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False, timeout=60).returncode == 0


def test_the_server_works_without_writable_executable_memory(keyserver: KeyServer) -> None:
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE")
    host = keyserver.add_host("web1")
    with running(keyserver, launcher=(sys.executable, "-c", MDWE_LAUNCHER)):
        session = keyserver.session(host)
        assert enroll(session, keyserver, host, "77", "1").status_code == 201
        assert release(session, keyserver, host, "77", "1").status_code == 200
        session.close()
        assert keyserver.process is not None
        master = keyserver.process.pid
        for pid in [master, *workers(master)]:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            assert not [m for m in maps if "w" in m.split()[1] and "x" in m.split()[1]]


def workers(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def test_reload_replaces_the_workers_and_keeps_serving(keyserver: KeyServer) -> None:
    """What ExecReload= does: SIGHUP to the main process, which stays."""
    host = keyserver.add_host("web1")
    with running(keyserver):
        assert keyserver.process is not None
        master = keyserver.process.pid
        wait_for(lambda: len(workers(master)) == 2)
        before = workers(master)
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: len(workers(master)) == 2 and not workers(master) & before, 30)
        session = keyserver.session(host)
        assert enroll(session, keyserver, host, "77", "2").status_code == 201
        session.close()
        assert keyserver.process.poll() is None


# install.sh


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def tree(root: Path) -> dict[str, str]:
    """Every file (its mode) and symlink (its target) under ROOT."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(root))] = oct(path.stat().st_mode & 0o7777)
    return found


def enabled_by_systemctl(root: Path, unit: Path) -> dict[str, str]:
    """The symlinks `systemctl --root enable` makes for UNIT (and the units its Also=
    names), for comparison."""
    also = [UNITS / name for value in values(unit, "Install", "Also") for name in value.split()]
    for each in (unit, *also):
        shutil.copy(each, root / "etc/systemd/system" / each.name)
    subprocess.run(
        ["systemctl", f"--root={root}", "enable", unit.name],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return {k: v for k, v in tree(root).items() if v.startswith("->")}


@pytest.fixture
def fresh_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    yield root


def from_checkout(unit: Path) -> bytes:
    """UNIT as install.sh installs it into another root without --bindir: pointing at
    /usr/local/bin, where pip puts the programs (a Debian package's unit runs /usr/bin's)."""
    text = unit.read_bytes()
    assert b"/usr/bin/zfs-unlock-" in text
    return text.replace(b"/usr/bin/zfs-unlock-", b"/usr/local/bin/zfs-unlock-")


def test_install_server_installs_the_unit_and_sysusers_and_enables_it(
    fresh_root: Path, tmp_path: Path
) -> None:
    result = install("--root", str(fresh_root), "server")
    assert result.returncode == 0, result.stderr
    unit = "etc/systemd/system/zfs-unlock-server.service"
    backup_unit = "etc/systemd/system/zfs-unlock-server-backup.service"
    timer = "etc/systemd/system/zfs-unlock-server-backup.timer"
    prune_timer = "etc/systemd/system/zfs-unlock-server-audit-prune.timer"
    assert tree(fresh_root) == {
        unit: "0o644",
        "etc/systemd/system/multi-user.target.wants/zfs-unlock-server.service": (
            "-> /etc/systemd/system/zfs-unlock-server.service"
        ),
        backup_unit: "0o644",
        timer: "0o644",
        "etc/systemd/system/timers.target.wants/zfs-unlock-server-backup.timer": (
            "-> /etc/systemd/system/zfs-unlock-server-backup.timer"
        ),
        "etc/systemd/system/zfs-unlock-server-audit-prune.service": "0o644",
        prune_timer: "0o644",
        "etc/systemd/system/timers.target.wants/zfs-unlock-server-audit-prune.timer": (
            f"-> /{prune_timer}"
        ),
        "etc/sysusers.d/zfs-unlock-server.conf": "0o644",
    }
    assert (fresh_root / unit).read_bytes() == from_checkout(SERVER_UNIT)
    assert (fresh_root / backup_unit).read_bytes() == from_checkout(BACKUP_UNIT)
    backups = fresh_root / "var/backups/zfs-unlock-server"
    assert backups.is_dir() and backups.stat().st_mode & 0o777 == 0o700
    assert "chown zfs-unlock:zfs-unlock" in result.stderr  # another root: the admin's step
    if shutil.which("systemctl"):
        other = tmp_path / "systemctl-root"
        (other / "etc/systemd/system").mkdir(parents=True)
        links = {k: v for k, v in tree(fresh_root).items() if v.startswith("->")}
        enabled_by_systemctl(other, SERVER_UNIT)
        enabled_by_systemctl(other, BACKUP_TIMER)
        assert enabled_by_systemctl(other, PRUNE_TIMER) == links  # all, as systemctl does
    again = install(f"--root={fresh_root}", "server")  # idempotent
    assert again.returncode == 0, again.stderr


def test_install_agent_installs_its_unit_and_drop_ins(fresh_root: Path, tmp_path: Path) -> None:
    agent = UNITS / "zfs-unlock-agent.service"
    result = install("--root", str(fresh_root), "agent")
    assert result.returncode == 0, result.stderr
    installed = tree(fresh_root)
    assert installed[f"etc/systemd/system/{agent.name}"] == "0o644"
    for conf in drop_ins():
        if conf.parent.name.startswith("zfs-load-key@"):
            target = fresh_root / "etc/systemd/system" / conf.parent.name / conf.name
            assert target.read_bytes() == from_checkout(conf)
    links = {k: v for k, v in installed.items() if v.startswith("->")}
    assert links  # enabled
    if shutil.which("systemctl"):
        other = tmp_path / "systemctl-root"
        (other / "etc/systemd/system").mkdir(parents=True)
        enabled_by_systemctl(other, agent)
        assert enabled_by_systemctl(other, UNITS / "zfs-unlock-agent-password.path") == links
    assert installed["etc/systemd/system/zfs-unlock-agent-password.service"] == "0o644"
    assert not (fresh_root / "etc/sysusers.d").exists()


def test_install_points_the_units_at_bindir(fresh_root: Path) -> None:
    """A virtualenv install: every Exec line names the program where it really is."""
    bindir = fresh_root / "opt/zua/bin"
    bindir.mkdir(parents=True)
    (bindir / "zfs-unlock-agent").write_text("#!/bin/sh\n")
    (bindir / "zfs-unlock-agent").chmod(0o755)
    result = install("--root", str(fresh_root), "--bindir", "/opt/zua/bin", "agent")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    system = fresh_root / "etc/systemd/system"
    installed = [system / "zfs-unlock-agent.service"]
    installed += sorted((system / "zfs-load-key@.service.d").glob("*.conf"))
    exec_lines = [
        line
        for path in installed
        for line in path.read_text().splitlines()
        if line.startswith("Exec") and "zfs-unlock-agent" in line
    ]
    assert len(exec_lines) >= 3  # ExecStartPre, ExecStart, the drop-in's ExecCondition
    assert all("=/opt/zua/bin/zfs-unlock-agent " in line for line in exec_lines), exec_lines
    missing = install("--root", str(fresh_root), "--bindir", "/nowhere", "agent")
    assert missing.returncode == 0
    assert "/nowhere/zfs-unlock-agent is not there" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--bindir", "relative/bin", "agent"),
        ("server", "agent"),
        ("client",),
        ("--root",),
        ("--root", "", "server"),
        ("--prefix", "/tmp", "server"),
    ],
)
def test_install_usage_errors_exit_64(args: tuple[str, ...]) -> None:
    result = install(*args)
    assert result.returncode == 64
    assert "usage:" in result.stderr


def test_install_refuses_a_missing_root(tmp_path: Path) -> None:
    result = install("--root", str(tmp_path / "missing"), "server")
    assert result.returncode == 66
    assert "no such directory" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_install_script_is_posix_sh() -> None:
    assert INSTALL.read_text().startswith("#!/bin/sh\n")
    assert os.access(INSTALL, os.X_OK)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(INSTALL)], check=True, timeout=60)
    if shutil.which("shellcheck"):
        done = subprocess.run(
            ["shellcheck", "--shell=sh", str(INSTALL)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout


def test_sysusers_entry_is_accepted_by_systemd_sysusers(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (user,) = service("User")
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    (entry,) = [line.split(":") for line in passwd if line.startswith(f"{user}:")]
    assert int(entry[2]) != 0 and entry[6].endswith("nologin")
