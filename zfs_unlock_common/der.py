"""Just enough DER to read three fields of an X.509 certificate: its public key (for
pins), its subject's common name (the name the key server enrolled a host under) and its
validity (when the host's own certificate expires).

Elements are found by position, without interpreting the rest: that keeps a large X.509
library off the path every unlock takes (the initramfs copies what this path imports).
Anything that does not walk as RFC 5280 says is a CertificateFormatError.
"""

from __future__ import annotations

SEQUENCE, SET, INTEGER, OID, VERSION = 0x30, 0x31, 0x02, 0x06, 0xA0
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18
COMMON_NAME = bytes.fromhex("550403")  # 2.5.4.3
# The string types a common name comes in that decode as UTF-8 (UTF8, Printable, IA5).
TEXT_TAGS = (0x0C, 0x13, 0x16)


class CertificateFormatError(ValueError):
    """The bytes are not a DER certificate we can walk."""


def element(der: bytes, offset: int, tag: int | None, limit: int) -> tuple[int, int]:
    """Start of the value and end of the DER element at OFFSET, which must have TAG (any
    tag when None) and end at or before LIMIT (definite lengths only, as DER requires)."""
    if offset + 2 > limit or (tag is not None and der[offset] != tag):
        raise CertificateFormatError("unexpected element")
    length, start = der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > limit:
            raise CertificateFormatError("bad length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > limit:
        raise CertificateFormatError("element overruns its container")
    return start, start + length


def _validity_start(cert_der: bytes) -> tuple[int, int]:
    """Where the validity starts, and where the tbsCertificate ends: Certificate =
    SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial, signature, issuer,
    validity, subject, subjectPublicKeyInfo, ... }, ... }."""
    body, end = element(cert_der, 0, SEQUENCE, len(cert_der))
    if end != len(cert_der):
        raise CertificateFormatError("trailing bytes after the certificate")
    position, tbs_end = element(cert_der, body, SEQUENCE, end)
    if position < tbs_end and cert_der[position] == VERSION:
        position = element(cert_der, position, VERSION, tbs_end)[1]
    for tag in (INTEGER, SEQUENCE, SEQUENCE):
        position = element(cert_der, position, tag, tbs_end)[1]
    return position, tbs_end


def _subject_and_key(cert_der: bytes) -> tuple[int, int, int]:
    """Where the subject starts, where the SubjectPublicKeyInfo starts and ends."""
    validity, tbs_end = _validity_start(cert_der)
    subject = element(cert_der, validity, SEQUENCE, tbs_end)[1]
    key = element(cert_der, subject, SEQUENCE, tbs_end)[1]
    return subject, key, element(cert_der, key, SEQUENCE, tbs_end)[1]


def subject_public_key_info(cert_der: bytes) -> bytes:
    """The DER of the certificate's SubjectPublicKeyInfo (RFC 5280, 4.1)."""
    _, start, end = _subject_and_key(cert_der)
    return cert_der[start:end]


def subject_common_name(cert_der: bytes) -> str | None:
    """The subject's common name, or None when it has none (or one in a string type other
    than UTF8, Printable and IA5). Name = SEQUENCE OF SET OF SEQUENCE { OID, value }."""
    subject, _, _ = _subject_and_key(cert_der)
    position, name_end = element(cert_der, subject, SEQUENCE, len(cert_der))
    while position < name_end:
        rdn, rdn_end = element(cert_der, position, SET, name_end)
        while rdn < rdn_end:
            pair, pair_end = element(cert_der, rdn, SEQUENCE, rdn_end)
            oid, oid_end = element(cert_der, pair, OID, pair_end)
            value, value_end = element(cert_der, oid_end, None, pair_end)
            if cert_der[oid:oid_end] == COMMON_NAME:
                if cert_der[oid_end] not in TEXT_TAGS:
                    return None
                try:
                    return cert_der[value:value_end].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            rdn = pair_end
        position = rdn_end
    return None


def validity(cert_der: bytes) -> tuple[int, int]:
    """notBefore and notAfter as Unix times. Validity = SEQUENCE { Time, Time }, each a
    UTCTime (YYMMDDHHMMSSZ; 50-99 are 19xx) or a GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    start, tbs_end = _validity_start(cert_der)
    position, end = element(cert_der, start, SEQUENCE, tbs_end)
    times = []
    for _ in range(2):
        tag = cert_der[position] if position < end else None
        if tag not in (UTC_TIME, GENERALIZED_TIME):
            raise CertificateFormatError("validity is not two times")
        value, position = element(cert_der, position, tag, end)
        times.append(_time(cert_der[value:position], tag == UTC_TIME))
    return times[0], times[1]


def _time(text: bytes, short_year: bool) -> int:
    digits = text.removesuffix(b"Z")
    if (
        len(text) - len(digits) != 1
        or not digits.isdigit()
        or len(digits) != (12 if short_year else 14)
    ):
        raise CertificateFormatError("a time that is not DER's")
    if short_year:
        year = int(digits[:2])
        digits = (b"19" if year >= 50 else b"20") + digits
    year, month, day, hour, minute, second = (
        int(digits[i : i + n]) for i, n in ((0, 4), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2))
    )
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise CertificateFormatError("a time that is not DER's")
    return _days_since_epoch(year, month, day) * 86400 + hour * 3600 + minute * 60 + second


def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (the civil-from-days inverse:
    no calendar module on the unlock path, which every boot imports)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468
