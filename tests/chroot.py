"""A directory tree to chroot into, built the way initramfs tools build an image.

Files keep their own paths; a symbolic link is kept and its target copied (as
initramfs-tools' copy_file and dracut's inst do); an executable brings the shared
libraries `ldd` names for it. Building one needs no privileges; chroot needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

LDD_LINE = re.compile(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$")


def shared_libraries(path: Path) -> list[Path]:
    result = subprocess.run(
        ["ldd", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "not found" not in result.stdout, result.stdout
    return [
        Path(match.group(1))
        for line in result.stdout.splitlines()
        if (match := LDD_LINE.match(line))
    ]


class Image:
    """A directory tree an initramfs tool would build: files at their own paths, symbolic
    links followed (the link kept, its target copied, as copy_file and inst do)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.libraries: set[Path] = set()

    def inside(self, path: Path) -> Path:
        return self.root / path.relative_to("/")

    def add(self, path: Path, at: Path | None = None) -> None:
        target = Path(os.path.realpath(path))
        destination = self.inside(at or path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if at is None and target != path and not destination.is_symlink():
            destination.symlink_to(target)
            destination = self.inside(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            shutil.copy2(target, destination)

    def add_exec(self, path: Path, at: Path | None = None) -> None:
        self.add(path, at)
        for library in shared_libraries(path):
            self.libraries.add(library)
            self.add(library)

    def add_listed(self, lines: Sequence[tuple[str, Path]]) -> None:
        for kind, path in lines:
            if kind == "exec":
                self.add_exec(path)
            else:
                self.add(path)
                if kind == "private":
                    self.inside(path).chmod(0o400)

    def add_devices(self) -> None:
        """What devtmpfs gives an initramfs: /dev/null (zfs runs with stdin from it)."""
        dev = self.inside(Path("/dev"))
        dev.mkdir(exist_ok=True)
        for name, minor in (("null", 3), ("zero", 5), ("urandom", 9)):
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            (dev / name).chmod(0o666)

    def add_text(self, path: str, text: str, mode: int = 0o644) -> Path:
        """A file made for the test, at PATH inside the image."""
        destination = self.inside(Path(path))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.unlink(missing_ok=True)  # never write through a link (a busybox applet)
        destination.write_text(text)
        destination.chmod(mode)
        return destination

    def run(
        self, *argv: str, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", str(self.root), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})},
        )
