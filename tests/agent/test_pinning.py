"""The pin walker: zfs_unlock_common.pinning finds the SubjectPublicKeyInfo by position.

It must hash exactly the bytes cryptography calls the SubjectPublicKeyInfo, for every
key type a server may use, with and without the version field (v1 certificates) and
with lengths of one, two and three bytes; and on anything else (every truncation,
trailing bytes, a wrong tag, a length that overruns its container, 5-byte and
indefinite lengths) `matches` says False and never raises.

Certificates are made with cryptography; v1 ones by taking the version out of a v3
certificate's TBSCertificate and signing it again, so they are genuine, verifiable v1
certificates. Mutations go through a small DER tree that re-encodes every enclosing
length, so each one breaks exactly the rule it is meant to break.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from tests.certs import not_after, not_before, verify_issued_by
from zfs_unlock_common import der, pinning

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

KEYS: dict[str, Callable[[], PrivateKey]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}
# Names long enough that the name, the TBSCertificate and the certificate need
# two-byte (0x82) or three-byte (0x83) lengths.
NAME_UNITS = {"short": 0, "long": 20, "huge": 1100}
OUTER_LENGTH_BYTE = {"long": 0x82, "huge": 0x83}


# A small DER tree, enough for certificates


@dataclass
class Node:
    tag: int
    content: bytes = b""  # primitive elements
    children: list[Node] | None = None  # constructed elements
    length_bytes: int | None = None  # None: minimal DER; N: long form with N bytes; 0: 0x80
    extra_length: int = 0  # declare this many bytes more than the content has
    offset: int = field(default=0, compare=False)


def _length(der: bytes, offset: int) -> tuple[int, int]:
    first = der[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    return int.from_bytes(der[offset + 1 : offset + 1 + count], "big"), offset + 1 + count


def parse(der: bytes, offset: int = 0, end: int | None = None) -> list[Node]:
    end = len(der) if end is None else end
    nodes = []
    while offset < end:
        tag = der[offset]
        length, start = _length(der, offset + 1)
        if tag & 0x20:
            nodes.append(Node(tag, children=parse(der, start, start + length), offset=offset))
        else:
            nodes.append(Node(tag, der[start : start + length], offset=offset))
        offset = start + length
    return nodes


def encode_length(length: int, length_bytes: int | None = None) -> bytes:
    if length_bytes == 0:
        return b"\x80"  # indefinite: BER only
    if length_bytes is None:
        if length < 0x80:
            return bytes([length])
        length_bytes = (length.bit_length() + 7) // 8
    return bytes([0x80 | length_bytes]) + length.to_bytes(length_bytes, "big")


def encode(node: Node) -> bytes:
    body = node.content if node.children is None else b"".join(map(encode, node.children))
    return (
        bytes([node.tag]) + encode_length(len(body) + node.extra_length, node.length_bytes) + body
    )


def tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(body)) + body


# Certificates


@dataclass(frozen=True)
class Cert:
    id: str
    der: bytes
    spki: bytes  # as cryptography encodes the public key

    @property
    def pin(self) -> bytes:
        return hashlib.sha256(self.spki).digest()


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def make_certificate(key_type: str, version: str, names: str) -> Cert:
    key = KEYS[key_type]()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, f"pin-{key_type}-{version}")]
    attributes += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"unit {i:04} " + "x" * 50)
        for i in range(NAME_UNITS[names])
    ]
    name = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    v3 = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, algorithm)
    )
    der = v3.public_bytes(serialization.Encoding.DER)
    if version == "v1":
        # No version field and (v1 has none) no extensions; signed again, for real.
        (certificate,) = parse(der)
        assert certificate.children is not None
        tbs, signature_algorithm, _ = certificate.children
        assert tbs.children is not None and tbs.children[0].tag == 0xA0
        tbs_v1 = encode(replace(tbs, children=tbs.children[1:-1]))  # [3] extensions: last
        der = tlv(
            0x30,
            tbs_v1 + encode(signature_algorithm) + tlv(0x03, b"\0" + _sign(key, tbs_v1)),
        )
    loaded = x509.load_der_x509_certificate(der)
    assert loaded.version == (x509.Version.v1 if version == "v1" else x509.Version.v3)
    verify_issued_by(loaded, loaded)  # a well-formed, correctly signed certificate
    spki = loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Cert(f"{key_type}-{version}-{names}", der, spki)


CASES = [
    (key_type, version, names)
    for key_type in KEYS
    for version in ("v3", "v1")
    for names in ("short", "long")
] + [("p256", "v3", "huge"), ("ed25519", "v1", "huge")]

_made: dict[tuple[str, str, str], Cert] = {}


@pytest.fixture(params=CASES, ids=["-".join(case) for case in CASES])
def cert(request: pytest.FixtureRequest) -> Cert:
    case: tuple[str, str, str] = request.param
    if case not in _made:  # RSA keys and huge names take a moment: make each once
        _made[case] = make_certificate(*case)
    return _made[case]


def walked(der: bytes) -> dict[str, Node]:
    """The elements the walker steps through, by name, in a fresh tree."""
    (certificate,) = parse(der)
    assert certificate.children is not None
    tbs = certificate.children[0]
    assert tbs.children is not None
    fields = list(tbs.children)
    nodes = {"certificate": certificate, "tbsCertificate": tbs}
    if fields[0].tag == 0xA0:
        nodes["version"] = fields.pop(0)
    names = ("serialNumber", "signature", "issuer", "validity", "subject", "spki")
    nodes.update(zip(names, fields, strict=False))
    return nodes


ELEMENTS = [
    "certificate",
    "tbsCertificate",
    "version",
    "serialNumber",
    "signature",
    "issuer",
    "validity",
    "subject",
    "spki",
]


def mutated(der: bytes, element: str, **change: Any) -> bytes | None:
    """DER with one walked element changed and every enclosing length re-encoded to fit;
    None when the certificate has no such element (a v1 certificate's version)."""
    nodes = walked(der)
    if element not in nodes:
        return None
    for name, value in change.items():
        setattr(nodes[element], name, value)
    return encode(nodes["certificate"])


def matches_safely(der: bytes, pins: list[bytes]) -> bool:
    result = pinning.matches(der, pins)  # an exception here fails the test
    assert isinstance(result, bool)
    return result


# The right bytes


def test_spki_is_what_cryptography_calls_the_subject_public_key_info(cert: Cert) -> None:
    assert der.subject_public_key_info(cert.der) == cert.spki
    assert pinning.spki_sha256(cert.der) == cert.pin
    assert pinning.pin_of_certificate(cert.der) == pinning.format_pin(cert.pin)
    assert pinning.parse_pin(pinning.pin_of_certificate(cert.der)) == cert.pin
    other = hashlib.sha256(b"another key").digest()
    assert matches_safely(cert.der, [cert.pin])
    assert matches_safely(cert.der, [other, cert.pin])
    assert matches_safely(cert.der, [cert.pin, other])
    assert not matches_safely(cert.der, [other])
    assert not matches_safely(cert.der, [])


def test_the_common_name_is_what_cryptography_reads(cert: Cert) -> None:
    # The common name comes first, before units that make the name long, even huge.
    loaded = x509.load_der_x509_certificate(cert.der)
    (expected,) = loaded.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert der.subject_common_name(cert.der) == expected.value


def test_the_validity_is_what_cryptography_reads(cert: Cert) -> None:
    loaded = x509.load_der_x509_certificate(cert.der)
    expected = (
        int(not_before(loaded).timestamp()),
        int(not_after(loaded).timestamp()),
    )
    assert der.validity(cert.der) == expected


@pytest.mark.parametrize(
    "when",
    ["1999-12-31T23:59:59", "2000-02-29T12:00:00", "2049-12-31T23:59:59", "2050-01-01T00:00:00",
     "2100-03-01T00:00:00"],
)  # fmt: skip
def test_utc_and_generalized_times_read_alike(when: str) -> None:
    """Dates before 2050 are UTCTime (two-digit years), from 2050 GeneralizedTime."""
    moment = datetime.datetime.fromisoformat(when).replace(tzinfo=datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "when")])
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(moment - datetime.timedelta(days=1))
        .not_valid_after(moment)
        .sign(key, hashes.SHA256())
    )
    start, end = der.validity(built.public_bytes(serialization.Encoding.DER))
    assert (start, end) == (int(moment.timestamp()) - 86400, int(moment.timestamp()))


def test_a_subject_without_a_common_name_has_none() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")])
    now = datetime.datetime.now(datetime.UTC)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert der.subject_common_name(built.public_bytes(serialization.Encoding.DER)) is None


def test_the_cases_cover_the_length_forms_and_versions() -> None:
    """The premise of the other tests: v1 and v3, one-, two- and three-byte lengths."""
    made = {case: _made.get(case) or make_certificate(*case) for case in CASES}
    for (_, version, names), cert in made.items():
        has_version = walked(cert.der).get("version") is not None
        assert has_version is (version == "v3")
        if names in OUTER_LENGTH_BYTE:
            assert cert.der[1] == OUTER_LENGTH_BYTE[names]
    assert made["rsa2048", "v3", "short"].spki[1] == 0x82  # the SPKI's own length
    assert made["p256", "v3", "short"].spki[1] < 0x80


def test_the_tree_reencodes_certificates_exactly(cert: Cert) -> None:
    """The mutation helper is faithful: unchanged, it gives back the same bytes."""
    assert [encode(node) for node in parse(cert.der)] == [cert.der]
    assert mutated(cert.der, "spki") == cert.der


# Anything else: False, never an exception


def test_every_truncation_matches_nothing(cert: Cert) -> None:
    view = memoryview(cert.der)
    for length in range(len(cert.der)):
        assert not matches_safely(bytes(view[:length]), [cert.pin]), length


def test_trailing_bytes_match_nothing(cert: Cert) -> None:
    for garbage in (b"\x00", b"\x30\x00", b"\xff" * 7, cert.der):
        assert not matches_safely(cert.der + garbage, [cert.pin]), garbage[:8]


TAGS = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x13, 0x30, 0x31, 0xA0, 0xA3, 0xFF]


def present(der: bytes) -> list[str]:
    """The walked elements this certificate has (a v1 certificate has no version)."""
    return [element for element in ELEMENTS if element in walked(der)]


def test_a_wrong_tag_on_any_walked_element_matches_nothing(cert: Cert) -> None:
    for element in present(cert.der):
        right = walked(cert.der)[element].tag
        for tag in TAGS:
            if tag != right:
                der = mutated(cert.der, element, tag=tag)
                assert der is not None
                assert not matches_safely(der, [cert.pin]), f"{element} with tag {tag:#04x}"


def _room_after(der: bytes, element: str) -> int:
    """Bytes between the end of ELEMENT and the end of its container's content."""
    if element == "certificate":
        return 0  # its container is the input itself
    nodes = walked(der)
    container = nodes["certificate" if element == "tbsCertificate" else "tbsCertificate"]

    def end(node: Node) -> int:
        return node.offset + len(encode(node))

    return end(container) - end(nodes[element])


def test_a_length_that_overruns_its_container_matches_nothing(cert: Cert) -> None:
    for element in present(cert.der):
        over = _room_after(cert.der, element) + 1  # one byte past the container's end
        der = mutated(cert.der, element, extra_length=over)
        assert der is not None
        assert not matches_safely(der, [cert.pin]), element
        # Far past it, in the widest length the walker reads (4 bytes).
        far = mutated(cert.der, element, extra_length=2**31, length_bytes=4)
        assert far is not None
        assert not matches_safely(far, [cert.pin]), element


def test_length_forms_the_walker_refuses(cert: Cert) -> None:
    """Indefinite (0x80) and 5-byte or longer lengths are refused, on every walked
    element. A non-minimal 4-byte length (BER, not DER) is read, so the rest of the walk
    still works: the control that shows a refusal comes from the length form alone. On
    the SPKI itself it changes the hashed bytes, so nothing matches then either."""
    for element in present(cert.der):
        for length_bytes, accepted in ((0, False), (5, False), (8, False), (4, True)):
            der = mutated(cert.der, element, length_bytes=length_bytes)
            assert der is not None
            expected = accepted and element != "spki"
            assert matches_safely(der, [cert.pin]) is expected, (element, length_bytes)


def test_short_and_odd_inputs_match_nothing() -> None:
    pin = hashlib.sha256(b"x").digest()
    for odd in [
        b"",
        b"\x30",
        b"\x30\x00",
        b"\x30\x80",
        b"\x30\x80\x00\x00",
        b"\x30\x85\x00\x00\x00\x00\x02\x30\x00",
        b"\x30\x84\xff\xff\xff\xff",
        b"\x30\x02\x30\x00",
        b"\x30\x04\x30\x02\xa0\x00",
        b"\x30\x06\x30\x04\x02\x00\x30\x00",
        b"\x02\x01\x00",
        b"\xff" * 64,
    ]:
        assert not matches_safely(odd, [pin]), odd


def test_random_damage_never_raises() -> None:
    """Seeded: flip, insert and delete bytes anywhere in real certificates."""
    rng = random.Random(5)  # noqa: S311 - reproducible damage, not secrets
    certs = [make_certificate(key_type, "v3", "short") for key_type in ("p256", "ed25519")]
    certs.append(make_certificate("rsa2048", "v1", "short"))
    for _ in range(3000):
        cert = rng.choice(certs)
        damaged = bytearray(cert.der)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(damaged))
            action = rng.choice(("flip", "insert", "delete"))
            if action == "flip":
                damaged[position] ^= 1 << rng.randrange(8)
            elif action == "insert":
                damaged.insert(position, rng.randrange(256))
            else:
                del damaged[position]
        matches_safely(bytes(damaged), [cert.pin])
        with contextlib.suppress(der.CertificateFormatError):
            name = der.subject_common_name(bytes(damaged))
            assert name is None or isinstance(name, str)
