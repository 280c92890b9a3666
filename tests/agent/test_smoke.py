from __future__ import annotations

from pathlib import Path

from tests.agent.harness import AgentHost
from tests.keyserver import KeyServer


def test_unlock_all_loads_and_mounts(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "smoke")
    pool = host.zfs.add_pool("tank")
    host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")
    result = host.run("-v", "unlock", "--all")
    assert result.returncode == 0, result.stderr
    assert host.zfs.keystatus("tank/secret") == "available"
    assert host.zfs.dataset("tank/secret/child")["mounted"]
