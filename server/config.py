"""The data directory's layout and its server.toml, read strictly: unknown keys are errors."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zfs_unlock_server.errors import ConfigError

DEFAULT_DATA_DIR = Path("/var/lib/zfs-unlock-server")
DATA_DIR_ENV = "ZFS_UNLOCK_SERVER_DATA_DIR"


@dataclass(frozen=True)
class Layout:
    """Where each file of a data directory lives."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    @property
    def database(self) -> Path:
        return self.root / "keys.db"

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def ratelimit(self) -> Path:
        return self.root / "ratelimit.db"

    @property
    def default_audit_log(self) -> Path:
        return self.root / "audit.log"


@dataclass(frozen=True)
class RateLimits:
    per_certificate_burst: float = 60.0
    per_certificate_rate: float = 2.0
    per_address_burst: float = 20.0
    per_address_rate: float = 0.5


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("0.0.0.0:8443",)
    workers: int = 0  # 0: two per CPU core
    io_timeout: float = 10.0  # seconds per socket operation, the TLS handshake included
    request_timeout: int = 30  # a worker busy longer than this is killed and replaced
    # Seconds a host may stay unseen; 0 = off; per-host override. Off when server.toml
    # leaves it out, so that data directories made before init wrote it keep behaving
    # as they did; init writes NEW_DEADMAN_TIMEOUT.
    deadman_timeout: int = 0
    simplezfs_route: bool = False
    audit_log: str = ""  # empty: audit.log in the data directory
    rate_limits: RateLimits = field(default_factory=RateLimits)


def _check_fields(table: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")


def _typed(value: Any, expected: type | tuple[type, ...], name: str, where: str) -> Any:
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where}: {name} has the wrong type")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: {name} has the wrong type")
    return value


def parse(text: str, where: str) -> ServerConfig:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_fields(table, ServerConfig, where)
    limits_table = table.pop("rate_limits", {})
    if not isinstance(limits_table, dict):
        raise ConfigError(f"{where}: rate_limits must be a table")
    _check_fields(limits_table, RateLimits, f"{where} [rate_limits]")
    limits = RateLimits(
        **{k: float(_typed(v, (int, float), k, where)) for k, v in limits_table.items()}
    )
    if (
        min(limits.per_certificate_burst, limits.per_address_burst) < 1
        or min(limits.per_certificate_rate, limits.per_address_rate) <= 0
    ):
        raise ConfigError(f"{where}: rate limits need burst >= 1 and rate > 0")
    listen = table.get("listen", list(ServerConfig.listen))
    if not isinstance(listen, list) or not listen or not all(isinstance(x, str) for x in listen):
        raise ConfigError(f"{where}: listen must be a non-empty list of 'ADDRESS:PORT'")
    config = ServerConfig(
        listen=tuple(listen),
        workers=_typed(table.get("workers", 0), int, "workers", where),
        io_timeout=float(_typed(table.get("io_timeout", 10.0), (int, float), "io_timeout", where)),
        request_timeout=_typed(table.get("request_timeout", 30), int, "request_timeout", where),
        deadman_timeout=_typed(table.get("deadman_timeout", 0), int, "deadman_timeout", where),
        simplezfs_route=_typed(table.get("simplezfs_route", False), bool, "simplezfs_route", where),
        audit_log=_typed(table.get("audit_log", ""), str, "audit_log", where),
        rate_limits=limits,
    )
    if config.workers < 0 or config.deadman_timeout < 0 or config.request_timeout < 1:
        raise ConfigError(f"{where}: workers, deadman_timeout must be >= 0, request_timeout >= 1")
    if config.io_timeout <= 0:
        raise ConfigError(f"{where}: io_timeout must be > 0")
    return config


def load(layout: Layout) -> ServerConfig:
    try:
        text = layout.config.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{layout.config}: missing; is {layout.root} a data directory made by"
            " 'zfs-unlock-server init'?"
        ) from None
    return parse(text, str(layout.config))


def audit_path(layout: Layout, config: ServerConfig) -> Path:
    if not config.audit_log:
        return layout.default_audit_log
    path = Path(config.audit_log)
    return path if path.is_absolute() else layout.root / path


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, str(DEFAULT_DATA_DIR)))


_CONFIG_TEMPLATE = """\
# zfs-unlock-server settings. Unknown keys are errors. See docs/protocol.md.

# Addresses to serve HTTPS on.
listen = ["0.0.0.0:8443"]

# Worker processes; 0 means two per CPU core.
workers = 0

# Seconds allowed for each socket operation (including the TLS handshake),
# and for one whole request before its worker is replaced.
io_timeout = 10.0
request_timeout = 30

# Dead-man switch: a host not seen (check-in or key release) for this many
# seconds is disabled until an admin re-enables it. 2592000 is 30 days; the
# agent's daemon checks in every 15 minutes. 0 turns it off, as does leaving
# the setting out. Hosts may override it with 'host add --deadman-timeout'.
deadman_timeout = {deadman}

# Serve imported SimpleZFSKeySystem keys at /MACHINE_ID/POOL_GUID/NAME for
# datasets still on ZFS's native keylocation=https:// (client certificate
# required, same checks as /v1).
simplezfs_route = false

# Audit log path; empty means audit.log in the data directory.
audit_log = ""

[rate_limits]
per_certificate_burst = 60
per_certificate_rate = 2.0
per_address_burst = 20
per_address_rate = 0.5
"""

# What init writes for a new data directory: a lost host that never calls again is
# disabled within a month, while a host down for maintenance for weeks is not.
NEW_DEADMAN_TIMEOUT = 30 * 24 * 3600
DEFAULT_CONFIG_TEXT = _CONFIG_TEMPLATE.replace("{deadman}", str(NEW_DEADMAN_TIMEOUT))
