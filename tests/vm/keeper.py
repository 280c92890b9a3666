"""The key server's admin during the real-OpenZFS scenarios: backups, restores, a recovery
kit and the loss of the server, done on the host when a guest case asks through the
control channel (tests/vm/vm.py, Forwarder hooks).

The admin's age identity lives in the guest's share (the medium the admin carries to a
host in an outage), never in a data directory; the master key is kept apart as the
README says, and given to `restore`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.keyserver import SERVER_BIN, KeyServer
from tests.vm.vm import Forwarder, VmError


class Keeper:
    def __init__(self, root: Path, share: Path, server: KeyServer) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.recovery = share / "recovery"  # the guest's /mnt/host/recovery
        self.recovery.mkdir(parents=True)
        self.identity = self.recovery / "identity.txt"
        self.recipient = age_keygen(self.identity)
        self.master_key = root / "master-key"
        shutil.copyfile(server.data_dir / "master.key", self.master_key)
        self.master_key.chmod(0o400)
        self.backup_file = root / "backups" / "latest.zuabackup"
        self.backup_file.parent.mkdir()
        self.servers = [server]  # the one the forwarder sends to is the last
        self.forwarder: Forwarder | None = None

    @property
    def current(self) -> KeyServer:
        return self.servers[-1]

    def hooks(self) -> dict[str, Callable[[], None]]:
        return {"kit": self.kit, "backup": self.backup, "restore": self.restore, "lose": self.lose}

    def admin(self, *args: str) -> None:
        done = subprocess.run(
            [str(SERVER_BIN), "--data-dir", str(self.current.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise VmError(
                f"zfs-unlock-server {' '.join(args)}: exit {done.returncode}: {done.stderr}"
            )

    def kit(self) -> None:
        """A recovery kit of every key, for the admin's identity, into the share."""
        kit = self.recovery / "kit.age"
        kit.unlink(missing_ok=True)
        self.admin("recovery-kit", "--recipient", self.recipient, "--out", str(kit))

    def backup(self) -> None:
        """An online backup of the serving server, replacing the last one."""
        self.backup_file.unlink(missing_ok=True)
        self.admin("backup", "--out", str(self.backup_file))

    def restore(self) -> None:
        """The last backup, restored into a new data directory and served on another port;
        the forwarder sends the guest there from now on (its URL and pin unchanged)."""
        number = len(self.servers)
        root = self.root / f"restored-{number}"
        root.mkdir()
        data_dir = root / "data"
        done = subprocess.run(
            [str(SERVER_BIN), "restore", str(self.backup_file), "--data-dir", str(data_dir),
             "--master-key", str(self.master_key)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise VmError(f"restore: exit {done.returncode}: {done.stderr}")
        restored = KeyServer.over(root, data_dir)
        if restored.pin != self.servers[0].pin:
            raise VmError(f"the restored server presents {restored.pin}, not the original pin")
        restored.start()
        self.servers.append(restored)
        assert self.forwarder is not None
        self.forwarder.retarget(restored.port)

    def lose(self) -> None:
        """The serving server's machine is gone: stopped, its data directory deleted."""
        lost = self.current
        lost.stop()
        shutil.rmtree(lost.data_dir)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def age_keygen(identity: Path) -> str:
    """A new age identity in IDENTITY (0600, as age-keygen makes it); its recipient."""
    done = subprocess.run(
        ["age-keygen", "-o", str(identity)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise VmError(f"age-keygen: exit {done.returncode}: {done.stderr}")
    for line in identity.read_text().splitlines():
        if line.startswith("# public key: "):
            return line.removeprefix("# public key: ")
    raise VmError(f"age-keygen wrote no public key into {identity}")
