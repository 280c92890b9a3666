"""Local administration: data directory creation, hosts and keys. Every change is audited.

These run on the server machine with direct access to the data directory; none
of them is reachable over HTTP. A running server sees each change on its next
request, because it reads the database for every decision.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zfs_unlock_common import pinning, protocol, validate
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import (
    adminca,
    approval,
    approvaldecide,
    database,
    hostca,
    pki,
    privileges,
    secretfile,
)
from zfs_unlock_server import config as server_config
from zfs_unlock_server.approval import Policy
from zfs_unlock_server.approvalgate import deny_open
from zfs_unlock_server.approvalrows import HOST_WIDE, Approval
from zfs_unlock_server.audit import AuditError, AuditRecord, AuditSink
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.deadman import expire_silent_hosts
from zfs_unlock_server.errors import CannotCreate, Conflict, DataError, NotFound
from zfs_unlock_server.masterkey import check_master_key
from zfs_unlock_server.outputs import HostBundle
from zfs_unlock_server.sealing import Sealer, load_master_key, new_master_key
from zfs_unlock_server.service import KeyService, new_key_id
from zfs_unlock_server.store import Host, KeyRecord, NewHost, Store


def actor() -> str:
    """Who runs this command, by real uid (not $USER, which anyone can set); the uid it
    started with if it has since become the data directory's owner."""
    uid = privileges.invoking_uid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"admin:{name}"


# Data directory


def init_data_dir(
    root: Path,
    server_names: Sequence[str],
    server_cert: Path | None = None,
    server_key: Path | None = None,
    master_key_out: Path | None = None,
    enter: Callable[[], object] = lambda: None,
    database_url: str = "",
) -> str:
    """Create a new data directory; return the server's public-key pin. Never overwrites.

    MASTER_KEY_OUT puts the master key there (0400) instead of into the data
    directory. ENTER runs once everything that needs the caller's own rights is
    done (reading --server-key, writing MASTER_KEY_OUT) and before the data
    directory is touched: the CLI becomes the directory's owner there. DATABASE_URL puts
    hosts, keys and the audit trail in that PostgreSQL database (created at this server's
    schema), which must hold no other deployment's.
    """
    if root.exists() and any(root.iterdir()):
        raise CannotCreate(f"{root} exists and is not empty; refusing to overwrite it")
    if (server_cert is None) != (server_key is None):
        raise DataError("--server-cert and --server-key go together")
    if master_key_out is not None:
        _check_master_key_out(master_key_out, root)
    # Check an operator's certificate and key before creating anything, so a
    # refusal leaves no half-made data directory behind.
    if server_cert is not None and server_key is not None:
        key_pem = secretfile.read_private(server_key)
        cert_pem = server_cert.read_bytes()
        pki.check_key_pair(cert_pem, key_pem)
    else:
        pair = pki.create_server_certificate(list(server_names) or pki.default_server_names())
        cert_pem, key_pem = pair.cert_pem, pair.key_pem
    config = server_config.parse(server_config.config_text(database_url), "server.toml")
    master_key = new_master_key()
    if master_key_out is not None:
        master_key_out.parent.mkdir(mode=0o700, exist_ok=True)
        secretfile.write_new(master_key_out, master_key, 0o400)
    enter()
    store = database.open_store(Layout(root), config, migrate=True) if database_url else None
    try:
        if store is not None and _in_use(store):
            raise CannotCreate(
                f"{database.describe(Layout(root), config)} already holds a deployment; a"
                " further node of it takes a copy of an existing node's data directory"
                " instead (docs/high-availability.md)"
            )
        _make_data_dir(root, config, master_key, master_key_out is None, cert_pem, key_pem, store)
    finally:
        if store is not None:
            store.close()
    return server_pin(Layout(root))


def _in_use(store: Store) -> bool:
    return store.counts() != (0, 0) or store.master_key_check() is not None


def _make_data_dir(
    root: Path,
    config: ServerConfig,
    master_key: bytes,
    keep_master_key: bool,
    cert_pem: bytes,
    key_pem: bytes,
    store: Store | None,
) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    layout = Layout(root)
    if keep_master_key:
        secretfile.write_new(layout.master_key, master_key, 0o400)
    ca = pki.create_ca()
    secretfile.write_new(layout.ca_key, ca.key_pem, 0o400)
    secretfile.write_new(layout.ca_cert, ca.cert_pem, 0o644)
    secretfile.write_new(layout.server_key, key_pem, 0o400)
    secretfile.write_new(layout.server_cert, cert_pem, 0o644)
    url = config.database.url
    secretfile.write_new(layout.config, server_config.config_text(url).encode(), 0o644)
    if store is None:
        store = database.open_store(layout, config, migrate=True)
        os.chmod(layout.database, 0o600)
    try:
        check_master_key(Sealer(master_key), store, layout)
        audit = database.open_audit(layout, config, store)
        audit.write(
            {"event": "init", "decision": "allow", "actor": actor(), "reason": "data_dir_created"}
        )
    finally:
        if not url:
            store.close()


def _check_master_key_out(path: Path, root: Path) -> None:
    if path.resolve().is_relative_to(root.resolve()):
        raise DataError(f"--master-key-out {path}: must be outside the data directory {root}")
    if path.exists() or path.is_symlink():
        raise CannotCreate(f"--master-key-out {path} exists; refusing to overwrite it")


def server_pin(layout: Layout) -> str:
    return pinning.pin_of_certificate(pki.pem_to_der(layout.server_cert.read_bytes()))


@dataclass(frozen=True)
class Change:
    """One audited change: its event and the fields that name what it changes."""

    event: str
    fields: Mapping[str, str | int | None]


@dataclass
class Admin:
    """An open data directory, for one admin command."""

    layout: Layout
    config: ServerConfig
    store: Store
    audit: AuditSink
    master: Sealer | None = None  # read before the command became the directory's owner
    _checked: Sealer | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, root: Path, master: Sealer | None = None) -> Admin:
        layout = Layout(root)
        config = server_config.load(layout)
        store = database.open_store(layout, config)
        return cls(layout, config, store, database.open_audit(layout, config, store), master)

    def close(self) -> None:
        self.store.close()
        self.audit.close()

    def sealer(self) -> Sealer:
        """The master key, once it has proved to be this data directory's (masterkey.py)."""
        if self._checked is None:
            master = self.master
            if master is None:
                master = load_master_key(self.layout.master_key)
            check_master_key(master, self.store, self.layout)
            self._checked = master
        return self._checked

    def service(self) -> KeyService:
        return KeyService(
            self.store,
            self.sealer(),
            self.audit,
            self.config.deadman_timeout,
            retired_key_grace=self.config.retired_key_grace_days * 86400,
            max_key_age=self.config.max_key_age_days * 86400,
            sign=self.sign,
            renewed_certificate_grace=self.config.renewed_certificate_grace_days * 86400,
        )

    def record(self, event: str, **fields: str | int | None) -> None:
        entry: AuditRecord = {"event": event, "decision": "allow", "actor": actor(), **fields}
        self.audit.write(entry)

    @contextlib.contextmanager
    def granting(self, event: str, **fields: str | int | None) -> Iterator[None]:
        """Record a change that grants access *before* making it: an unwritable audit
        log stops it. A change that then fails is recorded as failed."""
        with self.granting_all([Change(event, fields)]):
            yield

    @contextlib.contextmanager
    def granting_all(self, changes: Sequence[Change]) -> Iterator[None]:
        """granting for changes made together, in one transaction: every record is
        written (in one durable write) before it, and if it fails each record is
        followed by its failed one, so that none is left claiming a change not made."""
        who = actor()
        self.audit.write(
            *({"event": c.event, "decision": "allow", "actor": who, **c.fields} for c in changes)
        )
        try:
            yield
        except BaseException as exc:
            failed: list[AuditRecord] = [
                {
                    "event": c.event,
                    "decision": "failed",
                    "actor": who,
                    "reason": type(exc).__name__,
                    **c.fields,
                }
                for c in changes
            ]
            with contextlib.suppress(AuditError):
                self.audit.write(*failed)
            raise

    # Changes that take access away (disable, revoke, remove) are made first and
    # recorded after: a broken audit log must never keep a lost host enabled.

    # Hosts

    def sign(self, host_name: str, csr_pem: bytes) -> bytes:
        return hostca.sign(self.layout, host_name, csr_pem)

    def add_host(
        self,
        name: str,
        machine_id: str,
        networks: Sequence[str],
        pools: Sequence[str],
        deadman_timeout: int | None,
        csr_pem: bytes | None,
        issue_into: Path | HostBundle | None,
    ) -> tuple[Host, bytes]:
        """Register a host and return it with its new client certificate (PEM).

        ISSUE_INTO, instead of CSR_PEM: where to generate the host's key pair, a
        directory (made here, and removed again if this fails) or a bundle the caller
        opened (and removes)."""
        validate.label(name, "host name")
        validate.machine_id(machine_id)
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=True)
            except ValueError:
                raise DataError(f"--allow-ip {net!r} is not a network in CIDR form") from None
        for pool in pools:
            validate.guid(pool, "pool GUID")
        if deadman_timeout is not None and deadman_timeout < 0:
            raise DataError("--deadman-timeout must be >= 0")
        if csr_pem is None and issue_into is None:
            raise DataError(
                "give the host's CSR (--csr) or a directory for a new key (--issue-key)"
            )
        bundle = HostBundle.open(issue_into) if isinstance(issue_into, Path) else issue_into
        try:
            added = self._add_host(
                NewHost(
                    name, machine_id, tuple(networks), tuple(dict.fromkeys(pools)), deadman_timeout
                ),
                csr_pem,
                bundle if csr_pem is None else None,
            )
        except BaseException:
            if isinstance(issue_into, Path) and bundle is not None:
                bundle.discard()
            raise
        if isinstance(issue_into, Path) and bundle is not None:
            bundle.close()  # opened here: closed here (a fleet's worth would run out of fds)
        return added

    def _add_host(
        self, new: NewHost, csr_pem: bytes | None, bundle: HostBundle | None
    ) -> tuple[Host, bytes]:
        key_pem = None
        if csr_pem is None:
            key_pem, csr_pem = new_key_and_csr(new.name)
        cert_pem = self.sign(new.name, csr_pem)
        fingerprint = pki.certificate_fingerprint(pki.pem_to_der(cert_pem))
        # Key files first: a host whose only private key was never written would be
        # enrolled for nobody. If the database refuses, the bundle's owner removes them.
        if key_pem is not None and bundle is not None:
            bundle.write(key_pem, cert_pem)
        with self.granting(
            "host_added",
            host=new.name,
            machine_id=new.machine_id,
            cert_fp=fingerprint,
            networks=",".join(new.allowed_networks),
            pools=",".join(new.pools),
            deadman_timeout=new.deadman_timeout,
        ):
            host = self.store.add_host(new, fingerprint, pki.not_after(cert_pem))
        return host, cert_pem

    def add_certificate(self, name: str, csr_pem: bytes) -> bytes:
        host = self.store.host_by_name(name)
        cert_pem = self.sign(name, csr_pem)
        fingerprint = pki.certificate_fingerprint(pki.pem_to_der(cert_pem))
        with self.granting("certificate_added", host=name, cert_fp=fingerprint):
            self.store.add_certificate(host.id, fingerprint, pki.not_after(cert_pem))
        return cert_pem

    def remove_certificate(self, name: str, fingerprint: str) -> None:
        host = self.store.host_by_name(name)
        self.store.remove_certificate(host.id, fingerprint.lower())
        self.record("certificate_removed", host=name, cert_fp=fingerprint.lower())

    def set_enabled(self, name: str, enabled: bool) -> None:
        host = self.store.host_by_name(name)
        if enabled:
            with self.granting("host_enabled", host=name):
                self.store.set_host_enabled(host.id, True, "")
        else:
            self.store.set_host_enabled(host.id, False, "admin")
            self.record("host_disabled", host=name)
            deny_open(self.store, self.audit, host, None, actor(), "host_disabled", _now())

    def expire_silent_hosts(self) -> list[str]:
        return expire_silent_hosts(
            self.store, self.audit, self.config.deadman_timeout, int(time.time())
        )

    def remove_host(self, name: str, delete_keys: bool) -> int:
        host = self.store.host_by_name(name)
        removed = self.store.remove_host(host.id, delete_keys)
        self.record("host_removed", host=name, keys_deleted=removed)
        return removed

    # Keys

    def create_key(
        self,
        host_name: str,
        ref: DatasetRef,
        dataset: str,
        keyformat: str,
        imported: bytes | None,
    ) -> KeyRecord:
        """Admin enrollment: the key is active at once (the admin vouches for it)."""
        host = self.store.host_by_name(host_name)
        validate.dataset_name(dataset)
        if keyformat not in protocol.KEY_FORMATS:
            raise DataError("keyformat must be raw, hex or passphrase")
        if imported is None and keyformat == "passphrase":
            raise DataError("a passphrase can only be imported (--import)")
        if imported is not None:
            try:
                protocol.check_key_material(imported, keyformat)
            except protocol.KeyMaterialError as exc:
                raise DataError(str(exc)) from None
        if self.store.key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid) is not None:
            raise Conflict("that dataset already has a key")
        key_id = new_key_id()
        service = self.service()  # before the record: a wrong master key changes nothing
        with self.granting(
            "key_created",
            host=host.name,
            pool=ref.pool_guid,
            dataset_guid=ref.dataset_guid,
            dataset=dataset,
            key_id=key_id,
            keyformat=keyformat,
            origin="generated" if imported is None else "imported",
        ):
            record, _ = service.create_key(
                host, ref, dataset, keyformat, imported, "active", key_id
            )
        return record

    def set_key_state(self, key_id: str, state: str) -> KeyRecord:
        """Revoke or restore a key; return it as it was."""
        validate.key_id(key_id)
        expected = ("pending", "active") if state == "revoked" else ("revoked",)
        record = self.store.key_by_id(key_id)
        if record.state not in expected:  # checked here too, so a refusal leaves no record
            raise Conflict(f"key {key_id} is {record.state}, not {' or '.join(expected)}")
        fields: dict[str, str | int | None] = {
            "host": record.host,
            "key_id": key_id,
            "pool": record.pool_guid,
            "dataset_guid": record.dataset_guid or None,
            "dataset": record.dataset,
        }
        if state == "revoked":
            self.store.set_key_state(key_id, state, expected, int(time.time()))
            self.record("key_revoked", **fields)
            host = self.store.host_by_name(record.host)
            ref = (record.pool_guid, record.dataset_guid)
            deny_open(self.store, self.audit, host, [ref], actor(), "key_revoked", _now())
        else:
            with self.granting("key_restored", **fields):
                self.store.set_key_state(key_id, state, expected, int(time.time()))
        return record

    def request_rotation(self, host_name: str, dataset_guid: str | None) -> list[KeyRecord]:
        """Ask the host's daemon to rotate its active keys (or DATASET_GUID's) at its next
        check-in; the keys asked for. Audited, one record per key."""
        if dataset_guid is not None:
            validate.guid(dataset_guid, "dataset GUID")
        host = self.store.host_by_name(host_name)
        marked = self.store.request_rotation(host.id, dataset_guid)
        for record in marked:
            self.record(
                "key_rotation_requested",
                host=record.host,
                key_id=record.key_id,
                pool=record.pool_guid,
                dataset_guid=record.dataset_guid,
                dataset=record.dataset,
            )
        return marked

    def delete_key(self, key_id: str) -> KeyRecord:
        """Forget a revoked key for good (its dataset was destroyed). Irreversible."""
        validate.key_id(key_id)
        record = self.store.key_by_id(key_id)
        self.store.delete_key(key_id, expected=("revoked",))
        self.record(
            "key_deleted",
            host=record.host,
            key_id=key_id,
            pool=record.pool_guid,
            dataset_guid=record.dataset_guid or None,
            dataset=record.dataset,
        )
        return record

    # Approval of releases

    def set_approval_policy(self, host_name: str, policy: Policy | None, key_id: str = "") -> None:
        """Set the approval policy of a host, or (KEY_ID) of that key's dataset; None: the
        dataset follows its host's again. A policy that asks less than before is recorded
        before it is made, one that asks more after."""
        host = self.store.host_by_name(host_name)
        ref = HOST_WIDE
        fields: dict[str, str | int | None] = {"host": host.name}
        if key_id:
            record = self.store.key_by_id(validate.key_id(key_id))
            if record.host != host.name:
                raise DataError(f"key {key_id} is not a key of host {host.name}")
            if not record.dataset_guid:
                raise DataError(
                    "an imported SimpleZFSKeySystem key follows its host's approval policy"
                )
            ref = (record.pool_guid, record.dataset_guid)
            fields |= {"pool": record.pool_guid, "dataset_guid": record.dataset_guid}
            fields["dataset"] = record.dataset
        text = None if policy is None or (not key_id and not policy.active) else policy.to_text()
        fields["policy"] = text or ("inherit" if key_id else "none")
        before = self.store.approval_policies(host.id).get(ref)
        if _asks_more(approval.from_text(before) if before else None, policy):
            self.store.set_approval_policy(host.id, ref, text)
            self.record("approval_policy_set", **fields)
        else:
            with self.granting("approval_policy_set", **fields):
                self.store.set_approval_policy(host.id, ref, text)

    def approval_policies(self) -> dict[int, dict[tuple[str, str], Policy]]:
        """Every policy, by host id and then (pool GUID, dataset GUID)."""
        found: dict[int, dict[tuple[str, str], Policy]] = {}
        for host_id, pool, dataset, text in self.store.all_approval_policies():
            found.setdefault(host_id, {})[(pool, dataset)] = approval.from_text(text)
        return found

    def approvals(self, host_name: str | None = None) -> list[Approval]:
        host_id = self.store.host_by_name(host_name).id if host_name else None
        return self.store.approvals(host_id)

    def approve(self, approval_id: str, note: str) -> Approval:
        self.expire_silent_hosts()
        return approvaldecide.approve(
            self.store,
            self.audit,
            validate.approval_id(approval_id),
            actor(),
            note,
            _now(),
            self.config.deadman_timeout,
        )

    def deny(self, approval_id: str, note: str) -> Approval:
        return approvaldecide.deny(
            self.store, self.audit, validate.approval_id(approval_id), actor(), note, _now()
        )

    # The approval page's admins

    def add_admin(self, name: str) -> tuple[bytes, str]:
        """Issue admin NAME a certificate of the admin CA and register it; the PKCS#12
        bundle of its key and certificate, and the passphrase that seals it."""
        validate.label(name, "admin name")
        if name in (known for known, _, _ in self.store.admins()):
            raise Conflict(f"admin {name} exists; 'admin remove {name}' first to issue anew")
        key_pem, cert_pem = adminca.issue(self.layout, name)
        fingerprint = pki.certificate_fingerprint(pki.pem_to_der(cert_pem))
        with self.granting("admin_added", admin=name, cert_fp=fingerprint):
            self.store.add_admin(name, fingerprint, pki.not_after(cert_pem), _now())
        return adminca.bundle(name, key_pem, cert_pem, self.layout.admin_ca_cert.read_bytes())

    def remove_admin(self, name: str) -> None:
        if not self.store.remove_admin(name):
            raise NotFound(f"no admin {name}")
        self.record("admin_removed", admin=name)


def _asks_more(before: Policy | None, after: Policy | None) -> bool:
    """Whether AFTER surely asks for approval at least whenever BEFORE did (a change that
    takes access away: made first, recorded after). Any other change may grant access,
    and is recorded first."""
    if after is None or not after.active:
        return False
    return after.mode == "required" or before is None or not before.active


def _now() -> int:
    return int(time.time())
