"""The data directory's layout and its server.toml, read strictly: unknown keys are errors."""

from __future__ import annotations

import json
import os
import re
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
    def next_ca_cert(self) -> Path:
        """The CA `ca next` makes: trusted beside ca_cert, and signing, until `ca activate`
        moves it to ca_cert."""
        return self.root / "ca-next.crt"

    @property
    def next_ca_key(self) -> Path:
        return self.root / "ca-next.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def next_server_cert(self) -> Path:
        """The certificate `tls next` makes and `tls activate` moves to server_cert."""
        return self.root / "server-next.crt"

    @property
    def next_server_key(self) -> Path:
        return self.root / "server-next.key"

    @property
    def admin_ca_cert(self) -> Path:
        """The CA of the approval page's admins (`admin add`), apart from the hosts' CA."""
        return self.root / "admin-ca.crt"

    @property
    def admin_ca_key(self) -> Path:
        return self.root / "admin-ca.key"

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
class DatabaseConfig:
    # Empty: SQLite, keys.db in the data directory. A postgresql:// URL: the database that
    # several nodes share (pgstore.py); never with a password in it.
    url: str = ""
    # Days an audit record stays in the database; older ones are exported to a file and
    # deleted by `audit-prune`. 0: kept for ever. (SQLite's audit.log is rotated instead.)
    audit_retention_days: int = 0

    @property
    def shared(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class MetricsConfig:
    # Empty: off. ADDRESS:PORT: a plain-HTTP listener beside the HTTPS one, with /metrics
    # (Prometheus) and /health (for load balancers); meant for 127.0.0.1.
    listen: str = ""


@dataclass(frozen=True)
class ApprovalConfig:
    # A command (argv, no shell) told of each new request for approval, as JSON on its
    # stdin (approvalnotify.py); empty: none.
    notify: tuple[str, ...] = ()
    notify_timeout: float = 10.0
    # Requests of one host that may wait at once; more are refused (a flood of them
    # would bury the one that matters).
    max_pending: int = 4
    # Seconds an agent waits between asks while its request waits.
    poll_seconds: int = 5
    # ADDRESS:PORT of the approval page (approvalpage.py), HTTPS for admin certificates;
    # empty: off.
    page_listen: str = ""


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
    # Days a dataset key replaced by a rotation stays (sealed, for recovery).
    retired_key_grace_days: int = 30
    # Days after which a host's daemon rotates a dataset key by itself; 0: never.
    max_key_age_days: int = 0
    # Days a host certificate replaced by `zfs-unlock-agent renew` still works while the
    # new one has not been used (a renewal lost on its way home is not a lockout).
    renewed_certificate_grace_days: int = 7
    rate_limits: RateLimits = field(default_factory=RateLimits)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)


_LISTEN = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):[0-9]{1,5}")


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


def _table(table: dict[str, Any], name: str, cls: type, where: str) -> dict[str, Any]:
    """TABLE's sub-table NAME ({} when absent), its keys checked against CLS's fields."""
    sub = table.pop(name, {})
    if not isinstance(sub, dict):
        raise ConfigError(f"{where}: {name} must be a table")
    _check_fields(sub, cls, f"{where} [{name}]")
    return sub


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
    database_table = _table(table, "database", DatabaseConfig, where)
    database = DatabaseConfig(
        url=_typed(database_table.get("url", ""), str, "url", where),
        audit_retention_days=_typed(
            database_table.get("audit_retention_days", 0), int, "audit_retention_days", where
        ),
    )
    if database.audit_retention_days < 0:
        raise ConfigError(f"{where}: [database] audit_retention_days must be >= 0")
    metrics_table = _table(table, "metrics", MetricsConfig, where)
    metrics = MetricsConfig(listen=_typed(metrics_table.get("listen", ""), str, "listen", where))
    if metrics.listen and not _LISTEN.fullmatch(metrics.listen):
        raise ConfigError(f"{where}: [metrics] listen must be 'ADDRESS:PORT'")
    approval = _approval(_table(table, "approval", ApprovalConfig, where), where)
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
        retired_key_grace_days=_typed(
            table.get("retired_key_grace_days", 30), int, "retired_key_grace_days", where
        ),
        max_key_age_days=_typed(table.get("max_key_age_days", 0), int, "max_key_age_days", where),
        renewed_certificate_grace_days=_typed(
            table.get("renewed_certificate_grace_days", 7),
            int,
            "renewed_certificate_grace_days",
            where,
        ),
        rate_limits=limits,
        database=database,
        metrics=metrics,
        approval=approval,
    )
    if config.workers < 0 or config.deadman_timeout < 0 or config.request_timeout < 1:
        raise ConfigError(f"{where}: workers, deadman_timeout must be >= 0, request_timeout >= 1")
    if config.io_timeout <= 0:
        raise ConfigError(f"{where}: io_timeout must be > 0")
    if (
        min(
            config.retired_key_grace_days,
            config.max_key_age_days,
            config.renewed_certificate_grace_days,
        )
        < 0
    ):
        raise ConfigError(
            f"{where}: retired_key_grace_days, max_key_age_days,"
            " renewed_certificate_grace_days must be >= 0"
        )
    return config


def _approval(table: dict[str, Any], where: str) -> ApprovalConfig:
    notify = table.get("notify", [])
    if not isinstance(notify, list) or not all(isinstance(x, str) and x for x in notify):
        raise ConfigError(f"{where}: [approval] notify must be a list of strings (an argv)")
    if notify and not os.path.isabs(notify[0]):
        raise ConfigError(f"{where}: [approval] notify must start with an absolute path")
    config = ApprovalConfig(
        notify=tuple(notify),
        notify_timeout=float(
            _typed(table.get("notify_timeout", 10.0), (int, float), "notify_timeout", where)
        ),
        max_pending=_typed(table.get("max_pending", 4), int, "max_pending", where),
        poll_seconds=_typed(table.get("poll_seconds", 5), int, "poll_seconds", where),
        page_listen=_typed(table.get("page_listen", ""), str, "page_listen", where),
    )
    if config.page_listen and not _LISTEN.fullmatch(config.page_listen):
        raise ConfigError(f"{where}: [approval] page_listen must be 'ADDRESS:PORT'")
    if not 0 < config.notify_timeout <= 300:
        raise ConfigError(f"{where}: [approval] notify_timeout must be > 0 and <= 300")
    if not 1 <= config.max_pending <= 100:
        raise ConfigError(f"{where}: [approval] max_pending must be 1 to 100")
    if not 1 <= config.poll_seconds <= 60:
        raise ConfigError(f"{where}: [approval] poll_seconds must be 1 to 60")
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

# Days a dataset key replaced by a rotation is kept (sealed, for recovery from
# snapshots sent while it was live) before it is deleted.
retired_key_grace_days = 30

# Days after which each host's daemon rotates a dataset key by itself, at a
# check-in; 0 never. 'key rotate' asks for a rotation at any time.
max_key_age_days = 0

# Days a host certificate that its host renewed ('zfs-unlock-agent renew') still
# works while the new one has not been used; the first use of the new one ends it.
renewed_certificate_grace_days = 7

[rate_limits]
per_certificate_burst = 60
per_certificate_rate = 2.0
per_address_burst = 20
per_address_rate = 0.5

# Prometheus metrics (/metrics) and a health check for load balancers (/health) on
# a plain-HTTP listener of their own; off while empty. For example "127.0.0.1:9843".
[metrics]
listen = ""

# Releases that wait for a person's approval ('host set --approval'): a command
# (argv, no shell) run with each new request as JSON on stdin, to page, mail or
# chat; killed after notify_timeout seconds. How many requests a host may have
# waiting at once, and how often its agent asks again.
[approval]
notify = []
notify_timeout = 10
max_pending = 4
poll_seconds = 5
# The approval page for people with an admin certificate ('admin add NAME'), on
# a listener of its own; off while empty. For example "127.0.0.1:8444".
page_listen = ""
{database}"""

# What init writes for a new data directory: a lost host that never calls again is
# disabled within a month, while a host down for maintenance for weeks is not.
NEW_DEADMAN_TIMEOUT = 30 * 24 * 3600

_DATABASE_TABLE = """
# Where hosts, keys and (here) the audit trail live: a PostgreSQL database that
# several key-server nodes share. Never a password in the URL: libpq reads it from
# a password file (passfile= in the URL, PGPASSFILE, or the systemd credential
# "pgpass"), or a service file (service=). See docs/high-availability.md.
[database]
url = {url}

# Days an audit record stays in the database; 'zfs-unlock-server audit-prune'
# (a daily timer) exports older ones to a file, then deletes them. 0: keep all.
audit_retention_days = 0
"""


def config_text(database_url: str = "") -> str:
    """server.toml as init writes it; DATABASE_URL adds the [database] table."""
    text = _CONFIG_TEMPLATE.replace("{deadman}", str(NEW_DEADMAN_TIMEOUT))
    table = _DATABASE_TABLE.replace("{url}", _toml_string(database_url)) if database_url else ""
    return text.replace("{database}", table)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


DEFAULT_CONFIG_TEXT = config_text()
