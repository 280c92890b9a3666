"""The Debian packages on a clean Debian 12: they install, run, upgrade and purge.

The session builds zfs-unlock-agent, zfs-unlock-server and python3-zfs-unlock-common
with scripts/deb.sh (conftest.py: once for the tier) and the module installs them with
apt into a throw-away copy of a cached debootstrap of bookworm (tests/deb/build-tree.sh:
minbase, apt pointed at Debian alone). The copy (Chroot, system.py) is an overlay on the
cached tree, mounted with /proc, /sys, /dev and a /run tmpfs in a mount namespace of its
own (unshare --mount) that one helper process holds: when it ends, at teardown or with
pytest, every mount goes with it, and the cached tree is never written.
Commands run in it with chroot, Debian's own /usr/bin/python3 and a clean environment;
a policy-rc.d refuses every service start.

The tests share that one system and run in file order: install, the commands, the
units, the key server's set-up and serving, an upgrade to a repacked 0.1.0+1, remove,
purge. Only 127.0.0.1 is talked to (apt in the chroot installs from its cache of
Debian's packages and fetches what that lacks from Debian's mirror).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.common import free_port
from tests.deb.system import AGENT, COMMON, DEBS, PACKAGES, SERVER, Chroot
from zfs_unlock_common import pinning

pytestmark = pytest.mark.deb

VERSION = "0.1.0"
UPGRADE_VERSION = "0.1.0+1"
# Debian 12's versions (upstream part) of what the packages depend on.
DEBIAN_12 = {
    "python3-cryptography": "38.0.4",
    "python3-gunicorn": "20.1.0",
    "python3-pyudev": "0.24.0",
    "python3-sdnotify": "0.3.",
    "zfsutils-linux": "2.1.11",
}

# Paths inside the installed system.
SERVER_USER = "zfs-unlock"
DATA_DIR = "/var/lib/zfs-unlock-server"
SERVER_ETC = "/etc/zfs-unlock-server"
MASTER_KEY = f"{SERVER_ETC}/master-key"
AGENT_ETC = "/etc/zfs-unlock-agent"
ADMIN_FILES = ("agent.toml", "client.key", "client.csr", "client.crt")  # made by the admin
CONFFILE = "/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent"
UNIT_DIR = "/lib/systemd/system"
AGENT_UNIT, SERVER_UNIT = f"{AGENT}.service", f"{SERVER}.service"
BACKUP_UNIT, BACKUP_TIMER = f"{SERVER}-backup.service", f"{SERVER}-backup.timer"
PRUNE_UNIT, PRUNE_TIMER = f"{SERVER}-audit-prune.service", f"{SERVER}-audit-prune.timer"
# What systemd's LoadCredential= makes for the server's unit.
CREDENTIALS = f"/run/credentials/{SERVER_UNIT}"
HOST_NAME = "zua-deb-host"
# An encryption root in OpenZFS's list cache, so that Debian's own zfs-mount-generator
# makes the zfs-load-key@ unit our drop-in extends (zfs-load-key@tank-secret.service).
# The fields of OpenZFS 2.1's history_event-zfs-list-cacher.sh: name, mountpoint,
# canmount, atime, relatime, devices, exec, readonly, setuid, nbmand, encroot,
# keylocation, then eight org.openzfs.systemd:* properties, unset.
LIST_CACHE = "/etc/zfs/zfs-list.cache/tank"
LIST_CACHE_LINE = "\t".join(
    ["tank/secret", "/tank/secret", "on", "on", "on", "on", "on", "off", "on", "off"]
    + ["tank/secret", "prompt"]
    + ["-"] * 8
)
LOAD_KEY_INSTANCE = "zfs-load-key@tank-secret.service"

# apt, dpkg and the system's own bookkeeping, never ours to clean up.
BOOKKEEPING = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/", "/var/log/", DEBS + "/")
BOOKKEEPING_FILES = ("/etc/ld.so.cache",)
# The account databases and their backups: the server's user stays (checked apart).
ACCOUNTS = tuple(
    f"/etc/{db}{suffix}" for db in ("passwd", "group", "shadow", "gshadow") for suffix in ("", "-")
)
# What purge must keep: the keys, the master key that seals them, the admin's files.
KEPT = (
    DATA_DIR,
    SERVER_ETC,
    MASTER_KEY,
    AGENT_ETC,
    *(f"{AGENT_ETC}/{name}" for name in ADMIN_FILES),
)


@dataclass
class System:
    chroot: Chroot
    debs: dict[str, Path]  # package -> .deb built by scripts/deb.sh
    log: Path
    before: dict[str, str] = field(default_factory=dict)  # Chroot.listing() before installing
    packages_before: dict[str, str] = field(default_factory=dict)
    users_before: dict[str, set[str]] = field(default_factory=dict)
    install: subprocess.CompletedProcess[str] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def timed(system: System, name: str, started: float) -> None:
    system.seconds[name] = round(time.monotonic() - started, 1)
    print(f"deb tier: {name}: {system.seconds[name]} s")


def accounts(chroot: Chroot) -> dict[str, set[str]]:
    """User and group names."""
    return {
        name: {line.split(":")[0] for line in chroot.path(f"/etc/{name}").read_text().splitlines()}
        for name in ("passwd", "group")
    }


# Fixtures (the tree and the packages are the session's: conftest.py)


@pytest.fixture(scope="module")
def system(
    tree: Path, debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """The clean tree, prepared, listed, then the three packages installed with apt."""
    workdir = tmp_path_factory.mktemp("system")
    chroot = Chroot(tree, workdir / "overlay")
    try:
        state = System(chroot, debs, workdir / "apt.log")
        chroot.prepare()
        for deb in debs.values():
            shutil.copyfile(deb, chroot.path(f"{DEBS}/{deb.name}"))
        state.before = chroot.listing()
        state.packages_before = chroot.installed()
        state.users_before = accounts(chroot)
        started = time.monotonic()
        state.install = chroot.apt(
            "install", *(f"{DEBS}/{debs[p].name}" for p in PACKAGES), log=state.log
        )
        timed(state, "apt-get install", started)
        yield state
    finally:
        chroot.close()


@pytest.fixture(scope="module")
def installed(system: System) -> System:
    assert system.install is not None
    if system.install.returncode != 0:
        pytest.fail(
            "apt-get install failed: see"
            f" test_apt_installs_the_packages_with_every_dependency_from_debian and {system.log}"
        )
    return system


DEBIAN_ARCHIVES = ("http://deb.debian.org/debian ", "http://deb.debian.org/debian-security ")


def installed_origins(policy: str) -> dict[str, list[str]]:
    """Package -> where its installed version can come from, per `apt-cache policy`:
    the lines under the version marked *** ("500 http://deb.debian.org/debian
    bookworm/main amd64 Packages", "100 /var/lib/dpkg/status")."""
    origins: dict[str, list[str]] = {}
    package, in_installed = "", False
    for line in policy.splitlines():
        if re.fullmatch(r"\S+:", line):
            package, in_installed = line[:-1], False
        elif line.startswith(" *** "):
            in_installed = True
            origins[package] = []
        elif re.match(r" {5}\S", line):
            in_installed = False
        elif in_installed and line.startswith(" " * 8):
            origins[package].append(line.strip().split(" ", 1)[1])
    return origins


def tail(done: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


# Installing


def test_apt_installs_the_packages_with_every_dependency_from_debian(system: System) -> None:
    install = system.install
    assert install is not None
    assert install.returncode == 0, tail(install)
    chroot = system.chroot
    now = chroot.installed()
    assert {p: now.get(p) for p in PACKAGES} == dict.fromkeys(PACKAGES, VERSION)
    versions = {name: now.get(name, "missing") for name in DEBIAN_12}
    for name, version in versions.items():
        print(f"installed: {name} {version}")
    assert all(versions[n].startswith(v) for n, v in DEBIAN_12.items()), versions
    # Every package apt added came from Debian's archive (the tree's only source)...
    added = sorted(set(now) - set(system.packages_before) - set(PACKAGES))
    origins = installed_origins(chroot.run("apt-cache", "policy", *added).stdout)
    assert set(origins) == set(added)
    for name, sources in origins.items():
        assert any(s.startswith(DEBIAN_ARCHIVES) for s in sources), (name, sources)
    # ...and nothing came from pip.
    assert chroot.run("python3", "-c", "import pip", check=False).returncode != 0
    local = chroot.path("/usr/local/lib")
    assert not [p for p in local.rglob("*") if p.is_file()], list(local.rglob("*"))


def test_both_commands_run_on_debians_python(installed: System) -> None:
    chroot = installed.chroot
    for command in (AGENT, SERVER):
        shebang = chroot.path(f"/usr/bin/{command}").read_text().splitlines()[0]
        assert shebang == "#!/usr/bin/python3", shebang
    version = chroot.run(AGENT, "--version")
    assert version.stdout.strip() == f"{AGENT} {VERSION}"
    assert "unlock" in chroot.run(AGENT, "--help").stdout
    assert "serve" in chroot.run(SERVER, "--help").stdout


def test_units_are_enabled_and_wait_for_their_configuration(installed: System) -> None:
    chroot = installed.chroot
    agent_target = AGENT_UNIT.replace(".service", ".target")
    for unit, target in (
        (AGENT_UNIT, "multi-user.target"),
        (agent_target, "multi-user.target"),
        ("zfs-unlock-agent-password.path", "sysinit.target"),  # the password agent's watch
        (SERVER_UNIT, "multi-user.target"),
        (BACKUP_TIMER, "timers.target"),  # enabled: a key server without backups loses keys
        (PRUNE_TIMER, "timers.target"),  # enabled: it does nothing until asked to
    ):
        link = chroot.path(f"/etc/systemd/system/{target}.wants/{unit}")
        assert link.is_symlink() and os.readlink(link) == f"{UNIT_DIR}/{unit}", link
        assert chroot.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    conditions = {
        unit: re.findall(
            r"^ConditionPathExists=(.*)$",
            chroot.path(f"{UNIT_DIR}/{unit}").read_text(),
            re.MULTILINE,
        )
        for unit in (AGENT_UNIT, SERVER_UNIT, BACKUP_UNIT, PRUNE_UNIT)
    }
    assert f"{AGENT_ETC}/agent.toml" in conditions[AGENT_UNIT]
    assert sorted(conditions[SERVER_UNIT]) == sorted([f"{DATA_DIR}/server.toml", MASTER_KEY])
    assert conditions[BACKUP_UNIT] == [f"{DATA_DIR}/keys.db"]
    assert conditions[PRUNE_UNIT] == [f"{DATA_DIR}/server.toml"]
    # The timers' services, never enabled or started by the package itself.
    for unit in (BACKUP_UNIT, PRUNE_UNIT):
        assert chroot.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "static"
    backups = chroot.path("/var/backups/zfs-unlock-server")
    assert backups.is_dir() and backups.stat().st_mode & 0o777 == 0o700
    # Not set up yet: a start would be skipped (the conditions fail), not failed.
    for unit in (AGENT_UNIT, SERVER_UNIT, BACKUP_UNIT, PRUNE_UNIT):
        check = chroot.run("systemd-analyze", "condition", f"--unit={unit}", check=False)
        assert check.returncode != 0 and "Conditions failed" in check.stderr, check


def verify(chroot: Chroot) -> tuple[int, list[str], str]:
    """systemd-analyze verify on our units and an instance of the zfs-load-key@ unit
    that Debian's zfs-mount-generator makes (with our drop-in); the lines about ours."""
    cache = chroot.path(LIST_CACHE)
    cache.parent.mkdir(parents=True)
    cache.write_text(LIST_CACHE_LINE + "\n")
    try:
        done = chroot.run(
            "systemd-analyze", "verify", "--man=no", "--generators=yes",
            AGENT_UNIT, SERVER_UNIT, LOAD_KEY_INSTANCE, check=False,
        )  # fmt: skip
    finally:
        cache.unlink()
        cache.parent.rmdir()
    output = done.stdout + done.stderr
    ours = [
        line
        for line in output.splitlines()
        if any(name in line for name in (AGENT, SERVER, "zfs-load-key@"))
    ]
    return done.returncode, ours, output


def test_systemd_analyze_verify_accepts_the_installed_units(installed: System) -> None:
    """systemd has nothing to say about our units and drop-in, and every program they run
    is installed (ExecReload='s /bin/kill is procps's, a dependency of both packages)."""
    chroot = installed.chroot
    drop_in = chroot.path(f"{UNIT_DIR}/zfs-load-key@.service.d/{AGENT}.conf")
    text = drop_in.read_text()
    code, ours, output = verify(chroot)
    assert code == 0, output
    assert not ours, output
    # The drop-in is in force for the generated unit: a broken one is caught.
    drop_in.write_text(text.replace(f"/usr/bin/{AGENT} ", f"/usr/bin/{AGENT}-missing "))
    try:
        code, ours, output = verify(chroot)
    finally:
        drop_in.write_text(text)
    assert code != 0 and any(f"{AGENT}-missing" in line for line in ours), output


# The key server, set up as its unit's header and the README say


def test_the_package_made_the_server_user_and_directories(installed: System) -> None:
    chroot = installed.chroot
    entry = chroot.run("getent", "passwd", SERVER_USER).stdout.strip().split(":")
    assert entry[0] == SERVER_USER and int(entry[2]) != 0
    assert entry[5] == DATA_DIR and entry[6].endswith("nologin"), entry
    sysusers = chroot.path(f"/usr/lib/sysusers.d/{SERVER}.conf").read_text()
    assert re.search(rf"^u\s+{SERVER_USER}\s", sysusers, re.MULTILINE)
    stat = chroot.run("stat", "-c", "%n %a %U %G", DATA_DIR, SERVER_ETC).stdout.splitlines()
    assert stat == [
        f"{DATA_DIR} 700 {SERVER_USER} {SERVER_USER}",
        f"{SERVER_ETC} 700 root root",
    ]


def test_the_audit_log_rotation_is_a_conffile_naming_the_server_user(installed: System) -> None:
    """Its run against a live audit log is tests/server/test_logrotate.py's."""
    chroot = installed.chroot
    config = chroot.path(f"/etc/logrotate.d/{SERVER}").read_text()
    assert f"su {SERVER_USER} {SERVER_USER}" in config
    assert f"{DATA_DIR}/audit.log" in config
    conffiles = chroot.run("dpkg-query", "--showformat=${Conffiles}", "--show", SERVER).stdout
    assert f"/etc/logrotate.d/{SERVER}" in conffiles


@dataclass(frozen=True)
class ServerSetup:
    init: subprocess.CompletedProcess[str]
    pin: str
    port: int
    machine_id: str


@pytest.fixture(scope="module")
def server_setup(installed: System) -> ServerSetup:
    """init as the docs say; the host's identity made by the installed agent, and the
    host enrolled with `host add`, its certificate taken from standard output."""
    chroot = installed.chroot
    init = chroot.run(
        SERVER, "init", "--server-name", "127.0.0.1", "--master-key-out", MASTER_KEY, check=False
    )
    pin = chroot.run(SERVER, "pin").stdout.strip() if init.returncode == 0 else ""
    port = free_port()
    chroot.path(f"{AGENT_ETC}/agent.toml").write_text(
        f'[[server]]\nurl = "https://127.0.0.1:{port}"\npins = ["{pin}"]\n\n'
        '[client]\ncertificate = "client.crt"\nkey = "client.key"\n'
    )
    machine_id = chroot.path("/etc/machine-id").read_text().strip()
    if init.returncode == 0:
        chroot.run(AGENT, "identity", "--name", HOST_NAME)
        cert = chroot.run(
            SERVER, "host", "add", HOST_NAME, "--machine-id", machine_id,
            "--csr", f"{AGENT_ETC}/client.csr",
        ).stdout  # fmt: skip
        chroot.path(f"{AGENT_ETC}/client.crt").write_text(cert)
        chroot.run(AGENT, "configcheck")
    return ServerSetup(init, pin, port, machine_id)


def test_init_sets_up_the_key_server_and_its_unit_would_start(
    installed: System, server_setup: ServerSetup
) -> None:
    chroot = installed.chroot
    assert server_setup.init.returncode == 0, tail(server_setup.init)
    assert server_setup.pin.startswith(pinning.PIN_PREFIX)
    pinning.parse_pin(server_setup.pin)
    owners = chroot.run("stat", "-c", "%U %a", f"{DATA_DIR}/keys.db", MASTER_KEY).stdout
    assert owners.splitlines() == [f"{SERVER_USER} 600", "root 400"]
    assert not chroot.path(f"{DATA_DIR}/master.key").exists()  # the key is kept apart
    check = chroot.run("systemd-analyze", "condition", f"--unit={SERVER_UNIT}", check=False)
    assert check.returncode == 0 and "Conditions succeeded" in check.stderr, check


@dataclass
class Serving:
    setup: ServerSetup
    cert: Path
    key: Path
    pid: int  # gunicorn's arbiter


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A client that presents CERT and trusts nothing: the caller checks the pin."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    return context


def server_key_pin(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return pinning.pin_of_certificate(der)


@pytest.fixture(scope="class")
def serving(
    installed: System, server_setup: ServerSetup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serving]:
    """`serve` as the unit runs it: as zfs-unlock, the master key as the credential
    master-key in $CREDENTIALS_DIRECTORY; on 127.0.0.1 and a free port. Stopped after."""
    assert server_setup.init.returncode == 0, tail(server_setup.init)
    chroot = installed.chroot
    chroot.run(
        "sh",
        "-euc",
        f"install -d -m 0500 -o {SERVER_USER} -g {SERVER_USER} {CREDENTIALS}\n"
        f"install -m 0400 -o {SERVER_USER} -g {SERVER_USER} {MASTER_KEY} {CREDENTIALS}/",
    )
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            chroot.command(
                SERVER, "--data-dir", DATA_DIR, "serve",
                "--listen", f"127.0.0.1:{server_setup.port}", "--workers", "1",
                env={"CREDENTIALS_DIRECTORY": CREDENTIALS}, user=SERVER_USER,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        context = tls_context(
            chroot.path(f"{AGENT_ETC}/client.crt"), chroot.path(f"{AGENT_ETC}/client.key")
        )
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                server_key_pin(server_setup.port, context)
                break
            except (OSError, ssl.SSLError):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield Serving(
            server_setup,
            chroot.path(f"{AGENT_ETC}/client.crt"),
            chroot.path(f"{AGENT_ETC}/client.key"),
            process.pid,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
        chroot.run("rm", "-rf", "/run/credentials")


class TestServing:
    def test_serve_runs_as_the_server_user(self, installed: System, serving: Serving) -> None:
        uid = installed.chroot.run("id", "-u", SERVER_USER).stdout.strip()
        status = Path(f"/proc/{serving.pid}/status").read_text()
        (uids,) = re.findall(r"^Uid:\t(.*)$", status, re.MULTILINE)
        assert uids.split() == [uid] * 4, status

    def test_serve_presents_the_key_that_pin_printed(self, serving: Serving) -> None:
        context = tls_context(serving.cert, serving.key)
        assert server_key_pin(serving.setup.port, context) == serving.setup.pin

    def test_serve_answers_the_enrolled_host(self, serving: Serving) -> None:
        body = json.dumps({"machine_id": serving.setup.machine_id})
        connection = http.client.HTTPSConnection(
            "127.0.0.1",
            serving.setup.port,
            timeout=10,
            context=tls_context(serving.cert, serving.key),
        )
        try:
            connection.request(
                "POST",
                "/v1/checkin",
                body=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        assert response.status == 200, answer
        assert json.loads(answer)["host"] == HOST_NAME


# Upgrade, remove, purge


def repack(deb: Path, out: Path, version: str) -> Path:
    """DEB as VERSION: control's Version and the exact-version dependency on the common
    package rewritten; the agent's conffile changed too, as a new release may."""
    tree = out / f"{deb.stem}.tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=60)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    text = re.sub(r"^Version: .*$", f"Version: {version}", text, flags=re.MULTILINE)
    text = text.replace(f"{COMMON} (= {VERSION})", f"{COMMON} (= {version})")
    control.write_text(text)
    conffile = tree / CONFFILE.lstrip("/")
    if conffile.exists():
        conffile.write_text(conffile.read_text() + f"# {version}\n")
        digest = hashlib.md5(conffile.read_bytes()).hexdigest()  # noqa: S324 (dpkg's md5sums)
        md5sums = tree / "DEBIAN" / "md5sums"
        md5sums.write_text(
            re.sub(
                rf"^\w+(  {re.escape(CONFFILE.lstrip('/'))})$",
                rf"{digest}\1",
                md5sums.read_text(),
                flags=re.MULTILINE,
            )
        )
    name = out / deb.name.replace(f"_{VERSION}_", f"_{version}_")
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(name)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return name


def snapshot(chroot: Chroot, paths: Sequence[str]) -> dict[str, str]:
    """Each file under PATHS: mode, owner and SHA-256."""
    found = {}
    for path in paths:
        done = chroot.run("find", path, "-type", "f", "-printf", r"%p %m %U:%G\n")
        for line in done.stdout.splitlines():
            name, attributes = line.split(" ", 1)
            digest = hashlib.sha256(chroot.path(name).read_bytes()).hexdigest()
            found[name] = f"{attributes} {digest}"
    return found


ADMIN_EDIT = "# the admin's own line\n"


def test_upgrade_keeps_configuration_identity_and_data(
    installed: System, server_setup: ServerSetup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    chroot = installed.chroot
    assert server_setup.init.returncode == 0, tail(server_setup.init)
    conffile = chroot.path(CONFFILE)
    conffile.write_text(conffile.read_text() + ADMIN_EDIT)
    kept = [AGENT_ETC, SERVER_ETC, DATA_DIR, CONFFILE]
    before = snapshot(chroot, kept)
    assert {f"{AGENT_ETC}/{n}" for n in ADMIN_FILES} | {MASTER_KEY} <= set(before)
    assert before[f"{AGENT_ETC}/client.key"].startswith("400 0:0 ")
    out = tmp_path_factory.mktemp("upgrade")
    new = [repack(installed.debs[p], out, UPGRADE_VERSION) for p in PACKAGES]
    for deb in new:
        shutil.copyfile(deb, chroot.path(f"{DEBS}/{deb.name}"))
    started = time.monotonic()
    done = chroot.apt(
        "-o", "Dpkg::Options::=--force-confold", "install",
        *(f"{DEBS}/{deb.name}" for deb in new), log=installed.log,
    )  # fmt: skip
    timed(installed, "apt-get install (upgrade)", started)
    assert done.returncode == 0, tail(done)
    now = chroot.installed()
    assert {p: now.get(p) for p in PACKAGES} == dict.fromkeys(PACKAGES, UPGRADE_VERSION)
    assert snapshot(chroot, kept) == before
    # dpkg kept the admin's conffile and put the package's new one beside it.
    assert conffile.read_text().endswith(ADMIN_EDIT)
    assert chroot.path(CONFFILE + ".dpkg-dist").read_text().endswith(f"# {UPGRADE_VERSION}\n")
    for unit in (AGENT_UNIT, SERVER_UNIT):
        assert chroot.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"


def test_remove_keeps_the_conffiles(installed: System) -> None:
    chroot = installed.chroot
    done = chroot.apt("remove", *PACKAGES, log=installed.log)
    assert done.returncode == 0, tail(done)
    assert not chroot.path(f"/usr/bin/{AGENT}").exists()
    assert not chroot.path(f"{UNIT_DIR}/{SERVER_UNIT}").exists()
    assert chroot.status(AGENT) == "deinstall ok config-files"
    assert chroot.path(CONFFILE).read_text().endswith(ADMIN_EDIT)


@dataclass(frozen=True)
class Reference:
    listing: dict[str, str]  # Chroot.listing() after installing the dependencies alone
    accounts: dict[str, set[str]]  # the users and groups that added


def reference_install(tree: Path, workdir: Path, packages: Sequence[str]) -> Reference:
    """Another copy of the clean tree, prepared alike, with PACKAGES (the dependencies
    ours pulled in) installed alone: their files as dpkg installs them (dpkg -L) and
    what their maintainer scripts make (rc.d and enablement links, /etc/hostid, users,
    bytecode...)."""
    chroot = Chroot(tree, workdir)
    try:
        chroot.prepare()
        users = accounts(chroot)
        done = chroot.apt("install", *packages, log=workdir / "apt.log")
        assert done.returncode == 0, tail(done)
        added = {name: names - users[name] for name, names in accounts(chroot).items()}
        return Reference(chroot.listing(), added)
    finally:
        chroot.close()


def test_purge_leaves_only_the_keys_and_the_admins_files(
    installed: System,
    server_setup: ServerSetup,
    tree: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    chroot = installed.chroot
    assert server_setup.init.returncode == 0, tail(server_setup.init)
    done = chroot.apt("purge", *PACKAGES, log=installed.log)
    assert done.returncode == 0, tail(done)
    assert f"purge keeps {DATA_DIR} {SERVER_ETC}" in done.stdout + done.stderr, tail(done)
    for package in PACKAGES:
        assert chroot.status(package).endswith(("unknown", "not-installed")), package
    after = chroot.listing()
    dependencies = sorted(set(chroot.installed()) - set(installed.packages_before))
    started = time.monotonic()
    reference = reference_install(tree, tmp_path_factory.mktemp("reference"), dependencies)
    timed(installed, "reference install of the dependencies alone", started)
    # Changed since before the install, and not as the dependencies alone leave it.
    before, theirs = installed.before, reference.listing
    left = sorted(
        f"{p}: before {before.get(p, '-')}, now {after.get(p, '-')},"
        f" with the dependencies alone {theirs.get(p, '-')}"
        for p in before.keys() | after.keys()
        if before.get(p) != after.get(p) != theirs.get(p)
        and p not in (*KEPT, *BOOKKEEPING_FILES, *ACCOUNTS)
        and not p.startswith((*BOOKKEEPING, DATA_DIR + "/"))
    )
    assert not left, "purge left behind:\n" + "\n".join(left)
    for path in KEPT:
        assert path in after, f"purge removed {path}"
    # Accounts: the server's user and group stay, beside the dependencies' own.
    for name, names in accounts(chroot).items():
        added = names - installed.users_before[name] - reference.accounts[name]
        assert added == {SERVER_USER}, (name, added)
