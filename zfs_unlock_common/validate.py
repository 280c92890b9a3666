"""Strict syntax checks for the identifiers that cross the wire or reach argv.

Shared by the agent and the key server so that both sides accept exactly the
same language. Every check returns the canonical value or raises InvalidInput,
whose message never repeats the rejected input (it may be hostile or secret).
"""

from __future__ import annotations

import re

MAX_DATASET_NAME = 255  # ZFS_MAX_DATASET_NAME_LEN (256) less the terminating NUL
MAX_UINT64 = 2**64 - 1

_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_GUID = re.compile(r"[1-9][0-9]{0,19}")
# zfs_namecheck.c valid_char(): alphanumerics and - _ . : and space.
_COMPONENT = re.compile(r"[A-Za-z0-9_.: -]+")
# zpool pool_namecheck(): no vdev keyword prefix, not "log", not c[0-9]...
_POOL_RESERVED = re.compile(r"mirror|raidz|draid|spare|log\Z|c[0-9]")
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_KEY_ID = re.compile(r"k-[0-9a-f]{24}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_APPROVAL_ID = re.compile(r"a-[0-9a-f]{12}")


class InvalidInput(ValueError):
    """A value failed validation. The message names the field, never the value."""


def machine_id(value: object) -> str:
    """systemd machine-id: exactly 32 lowercase hex digits."""
    if not isinstance(value, str) or not _MACHINE_ID.fullmatch(value):
        raise InvalidInput("machine_id must be 32 lowercase hex digits")
    return value


def guid(value: object, field: str = "guid") -> str:
    """A pool or dataset GUID: decimal uint64, no sign, no leading zero, not 0."""
    if not isinstance(value, str) or not _GUID.fullmatch(value) or int(value) > MAX_UINT64:
        raise InvalidInput(f"{field} must be a decimal unsigned 64-bit integer")
    return value


def dataset_name(value: object) -> str:
    """A filesystem or volume name as ZFS accepts it (no snapshots, no bookmarks)."""
    if not isinstance(value, str) or not value or len(value) > MAX_DATASET_NAME:
        raise InvalidInput("dataset name must be 1 to 255 characters")
    components = value.split("/")
    pool = components[0]
    if not pool[:1].isascii() or not pool[:1].isalpha():
        raise InvalidInput("dataset name must start with a letter (the pool name)")
    if _POOL_RESERVED.match(pool):
        raise InvalidInput("dataset name uses a reserved pool name")
    for component in components:
        if not component or not _COMPONENT.fullmatch(component) or component in {".", ".."}:
            raise InvalidInput(
                "dataset name components must be non-empty and use only "
                "letters, digits, '-', '_', '.', ':' and space"
            )
    return value


def label(value: object, field: str = "name") -> str:
    """A short identifier for hosts and legacy key names: [A-Za-z0-9_.:-], not . or .."""
    if not isinstance(value, str) or not _LABEL.fullmatch(value) or value in {".", ".."}:
        raise InvalidInput(f"{field} must be 1 to 255 of A-Z a-z 0-9 _ . : -")
    return value


def key_id(value: object) -> str:
    """A key identifier as the server issues them."""
    if not isinstance(value, str) or not _KEY_ID.fullmatch(value):
        raise InvalidInput("key_id is malformed")
    return value


def nonce(value: object) -> str:
    """The agent's nonce that binds a release waiting for approval to it: 32 hex digits."""
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise InvalidInput("nonce must be 32 lowercase hex digits")
    return value


def approval_id(value: object) -> str:
    """An approval request's id as the server issues them."""
    if not isinstance(value, str) or not _APPROVAL_ID.fullmatch(value):
        raise InvalidInput("approval id must be 'a-' and 12 lowercase hex digits")
    return value
