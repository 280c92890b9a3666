"""The age file format (https://age-encryption.org), through Debian's `age` binary.

The one place that runs `age`. Plaintext goes to its standard input and comes from its
standard output, never through argv, the environment or a file of ours; a decrypted
plaintext is read straight into a bytearray for the caller to wipe.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Final, Literal

AGE: Final = "age"
# age's X25519 recipients (Bech32, lowercase; plugins' are longer) and the SSH public
# keys it accepts, with an optional comment as in authorized_keys.
_RECIPIENT = re.compile(
    r"age1[02-9ac-hj-np-z]{58,}|(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/]+={0,2}( [ -~]*)?"
)
_TIMEOUT = 120.0
# What age says when no identity given opens the file (age 1.0 and later).
_NO_IDENTITY = "no identity matched any of the recipients"


class AgeFailed(Exception):
    """age is missing or failed. REASON: missing (no binary), identity (no identity given
    opens the file) or failed (anything else: the message carries age's own words)."""

    def __init__(self, message: str, reason: Literal["missing", "identity", "failed"]) -> None:
        super().__init__(message)
        self.reason = reason


def check_recipient(recipient: str) -> str:
    """RECIPIENT if it has the shape of an age recipient, else ValueError."""
    if not _RECIPIENT.fullmatch(recipient):
        raise ValueError(
            "not an age recipient: expected age1... (age-keygen -y IDENTITY prints it)"
            " or an SSH public key (ssh-ed25519 AAAA... or ssh-rsa AAAA...)"
        )
    return recipient


def _age_error(stderr: bytes, returncode: int) -> AgeFailed:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    said = next((line for line in lines if line.startswith("age: error:")), "")
    said = said.removeprefix("age: error:").strip() or f"exit {returncode}"
    reason: Literal["identity", "failed"] = "identity" if _NO_IDENTITY in said else "failed"
    return AgeFailed(f"age: {said}", reason)


def _missing() -> AgeFailed:
    return AgeFailed(f"{AGE}: not found (install Debian's package age: apt install age)", "missing")


def encrypt(plaintext: bytes | bytearray, recipient: str) -> bytes:
    """PLAINTEXT encrypted to RECIPIENT (binary age format). PLAINTEXT reaches age on its
    standard input only."""
    check_recipient(recipient)
    try:
        finished = subprocess.run(  # noqa: S603 - a fixed program, the recipient is checked
            [AGE, "--encrypt", "--recipient", recipient],
            input=plaintext,
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise _missing() from None
    if finished.returncode != 0:
        raise _age_error(finished.stderr, finished.returncode)
    return finished.stdout


def decrypt(encrypted: Path, identity: Path) -> bytearray:
    """The plaintext of the age file ENCRYPTED, opened with the identity file IDENTITY,
    in a bytearray (the caller wipes it). The plaintext of an age file is smaller than
    the file, so one buffer of the file's size holds it without a copy."""
    size = encrypted.stat().st_size
    buffer = bytearray(size + 1)
    try:
        process = subprocess.Popen(  # noqa: S603 - a fixed program, file names only
            [AGE, "--decrypt", "--identity", str(identity), str(encrypted)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise _missing() from None
    assert process.stdout is not None and process.stderr is not None  # noqa: S101
    length = 0
    try:
        view = memoryview(buffer)
        while length < len(buffer):
            count = os.readv(process.stdout.fileno(), [view[length:]])
            if not count:
                break
            length += count
        view.release()
        stderr = process.stderr.read()
        returncode = process.wait(timeout=_TIMEOUT)
    except BaseException:
        process.kill()
        process.wait()
        buffer[:] = bytes(len(buffer))
        raise
    finally:
        process.stdout.close()
        process.stderr.close()
    if returncode != 0 or length > size:
        buffer[:] = bytes(len(buffer))
        if returncode == 0:
            raise AgeFailed("age: more plaintext than the file could hold", "failed")
        raise _age_error(stderr, returncode)
    plaintext = buffer[:length]
    buffer[:] = bytes(len(buffer))
    return plaintext


def available() -> bool:
    """Whether the age binary is on PATH."""
    return any(
        os.access(Path(directory) / AGE, os.X_OK)
        for directory in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if directory
    )
