"""age identities for tests, made with the real age-keygen (scripts/test.sh installs age)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def require_age() -> None:
    missing = [tool for tool in ("age", "age-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: install Debian's package age"
            " (scripts/test.sh does: bash scripts/need-debian-packages.sh age)"
        )


def new_identity(path: Path) -> str:
    """Write a new age identity to PATH; return its recipient (age1...)."""
    require_age()
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def decrypt(path: Path, identity: Path) -> bytes:
    return subprocess.run(
        ["age", "-d", "-i", str(identity), str(path)], check=True, capture_output=True
    ).stdout


def encrypt(plaintext: bytes, recipient: str, path: Path) -> None:
    subprocess.run(
        ["age", "-r", recipient, "-o", str(path)], input=plaintext, check=True, capture_output=True
    )
