"""When a PEM certificate expires, read with the standard library alone.

The TLS certificate's ``notAfter`` is exported as a gauge so that an alert can warn before it
passes. Python's ``ssl`` parses certificates only on a live connection, so the DER structure is
walked here: Certificate -> TBSCertificate -> (version, serial, signature, issuer, validity).
"""

from __future__ import annotations

import calendar
import re
import ssl
from pathlib import Path

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """``(tag, content start, content end)`` of the DER element at ``at``."""
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[start:start + size], "big")
        start += size
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _time(tag: int, text: str) -> float:
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ (years 1950-2049)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError(f"not a time (tag {tag:#x})")
    if not re.fullmatch(r"\d{14}Z", text):
        raise ValueError(f"unsupported time {text!r}")
    y, mo, d, h, mi, s = (int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14)))
    return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))


def not_after(der: bytes) -> float:
    """The Unix time at which a DER certificate stops being valid."""
    _, cert, _ = _element(der, 0)
    _, at, _ = _element(der, cert)  # TBSCertificate's content
    if der[at] == 0xA0:  # [0] version
        at = _element(der, at)[2]
    for _ in range(3):  # serial number, signature algorithm, issuer
        at = _element(der, at)[2]
    tag, validity, _ = _element(der, at)
    if tag != 0x30:
        raise ValueError("no validity")
    before_end = _element(der, validity)[2]
    tag, start, end = _element(der, before_end)
    return _time(tag, der[start:end].decode("ascii"))


def certificate_expiry(path: str | Path) -> float:
    """``notAfter`` of the first certificate of a PEM file (the server's own, in a chain)."""
    match = _PEM.search(Path(path).read_text())
    if match is None:
        raise ValueError(f"{path}: no PEM certificate")
    return not_after(ssl.PEM_cert_to_DER_cert(match.group()))
