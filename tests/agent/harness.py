"""An agent host for tests: fake zfs, a machine-id, a config, and credentials from a real server."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes import FakeZfs
from tests.keyserver import HostCreds, KeyServer, activated_key, toml_value

AGENT_BIN = Path(sys.executable).with_name("zfs-unlock-agent")


@dataclass
class AgentHost:
    root: Path
    server: KeyServer
    creds: HostCreds
    zfs: FakeZfs
    config_path: Path

    @classmethod
    def create(cls, root: Path, server: KeyServer, name: str, *host_options: str) -> AgentHost:
        creds = server.add_host(name, *host_options)
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "machine-id").write_text(creds.machine_id + "\n")
        host = cls(root, server, creds, FakeZfs(root / "zfs"), root / "etc" / "agent.toml")
        host.write_config()
        return host

    def write_config(
        self,
        urls: Sequence[str] | None = None,
        pins: Sequence[str] | None = None,
        network: dict[str, Any] | None = None,
        extra: str = "",
        zfs_settings: dict[str, Any] | None = None,
    ) -> None:
        """ZFS_SETTINGS add to or replace the [zfs] table (zfs, zpool, volume_link_timeout)."""
        urls = urls or [self.server.url("")]
        pins = pins or [self.server.pin]
        net = {
            "connect_timeout": 2,
            "read_timeout": 5,
            "deadline": 6,
            "backoff_initial": 0.1,
            "backoff_max": 0.5,
            **(network or {}),
        }
        zfs_table = {
            "zfs": self.zfs.zfs,
            "zpool": self.zfs.zpool,
            "volume_link_timeout": 3,
            **(zfs_settings or {}),
        }
        servers = "".join(
            f'[[server]]\nurl = "{u}"\npins = [{", ".join(repr(p) for p in pins)}]\n' for u in urls
        )
        self.config_path.write_text(
            f'machine_id_file = "{self.root}/etc/machine-id"\n'
            f'state_directory = "{self.root}/state"\n{extra}\n{servers}'
            f'[client]\ncertificate = "{self.creds.cert}"\nkey = "{self.creds.key}"\n'
            "[network]\n"
            + "".join(f"{k} = {v}\n" for k, v in net.items())
            + "[zfs]\n"
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in zfs_table.items())
        )

    def run(
        self, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the agent; ENV adds to (or, with an empty value, overrides) the inherited one."""
        environment = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        environment.update(env or {})
        return subprocess.run(
            [str(AGENT_BIN), "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            check=False,
        )

    def server_key(
        self,
        pool_guid: str,
        dataset_guid: str,
        dataset: str,
        keyformat: str = "raw",
        key: bytes | None = None,
    ) -> bytes:
        """Enroll (and activate) a key on the server for a dataset; return its bytes."""
        extra = {"key": base64.b64encode(key).decode()} if key is not None else {}
        _, material = activated_key(
            self.server, self.creds, pool_guid, dataset_guid, dataset, keyformat, **extra
        )
        return material

    def encrypted_dataset(
        self, name: str, pool_guid: str, keyformat: str = "raw", **extra: Any
    ) -> bytes:
        """A locked encryption root whose key the server holds; returns the key."""
        import os as _os

        material = _os.urandom(32) if keyformat == "raw" else _os.urandom(32).hex().encode()
        guid = self.zfs.add_encrypted(name, material, keyformat, **extra)
        self.server_key(pool_guid, guid, name, keyformat, material)
        return material
