"""Unlock and verify encryption roots: keystatus, one batch fetch, load-key, mount.

Roots whose key is already available cost no fetch. Each root is handled on
its own: one that fails never stops the others, and its result says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from zfs_unlock_agent.config import Config
from zfs_unlock_agent.errors import (
    EX_BADKEY,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_PARTIAL,
    EX_TEMPFAIL,
    AgentError,
    ConfigError,
    KeyAlreadyLoaded,
    ZfsError,
    ZfsUnavailable,
)
from zfs_unlock_agent.keyclient import ApprovalTicket, KeyClient, ReleasedKey
from zfs_unlock_agent.log import log
from zfs_unlock_agent.udev import wait_for_links
from zfs_unlock_agent.zfs import GENERATOR_IGNORE, Dataset, Inventory, Zfs
from zfs_unlock_common import protocol, validate
from zfs_unlock_common.protocol import DatasetRef

ZVOL_DIR = Path("/dev/zvol")

# Where keys come from: given the inventory, the locked roots and the results so far, the
# keys it has (by root name), recording in the results why a root got none.
KeySource = Callable[
    [Inventory, Sequence[Dataset], dict[str, "RootResult"]], dict[str, ReleasedKey]
]


class RootResult:
    """What became of one encryption root; mounting may still turn it into a failure."""

    __slots__ = ("exit_code", "message", "mounted", "outcome", "root")

    def __init__(self, root: str, outcome: str, exit_code: int = EX_OK, message: str = "") -> None:
        self.root = root
        self.outcome = outcome  # unlocked, available, verified, failed
        self.exit_code = exit_code
        self.message = message
        self.mounted: list[str] = []

    def __repr__(self) -> str:
        return (
            f"RootResult({self.root!r}, {self.outcome!r}, {self.exit_code}, {self.message!r},"
            f" mounted={self.mounted!r})"
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == EX_OK


def read_machine_id(path: Path) -> str:
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{path}: cannot read the machine-id") from None
    try:
        return validate.machine_id(value)
    except validate.InvalidInput:
        raise ConfigError(f"{path}: not a machine-id (32 lowercase hex digits)") from None


def _warn_missing(problem: str) -> None:
    log.warning("%s (listed in the configuration); skipped", problem)


def select_roots(
    inventory: Inventory,
    config: Config,
    requested: Sequence[str],
    every: bool,
    on_missing: Callable[[str], None] = _warn_missing,
) -> list[Dataset]:
    """The encryption roots to act on: those of REQUESTED datasets, or every managed one.

    Why a configured dataset cannot be used (its pool is not imported, it is not
    encrypted) goes to ON_MISSING.
    """
    names: list[str] = []
    if requested:
        for name in requested:
            validate.dataset_name(name)
            names.append(inventory.root_of(name).name)
    if every or not requested:
        if config.datasets.property:
            names += [r.name for r in inventory.encryption_roots() if r.managed]
        for name in config.datasets.include:
            try:
                names.append(inventory.root_of(name).name)
            except ZfsUnavailable as exc:  # one stale entry must not stop the others
                on_missing(str(exc))
    return [inventory.get(n) for n in dict.fromkeys(names)]


# Where zed keeps zfs-mount-generator's list of a pool's datasets, when it is set up.
LIST_CACHE_DIR = Path("/etc/zfs/zfs-list.cache")


def generator_warnings(roots: Sequence[Dataset], cache_dir: Path = LIST_CACHE_DIR) -> list[str]:
    """What to tell about ROOTS whose mounts systemd may undo: zfs-mount-generator makes
    units for them (their pool has a cache file, and org.openzfs.systemd:ignore is not on:
    enrolled by an older version, or managed by name), bound to a zfs-load-key@ unit that
    does not run for a managed root."""
    return [
        f"{root.name}: {cache_dir / root.pool} has zfs-mount-generator make systemd units for"
        f" it, which may unmount it; run: zfs set {GENERATOR_IGNORE}=on {root.name}"
        for root in roots
        if not root.generator_ignored and (cache_dir / root.pool).exists()
    ]


def exit_code(results: Sequence[RootResult]) -> int:
    """0 when all are fine; 1 when some failed and some did not; else the first failure's code."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return EX_OK
    if len(failed) < len(results):
        return EX_PARTIAL
    return failed[0].exit_code


class Unlocker:
    def __init__(
        self,
        zfs: Zfs,
        client: Callable[[], KeyClient],
        machine_id: str,
        volume_link_timeout: float = 30.0,
        zvol_dir: Path = ZVOL_DIR,
        completes_enrollment: bool = True,
        ticket: ApprovalTicket | None = None,
    ) -> None:
        """COMPLETES_ENROLLMENT: a pending key that loads is reported to the key server as
        proven (False for recover, which has no key server)."""
        self.completes_enrollment = completes_enrollment
        # Kept by callers that ask again (the daemon): a release that waits for approval
        # is found again, not asked anew.
        self.ticket = ticket or ApprovalTicket()
        self.zfs = zfs
        self.client = client
        self.machine_id = machine_id
        self.volume_link_timeout = volume_link_timeout
        self.zvol_dir = zvol_dir

    def _fetch(
        self,
        inventory: Inventory,
        roots: Sequence[Dataset],
        results: dict[str, RootResult],
        outcome: str,
    ) -> dict[str, ReleasedKey]:
        """One batch request for every root; failures are recorded per root. A failed
        request is logged here, once for the batch: each root's result then only says
        OUTCOME ("stays locked"), not the server's problem once more."""
        refs = {}
        for root in roots:
            try:
                refs[root.name] = DatasetRef(inventory.pool_guid(root), root.guid)
            except ZfsUnavailable as exc:
                results[root.name] = RootResult(root.name, "failed", exc.exit_code, str(exc))
        if not refs:
            return {}
        try:
            with self.client() as client:
                batch = client.release(self.machine_id, list(refs.values()), self.ticket)
        except AgentError as exc:
            log.error("%s", exc)
            for name in refs:
                results[name] = RootResult(
                    name, "failed", exc.exit_code, f"{outcome}: no key from the server (see above)"
                )
            return {}
        keys = {}
        for name, ref in refs.items():
            if ref in batch.released:
                keys[name] = batch.released[ref]
            elif ref in batch.waiting:
                results[name] = RootResult(
                    name,
                    "failed",
                    EX_TEMPFAIL,
                    f"{outcome}: approval {batch.approval} was not given in time",
                )
            else:
                results[name] = RootResult(
                    name, "failed", EX_NOPERM, "the key server refused to release its key"
                )
        return keys

    def unlock(
        self,
        inventory: Inventory,
        roots: Sequence[Dataset],
        mount: bool = True,
        source: KeySource | None = None,
    ) -> list[RootResult]:
        """Load the keys of ROOTS' locked roots and mount them. The keys come from the key
        server, or from SOURCE (recover: a recovery kit); the loading is the same."""
        if source is None:
            source = lambda inventory, locked, results: self._fetch(
                inventory, locked, results, "stays locked"
            )
        results: dict[str, RootResult] = {}
        locked = [r for r in roots if r.keystatus != "available"]
        for root in roots:
            if root.keystatus == "available":
                results[root.name] = RootResult(
                    root.name, "available", message="key already loaded"
                )
        keys = source(inventory, locked, results) if locked else {}
        results |= self._load([(r, keys[r.name]) for r in locked if r.name in keys], inventory)
        if mount:
            unlocked = [r for r in roots if results[r.name].outcome == "unlocked"]
            for warning in generator_warnings(unlocked):
                log.warning("%s", warning)
            self._mount([(r, results[r.name]) for r in roots if results[r.name].ok], inventory)
        ordered = [results[r.name] for r in roots]
        for result in ordered:
            self._report(result)
        return ordered

    def _load(
        self, fetched: Sequence[tuple[Dataset, ReleasedKey]], inventory: Inventory
    ) -> dict[str, RootResult]:
        """Check each key against its root's keyformat, load the good ones (side by side),
        wipe them all, then finish the enrollment of pending keys that loaded."""
        results: dict[str, RootResult] = {}
        loadable: list[tuple[Dataset, ReleasedKey]] = []
        try:
            for root, key in fetched:
                problem = key_problem(root, key)
                if problem:
                    results[root.name] = RootResult(root.name, "failed", EX_DATAERR, problem)
                else:
                    loadable.append((root, key))
            outcomes = self.zfs.load_keys([(root.name, key.secret) for root, key in loadable])
            # A rotation that changed the key but was not yet made active on the server:
            # the dataset opens with its next key, and the rotation is completed below.
            retry = [
                (i, key.next)
                for i, ((_, key), error) in enumerate(zip(loadable, outcomes, strict=True))
                if key.next is not None and error is not None
                if not isinstance(error, KeyAlreadyLoaded)
            ]
            second = (
                self.zfs.load_keys([(loadable[i][0].name, nxt.secret) for i, nxt in retry])
                if retry
                else []
            )
            for (i, upcoming), error in zip(retry, second, strict=True):
                if error is None or isinstance(error, KeyAlreadyLoaded):
                    loadable[i] = (loadable[i][0], upcoming)
                    outcomes[i] = error
        finally:
            for _, key in fetched:
                key.wipe()
        for (root, key), error in zip(loadable, outcomes, strict=True):
            if isinstance(error, KeyAlreadyLoaded):
                results[root.name] = RootResult(
                    root.name, "available", message="key was loaded meanwhile"
                )
            elif error is not None:
                results[root.name] = RootResult(
                    root.name, "failed", error.exit_code, _zfs_reason(error)
                )
            else:
                if key.state in ("pending", "next") and self.completes_enrollment:
                    self._activate(inventory, root, key)
                results[root.name] = RootResult(root.name, "unlocked", message="key loaded")
        return results

    def _activate(self, inventory: Inventory, root: Dataset, key: ReleasedKey) -> None:
        """A pending or next key that opened the dataset is proven: finish an interrupted
        enrollment or rotation. That is their last step: the key becomes active (the key
        before it retired) and the dataset managed.
        """
        what = "rotation" if key.state == "next" else "enrollment"
        try:
            with self.client() as client:
                client.activate(self.machine_id, key.ref, key.key_id)
            if not root.managed:
                self.zfs.mark_managed(root.name)
            log.info("%s: %s completed (key %s is now active)", root.name, what, key.key_id)
        except AgentError as exc:
            log.warning(
                "%s: could not complete the %s of key %s: %s", root.name, what, key.key_id, exc
            )

    def _mount(self, unlocked: Sequence[tuple[Dataset, RootResult]], inventory: Inventory) -> None:
        """Mount what `zfs mount -a` would, parents' mountpoints before children's,
        across all roots (a root may be mounted inside another root's filesystem)."""
        filesystems: list[tuple[Dataset, RootResult]] = []
        links: list[tuple[Path, RootResult]] = []
        for root, result in unlocked:
            for member in inventory.members(root.name):
                if member.type == "volume":
                    links.append((self.zvol_dir / member.name, result))
                elif member.wants_mount and not member.mounted:
                    filesystems.append((member, result))
        for member, result in sorted(filesystems, key=lambda pair: pair[0].mountpoint):
            try:
                self.zfs.mount(member.name)
                result.mounted.append(member.name)
            except ZfsError as exc:
                if "already mounted" in exc.stderr:
                    continue
                result.outcome, result.exit_code = "failed", exc.exit_code
                result.message = (
                    f"key loaded, but mounting {member.name} failed: {_zfs_reason(exc)}"
                )
        if not links:
            return
        missing = set(wait_for_links([link for link, _ in links], self.volume_link_timeout))
        for link, result in links:
            if link in missing and result.ok:
                result.outcome, result.exit_code = "failed", ZfsUnavailable.exit_code
                result.message = f"key loaded, but no device link appeared for {link}"

    def verify(self, inventory: Inventory, roots: Sequence[Dataset]) -> list[RootResult]:
        """Fetch every key and prove it with `zfs load-key -n`; changes no keystatus."""
        results: dict[str, RootResult] = {}
        keys = self._fetch(inventory, roots, results, "not verified")
        for root in roots:
            key = keys.get(root.name)
            if key is None:
                continue
            try:
                if key.keyformat != root.keyformat:
                    results[root.name] = RootResult(
                        root.name, "failed", EX_DATAERR, "server's keyformat differs"
                    )
                    continue
                protocol.check_key_material(key.secret.buffer(), root.keyformat)
                self.zfs.load_key(root.name, key.secret, dry_run=True)
                results[root.name] = RootResult(root.name, "verified", message="the key is right")
            except protocol.KeyMaterialError as exc:
                results[root.name] = RootResult(root.name, "failed", EX_DATAERR, str(exc))
            except ZfsError as exc:
                results[root.name] = RootResult(
                    root.name, "failed", exc.exit_code, _zfs_reason(exc)
                )
            finally:
                key.secret.wipe()
        ordered = [results[r.name] for r in roots]
        for result in ordered:
            self._report(result)
        return ordered

    @staticmethod
    def _report(result: RootResult) -> None:
        if result.ok:
            mounted = f"; mounted {', '.join(result.mounted)}" if result.mounted else ""
            log.info("%s: %s (%s%s)", result.root, result.outcome, result.message, mounted)
        else:
            log.error("%s: %s", result.root, result.message)


def key_problem(root: Dataset, key: ReleasedKey) -> str:
    """Why KEY must not go to zfs for ROOT, or "" when it may."""
    if key.keyformat != root.keyformat:
        return (
            f"the server's key is {key.keyformat} but the dataset's keyformat is {root.keyformat}"
        )
    try:
        protocol.check_key_material(key.secret.buffer(), root.keyformat)
    except protocol.KeyMaterialError as exc:
        return f"server sent a bad key: {exc}"
    return ""


def _zfs_reason(exc: ZfsError) -> str:
    if exc.exit_code == EX_BADKEY:
        return "zfs rejected the key (incorrect key)"
    return str(exc)
