"""The agent's TOML configuration, read strictly into immutable named tuples.

Unknown keys, wrong types, http:// URLs, malformed pins, invalid dataset names
and a client key that others may read are all errors that name the key and the
file. `load` touches neither ZFS nor the network, so `configcheck` can run it
before anything else (for instance from ExecStartPre).
"""

from __future__ import annotations

import os
import ssl
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from zfs_unlock_agent import learnedpins, transport
from zfs_unlock_agent.errors import ConfigError
from zfs_unlock_common import pinning, privatefile, validate

DEFAULT_PATH = Path("/etc/zfs-unlock-agent/agent.toml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/zfs-unlock-agent")
CONFIG_ENV = "ZFS_UNLOCK_AGENT_CONFIG"


class ServerSettings(NamedTuple):
    url: str
    pins: tuple[bytes, ...]


class NetworkSettings(NamedTuple):
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 60.0  # overall bound for fetching keys, retries included
    backoff_initial: float = 0.5
    backoff_max: float = 10.0


OPENZFS_PROMPTS = ("skip", "answer")  # what needs-prompt does with a managed root's prompt


class DatasetSettings(NamedTuple):
    property: bool = True  # manage encryption roots with zfs-unlock-agent:managed=on
    include: tuple[str, ...] = ()
    # OpenZFS's own prompt (zfs-load-key@ROOT units) for a managed root: "skip" it (the
    # daemon loads the key once the network is online), or "answer" it: kept for a key
    # that can be typed, which the password agent answers while the console asks.
    openzfs_prompt: str = "skip"


class ZfsSettings(NamedTuple):
    zfs: str = "zfs"
    zpool: str = "zpool"
    volume_link_timeout: float = 30.0
    zvol_dir: Path = Path("/dev/zvol")  # where udev creates volume links


class DaemonSettings(NamedTuple):
    """`zfs-unlock-agent daemon`: how long boot may wait, and how often to try again."""

    boot_deadline: float = 30.0  # the first pass's network budget: boot waits at most this
    retry_initial: float = 5.0  # first pause before a failed root is tried again; doubles
    retry_max: float = 300.0  # the longest pause between tries of a failed root
    rescan_interval: float = 60.0  # re-read the pools even without a udev event
    checkin_interval: float = 900.0  # tell the server we are alive (dead-man switch); 0 = off
    # node_exporter's textfile collector: the daemon's state, rewritten after each pass
    textfile: Path | None = None
    # The command that rebuilds the initramfs after the host learned a server pin;
    # None ("auto"): found by itself (initramfs.py), (): never (no unlock at boot here).
    initramfs_update: tuple[str, ...] | None = None


class Config(NamedTuple):
    path: Path
    servers: tuple[ServerSettings, ...]
    client_certificate: Path
    client_key: Path
    machine_id_file: Path = Path("/etc/machine-id")
    network: NetworkSettings = NetworkSettings()
    datasets: DatasetSettings = DatasetSettings()
    zfs: ZfsSettings = ZfsSettings()
    daemon: DaemonSettings = DaemonSettings()
    # Where the agent keeps what it learns (learnedpins.py).
    state_directory: Path = DEFAULT_STATE_DIRECTORY
    learned: learnedpins.LearnedPins | None = None

    def configured_pins(self) -> set[str]:
        """The pins agent.toml names."""
        return {pinning.format_pin(p) for s in self.servers for p in s.pins}

    def trusted_servers(self) -> tuple[ServerSettings, ...]:
        """The servers, each trusted by its agent.toml pins and by the learned ones."""
        if self.learned is None or not self.learned.announced:
            return self.servers
        learned = self.learned.digests()
        return tuple(
            ServerSettings(s.url, s.pins + tuple(p for p in learned if p not in s.pins))
            for s in self.servers
        )


class _Reader:
    """Pops typed values from one table, then complains about whatever is left."""

    def __init__(self, table: Any, where: str, file: Path) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: {where or 'top level'} must be a table")
        self.table = dict(table)
        self.where = where
        self.file = file

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self._name(key)}: {message}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.table.pop(key)
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, "has the wrong type")
        if not isinstance(value, kind):
            raise self.fail(key, "has the wrong type")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = float(self.take(key, (int, float), default))
        if value <= minimum:
            raise self.fail(key, f"must be greater than {minimum:g}")
        return value

    def interval(self, key: str, default: float) -> float:
        """A period in seconds where 0 means never."""
        value = float(self.take(key, (int, float), default))
        if value < 0:
            raise self.fail(key, "must be 0 (off) or more")
        return value

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(self._name(k) for k in sorted(self.table))
            raise ConfigError(f"{self.file}: unknown setting(s): {unknown}")


def _server(table: Any, index: int, file: Path) -> ServerSettings:
    reader = _Reader(table, f"server[{index}]", file)
    url = reader.take("url", str)
    try:
        url = transport.check_url(url)
    except ValueError as exc:
        raise reader.fail("url", str(exc)) from None
    pins = reader.take("pins", list)
    if not pins:
        raise reader.fail("pins", "needs at least one pin")
    parsed = []
    for pin in pins:
        if not isinstance(pin, str):
            raise reader.fail("pins", "must be strings")
        try:
            parsed.append(pinning.parse_pin(pin))
        except pinning.PinError as exc:
            raise reader.fail("pins", str(exc)) from None
    reader.done()
    return ServerSettings(url, tuple(parsed))


def check_private_key_file(path: Path, what: str) -> None:
    reason = privatefile.problem(path)
    if reason:
        raise ConfigError(f"{what} {path}: {reason}")


def client_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """transport's TLS context with this host's certificate and key. A pair OpenSSL cannot
    use is a configuration error that names both files and says which is wrong: `unlock`
    must not call it an internal error, and `configcheck` catches it before a boot does."""
    try:
        return transport.client_context(certificate, key)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(
            f"client certificate {certificate} and client key {key}:"
            f" {_credentials_problem(certificate, key, exc)}"
        ) from None


def _credentials_problem(certificate: Path, key: Path, exc: OSError) -> str:
    """Why OpenSSL refused the pair. It says "PEM lib" alike for a bad certificate and a bad
    key; loading the certificate on its own tells them apart, and only on this failure."""
    if not isinstance(exc, ssl.SSLError):
        return f"cannot read them: {exc.strerror or exc}"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not match the certificate"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(certificate))
    except ssl.SSLError:
        return f"{certificate} is not a PEM certificate"
    return f"{key} is not a PEM private key, or one protected by a passphrase"


def parse(text: str, file: Path, check_files: bool = True) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    top = _Reader(document, "", file)

    servers_table = top.take("server", list)
    if not servers_table:
        raise top.fail("server", "needs at least one [[server]]")
    servers = tuple(_server(t, i, file) for i, t in enumerate(servers_table))

    client = _Reader(top.take("client", dict), "client", file)
    certificate = Path(client.take("certificate", str))
    key = Path(client.take("key", str))
    client.done()

    net = _Reader(top.take("network", dict, {}), "network", file)
    # Every [network] setting is a number of seconds greater than 0.
    network = NetworkSettings(
        **{k: net.number(k, v) for k, v in NetworkSettings._field_defaults.items()}
    )
    net.done()

    ds = _Reader(top.take("datasets", dict, {}), "datasets", file)
    include = ds.take("include", list, [])
    for name in include:
        try:
            validate.dataset_name(name)
        except validate.InvalidInput as exc:
            raise ds.fail("include", str(exc)) from None
    prompt = ds.take("openzfs_prompt", str, "skip")
    if prompt not in OPENZFS_PROMPTS:
        raise ds.fail("openzfs_prompt", f"must be one of {', '.join(OPENZFS_PROMPTS)}")
    datasets = DatasetSettings(
        property=ds.take("property", bool, True),
        include=tuple(dict.fromkeys(include)),
        openzfs_prompt=prompt,
    )
    ds.done()

    z = _Reader(top.take("zfs", dict, {}), "zfs", file)
    defaults = ZfsSettings._field_defaults
    zfs = ZfsSettings(
        zfs=z.take("zfs", str, defaults["zfs"]),
        zpool=z.take("zpool", str, defaults["zpool"]),
        volume_link_timeout=z.number("volume_link_timeout", defaults["volume_link_timeout"]),
        zvol_dir=_relative(Path(z.take("zvol_dir", str, str(defaults["zvol_dir"]))), file),
    )
    z.done()

    d = _Reader(top.take("daemon", dict, {}), "daemon", file)
    defaults = DaemonSettings._field_defaults
    textfile = d.take("textfile", str, "")  # "": off
    update = d.take("initramfs_update", (list, str), "auto")
    if update != "auto" and not (
        isinstance(update, list) and all(isinstance(a, str) and a for a in update)
    ):
        raise d.fail("initramfs_update", 'must be "auto" or a command (a list of strings)')
    daemon = DaemonSettings(
        boot_deadline=d.number("boot_deadline", defaults["boot_deadline"]),
        retry_initial=d.number("retry_initial", defaults["retry_initial"]),
        retry_max=d.number("retry_max", defaults["retry_max"]),
        rescan_interval=d.number("rescan_interval", defaults["rescan_interval"]),
        checkin_interval=d.interval("checkin_interval", defaults["checkin_interval"]),
        textfile=_relative(Path(textfile), file) if textfile else None,
        initramfs_update=None if update == "auto" else tuple(update),
    )
    d.done()
    if daemon.textfile is not None and daemon.textfile.suffix != ".prom":
        raise d.fail("textfile", "must end in .prom (node_exporter reads only those)")
    if daemon.retry_max < daemon.retry_initial:
        raise d.fail("retry_max", "must not be less than retry_initial")

    machine_id_file = Path(top.take("machine_id_file", str, "/etc/machine-id"))
    state_directory = Path(top.take("state_directory", str, str(DEFAULT_STATE_DIRECTORY)))
    top.done()

    config = Config(
        path=file,
        servers=servers,
        client_certificate=_relative(certificate, file),
        client_key=_relative(key, file),
        machine_id_file=_relative(machine_id_file, file),
        network=network,
        datasets=datasets,
        zfs=zfs,
        daemon=daemon,
        state_directory=_relative(state_directory, file),
    )
    if check_files:
        check_private_key_file(config.client_key, "client key")
        if not config.client_certificate.is_file():
            raise ConfigError(f"client certificate {config.client_certificate}: missing")
        config = config._replace(learned=learnedpins.load(config.state_directory))
    return config


def _relative(path: Path, config_file: Path) -> Path:
    """Paths in the file are relative to the file's directory, like most daemons'."""
    return path if path.is_absolute() else config_file.parent / path


def load(path: Path, check_files: bool = True) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing; 'zfs-unlock-agent setup --server URL --pin PIN' writes one"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, path, check_files)


def default_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, str(DEFAULT_PATH)))
