"""Which server pins the deployment vouches for: the one each node serves, and the next
ones `tls next` made, announced to hosts inside the pinned mutual-TLS channel so that a
rollover (`tls activate`) never locks a host out.

The pins live in the database (meta rows, JSON lists), so every node announces them
whichever node made them; each node adds the pin of the certificate it serves now.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from zfs_unlock_common import pinning, protocol
from zfs_unlock_common.validate import InvalidInput
from zfs_unlock_server import pki
from zfs_unlock_server.filewatch import Derived
from zfs_unlock_server.store import Store

NEXT_META = "tls_next_pins"
# The pins the nodes serve: each node adds its own when serve starts, and `tls activate`
# swaps its old one for its new one, so that a host hears every node's, whichever it
# checks in with (with a key per node, it checks in with the first one only).
SERVED_META = "tls_served_pins"


def next_pins(store: Store) -> list[str]:
    return _pins(store, NEXT_META)


def served_pins(store: Store) -> list[str]:
    return _pins(store, SERVED_META)


def _pins(store: Store, name: str) -> list[str]:
    raw = store.meta(name)
    return list(json.loads(raw)) if raw else []


def change_pins(
    store: Store, name: str, add: str = "", remove: str = "", alone: bool = False
) -> None:
    """Add or remove one pin of the list meta NAME (ALONE: ADD replaces every other),
    against concurrent admins and nodes (compare and swap)."""
    while True:
        raw = store.meta(name)
        pins = list(json.loads(raw)) if raw else []
        wanted = [] if alone else [p for p in pins if p != remove]
        if add and add not in wanted:
            wanted.append(add)
        if wanted == pins or store.swap_meta(name, raw, json.dumps(wanted).encode()):
            return


def pin_of_pem(cert_pem: bytes) -> str:
    return pinning.pin_of_certificate(pki.pem_to_der(cert_pem))


def served_pin(path: os.PathLike[str]) -> Derived[str]:
    """The pin of the certificate a node serves, followed as `tls activate` replaces it."""
    return Derived(path, pin_of_pem, "")


def check_reported(pins: object) -> tuple[str, ...]:
    """A check-in's "pins": a list of at most protocol.MAX_REPORTED_PINS well-formed pins (InvalidInput,
    400, otherwise)."""
    if not isinstance(pins, list) or len(pins) > protocol.MAX_REPORTED_PINS:
        raise InvalidInput(f"pins must be a list of at most {protocol.MAX_REPORTED_PINS} pins")
    found: list[str] = []
    for pin in pins:
        try:
            if not isinstance(pin, str):
                raise pinning.PinError("pins must be strings")
            found.append(pinning.format_pin(pinning.parse_pin(pin)))
        except pinning.PinError as exc:
            raise InvalidInput(f"pins: {exc}") from None
    return tuple(sorted(set(found)))


def holds_all(held: Sequence[str], wanted: Sequence[str]) -> bool:
    return set(wanted) <= set(held)
