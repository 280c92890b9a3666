"""recover: a kit from the real key server, real age, the fake zfs; no key server running."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.agekeys import encrypt, new_identity
from tests.agent.harness import AgentHost
from tests.fakes.fake_zfs import key_digest
from tests.keyserver import KeyServer, running

DOC = Path(__file__).parents[2] / "docs" / "recovery-kit.md"


class Site:
    """Host web1 with two pools; its keys on the server; a kit of them."""

    def __init__(self, root: Path) -> None:
        self.server = KeyServer(root / "srv")
        self.host = AgentHost.create(root / "web1", self.server, "web1")
        self.zfs = self.host.zfs
        self.identity = root / "identity.txt"
        self.recipient = new_identity(self.identity)
        self.pools = {"tank": self.zfs.add_pool("tank"), "backup": self.zfs.add_pool("backup")}
        self.keys = {
            "tank/secret": ("raw", os.urandom(32)),
            "tank/hexed": ("hex", os.urandom(32).hex().encode()),
            "backup/vault": ("passphrase", b"correct horse battery staple"),
        }
        for name, (keyformat, key) in self.keys.items():
            guid = self.zfs.add_encrypted(name, key, keyformat)
            self.zfs.add_child(f"{name}/child")
            self.add_key("web1", name, guid, keyformat, key)
        self.kit = root / "kit.age"
        self.export(self.kit)

    def add_key(self, host: str, name: str, guid: str, keyformat: str, key: bytes) -> None:
        self.server.must(
            "key", "create", "--host", host, "--pool-guid", self.pools[name.split("/", maxsplit=1)[0]],
            "--dataset-guid", guid, "--dataset", name, "--keyformat", keyformat, "--import",
            stdin=key,
        )  # fmt: skip

    def export(self, out: Path, *options: str) -> None:
        self.server.must("recovery-kit", "--recipient", self.recipient, "--out", str(out), *options)

    def recover(self, *args: str, kit: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            "recover", "--kit", str(kit or self.kit), "--identity", str(self.identity), *args
        )

    def assert_no_key_leaked(self, *outputs: str) -> None:
        calls = self.zfs.calls()
        for _, key in self.keys.values():
            forms = [key, key.hex().encode(), base64.b64encode(key)]
            for call in calls:
                logged = json.dumps([call["argv"], call["env"]]).encode()
                assert not any(form in logged for form in forms)
            for output in outputs:
                assert not any(form.decode("latin-1") in output for form in forms)

    def loaded(self) -> list[str]:
        return sorted(c["argv"][-1] for c in self.zfs.calls("zfs", "load-key"))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_recover_all_loads_and_mounts_every_root_of_both_pools(site: Site) -> None:
    done = site.recover("--all")
    assert done.returncode == 0, done.stderr
    for name, (_, key) in site.keys.items():
        assert site.zfs.keystatus(name) == "available"
        assert site.zfs.dataset(name)["mounted"]
        assert site.zfs.dataset(f"{name}/child")["mounted"]
        assert f"{name}: unlocked (key loaded; mounted {name}, {name}/child)" in done.stderr
        (call,) = [c for c in site.zfs.calls("zfs", "load-key") if c["argv"][-1] == name]
        assert call["argv"] == ["load-key", "-L", "prompt", name]
        assert call["stdin_sha256"] == hashlib.sha256(key).hexdigest()
    site.assert_no_key_leaked(done.stdout, done.stderr)


def test_recover_one_dataset_loads_that_one_only(site: Site) -> None:
    done = site.recover("--dataset", "tank/hexed/child", "--no-mount")
    assert done.returncode == 0, done.stderr
    assert site.loaded() == ["tank/hexed"]
    assert site.zfs.keystatus("tank/hexed") == "available"
    assert not site.zfs.dataset("tank/hexed")["mounted"]
    assert site.zfs.keystatus("tank/secret") == "unavailable"
    again = site.recover("--all")  # the loaded one is left alone
    assert again.returncode == 0, again.stderr
    assert "tank/hexed: available (key already loaded" in again.stderr
    assert site.loaded() == ["backup/vault", "tank/hexed", "tank/secret"]


def test_a_renamed_dataset_still_matches_by_guid(site: Site) -> None:
    with site.zfs.edit() as state:
        for old in ("tank/secret", "tank/secret/child"):
            new = old.replace("tank/secret", "tank/renamed")
            state["datasets"][new] = state["datasets"].pop(old)
            if state["datasets"][new].get("encryptionroot") == "tank/secret":
                state["datasets"][new]["encryptionroot"] = "tank/renamed"
    done = site.recover("--dataset", "tank/renamed")
    assert done.returncode == 0, done.stderr
    assert site.zfs.keystatus("tank/renamed") == "available"


def test_a_kit_of_another_host_loads_nothing(site: Site, tmp_path: Path) -> None:
    other = site.server.add_host("web2")
    assert other.name == "web2"
    site.add_key("web2", "tank/elsewhere", "123456789", "raw", os.urandom(32))
    kit = tmp_path / "web2.age"
    site.export(kit, "--host", "web2")
    done = site.recover("--all", kit=kit)
    assert done.returncode == 65
    assert "none of its 1 key(s) (host(s) web2) is for an encryption root here" in done.stderr
    done = site.recover("--dataset", "tank/secret", kit=kit)
    assert done.returncode == 65
    assert re.search(r"tank/secret: .*web2\.age holds no key for it \(pool GUID \d+", done.stderr)
    assert site.loaded() == []


def test_a_wrong_identity_is_refused(site: Site, tmp_path: Path) -> None:
    new_identity(tmp_path / "other.txt")
    done = site.host.run(
        "recover", "--kit", str(site.kit), "--identity", str(tmp_path / "other.txt"), "--all"
    )
    assert done.returncode == 77
    assert "does not open" in done.stderr
    assert "no identity matched any of the recipients" in done.stderr
    assert site.zfs.calls("zfs", "load-key") == []


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_a_damaged_kit_is_refused(site: Site, tmp_path: Path, damage: str) -> None:
    data = bytearray(site.kit.read_bytes())
    if damage == "truncated":
        del data[-20:]
    else:
        data[-10] ^= 0x01
    kit = tmp_path / "damaged.age"
    kit.write_bytes(bytes(data))
    done = site.recover("--all", kit=kit)
    assert done.returncode == 65
    assert "cannot be decrypted, damaged or truncated?" in done.stderr
    assert site.zfs.calls("zfs", "load-key") == []


@pytest.mark.parametrize(
    ("plaintext", "message"),
    [
        (b"# zfs-unlock-recovery-kit version 2\n# end of kit: 0 keys\n", "kit format version 2 is not supported (this agent reads version 1)"),
        (b'{"format": "zfs-unlock-recovery-kit"}\n', "not a zfs-unlock recovery kit"),
        (b"# zfs-unlock-recovery-kit version 1\n", "truncated or damaged"),
    ],
)  # fmt: skip
def test_a_kit_of_another_format_is_refused(
    site: Site, tmp_path: Path, plaintext: bytes, message: str
) -> None:
    kit = tmp_path / "other.age"
    encrypt(plaintext, site.recipient, kit)
    done = site.recover("--all", kit=kit)
    assert done.returncode == 65
    assert message in done.stderr
    assert site.zfs.calls("zfs", "load-key") == []


def test_a_missing_kit_or_identity_file(site: Site, tmp_path: Path) -> None:
    done = site.recover("--all", kit=tmp_path / "nothing.age")
    assert done.returncode == 66
    assert f"--kit {tmp_path / 'nothing.age'}: cannot be read" in done.stderr
    assert site.recover("--all", "--dataset", "tank/secret").returncode == 64


def by_hand_block() -> str:
    text = DOC.read_text()
    block = text.split("<!-- test: by-hand -->\n```sh\n", 1)[1].split("```", 1)[0]
    assert "zfs load-key -L prompt" in block
    return block


@pytest.mark.parametrize("dataset", ["tank/secret", "tank/hexed", "backup/vault"])
def test_the_documented_by_hand_commands_work_as_written(
    site: Site, tmp_path: Path, dataset: str
) -> None:
    work = tmp_path / "by-hand"
    work.mkdir()
    (work / "kit.age").write_bytes(site.kit.read_bytes())
    (work / "identity.txt").write_bytes(site.identity.read_bytes())
    script = by_hand_block().replace("ds=tank/secret", f"ds='{dataset}'", 1)
    done = subprocess.run(
        ["sh", "-e", "-c", script], cwd=work, capture_output=True, text=True, timeout=60,
        env={"PATH": f"{site.zfs.bin_dir}:{os.environ['PATH']}"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert site.loaded() == [dataset]
    assert site.zfs.keystatus(dataset) == "available"
    assert site.zfs.dataset(f"{dataset}/child")["mounted"]
    (call,) = site.zfs.calls("zfs", "load-key")
    assert call["stdin_sha256"] == hashlib.sha256(site.keys[dataset][1]).hexdigest()
    site.assert_no_key_leaked(done.stdout, done.stderr)


def test_the_readme_shows_the_same_by_hand_commands() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    assert by_hand_block() in readme


def test_a_kit_made_during_a_rotation_opens_a_dataset_wrapped_with_the_next_key(
    site: Site, tmp_path: Path
) -> None:
    """The rotation got as far as `zfs change-key` when the kit was made: the dataset's
    active key no longer opens it, its next key (in the kit beside it) does."""
    creds = site.host.creds
    guid = site.zfs.dataset("tank/secret")["guid"]
    with running(site.server, workers=1), site.server.session(creds) as session:
        answer = session.post(
            site.server.url("/v1/keys/next"),
            json={
                "machine_id": creds.machine_id,
                "pool_guid": site.pools["tank"],
                "dataset_guid": guid,
            },
            timeout=10,
        )
    assert answer.status_code == 201, answer.text
    upcoming = base64.b64decode(answer.json()["key"])
    with site.zfs.edit() as state:  # what change-key did
        state["datasets"]["tank/secret"]["key"] = key_digest(upcoming, "raw")
    kit = tmp_path / "rotating.age"
    site.export(kit)

    done = site.recover("--dataset", "tank/secret", kit=kit)

    assert done.returncode == 0, done.stderr
    assert site.zfs.keystatus("tank/secret") == "available"
    tries = [c["stdin_sha256"] for c in site.zfs.calls("zfs", "load-key")]
    assert tries == [
        hashlib.sha256(site.keys["tank/secret"][1]).hexdigest(),
        hashlib.sha256(upcoming).hexdigest(),
    ]
    site.assert_no_key_leaked(done.stdout, done.stderr)
