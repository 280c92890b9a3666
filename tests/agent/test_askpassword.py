"""The ask files the password agent reads: what counts as a question, and what does not."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from zfs_unlock_agent import askpassword
from zfs_unlock_agent.secret import Secret
from zfs_unlock_agent.zfsasks import dataset_asked

ASK = """[Ask]
PID={pid}
Socket={socket}
AcceptCached=0
Echo=0
NotAfter={not_after}
Silent=0
Message=Enter passphrase for tank/secret:
Id=zfs:tank/secret
"""


def write(directory: Path, name: str = "ask.abc", **fields: object) -> Path:
    values: dict[str, object] = {
        "pid": os.getpid(),
        "socket": "/run/x/sck.1",
        "not_after": 0,
        **fields,
    }
    path = directory / name
    path.write_text(ASK.format(**values))
    return path


def test_a_question_is_read_with_its_fields(tmp_path: Path) -> None:
    path = write(tmp_path)
    [question] = askpassword.questions(tmp_path)
    assert question.path == path and question.pid == os.getpid()
    assert question.socket == "/run/x/sck.1" and question.not_after == 0
    assert question.id == "zfs:tank/secret" and dataset_asked(question) == "tank/secret"
    assert question.still_asked()


@pytest.mark.parametrize(
    "text",
    [
        "not an ini file",
        "[Other]\nSocket=/x\n",
        "[Ask]\nPID=12\n",  # no socket
        "[Ask]\nSocket=relative/path\n",
        "[Ask]\nPID=twelve\nSocket=/x\n",
        "[Ask]\nSocket=/x\nNotAfter=soon\n",
    ],
)
def test_what_is_not_a_question_is_skipped(tmp_path: Path, text: str) -> None:
    (tmp_path / "ask.bad").write_text(text)
    write(tmp_path, "ask.good")
    assert [q.path.name for q in askpassword.questions(tmp_path)] == ["ask.good"]


def test_only_root_owned_regular_files_are_questions(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    given = write(tmp_path, "ask.given")
    os.chown(given, 1000, 1000)
    (tmp_path / "ask.link").symlink_to(write(tmp_path, "elsewhere"))
    (tmp_path / "ask.dir").mkdir()
    (tmp_path / "ask.huge").write_bytes(b"[Ask]\nSocket=/x\n" + b"#" * 70_000)
    assert askpassword.questions(tmp_path) == []


def test_an_expired_question_and_a_dead_asker_are_no_longer_asked(tmp_path: Path) -> None:
    past = askpassword.monotonic_us() - 1
    expired = askpassword.read_question(write(tmp_path, not_after=past))
    assert expired is not None and expired.expired() and not expired.still_asked()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    gone = askpassword.read_question(write(tmp_path, "ask.dead", pid=dead))
    assert gone is not None and not gone.asker_alive() and not gone.still_asked()


def test_a_replaced_file_is_a_new_question(tmp_path: Path) -> None:
    path = write(tmp_path)
    first = askpassword.read_question(path)
    assert first is not None
    path.unlink()
    write(tmp_path)
    os.utime(path, ns=(1, 1))
    assert not first.still_asked()


@pytest.mark.parametrize(
    ("id_", "message", "dataset"),
    [
        ("zfs:rpool/ROOT/debian", "", "rpool/ROOT/debian"),
        ("", "Encrypted ZFS password for rpool/ROOT/debian", "rpool/ROOT/debian"),
        ("cryptsetup:/dev/sda2", "Please enter passphrase for disk", None),
        ("zfs:../../etc", "", None),
        ("zfs:", "", None),
        ("", "Encrypted ZFS password for a b", None),
    ],
)
def test_the_dataset_comes_from_openzfs_questions_only(
    tmp_path: Path, id_: str, message: str, dataset: str | None
) -> None:
    question = askpassword.Question(tmp_path / "ask.x", (0, 0), 0, "/x", 0, message, id_)
    assert dataset_asked(question) == dataset


def test_the_answer_is_plus_and_the_key_in_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "sck"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        question = askpassword.Question(tmp_path / "ask.x", (0, 0), 0, str(path), 0, "", "")
        askpassword.answer(question, Secret(b"00ff" * 16))
        assert receiver.recv(4096) == b"+" + b"00ff" * 16
    with pytest.raises(OSError):
        askpassword.answer(question, Secret(b"x" * 8))  # nobody listens any more


def test_the_directory_is_occupied_by_anything_in_it(tmp_path: Path) -> None:
    assert askpassword.entries(tmp_path) == []
    assert askpassword.entries(tmp_path / "missing") == []
    (tmp_path / "sck.stale").touch()  # a socket left behind by a killed asker
    assert askpassword.entries(tmp_path) == ["sck.stale"]
    assert askpassword.questions(tmp_path) == []
