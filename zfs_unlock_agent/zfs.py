"""The only module that runs zfs and zpool.

Argument lists only (never a shell), binaries configurable so tests can put a
fake in their place, LC_ALL=C so messages can be recognised, and key material
only ever written to the child's standard input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from zfs_unlock_agent import processes
from zfs_unlock_agent.errors import IncorrectKey, KeyAlreadyLoaded, ZfsError, ZfsUnavailable
from zfs_unlock_agent.secret import Secret
from zfs_unlock_common import validate

# The user property that marks an encryption root as the agent's to unlock.
MANAGED_PROPERTY = "zfs-unlock-agent:managed"
# What a root the agent manages carries (inherited by its children): our mark, and
# OpenZFS's own "make no systemd units for it". With /etc/zfs/zfs-list.cache,
# zfs-mount-generator would bind each mount to a zfs-load-key@ROOT unit, which the
# drop-in skips so that it never prompts; systemd would then unmount what the agent
# mounts, as "bound to an inactive unit". The agent mounts these datasets itself.
GENERATOR_IGNORE = "org.openzfs.systemd:ignore"
MANAGED_PROPERTIES = {MANAGED_PROPERTY: "on", GENERATOR_IGNORE: "on"}

COMMAND_TIMEOUT = 120.0  # mounting a large pool can take a while; load-key cannot hang forever
# Roots' keys load side by side: each `zfs load-key` is a process of its own (and, for a
# passphrase, a key derivation that keeps one CPU busy), so a host with many roots gains.
# Twice the CPUs: a starting process leaves its CPU idle while the kernel maps it (100
# roots on 2 CPUs: 2 at once 181 ms, 4 at once 151 ms, 8 no better).
PARALLEL = min(16, max(4, 2 * (os.cpu_count() or 1)))

# What libzfs reads from its environment to fetch a keylocation=https:// key (CA file or
# directory, client certificate and key: get_key_material_https() in libzfs_crypto.c).
# File names, never key material; passed on only to `zfs load-key` from the keylocation.
HTTPS_KEYLOCATION_ENV = (
    "SSL_CA_CERT_FILE",
    "SSL_CA_CERT_PATH",
    "SSL_CLIENT_CERT_FILE",
    "SSL_CLIENT_KEY_FILE",
)

LIST_COLUMNS = (
    "name",
    "type",
    "guid",
    "encryptionroot",
    "keystatus",
    "keyformat",
    "keylocation",
    "mounted",
    "canmount",
    "mountpoint",
    MANAGED_PROPERTY,
    GENERATOR_IGNORE,
)


# Key formats that can pass through a password prompt (a line of text): a raw key is
# 32 bytes, which no prompt carries.
TYPABLE_KEYFORMATS = ("hex", "passphrase")


class Dataset(NamedTuple):
    name: str
    type: str  # filesystem or volume
    guid: str
    encryption_root: str  # "" when not encrypted
    keystatus: str  # available, unavailable, or "" when not encrypted
    keyformat: str  # raw, hex, passphrase, or "" when not encrypted
    keylocation: str
    mounted: bool
    canmount: str
    mountpoint: str
    managed: bool
    generator_ignored: bool = False  # org.openzfs.systemd:ignore=on (inherited too)

    @property
    def pool(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def is_encryption_root(self) -> bool:
        return self.encryption_root == self.name

    @property
    def wants_mount(self) -> bool:
        """Would `zfs mount -a` mount it? (legacy and none are mounted by others or not at all)"""
        return (
            self.type == "filesystem"
            and self.canmount == "on"
            and self.mountpoint not in {"none", "legacy", "-", ""}
        )


def _output(argv: Sequence[str], finished: processes.Finished) -> str:
    """The command's stdout, or the ZfsError its status and stderr say."""
    command = " ".join(argv[:2])
    if finished.timed_out:
        raise ZfsError(command, -9, f"timed out after {COMMAND_TIMEOUT:.0f} s")
    err = finished.stderr.decode("utf-8", "replace")
    if finished.returncode != 0:
        if "Incorrect key provided" in err:
            raise IncorrectKey(command, finished.returncode, err)
        if "Key already loaded" in err:
            raise KeyAlreadyLoaded(command, finished.returncode, err)
        raise ZfsError(command, finished.returncode, err)
    return finished.stdout.decode("utf-8", "replace")


def _field(value: str) -> str:
    return "" if value == "-" else value


class Inventory(NamedTuple):
    datasets: dict[str, Dataset]
    pool_guids: dict[str, str]

    def get(self, name: str) -> Dataset:
        try:
            return self.datasets[name]
        except KeyError:
            raise ZfsUnavailable(f"{name}: no such dataset (is its pool imported?)") from None

    def encryption_roots(self) -> list[Dataset]:
        return [d for d in self.datasets.values() if d.is_encryption_root]

    def root_of(self, name: str) -> Dataset:
        dataset = self.get(name)
        if not dataset.encryption_root:
            raise ZfsUnavailable(f"{name}: not encrypted")
        return self.get(dataset.encryption_root)

    def members(self, root: str) -> list[Dataset]:
        """Datasets whose key is ROOT's, parents before children."""
        return sorted(
            (d for d in self.datasets.values() if d.encryption_root == root), key=lambda d: d.name
        )

    def pool_guid(self, dataset: Dataset) -> str:
        try:
            return self.pool_guids[dataset.pool]
        except KeyError:
            raise ZfsUnavailable(f"{dataset.name}: pool {dataset.pool} is not imported") from None


class Programs(Protocol):
    """Which zfs and zpool to run ([zfs] in agent.toml: config.ZfsSettings)."""

    @property
    def zfs(self) -> str: ...

    @property
    def zpool(self) -> str: ...


class Zfs:
    def __init__(self, programs: Programs) -> None:
        self.zfs = programs.zfs
        self.zpool = programs.zpool

    @staticmethod
    def _environment(passed: Sequence[str] = ()) -> dict[str, str]:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C",
        }
        return environment | {name: os.environ[name] for name in passed if name in os.environ}

    def _run(
        self, argv: Sequence[str], stdin: Secret | None = None, passed_env: Sequence[str] = ()
    ) -> str:
        finished = self._run_all([processes.Command(argv, stdin)], passed_env)[0]
        return _output(argv, finished)

    def _run_all(
        self, commands: Sequence[processes.Command], passed_env: Sequence[str] = ()
    ) -> list[processes.Finished]:
        program = commands[0].argv[0] if commands else ""
        try:
            return processes.run_all(
                commands, self._environment(passed_env), COMMAND_TIMEOUT, PARALLEL
            )
        except FileNotFoundError as exc:
            raise ZfsUnavailable(f"{exc.filename or program}: not found") from None
        except PermissionError as exc:
            raise ZfsUnavailable(f"{exc.filename or program}: not executable") from None

    # Reading

    def inventory(self) -> Inventory:
        # Both lists at once: two read-only queries that do not depend on each other.
        pool_list = [self.zpool, "list", "-H", "-p", "-o", "name,guid"]
        dataset_list = [
            self.zfs,
            "list",
            "-H",
            "-p",
            "-t",
            "filesystem,volume",
            "-o",
            ",".join(LIST_COLUMNS),
        ]
        finished = self._run_all([processes.Command(pool_list), processes.Command(dataset_list)])
        pools: dict[str, str] = {}
        for line in _output(pool_list, finished[0]).splitlines():
            name, guid = line.split("\t")
            pools[name] = guid
        datasets: dict[str, Dataset] = {}
        if not pools:
            return Inventory(datasets, pools)
        output = _output(dataset_list, finished[1])
        for line in output.splitlines():
            fields = line.split("\t")
            if len(fields) != len(LIST_COLUMNS):
                raise ZfsError("zfs list", 0, "unexpected output format")
            (
                name,
                kind,
                guid,
                root,
                keystatus,
                keyformat,
                keylocation,
                mounted,
                canmount,
                mountpoint,
                managed,
                ignored,
            ) = fields
            keyformat = _field(keyformat)
            datasets[name] = Dataset(
                name=name,
                type=kind,
                guid=guid,
                encryption_root=_field(root),
                keystatus=_field(keystatus),
                keyformat="" if keyformat == "none" else keyformat,
                keylocation=_field(keylocation),
                mounted=mounted == "yes",
                canmount=canmount,
                mountpoint=mountpoint,
                managed=managed == "on",
                generator_ignored=ignored == "on",
            )
        return Inventory(datasets, pools)

    def keystatus(self, name: str) -> str:
        """`zfs get keystatus NAME`: available, unavailable, or "-" (not encrypted)."""
        validate.dataset_name(name)
        argv = [self.zfs, "get", "-H", "-o", "value", "keystatus", name]
        return self._run(argv).strip()

    # Changing

    def load_key(self, root: str, key: Secret, dry_run: bool = False) -> None:
        """`zfs load-key [-n] -L prompt ROOT`, the key on stdin."""
        validate.dataset_name(root)
        flags = ["-n"] if dry_run else []
        self._run([self.zfs, "load-key", *flags, "-L", "prompt", root], stdin=key)

    def load_keys(self, keys: Sequence[tuple[str, Secret]]) -> list[ZfsError | None]:
        """`zfs load-key -L prompt ROOT` for every (ROOT, KEY), up to PARALLEL at once:
        each is its own command with its own key on its stdin, as load_key runs it.
        Returns, in order, None for a key loaded or the ZfsError that zfs reported."""
        commands = []
        for root, key in keys:
            validate.dataset_name(root)
            commands.append(processes.Command([self.zfs, "load-key", "-L", "prompt", root], key))
        outcomes: list[ZfsError | None] = []
        for command, finished in zip(commands, self._run_all(commands), strict=True):
            try:
                _output(command.argv, finished)
                outcomes.append(None)
            except ZfsError as exc:
                outcomes.append(exc)
        return outcomes

    def load_key_from_location(self, root: str) -> None:
        """`zfs load-key ROOT` from the dataset's own keylocation (file:// or https://),
        with the SSL_* variables an https:// keylocation needs, as `zfs load-key` has them."""
        validate.dataset_name(root)
        self._run([self.zfs, "load-key", root], passed_env=HTTPS_KEYLOCATION_ENV)

    def mount(self, dataset: str) -> None:
        validate.dataset_name(dataset)
        self._run([self.zfs, "mount", dataset])

    def change_key(self, root: str, key: Secret, keyformat: str) -> None:
        """Re-wrap ROOT's data key with KEY, read from stdin; keylocation becomes prompt."""
        validate.dataset_name(root)
        self._run(
            [
                self.zfs,
                "change-key",
                "-o",
                "keylocation=prompt",
                "-o",
                f"keyformat={keyformat}",
                root,
            ],
            stdin=key,
        )

    def create_encrypted(
        self, name: str, key: Secret, keyformat: str, properties: dict[str, str]
    ) -> None:
        validate.dataset_name(name)
        options = [
            "-o",
            "encryption=on",
            "-o",
            f"keyformat={keyformat}",
            "-o",
            "keylocation=prompt",
        ]
        for prop, value in properties.items():
            options += ["-o", f"{prop}={value}"]
        self._run([self.zfs, "create", *options, name], stdin=key)

    def mark_managed(self, dataset: str) -> None:
        """Set MANAGED_PROPERTIES on DATASET, all in one `zfs set`: a crash leaves all or none."""
        validate.dataset_name(dataset)
        assignments = [f"{prop}={value}" for prop, value in MANAGED_PROPERTIES.items()]
        self._run([self.zfs, "set", *assignments, dataset])
