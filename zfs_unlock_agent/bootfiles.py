"""The files `zfs-unlock-agent unlock` needs to run in an initramfs, one per line.

The initramfs-tools hook and the dracut module copy exactly these: the interpreter,
every module the unlock path imports, as source and as bytecode, pyvenv.cfg when the
agent lives in a virtual environment, and with --config the configuration, the
client certificate and key, the machine-id file it names, and the server pins the agent
learned (learnedpins.py). Run it with the
interpreter that runs the agent:

    python3 -I -m zfs_unlock_agent.bootfiles --config /etc/zfs-unlock-agent/agent.toml

Each line is "KIND PATH": "exec" for an ELF file (the hooks copy its shared libraries
too), "file" for anything else, "private" for a file that must stay 0400 in the image.
Both initramfs tools follow symbolic links themselves. A configuration that fails
`configcheck` fails this too (exit 78), so a broken one never reaches an initramfs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import site
import sys
from collections.abc import Sequence
from pathlib import Path

from zfs_unlock_agent import config
from zfs_unlock_agent.errors import EX_SOFTWARE, AgentError
from zfs_unlock_agent.unlock import read_machine_id

# Imported at run time, after start-up, on the unlock path: the initramfs-tools race
# (boot-unlock) and dracut's password agent, which cli imports when they run; codecs that hostnames,
# headers and JSON bodies may need; what argparse needs to print usage, help and the
# version; the traceback of a -v run that hit a bug. Everything else is imported when
# cli is.
RUNTIME_IMPORTS = (
    "zfs_unlock_agent.cli",
    "zfs_unlock_agent.bootrace",
    "zfs_unlock_agent.passwordagent",
    "textwrap",
    "traceback",
    "encodings.idna",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.punycode",
)


def _import_all() -> None:
    for name in RUNTIME_IMPORTS:
        importlib.import_module(name)


def _module_files() -> set[Path]:
    files: set[Path] = set()
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        path = Path(origin)
        if path.is_file():
            files.add(path)
            if path.suffix == ".py":
                cached = Path(importlib.util.cache_from_source(str(path)))
                if cached.is_file():
                    files.add(cached)
    # .pth files run at start-up (an editable install's import hook is one); the
    # modules they import are in sys.modules already.
    for directory in {*site.getsitepackages(), site.getusersitepackages()}:
        if Path(directory) in map(Path, sys.path):
            files.update(Path(directory).glob("*.pth"))
    # The entry point (python -m zfs_unlock_agent): found, not imported, which would run it.
    spec = importlib.util.find_spec("zfs_unlock_agent.__main__")
    if spec and spec.origin:
        files.add(Path(spec.origin))
    return files


def entries() -> list[str]:
    _import_all()
    lines = [f"exec {sys.executable}"]
    if sys.prefix != sys.base_prefix:
        lines.append(f"file {Path(sys.prefix) / 'pyvenv.cfg'}")
    # os.py is the landmark by which the interpreter finds its standard library.
    for path in sorted(_module_files() | {Path(os.__file__)}):
        kind = "exec" if path.suffix == ".so" else "file"
        lines.append(f"{kind} {path}")
    return lines


def config_entries(path: Path) -> list[str]:
    cfg = config.load(path)
    read_machine_id(cfg.machine_id_file)
    lines = [
        f"file {cfg.path}",
        f"file {cfg.client_certificate}",
        f"private {cfg.client_key}",
        f"file {cfg.machine_id_file}",
    ]
    if cfg.learned is not None and cfg.learned.path.exists():
        # The server pins learned while running: the boot after a `tls activate` needs them.
        lines.append(f"file {cfg.learned.path}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m zfs_unlock_agent.bootfiles")
    parser.add_argument("--config", type=Path, help="also list this configuration's files")
    args = parser.parse_args(argv)
    lines = []
    if args.config is not None:
        try:
            lines += config_entries(args.config)
        except AgentError as exc:
            print(f"zfs-unlock-agent: {exc}", file=sys.stderr)
            return exc.exit_code
    lines += entries()
    if any("\n" in line for line in lines):
        print("zfs-unlock-agent: a path contains a newline; refusing", file=sys.stderr)
        return EX_SOFTWARE
    # The hooks read "KIND PATH" per line; the path is the rest of the line.
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
