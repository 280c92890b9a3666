"""README.md's install and first-run commands, run as written, in order, on a clean
Debian 12 with the packages of this checkout: the README cannot drift from the product.

The blocks to walk are marked in README.md, on the line before their ```sh fence:
`<!-- walk: server, install -->`, `<!-- walk: host, install -->`, `<!-- walk: server -->`,
`<!-- walk: host -->`. They are read from README.md at test time, never copied here; a
block without a marker is prose and not run. Fewer than MIN_BLOCKS marked blocks, or a
marker not followed by a ```sh block, fails the test.

The key server and the host (keys.example.org and web1, both 127.0.0.1 in /etc/hosts)
are one throw-away chroot on the tier's cached bookworm tree (Chroot, system.py), with
the host name web1 (a UTS namespace of the helper that holds the mounts). Server blocks
run as root in /root/admin, the admin's directory on the key server; host blocks as
root in /root. Each block runs as `bash -euxo pipefail -c BLOCK` with the chroot's clean
environment, the shims' directory first in PATH, and PIN: the pin `zfs-unlock-server
init` printed (its block's standard output, one line; checked against `pin`).

- `install` blocks run in /root with the .debs in /root/build/deb/, on the host's network:
  apt installs from the tree's cache of Debian's packages and fetches what it lacks from
  Debian's mirror. apt asks before it installs more than named; the walk answers yes for
  the admin (APT::Get::Assume-Yes, while the install blocks run). The tree's apt installs
  recommends only when asked (build-tree.sh), so zfs-initramfs | zfs-dracut (the agent's
  recommendation) and zfsutils-linux's (zfs-modules | zfs-dkms, zfs-zed) are left out,
  as the package tier leaves them out.
- Every other block runs in a network namespace of the test's own (`ip netns add`,
  only `lo`, up), so the server's default listen, 0.0.0.0:8443, is reachable there
  alone, and nothing of the walk can reach or be reached from the machine's network.
- The line of a server block that ends with `# as setup printed it` is replaced by the
  line `zfs-unlock-agent setup` printed on standard output, once both are found to have
  the same words but the values of --machine-id and --pool.

Stand-ins, each a few lines (SCP, SYSTEMCTL, the zfs wrappers):

- `scp` copies within the chroot (both machines are this one): a `user@host:` prefix is
  dropped. No options.
- `systemctl start UNIT` stands for systemd, which does not run in a chroot. It reads
  the installed unit: fails if a ConditionPathExists= path is missing (but /dev/zfs, the
  kernel module's device, which the stand-in for zfs replaces), makes StateDirectory= and
  LogsDirectory= as systemd would (owner User=, their modes), copies each
  LoadCredential=ID:PATH to /run/credentials/UNIT/ID (0400, the User='s, in a 0500
  directory) and sets CREDENTIALS_DIRECTORY, runs each ExecStartPre= (failing the start if
  one fails) and then ExecStart= in the background as User= (its groups too) with UMask=, in WorkingDirectory= (/ by
  default), a new session and a clean
  environment (PATH, and HOME, USER, LOGNAME of User=), its output in
  /var/log/zua-walk/UNIT.log. It does not apply the units' sandboxing (Protect*=,
  SystemCallFilter=, ...), and there is no NOTIFY_SOCKET: readiness is judged instead —
  for zfs-unlock-server.service, until the port of `listen` in server.toml (8443 by
  default) takes connections in the network namespace; for any other unit, by its still
  running after two seconds. zfs-unlock-agent.service's daemon does run in the chroot
  (checked: its boot pass, and its udev monitor's netlink socket, which opens in the
  network namespace; with no udevd there it would hear of no hot-plugged disk, which
  the walk does not need). Any other use of systemctl fails the walk (and is logged;
  the test checks the log).
- /usr/sbin/zfs and /usr/sbin/zpool (zfsutils-linux's, installed by apt with the agent;
  there is no kernel module) are replaced, in the throw-away overlay, by wrappers that
  run tests/fakes/fake_zfs.py (copied in) with the chroot's /usr/bin/python3, its state
  in the chroot: one pool, tank, as FakeZfs.add_pool makes it.
- /etc/machine-id, empty in the debootstrap tree, gets a random id if still empty
  when the first block after the installs runs (systemd's postinst usually fills it).

After the walk: `check` exited 0, `enroll --create` made tank/secret an encryption root
with keylocation=prompt, managed by the agent; `status` says its key is available;
`host show web1` names the host; the audit log has web1's enroll record; the client key
is 0400; and no dataset key (opened from keys.db with the master key) appears in any
block's output, the services' logs or the fake's files. The test kills what the walk
started, then deletes the network namespace, then unmounts. Timings are printed (-s).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.deb.system import AGENT, COMMON, REPO, SERVER, Chroot
from tests.fakes import FAKE
from zfs_unlock_server.sealing import load_master_key
from zfs_unlock_server.service import context_of
from zfs_unlock_server.sqlitestore import SqliteStore

pytestmark = [pytest.mark.deb, pytest.mark.usefixtures("deb_tier")]

README = REPO / "README.md"
MARKER = re.compile(r"<!-- walk: (server|host)(, install)? -->")
MIN_BLOCKS = 6
SETUP_PRINTED = "# as setup printed it"
HOST_NAME, SERVER_NAME = "web1", "keys.example.org"
ROLE_DIRS = {"server": "/root/admin", "host": "/root"}
DEB_DIR = "/root/build/deb"  # the README's ./build/deb, run from /root
SHIMS = "/opt/zua-walk/bin"
RUN_DIR = "/run/zua-walk"  # the systemctl stand-in's pid files and call log
LOG_DIR = "/var/log/zua-walk"  # the started services' output
FAKE_PROGRAM = "/opt/zua-fake-zfs/fake_zfs.py"
FAKE_DIR = "/var/lib/zua-fake-zfs"
FAKE_STATE, FAKE_LOG = f"{FAKE_DIR}/state.json", f"{FAKE_DIR}/calls.jsonl"
ASSUME_YES = "/etc/apt/apt.conf.d/99zua-walk-admin-says-yes"
DATA_DIR = "/var/lib/zfs-unlock-server"
MASTER_KEY = "/etc/zfs-unlock-server/master-key"
CLIENT_KEY = "/etc/zfs-unlock-agent/client.key"
DATASET = "tank/secret"
INSTALL_TIMEOUT, BLOCK_TIMEOUT = 900.0, 180.0
UEVENT = 15  # NETLINK_KOBJECT_UEVENT, the socket a udev monitor listens on

SCP = """#!/bin/sh
# scp, for zfs-unlock-agent's README walk: both machines are this chroot, so a copy
# within it; a user@host: prefix is dropped. No options.
set -eu
[ $# = 2 ] || { echo "scp stand-in: SOURCE TARGET only, not: $*" >&2; exit 2; }
strip() { case $1 in -*) echo "scp stand-in: no options: $1" >&2; exit 2 ;;
    [!/]*:*) echo "${1#*:}" ;; *) echo "$1" ;; esac; }
exec cp -- "$(strip "$1")" "$(strip "$2")"
"""

SYSTEMCTL = f"""#!/bin/bash
# systemctl, for zfs-unlock-agent's README walk: 'systemctl start UNIT' alone, done as
# systemd would from the installed unit (see tests/deb/test_readme_walk.py).
set -euo pipefail
mkdir -p {RUN_DIR} {LOG_DIR}
echo "systemctl $*" >>{RUN_DIR}/systemctl.calls
[ $# = 2 ] && [ "$1" = start ] || {{ echo "systemctl stand-in: only start UNIT: $*" >&2; exit 1; }}
unit=${{2%.service}}.service file=/lib/systemd/system/${{2%.service}}.service
[ -f "$file" ] || {{ echo "systemctl stand-in: Unit $unit not found." >&2; exit 5; }}
get() {{ sed -n "s/^$1=//p" "$file"; }}
for path in $(get ConditionPathExists); do
    [ "$path" = /dev/zfs ] || [ -e "$path" ] ||
        {{ echo "systemctl stand-in: $unit: ConditionPathExists=$path fails" >&2; exit 1; }}
done
user=$(get User) user=${{user:-root}} group=$(get Group) group=${{group:-$user}}
env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin USER=$user LOGNAME=$user
     HOME=$(getent passwd "$user" | cut -d: -f6))
for kind in State:/var/lib Logs:/var/log; do
    name=$(get "${{kind%:*}}Directory") mode=$(get "${{kind%:*}}DirectoryMode")
    [ -z "$name" ] || install -d -m "${{mode:-0755}}" -o "$user" -g "$group" "${{kind#*:}}/$name"
done
credentials=/run/credentials/$unit
for credential in $(get LoadCredential); do
    install -d -m 0500 -o "$user" -g "$group" "$credentials"
    install -m 0400 -o "$user" -g "$group" "${{credential#*:}}" "$credentials/${{credential%%:*}}"
done
[ ! -d "$credentials" ] || env+=(CREDENTIALS_DIRECTORY=$credentials)
as_user=(setpriv --reuid="$user" --regid="$group" --init-groups env -i "${{env[@]}}")
mask=$(get UMask) && [ -z "$mask" ] || umask "$mask"
directory=$(get WorkingDirectory) && cd "${{directory:-/}}"
while read -r pre; do "${{as_user[@]}}" $pre </dev/null >>{LOG_DIR}/$unit.log 2>&1; done \
    < <(get ExecStartPre)
setsid "${{as_user[@]}}" $(get ExecStart) </dev/null >>{LOG_DIR}/$unit.log 2>&1 &
echo $! >{RUN_DIR}/$unit.pid
if [ "$unit" = zfs-unlock-server.service ]; then
    port=$(sed -n 's/^listen *= *"[^"]*:\\([0-9]*\\)".*/\\1/p' {DATA_DIR}/server.toml)
    for _ in $(seq 300); do
        (exec 3<>/dev/tcp/127.0.0.1/"${{port:-8443}}") 2>/dev/null && exit 0
        kill -0 $! 2>/dev/null || break
        sleep 0.2
    done
    echo "systemctl stand-in: $unit does not listen on ${{port:-8443}}" >&2; exit 1
fi
sleep 2
kill -0 $! 2>/dev/null || {{ echo "systemctl stand-in: $unit exited" >&2; exit 1; }}
"""

FAKE_WRAPPER = """#!/bin/sh
# zfs-unlock-agent's README walk: the stand-in for OpenZFS's {program} (no kernel module
# here): tests/fakes/fake_zfs.py, its pools and datasets in {state}.
exec /usr/bin/python3 {fake} --state {state} --log {log} {program} "$@"
"""


# The README's marked blocks


@dataclass(frozen=True)
class Block:
    line: int  # README.md's line of the ```sh fence
    role: str  # server or host
    install: bool
    text: str

    def describe(self) -> str:
        kind = f"{self.role}, install" if self.install else self.role
        return f"README.md line {self.line} ({kind})"


def readme_blocks(text: str) -> list[Block]:
    """The marked blocks of TEXT, in order; AssertionError for a malformed marker or
    one that no ```sh block follows."""
    lines = text.splitlines()
    blocks = []
    for number, line in enumerate(lines, 1):
        if not line.lstrip().startswith("<!-- walk"):
            continue
        marker = MARKER.fullmatch(line.strip())
        assert marker, f"README.md line {number}: malformed walk marker: {line!r}"
        fence = lines[number] if number < len(lines) else ""
        assert fence == "```sh", (
            f"README.md line {number}: {line!r} is not followed by a ```sh block: {fence!r}"
        )
        try:
            end = lines.index("```", number + 1)
        except ValueError:
            raise AssertionError(f"README.md line {number + 1}: the block never ends") from None
        body = "\n".join(lines[number + 1 : end]) + "\n"
        blocks.append(Block(number + 1, marker.group(1), marker.group(2) is not None, body))
    return blocks


def masked_words(line: str) -> list[str]:
    """LINE's shell words (its comment dropped), the values of --machine-id and --pool
    replaced: what must be equal between the README's line and setup's."""
    words = shlex.split(line, comments=True)
    return [
        "VALUE" if index and words[index - 1] in ("--machine-id", "--pool") else word
        for index, word in enumerate(words)
    ]


# The walk


@dataclass
class Ran:
    block: Block
    script: str  # what ran: the block, the setup line put in
    done: subprocess.CompletedProcess[str]
    seconds: float

    def report(self) -> str:
        return (
            f"{self.block.describe()}, exit {self.done.returncode} after {self.seconds:.1f} s:\n"
            f"{self.script}--- stdout\n{self.done.stdout}--- stderr\n{self.done.stderr}"
        )


@dataclass
class Walk:
    chroot: Chroot
    netns: str  # /run/netns/NAME
    blocks: list[Block]
    ran: list[Ran] = field(default_factory=list)
    pin: str = ""
    setup_line: str = ""
    pool_guid: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return len(self.ran) == len(self.blocks) and all(r.done.returncode == 0 for r in self.ran)

    def stopped(self) -> str:
        if not self.ran:
            return "the walk ran no block"
        logs = self.chroot.path(LOG_DIR)
        started = sorted(logs.glob("*.log")) if logs.is_dir() else []
        return "the walk stopped:\n" + "".join(
            [self.ran[-1].report(), *(f"--- {log.name}\n{log.read_text()}" for log in started)]
        )

    def ran_with(self, command: str) -> Ran:
        (found,) = [r for r in self.ran if command in r.block.text]
        return found

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """ARGV in the chroot as the walk's blocks run (root, the network namespace)."""
        return self.chroot.run(*argv, netns=self.netns, check=check)


def write(chroot: Chroot, inside: str, text: str, mode: int = 0o644) -> None:
    path = chroot.path(inside)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def install_fake_zfs(chroot: Chroot, pool_guid: str) -> None:
    """The wrappers in place of zfsutils-linux's zfs and zpool; the state made the first
    time: the pool tank and its root dataset, as FakeZfs.add_pool writes them."""
    program = chroot.path(FAKE_PROGRAM)
    if not program.exists():
        program.parent.mkdir(parents=True)
        shutil.copyfile(FAKE, program)
        state = {
            "pools": {"tank": {"guid": pool_guid}},
            "datasets": {
                "tank": {"type": "filesystem", "guid": random_guid(), "mounted": True},
            },
            "zvol_dir": f"{FAKE_DIR}/zvol",
        }
        write(chroot, FAKE_STATE, json.dumps(state, indent=1), 0o600)
        write(chroot, FAKE_LOG, "", 0o600)
    for name in ("zfs", "zpool"):
        wrapper = FAKE_WRAPPER.format(
            program=name, fake=FAKE_PROGRAM, state=FAKE_STATE, log=FAKE_LOG
        )
        path = chroot.path(f"/usr/sbin/{name}")
        if not path.exists() or path.read_bytes() != wrapper.encode():
            path.unlink(missing_ok=True)  # zfsutils-linux's binary, in the throw-away overlay
            write(chroot, f"/usr/sbin/{name}", wrapper, 0o755)


def random_guid() -> str:
    return str(secrets.randbits(64) or 1)


def fill_machine_id(chroot: Chroot) -> None:
    path = chroot.path("/etc/machine-id")
    if not path.read_text().strip():
        path.write_text(secrets.token_hex(16) + "\n")


def prepare(walk: Walk, debs: dict[str, Path]) -> None:
    chroot = walk.chroot
    chroot.prepare()
    hosts = chroot.path("/etc/hosts")  # debootstrap writes none
    known = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n"
    hosts.write_text(known + f"127.0.0.1\t{SERVER_NAME} {HOST_NAME}\n")
    for role_dir in ROLE_DIRS.values():
        chroot.path(role_dir).mkdir(parents=True, exist_ok=True)
    chroot.path(DEB_DIR).mkdir(parents=True)
    for deb in debs.values():
        shutil.copyfile(deb, chroot.path(f"{DEB_DIR}/{deb.name}"))
    write(chroot, f"{SHIMS}/scp", SCP, 0o755)
    write(chroot, f"{SHIMS}/systemctl", SYSTEMCTL, 0o755)


def run_block(walk: Walk, block: Block) -> Ran:
    chroot = walk.chroot
    script = block.text
    if block.install:
        write(chroot, ASSUME_YES, 'APT::Get::Assume-Yes "true";\n')
    else:
        install_fake_zfs(chroot, walk.pool_guid)
        fill_machine_id(chroot)
    if SETUP_PRINTED in script:
        (readme_line,) = [ln for ln in script.splitlines() if ln.rstrip().endswith(SETUP_PRINTED)]
        assert walk.setup_line, f"{block.describe()}: no setup has printed its line yet"
        assert masked_words(readme_line) == masked_words(walk.setup_line), (
            f"README.md's line and what setup printed differ:\n{readme_line}\n{walk.setup_line}"
        )
        script = script.replace(readme_line, walk.setup_line)
    env = {"PATH": f"{SHIMS}:/usr/sbin:/usr/bin:/sbin:/bin"}
    if walk.pin:
        env["PIN"] = walk.pin
    started = time.monotonic()
    try:
        done = chroot.run(
            "bash", "-euxo", "pipefail", "-c", script,
            env=env,
            cwd="/root" if block.install else ROLE_DIRS[block.role],
            netns=None if block.install else walk.netns,
            timeout=INSTALL_TIMEOUT if block.install else BLOCK_TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        chroot.path(ASSUME_YES).unlink(missing_ok=True)
    ran = Ran(block, script, done, time.monotonic() - started)
    print(f"readme walk: {block.describe()}: exit {done.returncode}, {ran.seconds:.1f} s")
    return ran


def after_block(walk: Walk, ran: Ran) -> None:
    """What the walk takes from a block's output: init's pin, setup's line."""
    text = ran.block.text
    if re.search(rf"^{SERVER} init\b", text, re.MULTILINE):
        lines = ran.done.stdout.splitlines()
        assert len(lines) == 1, f"init's block printed not the pin alone:\n{ran.report()}"
        walk.pin = lines[0].strip()
        again = walk.run(SERVER, "pin").stdout.strip()
        assert walk.pin == again, f"init printed {walk.pin}, pin prints {again}"
    if re.search(rf"^{AGENT} setup\b", text, re.MULTILINE):
        lines = ran.done.stdout.splitlines()
        assert len(lines) == 1, f"setup printed more than its line:\n{ran.report()}"
        walk.setup_line = lines[0]
        words = shlex.split(walk.setup_line)
        machine_id = walk.chroot.path("/etc/machine-id").read_text().strip()
        assert words[words.index("--machine-id") + 1] == machine_id, walk.setup_line
        assert words[words.index("--pool") + 1] == walk.pool_guid, walk.setup_line


def walk_readme(walk: Walk, transcript: Path) -> None:
    """Each block in order, until one fails; every block's report appended to TRANSCRIPT."""
    for block in walk.blocks:
        ran = run_block(walk, block)
        walk.ran.append(ran)
        with transcript.open("a") as out:
            out.write(ran.report() + "\n")
        if ran.done.returncode != 0:
            break
        after_block(walk, ran)
    logs = walk.chroot.path(LOG_DIR)
    with transcript.open("a") as out:
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            out.write(f"--- {LOG_DIR}/{log.name}\n{log.read_text()}")


def stop_started(chroot: Chroot) -> None:
    """Ends every process the systemctl stand-in started (and its session)."""
    run_dir = chroot.path(RUN_DIR)
    for pid_file in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        pid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + 20
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not Path(f"/proc/{pid}").exists():
                break


@pytest.fixture(scope="module")
def walk(
    tree: Path, debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Walk]:
    """The README walked (or as far as it went) in a clean chroot and a network namespace."""
    started = time.monotonic()
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= MIN_BLOCKS, f"README.md has {len(blocks)} marked blocks"
    name = f"zua-walk-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    chroot: Chroot | None = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        workdir = tmp_path_factory.mktemp("readme-walk")
        chroot = Chroot(tree, workdir / "overlay", hostname=HOST_NAME)
        state = Walk(chroot, f"/run/netns/{name}", blocks, pool_guid=random_guid())
        prepare(state, debs)
        print(f"readme walk: transcript in {workdir / 'walk.log'}")
        walk_readme(state, workdir / "walk.log")
        state.seconds["walk"] = round(time.monotonic() - started, 1)
        installs = sum(r.seconds for r in state.ran if r.block.install)
        print(
            f"readme walk: {len(state.ran)} of {len(blocks)} blocks in {state.seconds['walk']} s"
            f" (the installs {installs:.1f} s, the rest {state.seconds['walk'] - installs:.1f} s)"
        )
        yield state
    finally:
        if chroot is not None:
            stop_started(chroot)
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)
        if chroot is not None:
            chroot.close()


@pytest.fixture(scope="module")
def walked(walk: Walk) -> Walk:
    if not walk.completed:
        pytest.fail(walk.stopped())
    return walk


# The tests


def test_the_readme_marks_its_install_and_first_run_blocks() -> None:
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= MIN_BLOCKS, f"README.md has {len(blocks)} marked blocks"
    assert {(b.role, b.install) for b in blocks} == {
        ("server", True), ("host", True), ("server", False), ("host", False)
    }  # fmt: skip
    assert sum(SETUP_PRINTED in b.text for b in blocks) == 1


def test_every_marked_block_runs_as_written(walk: Walk) -> None:
    assert walk.completed, walk.stopped()
    assert walk.pin, "no block ran zfs-unlock-server init"
    assert walk.setup_line, "no block ran zfs-unlock-agent setup"
    calls = walk.chroot.path(f"{RUN_DIR}/systemctl.calls").read_text().splitlines()
    assert all(c.startswith("systemctl start ") for c in calls), calls


def test_check_passed_and_enroll_created_a_managed_encryption_root(walked: Walk) -> None:
    ran = walked.ran_with(f"{AGENT} check")
    assert ran.done.returncode == 0  # the block runs with -e: check exited 0
    state = json.loads(walked.chroot.path(FAKE_STATE).read_text())
    secret = state["datasets"][DATASET]
    assert secret["encryptionroot"] == DATASET, secret
    assert secret["keylocation"] == "prompt", secret
    assert secret["props"].get("zfs-unlock-agent:managed") == "on", secret
    assert secret["keystatus"] == "available", secret


def test_status_says_the_key_is_available(walked: Walk) -> None:
    ran = walked.ran_with(f"{AGENT} status")
    rows = [ln.split() for ln in ran.done.stdout.splitlines() if ln.startswith(DATASET + " ")]
    assert rows and rows[-1][1] == "available", ran.report()
    rows_json = json.loads(walked.run(AGENT, "status", "--json").stdout)
    assert [(r["encryption_root"], r["keystatus"]) for r in rows_json] == [(DATASET, "available")]


def test_the_key_server_runs_as_its_unit_says(walked: Walk) -> None:
    """As the unit's User=, with the master key as its credential, on 0.0.0.0:8443."""
    pid = int(walked.chroot.path(f"{RUN_DIR}/{SERVER}.service.pid").read_text())
    uid = walked.run("id", "-u", "zfs-unlock").stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    (uids,) = re.findall(r"^Uid:\t(.*)$", status, re.MULTILINE)
    assert uids.split() == [uid] * 4, status
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    credentials = f"/run/credentials/{SERVER}.service"
    assert f"CREDENTIALS_DIRECTORY={credentials}".encode() in environment
    key = walked.run("stat", "-c", "%a %U", f"{credentials}/master-key").stdout.split()
    assert key == ["400", "zfs-unlock"]
    log = walked.chroot.path(f"{LOG_DIR}/{SERVER}.service.log").read_text()
    assert "on https://0.0.0.0:8443" in log, log


def test_the_agent_daemon_runs(walked: Walk) -> None:
    pid = int(walked.chroot.path(f"{RUN_DIR}/{AGENT}.service.pid").read_text())
    assert Path(f"/proc/{pid}").exists(), walked.chroot.path(f"{LOG_DIR}/{AGENT}.service.log")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"daemon" in cmdline, cmdline
    log = walked.chroot.path(f"{LOG_DIR}/{AGENT}.service.log").read_text()
    assert "boot pass done: 1 of 1 managed encryption roots unlocked" in log, log
    # Its udev monitor opened: it holds a NETLINK_KOBJECT_UEVENT socket (protocol 15).
    sockets = {
        link.removeprefix("socket:[").removesuffix("]")
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if (link := os.readlink(fd)).startswith("socket:[")
    }
    netlink = [line.split() for line in Path(f"/proc/{pid}/net/netlink").read_text().splitlines()]
    uevent = [row for row in netlink[1:] if row[1] == str(UEVENT) and row[-1] in sockets]
    assert uevent, netlink


def test_the_server_knows_the_host_and_audited_its_enrollment(walked: Walk) -> None:
    show = walked.ran_with(f"{SERVER} host show {HOST_NAME}")
    assert re.search(rf"\b{HOST_NAME}\b", show.done.stdout), show.report()
    audit = walked.run(SERVER, "audit", "--host", HOST_NAME, "--json").stdout
    records: list[dict[str, Any]] = [json.loads(line) for line in audit.splitlines()]
    allowed = {(r.get("event"), r.get("decision")) for r in records}
    print(f"readme walk: audit events for {HOST_NAME}: {sorted(map(str, allowed))}")
    assert ("enroll", "allow") in allowed, records


def test_the_client_key_is_read_only_for_root(walked: Walk) -> None:
    assert walked.run("stat", "-c", "%a %U", CLIENT_KEY).stdout.split() == ["400", "root"]


def test_no_key_appears_in_any_output(walked: Walk, tmp_path: Path) -> None:
    """Each dataset key in keys.db, opened with the master key, is nowhere in the blocks'
    output, the services' logs, the audit log or the fake zfs's state and call log."""
    chroot = walked.chroot
    for name in ("keys.db", "keys.db-wal"):
        if chroot.path(f"{DATA_DIR}/{name}").exists():
            shutil.copyfile(chroot.path(f"{DATA_DIR}/{name}"), tmp_path / name)
    store = SqliteStore(tmp_path / "keys.db")
    try:
        records = store.keys()
    finally:
        store.close()
    assert records, "keys.db holds no key: enroll made none"
    haystacks = {
        r.block.describe(): (r.script + r.done.stdout + r.done.stderr).encode() for r in walked.ran
    }
    for inside in (FAKE_STATE, FAKE_LOG, f"{DATA_DIR}/audit.log"):
        haystacks[inside] = chroot.path(inside).read_bytes()
    for log in chroot.path(LOG_DIR).glob("*.log"):
        haystacks[log.name] = log.read_bytes()
    old = os.environ.pop("CREDENTIALS_DIRECTORY", None)
    try:
        sealer = load_master_key(chroot.path(MASTER_KEY))
    finally:
        if old is not None:
            os.environ["CREDENTIALS_DIRECTORY"] = old
    found = []
    for record in records:
        material = sealer.open(record.sealed, context_of(record))
        forms = (material, material.hex().encode(), base64.b64encode(material))
        found += [where for where, data in haystacks.items() if any(f in data for f in forms)]
    assert not found, f"a dataset key appears in: {found}"
    print(f"readme walk: {len(records)} key(s) searched in {len(haystacks)} outputs and files")


def test_the_packages_are_this_checkouts(walked: Walk, debs: dict[str, Path]) -> None:
    now = walked.chroot.installed()
    for package in (AGENT, SERVER, COMMON):
        assert debs[package].name.startswith(f"{package}_{now.get(package)}_"), (package, now)
