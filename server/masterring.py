"""The master key ring kept in the database, and what a process learns from it.

A process starts with one master key, from its credential or the data directory. The ring
(sealing.Ring, one row of meta) says which key seals new values and, while a rotation runs,
holds each of its two keys sealed under the other: a process given either key learns the
other here, so serving nodes started before a rotation open what it re-seals, and a node
restarted with the new credential still opens what is not re-sealed yet. Once no value
needs the old key, the rotation leaves the new one alone in the ring, with nothing wrapped:
the old key then opens nothing the database holds.

Serving processes look again before they seal, when they meet a value under a key they do
not hold, and every REFRESH_SECONDS while idle (serve.py).
"""

from __future__ import annotations

from zfs_unlock_server.errors import IntegrityError
from zfs_unlock_server.sealing import MasterKeyWrap, Ring, Sealer, key_id_of
from zfs_unlock_server.store import Store

REFRESH_SECONDS = 1.0


def load(store: Store) -> Ring | None:
    raw = store.meta(Ring.META_NAME)
    return None if raw is None else Ring.decode(raw)


def learn(sealer: Sealer, ring: Ring) -> None:
    """Make SEALER hold what RING holds that it can open, seal under RING's sealing key, and
    drop learned keys that RING dropped."""
    progress = True
    while progress:
        progress = False
        for kid, wrapped in ring.wrapped.items():
            if kid in sealer.held() or not wrapped:
                continue
            try:
                material = sealer.open(wrapped, MasterKeyWrap(kid))
            except IntegrityError:
                continue  # wrapped under a key not held (yet)
            if key_id_of(material) != kid:
                raise IntegrityError(f"the ring's master key {kid} is not what its id names")
            sealer.add(material)
            progress = True
    for kid in sealer.held() - set(ring.wrapped):
        sealer.forget(kid)
    # Even when not held: sealing then fails (503) instead of sealing under a retired key.
    sealer.sealing_id = ring.sealing


def refresh(sealer: Sealer, store: Store) -> Ring | None:
    ring = load(store)
    if ring is not None:
        learn(sealer, ring)
    return ring


def register(sealer: Sealer, store: Store) -> None:
    """Start the ring with SEALER's key, once it has proved to be the data directory's."""
    store.swap_meta(Ring.META_NAME, None, Ring(sealer.own_id, {sealer.own_id: b""}).encode())
