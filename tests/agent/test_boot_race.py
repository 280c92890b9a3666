"""`zfs-unlock-agent boot-unlock`, the initramfs-tools race, against the real key server and
the fake zfs, with a pseudo-terminal as the console: the test reads what the console shows
and types as a person would."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.fakes import sha256
from tests.keyserver import KeyServer

PROMPT = re.compile(r"Enter hex key for 'tank/secret' \(the key server is tried meanwhile\): ")
EX_UNAVAILABLE, EX_TEMPFAIL = 69, 75


class Console:
    """The pseudo-terminal the agent runs on; OUTPUT is everything it showed so far."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the agent is gone and so is the last reader of the slave
                time.sleep(timeout)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 20, start: int = 0) -> float:
        """Wait until PATTERN shows (at or after START); when it did."""
        deadline = time.monotonic() + timeout
        while not pattern.search(self.output, start):
            assert time.monotonic() < deadline, f"{pattern.pattern!r} never showed:\n{self.output}"
            self.read(0.1)
        return time.monotonic()

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def refused(self, line: bytes, said: str) -> None:
        """Type LINE at the prompt; the console says SAID and asks again."""
        self.wait_for(PROMPT)
        self.type(line + b"\n")
        start = self.wait_for_match(re.compile(re.escape(said)))
        self.wait_for(PROMPT, start=start)

    def wait_for_match(self, pattern: re.Pattern[str], timeout: float = 20) -> int:
        """Wait until PATTERN shows; where its match ends."""
        self.wait_for(pattern, timeout)
        found = pattern.search(self.output)
        assert found is not None
        return found.end()

    def echoes(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def console() -> Iterator[Console]:
    found = Console()
    yield found
    found.close()


def boot_unlock(host: AgentHost, console: Console, *extra: str) -> subprocess.Popen[str]:
    """The agent as the initramfs-tools provider runs it, on CONSOLE; stderr piped."""
    environment = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    environment["PATH"] = f"{host.root}/no-plymouth:/usr/bin:/bin"
    return subprocess.Popen(
        [
            str(AGENT_BIN),
            "-c",
            str(host.config_path),
            "boot-unlock",
            "--dataset",
            "tank/secret",
            *extra,
        ],
        stdin=console.slave,
        stdout=console.slave,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def hex_root(host: AgentHost, keyformat: str = "hex", **extra: object) -> bytes:
    pool = host.zfs.add_pool("tank")
    return host.encrypted_dataset("tank/secret", pool, keyformat=keyformat, **extra)


def stopped_server_host(
    keyserver: KeyServer, tmp_path: Path, name: str, keyformat: str = "hex", **extra: object
) -> tuple[AgentHost, bytes]:
    """A host whose tank/secret key the server holds, the server then stopped."""
    keyserver.start()
    host = AgentHost.create(tmp_path, keyserver, name)
    key = hex_root(host, keyformat, **extra)
    keyserver.stop()
    return host, key


def test_the_network_key_wins_and_no_prompt_appears(
    shared_keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "race-up")
    key = hex_root(host)
    code, err = finish(boot_unlock(host, console, "--grace", "5"))
    console.read(0.2)
    assert code == 0, err
    assert "tank/secret: unlocked with the key server's key" in err
    assert not PROMPT.search(console.output), console.output
    assert host.zfs.keystatus("tank/secret") == "available"
    [loaded] = host.zfs.calls("zfs", "load-key")
    assert loaded["stdin_sha256"] == sha256(key)


def test_server_down_the_prompt_appears_after_the_grace_and_a_typed_key_wins(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, key = stopped_server_host(keyserver, tmp_path, "race-typed")
    started = time.monotonic()
    racing = boot_unlock(host, console, "--grace", "1")
    shown = console.wait_for(PROMPT)
    assert 1.0 <= shown - started < 10, shown - started
    assert not console.echoes(), "the typed key would be shown on the console"
    console.type(key + b"\n")
    code, err = finish(racing)
    assert code == 0, err
    assert "tank/secret: unlocked with the typed key" in err
    assert host.zfs.keystatus("tank/secret") == "available"
    [loaded] = host.zfs.calls("zfs", "load-key")
    assert loaded["stdin_sha256"] == sha256(key), "the typed line, without its newline"
    assert console.echoes(), "echo stays off after the race"
    assert key.decode() not in console.output + err


def test_the_grace_period_starts_once_the_network_is_up(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    # A slow DHCP answer must not bring the prompt up while the key is on its way.
    host, key = stopped_server_host(keyserver, tmp_path, "race-network")
    network_up = tmp_path / "network-up"
    racing = boot_unlock(host, console, "--grace", "1", "--network-up", str(network_up))
    time.sleep(3)
    console.read(0.1)
    assert not PROMPT.search(console.output), "the prompt came before the network"
    up = time.monotonic()
    network_up.touch()
    shown = console.wait_for(PROMPT)
    assert 1.0 <= shown - up < 10, shown - up
    console.type(key + b"\n")
    assert finish(racing)[0] == 0


def test_a_wrong_key_asks_again_and_the_network_wins_when_the_server_comes_back(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, key = stopped_server_host(keyserver, tmp_path, "race-wrong")
    racing = boot_unlock(host, console, "--grace", "0")
    console.refused(b"0" * 64, "That hex key does not open tank/secret; try again.")
    assert racing.poll() is None
    keyserver.start()
    code, err = finish(racing, 60)
    console.read(0.2)
    assert code == 0, err
    assert "tank/secret: unlocked with the key server's key" in err
    assert "tank/secret: unlocked with the key server's key; no key needed" in console.output
    assert host.zfs.keystatus("tank/secret") == "available"
    assert console.echoes()
    wrong, right = host.zfs.calls("zfs", "load-key")
    assert right["stdin_sha256"] == sha256(key)
    assert wrong["stdin_sha256"] != sha256(key)


def test_a_key_loaded_elsewhere_ends_the_race(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    # What OpenZFS's zfsunlock does over SSH: zfs load-key from another session.
    host, key = stopped_server_host(keyserver, tmp_path, "race-elsewhere")
    racing = boot_unlock(host, console, "--grace", "0")
    console.wait_for(PROMPT)
    loaded = subprocess.run(
        [host.zfs.zfs, "load-key", "-L", "prompt", "tank/secret"],
        input=key,
        capture_output=True,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    code, err = finish(racing)
    assert code == 0, err
    assert "unlocked with a key loaded from elsewhere" in err
    assert console.echoes()


def test_zfsunlocks_kill_takes_the_prompt_down(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    # zfsunlock kills the process named in /run/zfs_console_askpwd_cmd after loading the
    # key; killed with the key not loaded, the race says so in its status.
    host, _ = stopped_server_host(keyserver, tmp_path, "race-killed")
    racing = boot_unlock(host, console, "--grace", "0")
    console.wait_for(PROMPT)
    racing.send_signal(signal.SIGTERM)
    code, err = finish(racing)
    assert code == EX_TEMPFAIL, err
    assert "tank/secret: stopped; its key is not loaded" in err
    assert console.echoes(), "a killed prompt must not leave the console without echo"
    console.read(0.2)
    assert "unlocked" not in console.output


def test_a_raw_key_cannot_be_typed_and_the_console_says_what_to_do(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, _ = stopped_server_host(keyserver, tmp_path, "race-raw", "raw")
    racing = boot_unlock(host, console, "--grace", "0")
    console.wait_for(re.compile(r"tank/secret: its key is raw and cannot be typed"))
    assert "zfs load-key -L file:///PATH tank/secret" in console.output
    assert not re.search(r"Enter \S+", console.output)
    keyserver.start()
    code, err = finish(racing, 60)
    assert code == 0, err
    assert host.zfs.keystatus("tank/secret") == "available"


def test_a_refusal_shows_the_prompt_without_waiting_for_the_grace(
    shared_keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "race-refused")
    key = hex_root(host)
    shared_keyserver.must("host", "disable", "race-refused")
    started = time.monotonic()
    racing = boot_unlock(host, console, "--grace", "60")
    shown = console.wait_for(PROMPT, timeout=30)
    assert shown - started < 30
    console.type(key + b"\n")
    code, err = finish(racing)
    assert code == 0, err
    assert "refused" in err or "403" in err, err
    assert "tank/secret: unlocked with the typed key" in err


def test_a_key_loaded_before_the_race_ends_it_at_once(
    shared_keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "race-loaded")
    hex_root(host)
    with host.zfs.edit() as state:
        state["datasets"]["tank/secret"]["keystatus"] = "available"
    code, err = finish(boot_unlock(host, console))
    assert code == 0, err
    assert "its key is loaded already" in err
    assert not host.zfs.calls("zfs", "load-key")


PLYMOUTH = """#!/bin/sh
# plymouth, as the race uses it: --ping, ask-for-password (prints what the test put in
# $DIR/typed once it is there), display-message (appended to $DIR/messages).
DIR="$(dirname "$0")"
case "$1" in
--ping) exit 0 ;;
ask-for-password)
	echo "$$" >"$DIR/asking-pid"
	echo "$2" >>"$DIR/asked"
	while [ ! -e "$DIR/typed" ]; do sleep 0.05; done
	cat "$DIR/typed"; rm -f "$DIR/typed" ;;
display-message) echo "$2" >>"$DIR/messages" ;;
*) exit 1 ;;
esac
"""


def fake_plymouth(host: AgentHost) -> Path:
    """PLYMOUTH, first on the race's PATH (see boot_unlock); its directory."""
    splash = host.root / "no-plymouth"
    splash.mkdir()
    (splash / "plymouth").write_text(PLYMOUTH)
    (splash / "plymouth").chmod(0o755)
    return splash


def wait_for_file(path: Path, racing: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline and racing.poll() is None, path
        time.sleep(0.05)


def test_with_plymouth_running_the_splash_screen_asks(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, key = stopped_server_host(keyserver, tmp_path, "race-plymouth")
    splash = fake_plymouth(host)
    racing = boot_unlock(host, console, "--grace", "0")
    wait_for_file(splash / "asked", racing)
    assert "--prompt=Enter hex key for 'tank/secret'" in (splash / "asked").read_text()
    (splash / "typed").write_bytes(b"f" * 64)
    wait_for_file(splash / "messages", racing)
    assert "does not open tank/secret" in (splash / "messages").read_text()
    (splash / "typed").write_bytes(key)
    code, err = finish(racing)
    assert code == 0, err
    assert "tank/secret: unlocked with the typed key" in err
    assert not PROMPT.search(console.output), "plymouth asks, not the console"


def test_the_server_winning_takes_the_question_off_the_splash_screen(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, _ = stopped_server_host(keyserver, tmp_path, "race-splash")
    splash = fake_plymouth(host)
    racing = boot_unlock(host, console, "--grace", "0")
    wait_for_file(splash / "asking-pid", racing)
    asking = int((splash / "asking-pid").read_text())
    keyserver.start()
    code, err = finish(racing, 60)
    assert code == 0, err
    assert "tank/secret: unlocked with the key server's key" in err
    with pytest.raises(ProcessLookupError):  # the question is off the screen
        os.kill(asking, 0)
    said = (splash / "messages").read_text()
    assert "tank/secret: unlocked with the key server's key; no key needed" in said


def test_a_root_this_host_does_not_manage_is_left_to_openzfs_at_once(
    shared_keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "race-unmanaged")
    hex_root(host, managed=False)
    code, err = finish(boot_unlock(host, console, "--grace", "0"))
    assert code == EX_UNAVAILABLE, err
    assert "tank/secret: not managed by zfs-unlock-agent; left to OpenZFS" in err
    assert not PROMPT.search(console.output)
    assert not host.zfs.calls("zfs", "load-key")


@pytest.mark.parametrize(
    ("keyformat", "keylocation"),
    [("hex", "file:///etc/zfs/tank.key"), ("raw", "prompt")],
    ids=["keylocation-file", "raw"],
)
def test_with_nothing_to_type_a_server_that_gives_up_ends_the_race(
    keyserver: KeyServer, tmp_path: Path, console: Console, keyformat: str, keylocation: str
) -> None:
    # OpenZFS then goes on as usual (keylocation=file:// loads from the file); a race that
    # went on would only hold the boot.
    host, _ = stopped_server_host(
        keyserver, tmp_path, f"race-gives-up-{keyformat}", keyformat, keylocation=keylocation
    )
    started = time.monotonic()
    code, err = finish(boot_unlock(host, console, "--grace", "0", "--deadline", "1"))
    assert code == EX_TEMPFAIL, err
    assert time.monotonic() - started < 5, "--deadline bounds the requests it is cut into"
    assert "tank/secret: no key from the key server, and it cannot be typed" in err
    assert not re.search(r"Enter \S+", console.output)


@pytest.mark.parametrize("grace", ["00", "0.0", "x", "-1", "99999"])
def test_a_grace_from_the_kernel_command_line_never_costs_the_race(
    shared_keyserver: KeyServer, tmp_path: Path, console: Console, grace: str
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, f"race-grace-{grace}")
    hex_root(host)
    code, err = finish(boot_unlock(host, console, "--grace", grace, "--deadline", "0.0"))
    assert code == 0, err
    assert "tank/secret: unlocked with the key server's key" in err
    if grace in ("x", "-1", "99999"):
        assert f"zfs_unlock_agent.grace={grace} is not a number of seconds we can use" in err


def test_a_line_too_long_for_a_key_is_refused_whole(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    host, key = stopped_server_host(keyserver, tmp_path, "race-long")
    racing = boot_unlock(host, console, "--grace", "0")
    console.refused(b"a" * 1500, "That is too long for a key; try again.")
    console.type(key + b"\n")
    code, err = finish(racing)
    assert code == 0, err
    assert "tank/secret: unlocked with the typed key" in err
    [loaded] = host.zfs.calls("zfs", "load-key")  # nothing of the long line reached zfs
    assert loaded["stdin_sha256"] == sha256(key)


def test_a_key_with_a_keylocation_of_its_own_is_tried_for_one_request_deadline(
    keyserver: KeyServer, tmp_path: Path, console: Console
) -> None:
    # Without --deadline: [network] deadline (6 s here), then OpenZFS loads it its own way.
    host, _ = stopped_server_host(
        keyserver, tmp_path, "race-own-location", keylocation="file:///etc/zfs/tank.key"
    )
    started = time.monotonic()
    code, err = finish(boot_unlock(host, console, "--grace", "0"))
    assert code == EX_TEMPFAIL, err
    assert 5 < time.monotonic() - started < 20
    assert not re.search(r"Enter \S+", console.output)
