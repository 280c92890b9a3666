"""`zfs-unlock-agent password-agent` against the real systemd-ask-password and the real key
server, with the fake zfs.

Each test gets its own mount namespace in which a temporary directory is
/run/systemd/ask-password (a tmpfs on /run, so nothing of the machine's own /run is
touched). The asker runs there as OpenZFS's zfs-load-key@ unit runs it
(`systemd-ask-password --id=zfs:ROOT ... | zfs load-key ROOT`, the fake zfs reading the
key from its stdin), and so does the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.fakes import sha256
from tests.keyserver import KeyServer

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("systemd-ask-password") is None,
        reason="needs root (a mount namespace) and systemd-ask-password",
    ),
    pytest.mark.slow,  # most wait for a question's time to run out: 30 s for the module
]

ASK_DIR = "/run/systemd/ask-password"
HOLD = (
    f"mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p {ASK_DIR};"
    f' mount --bind "$1" {ASK_DIR}; echo ready; exec sleep infinity'
)
SEND = (
    "import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
    ".sendto(b'+' + sys.argv[2].encode(), sys.argv[1])"
)


class Namespace:
    """A mount namespace held open by a sleeping process; DIRECTORY is its ask directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-ec",
                HOLD,
                "holder",
                str(directory),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline().strip() == "ready"

    def popen(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """ARGV in the namespace, its standard output and error piped."""
        return subprocess.Popen(
            ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    def close(self) -> None:
        self.holder.kill()
        self.holder.communicate()

    def ask_files(self) -> list[Path]:
        return sorted(self.directory.glob("ask.*"))

    def asker_pid(self) -> int:
        """The PID the one question names: systemd-ask-password's own."""
        [question] = self.ask_files()
        return int(field(question, "PID"))


def field(question: Path, name: str) -> str:
    return next(
        line.split("=", 1)[1]
        for line in question.read_text().splitlines()
        if line.startswith(f"{name}=")
    )


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    found = Namespace(tmp_path / "ask")
    yield found
    found.close()


def ask(
    ns: Namespace,
    host: AgentHost,
    dataset: str,
    timeout: float = 20,
    *,
    question: str | None = None,
) -> subprocess.Popen[str]:
    """OpenZFS's prompt for DATASET: by default a zfs-load-key@ unit's (Id=zfs:DATASET);
    QUESTION: dracut's, a message and no id. The pipeline's status is zfs's."""
    if question is None:
        asking = f'--id="zfs:{dataset}" "Enter passphrase for {dataset}:"'
    else:
        asking = f'"{question}"'
    pipeline = (
        f"systemd-ask-password --no-tty --timeout={timeout:g} {asking}"
        f' | "{host.zfs.zfs}" load-key -L prompt "{dataset}"'
    )
    asker = ns.popen(["sh", "-c", pipeline])
    deadline = time.monotonic() + 10
    while not ns.ask_files():
        assert time.monotonic() < deadline, "systemd-ask-password wrote no question"
        time.sleep(0.02)
    return asker


def agent(ns: Namespace, host: AgentHost, idle: float = 1.0) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    return ns.popen(
        [str(AGENT_BIN), "-c", str(host.config_path), "password-agent", "--idle", f"{idle:g}"],
        env=environment,
    )


def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """Wait for PROCESS; its status and its standard error."""
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def releases(server: KeyServer, host: AgentHost) -> int:
    return sum(
        1
        for r in server.audit_records()
        if r.get("event") == "release" and r.get("host") == host.creds.name
    )


def hex_root(host: AgentHost, name: str = "tank/secret") -> bytes:
    """A locked, managed root with a hex key the server holds; the key."""
    pool = host.zfs.add_pool(name.split("/", maxsplit=1)[0])
    return host.encrypted_dataset(name, pool, keyformat="hex")


# Answers


def test_a_zfs_load_key_question_is_answered_and_the_key_loads(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-answer")
    key = hex_root(host)
    asker = ask(namespace, host, "tank/secret")
    helper = agent(namespace, host)
    assert finish(asker)[0] == 0
    code, err = finish(helper)
    assert code == 0, err
    assert host.zfs.keystatus("tank/secret") == "available"
    assert "tank/secret: answered the password question" in err
    assert not namespace.ask_files()
    # Proven first by a dry run, then loaded by the asker's zfs, from the prompt's line.
    dry, real = host.zfs.calls("zfs", "load-key")
    assert "-n" in dry["argv"] and "-n" not in real["argv"]
    assert dry["stdin_sha256"] == sha256(key)
    assert real["stdin_sha256"] == sha256(key + b"\n")


def test_draculas_question_names_a_dataset_below_the_root(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    # dracut's zfs-load-key.sh asks "Encrypted ZFS password for BOOTFS", BOOTFS being the
    # root file system, which may sit below its encryption root; the key is the root's.
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-dracut")
    hex_root(host, "rpool/enc")
    host.zfs.add_child("rpool/enc/root")
    asker = ask(namespace, host, "rpool/enc", question="Encrypted ZFS password for rpool/enc/root")
    helper = agent(namespace, host)
    assert finish(asker)[0] == 0
    assert finish(helper)[0] == 0
    assert host.zfs.keystatus("rpool/enc") == "available"


def test_the_network_key_wins_when_the_server_comes_back_while_asked(
    keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    keyserver.start()
    host = AgentHost.create(tmp_path, keyserver, "pw-later")
    hex_root(host)
    keyserver.stop()
    asker = ask(namespace, host, "tank/secret", timeout=60)
    helper = agent(namespace, host)
    time.sleep(3)  # the agent is trying meanwhile
    assert asker.poll() is None and helper.poll() is None
    keyserver.start()
    assert finish(asker, 60)[0] == 0
    assert finish(helper, 60)[0] == 0
    assert host.zfs.keystatus("tank/secret") == "available"


def test_a_release_that_needs_approval_is_waited_for_with_one_request(
    keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    """The password agent keeps asking for the same request while the question is asked
    (its rounds each end at their deadline), and answers once a person approves it."""
    keyserver.configure(approval={"poll_seconds": 1})
    keyserver.start()
    host = AgentHost.create(tmp_path, keyserver, "pw-approval")
    host.write_config(network={"deadline": 2})
    key = hex_root(host)
    keyserver.must("host", "set", "pw-approval", "--approval", "required")
    asker = ask(namespace, host, "tank/secret", timeout=60)
    helper = agent(namespace, host)
    time.sleep(6)  # several rounds, each ending at the 2 s deadline
    assert asker.poll() is None and helper.poll() is None
    [request] = json.loads(keyserver.must("approval", "list", "--all", "--json"))
    keyserver.must("approval", "approve", request["id"])
    assert finish(asker, 60)[0] == 0
    code, err = finish(helper, 60)
    assert code == 0, err
    assert f"until a person approves request {request['id']}" in err
    assert err.count(f"approval approve {request['id']}") == 1, "said once"
    [loaded] = [c for c in host.zfs.calls("zfs", "load-key") if "-n" not in c["argv"]]
    assert loaded["stdin_sha256"] == sha256(key + b"\n")


# No answer


def assert_unanswered(asker: subprocess.Popen[str], helper: subprocess.Popen[str]) -> str:
    """The agent gave up on the question (it exits once the asker's time is up and the
    question is gone) and the asker got nothing: systemd-ask-password timed out."""
    code, err = finish(helper, 60)
    assert code == 0, err
    status, asker_err = finish(asker, 60)
    assert status != 0
    assert "Timer expired" in asker_err, asker_err
    return err


def test_a_foreign_question_is_left_alone(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-foreign")
    hex_root(host)
    pipeline = 'systemd-ask-password --no-tty --timeout=2 --id="cryptsetup:/dev/sda2" "Disk:"'
    asker = namespace.popen(["sh", "-c", pipeline])
    while not namespace.ask_files():
        time.sleep(0.02)
    helper = agent(namespace, host)
    assert_unanswered(asker, helper)
    assert releases(shared_keyserver, host) == 0


@pytest.mark.parametrize(
    ("keyformat", "managed", "said"),
    [
        ("hex", False, "tank/secret: not managed by zfs-unlock-agent"),
        ("raw", True, "tank/secret: its key is raw and cannot pass through a password prompt"),
    ],
    ids=["unmanaged", "raw"],
)
def test_a_root_that_is_not_ours_to_answer_gets_no_answer_and_the_log_says_why(
    shared_keyserver: KeyServer,
    tmp_path: Path,
    namespace: Namespace,
    keyformat: str,
    managed: bool,
    said: str,
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, f"pw-{keyformat}-{managed}")
    pool = host.zfs.add_pool("tank")
    host.encrypted_dataset("tank/secret", pool, keyformat=keyformat, managed=managed)
    asker = ask(namespace, host, "tank/secret", timeout=2)
    err = assert_unanswered(asker, agent(namespace, host))
    assert said in err
    assert releases(shared_keyserver, host) == 0


def test_a_key_that_does_not_prove_is_not_given(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-wrong")
    pool = host.zfs.add_pool("tank")
    guid = host.zfs.add_encrypted("tank/secret", os.urandom(32).hex().encode(), "hex")
    host.server_key(pool, guid, "tank/secret", "hex", os.urandom(32).hex().encode())
    asker = ask(namespace, host, "tank/secret", timeout=3)
    err = assert_unanswered(asker, agent(namespace, host))
    assert "tank/secret: no key from the key server opens it; no answer" in err
    # The agent's dry run, then the asker's zfs with nothing on its stdin: the prompt
    # ended without a line.
    dry, real = host.zfs.calls("zfs", "load-key")
    assert "-n" in dry["argv"] and "-n" not in real["argv"]
    assert real["stdin_len"] == 0
    assert host.zfs.keystatus("tank/secret") == "unavailable"


def test_a_dead_asker_gets_no_answer(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-dead")
    hex_root(host)
    asker = ask(namespace, host, "tank/secret")
    # SIGKILL: no clean-up, so its question stays behind, naming a PID that is gone.
    os.kill(namespace.asker_pid(), signal.SIGKILL)
    finish(asker, 10)
    assert len(namespace.ask_files()) == 1  # its question stays behind
    helper = agent(namespace, host)
    time.sleep(2)
    assert helper.poll() is None  # still watching: the directory is not empty
    for leftover in namespace.directory.iterdir():  # its question and its socket
        leftover.unlink()
    code, err = finish(helper)  # the agent exits once the directory is empty
    assert code == 0, err
    assert releases(shared_keyserver, host) == 0


def test_an_expired_question_gets_no_answer(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-expired")
    hex_root(host)
    asker = ask(namespace, host, "tank/secret", timeout=1)
    # Stopped, the asker cannot remove its question when its time is up.
    pid = namespace.asker_pid()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(1.5)
    helper = agent(namespace, host)
    time.sleep(2)
    assert helper.poll() is None  # still watching the question, not answering it
    os.kill(pid, signal.SIGCONT)
    assert finish(asker)[0] != 0
    assert finish(helper)[0] == 0
    assert releases(shared_keyserver, host) == 0
    assert host.zfs.keystatus("tank/secret") == "unavailable"


def test_a_question_answered_at_the_console_mid_fetch_gets_no_second_answer(
    shared_keyserver: KeyServer, tmp_path: Path, namespace: Namespace
) -> None:
    # The person at the console wins while the agent proves its key (a zfs that holds
    # `load-key -n` until told): the agent must not answer a question that is gone.
    host = AgentHost.create(tmp_path, shared_keyserver, "pw-console")
    typed = os.urandom(32).hex().encode()
    pool = host.zfs.add_pool("tank")
    guid = host.zfs.add_encrypted("tank/secret", typed, "hex")
    host.server_key(pool, guid, "tank/secret", "hex", typed)
    held, go = tmp_path / "held", tmp_path / "go"
    slow = tmp_path / "slow-zfs"
    slow.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = load-key ] && [ "$2" = -n ]; then touch "{held}";'
        f' while [ ! -e "{go}" ]; do sleep 0.05; done; fi\n'
        f'exec "{host.zfs.zfs}" "$@"\n'
    )
    slow.chmod(0o755)
    host.write_config(zfs_settings={"zfs": str(slow)})
    asker = ask(namespace, host, "tank/secret")
    helper = agent(namespace, host)
    deadline = time.monotonic() + 30
    while not held.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [question] = namespace.ask_files()
    socket_path = field(question, "Socket")
    console = namespace.popen(
        [
            "python3",
            "-c",
            SEND,
            socket_path,
            typed.decode(),
        ]
    )
    assert finish(console, 10)[0] == 0
    assert finish(asker)[0] == 0  # the typed key loaded
    go.touch()
    code, err = finish(helper)
    assert code == 0, err
    assert "tank/secret: the question was answered or withdrawn meanwhile" in err
    assert "answered the password question" not in err
    assert host.zfs.keystatus("tank/secret") == "available"
