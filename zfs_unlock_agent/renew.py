"""`zfs-unlock-agent renew`: a new client certificate for this host's key, from the key
server, over mutual TLS with the certificate it replaces.

The key stays (it never leaves the host), so only the certificate file changes, by one
rename: there is no moment at which the key and the certificate do not match. The server
keeps the old certificate valid until the new one is first used, or for its grace period
(renewed_certificate_grace_days), so a renewal lost on its way back locks nobody out.
The initramfs holds a copy of the certificate: it is rebuilt before the new certificate
is used, and if that fails the old certificate goes back into place (still valid) and the
renewal is tried again later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zfs_unlock_agent import config, durable, initramfs
from zfs_unlock_agent.errors import AgentError, BadKeyData
from zfs_unlock_agent.keyclient import KeyClient, pem_certificate_der
from zfs_unlock_common import der, validate

RENEW_AT = 2 / 3  # of a certificate's lifetime: the daemon renews from there on


def lifetime(cert_path: Path) -> tuple[int, int]:
    """The certificate's notBefore and notAfter (Unix times)."""
    try:
        return der.validity(pem_certificate_der(cert_path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise AgentError(f"client certificate {cert_path}: cannot read it: {exc}") from None


def due(cert_path: Path, now: float) -> bool:
    start, end = lifetime(cert_path)
    return now >= start + RENEW_AT * (end - start)


def renew(
    cfg: config.Config, client: KeyClient, machine_id: str, rebuild: Callable[[], None]
) -> int:
    """Renew the client certificate; returns the new one's notAfter. REBUILD rebuilds the
    initramfs (raises when it cannot): until it has, the new certificate is not kept."""
    # Here only: the X.509 library is large, and the unlock path never needs it.
    from zfs_unlock_common.csr import csr_for_key  # noqa: PLC0415

    cert_path, key_path = cfg.client_certificate, cfg.client_key
    try:
        old_pem = cert_path.read_bytes()
        old_der = pem_certificate_der(old_pem)
        name = validate.label(der.subject_common_name(old_der) or "", "host name")
        config.check_private_key_file(key_path, "client key")
        key_pem = bytearray(key_path.read_bytes())
    except (OSError, ValueError) as exc:  # InvalidInput, CertificateFormatError included
        raise AgentError(f"cannot renew {cert_path}: {exc}") from None
    try:
        csr_pem = csr_for_key(bytes(key_pem), name)
    except (ValueError, TypeError):
        raise AgentError(f"client key {key_path}: cannot sign a request with it") from None
    finally:
        key_pem[:] = bytes(len(key_pem))
    new_pem = client.renew(machine_id, csr_pem)
    try:
        new_der = pem_certificate_der(new_pem)
        same_key = der.subject_public_key_info(new_der) == der.subject_public_key_info(old_der)
        same_name = der.subject_common_name(new_der) == name
    except ValueError:
        raise BadKeyData("the server's answer is not a certificate; not installed") from None
    if not same_key:
        raise BadKeyData("the renewed certificate is not for this host's key; not installed")
    if not same_name:
        raise BadKeyData("the renewed certificate names another host; not installed")
    try:
        initramfs.mark_stale(cfg.state_directory)
    except OSError as exc:
        raise AgentError(f"cannot mark the initramfs stale: {exc}") from None
    _replace(cert_path, new_pem)
    try:
        rebuild()
    except AgentError:
        _replace(cert_path, old_pem)  # still valid: the new one was never used
        raise
    try:
        return der.validity(new_der)[1]
    except ValueError:
        return 0


def _replace(path: Path, data: bytes) -> None:
    try:
        durable.replace(path, data, 0o644)
    except OSError as exc:
        raise AgentError(f"client certificate {path}: cannot write it: {exc.strerror}") from None
