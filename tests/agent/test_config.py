"""Configuration safety (P32, P2, P6, P13, P18) and the Secret wrapper (P14).

Valid samples all load; each invalid sample fails with a message that names the
offending setting and the file, in `config.load` and through `configcheck` (78).
Each invalid sample says which setting is wrong in its first line: `# error: KEY`.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography.hazmat.primitives import serialization

from tests.agent.harness import AGENT_BIN
from tests.fakes.stub_https import self_signed_cert
from zfs_unlock_agent import config
from zfs_unlock_agent.errors import EX_CONFIG, EX_OK, ConfigError
from zfs_unlock_agent.secret import Secret

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "examples" / "agent.toml"
SAMPLES = REPO / "tests" / "data" / "configs"
VALID = sorted((SAMPLES / "valid").glob("*.toml"))
INVALID = sorted((SAMPLES / "invalid").glob("*/agent.toml"))


def configcheck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT_BIN), "-c", str(path), "configcheck"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path}: first line must be '# error: KEY'"
    return first.removeprefix("# error: ").strip()


def test_there_are_samples() -> None:
    assert len(VALID) >= 3
    assert len(INVALID) >= 12


@pytest.mark.parametrize("path", [EXAMPLE, *VALID], ids=lambda p: p.parent.name + "/" + p.name)
def test_valid_configs_load(path: Path) -> None:
    cfg = config.load(path, check_files=False)

    assert cfg.path == path
    assert cfg.servers
    assert all(s.url.startswith("https://") and s.pins for s in cfg.servers)
    for file in (cfg.client_certificate, cfg.client_key, cfg.machine_id_file):
        assert file.is_absolute()


def test_relative_paths_are_relative_to_the_file() -> None:
    path = SAMPLES / "valid" / "failover.toml"
    cfg = config.load(path, check_files=False)

    assert cfg.client_certificate == path.parent / "tls" / "client.crt"
    assert cfg.client_key == path.parent / "tls" / "client.key"
    assert [len(s.pins) for s in cfg.servers] == [2, 1]
    assert cfg.network.deadline == 20
    assert cfg.network.connect_timeout == config.NetworkSettings().connect_timeout


def test_full_sample_sets_every_setting() -> None:
    cfg = config.load(SAMPLES / "valid" / "full.toml", check_files=False)

    assert cfg.servers[0].url == "https://keys.example.net:8443"  # trailing slash dropped
    assert cfg.machine_id_file == Path("/run/machine-id")
    assert cfg.network == config.NetworkSettings(2, 4.5, 120, 1, 30)
    assert cfg.datasets == config.DatasetSettings(False, ("tank/secret", "backup/vm disk:0"))
    assert cfg.zfs == config.ZfsSettings("/usr/sbin/zfs", "/usr/sbin/zpool", 5, Path("/run/zvol"))


def test_example_documents_every_setting_with_its_default() -> None:
    """examples/agent.toml spells out every setting, and each value it shows is the default."""
    document = tomllib.loads(EXAMPLE.read_text())

    def names(cls: type[NamedTuple]) -> set[str]:
        return set(cls._fields)  # the settings a named tuple holds

    assert set(document) == {
        "machine_id_file",
        "state_directory",
        "server",
        "client",
        "network",
        "datasets",
        "zfs",
        "daemon",
    }
    assert set(document["server"][0]) == {"url", "pins"}
    assert set(document["client"]) == {"certificate", "key"}
    assert set(document["network"]) == names(config.NetworkSettings)
    assert set(document["datasets"]) == names(config.DatasetSettings)
    assert set(document["zfs"]) == names(config.ZfsSettings)
    assert set(document["daemon"]) == names(config.DaemonSettings)

    cfg = config.load(EXAMPLE, check_files=False)
    assert cfg.network == config.NetworkSettings()
    assert cfg.datasets == config.DatasetSettings()
    assert cfg.zfs == config.ZfsSettings()
    assert cfg.daemon == config.DaemonSettings()
    assert cfg.machine_id_file == Path("/etc/machine-id")
    assert (cfg.client_certificate, cfg.client_key) == (
        EXAMPLE.parent / "client.crt",
        EXAMPLE.parent / "client.key",
    )
    # Every setting has a comment: on its own line, or after the value.
    lines = EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert "#" in line or lines[index - 1].startswith("#"), line


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.parent.name)
def test_invalid_configs_fail_naming_the_key_and_the_file(path: Path) -> None:
    key = expected_key(path)

    with pytest.raises(ConfigError) as caught:
        config.load(path, check_files=False)

    message = str(caught.value)
    assert str(path) in message
    assert key in message
    assert caught.value.exit_code == EX_CONFIG


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.parent.name)
def test_configcheck_exits_78_for_invalid_configs(path: Path) -> None:
    result = configcheck(path)

    assert result.returncode == EX_CONFIG, result.stderr
    assert str(path) in result.stderr
    assert expected_key(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_secret_url_credentials_are_not_echoed() -> None:
    """The message names the setting, not the password in it."""
    path = SAMPLES / "invalid" / "url-with-credentials" / "agent.toml"
    with pytest.raises(ConfigError) as caught:
        config.load(path, check_files=False)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in configcheck(path).stderr


def host_files(root: Path, key_mode: int) -> Path:
    """A config with a client key in mode KEY_MODE, its certificate and a machine-id."""
    root.mkdir(parents=True, exist_ok=True)
    pair = self_signed_cert(root / "pair", "configcheck")
    key = root / "client.key"
    key.write_bytes(pair.key.read_bytes())
    key.chmod(key_mode)
    (root / "client.crt").write_bytes(pair.cert.read_bytes())
    (root / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    path = root / "agent.toml"
    path.write_text(
        'machine_id_file = "machine-id"\n'
        "[[server]]\n"
        'url = "https://127.0.0.1:8443"\n'
        'pins = ["sha256//47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="]\n'
        "[client]\n"
        'certificate = "client.crt"\n'
        'key = "client.key"\n'
    )
    return path


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        pytest.param(mode, code, id=f"{mode:04o}-exit-{code}")
        for mode, code in [
            (0o400, EX_OK),
            (0o600, EX_OK),
            (0o640, EX_CONFIG),
            (0o644, EX_CONFIG),
            (0o604, EX_CONFIG),
        ]
    ],
)
def test_configcheck_checks_the_client_key_mode(tmp_path: Path, mode: int, code: int) -> None:
    path = host_files(tmp_path, mode)

    result = configcheck(path)

    assert result.returncode == code, result.stderr
    if code == EX_OK:
        assert result.stdout.startswith(f"{path}: ok")
    else:
        assert str(tmp_path / "client.key") in result.stderr
        assert f"{mode:04o}" in result.stderr


def test_configcheck_reports_a_missing_client_key(tmp_path: Path) -> None:
    path = host_files(tmp_path, 0o400)
    (tmp_path / "client.key").unlink()

    result = configcheck(path)

    assert result.returncode == EX_CONFIG
    assert str(tmp_path / "client.key") in result.stderr


def test_configcheck_reports_a_bad_machine_id(tmp_path: Path) -> None:
    path = host_files(tmp_path, 0o400)
    (tmp_path / "machine-id").write_text("not-a-machine-id\n")

    result = configcheck(path)

    assert result.returncode == EX_CONFIG
    assert str(tmp_path / "machine-id") in result.stderr


# The client certificate and key must form a pair OpenSSL can use


def spoil(root: Path, case: str) -> str:
    """Break the pair host_files wrote, as CASE says; return what the message must say."""
    key, cert = root / "client.key", root / "client.crt"
    key.chmod(0o600)
    if case == "key-of-another-certificate":
        key.write_bytes(self_signed_cert(root / "other", "other").key.read_bytes())
        return "the key does not match the certificate"
    if case == "key-not-a-key":
        key.write_text("not a key\n")
        return f"{key} is not a PEM private key"
    if case == "key-with-a-passphrase":  # refused at once: no prompt for it, ever
        locked = self_signed_cert(root / "locked", "locked").key_obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        key.write_bytes(locked)
        return f"{key} is not a PEM private key, or one protected by a passphrase"
    cert.write_text("not a certificate\n")
    return f"{cert} is not a PEM certificate"


PAIR_CASES = [
    "key-of-another-certificate",
    "key-not-a-key",
    "key-with-a-passphrase",
    "certificate-not-a-certificate",
]


@pytest.mark.parametrize("case", PAIR_CASES)
def test_configcheck_refuses_a_client_pair_that_does_not_work(tmp_path: Path, case: str) -> None:
    path = host_files(tmp_path, 0o400)
    reason = spoil(tmp_path, case)

    result = configcheck(path)

    assert result.returncode == EX_CONFIG, result.stderr
    assert f"client certificate {tmp_path / 'client.crt'}" in result.stderr
    assert f"client key {tmp_path / 'client.key'}" in result.stderr
    assert reason in result.stderr
    assert "Traceback" not in result.stderr
    assert "PRIVATE KEY" not in result.stderr  # the files are named, never shown
    assert result.stdout == ""


# Secret (P14)


def test_secret_never_shows_its_bytes() -> None:
    material = b"sentinel-" + bytes(range(23))
    secret = Secret(material)

    assert repr(secret) == str(secret) == f"{secret}" == "Secret(len=32)"
    assert repr([secret]) == "[Secret(len=32)]"
    assert len(secret) == 32


def test_secret_wipe_zeroes_the_buffer_in_place() -> None:
    secret = Secret(bytearray(b"\xff" * 32))
    buffer = secret.buffer()
    view = secret.view()

    secret.wipe()

    assert secret.buffer() is buffer
    assert buffer == bytearray(32)
    assert view.tobytes() == bytes(32)
    assert repr(secret) == "Secret(len=32)"


def test_secret_copies_its_input_and_wipes_on_exit() -> None:
    source = bytearray(b"k" * 32)
    with Secret(source) as secret:
        buffer = secret.buffer()
        assert buffer == source
        assert buffer is not source
    assert buffer == bytearray(32)
    assert source == bytearray(b"k" * 32)  # the caller's buffer is the caller's to wipe


def test_secret_view_is_read_only() -> None:
    view = Secret(b"x" * 32).view()
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0
