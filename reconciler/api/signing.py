"""Volcengine OpenAPI request signing (HMAC-SHA256, "V4").

A pure function of the request and the time: :func:`sign` returns the headers
to add (``X-Date``, ``X-Content-Sha256``, ``Authorization`` and, with temporary
credentials, ``X-Security-Token``). :func:`compute_signature` is the shared
kernel, so the emulator verifies with exactly the code the client signs with.

The canonical forms follow Volcengine's SDK signer; the shared test vectors,
made with that signer, pin every detail (which headers are signed, how the query
is escaped, that ``:80``/``:443`` is dropped from ``Host``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from reconciler.api.credentials import Credentials

ALGORITHM = "HMAC-SHA256"
_UNSIGNED_EXCEPT_X = frozenset({"content-type", "content-md5", "host"})


def x_date(now: datetime | None = None) -> str:
    """The ``X-Date`` form of a UTC instant: ``YYYYMMDD'T'HHMMSS'Z'``."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def signed_host(host: str) -> str:
    """``Host`` as signed: a default port is not part of it."""
    for port in (":80", ":443"):
        if host.endswith(port):
            return host[: -len(port)]
    return host


def is_signed_header(name: str) -> bool:
    lower = name.lower()
    return lower in _UNSIGNED_EXCEPT_X or lower.startswith("x-")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def compute_signature(
    *,
    secret_key: str,
    region: str,
    service: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body_hash: str,
    date: str,
) -> tuple[str, str]:
    """Return ``(signed_header_names, signature)`` for already-chosen headers.

    ``headers`` holds exactly the headers to sign (any case); ``date`` is the
    ``X-Date`` value.
    """
    lowered = sorted((k.lower(), v.strip()) for k, v in headers.items())
    names = ";".join(k for k, _ in lowered)
    canonical = "\n".join(
        [
            method.upper(),
            path or "/",
            canonical_query(query),
            "".join(f"{k}:{v}\n" for k, v in lowered),
            names,
            body_hash,
        ]
    )
    scope = f"{date[:8]}/{region}/{service}/request"
    to_sign = "\n".join([ALGORITHM, date, scope, sha256_hex(canonical.encode())])
    key = _hmac(secret_key.encode(), date[:8])
    for part in (region, service, "request"):
        key = _hmac(key, part)
    return names, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign(
    *,
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    date: str | None = None,
) -> dict[str, str]:
    """Headers to add to a request so the gateway accepts it."""
    stamp = date or x_date()
    body_hash = sha256_hex(body)
    added = {"X-Date": stamp, "X-Content-Sha256": body_hash}
    if credentials.session_token:
        added["X-Security-Token"] = credentials.session_token
    to_sign = {k: v for k, v in headers.items() if is_signed_header(k)}
    to_sign.update(added)
    to_sign["Host"] = signed_host(host)
    names, signature = compute_signature(
        secret_key=credentials.secret_key,
        region=region,
        service=service,
        method=method,
        path=path,
        query=query.items(),
        headers=to_sign,
        body_hash=body_hash,
        date=stamp,
    )
    scope = f"{stamp[:8]}/{region}/{service}/request"
    added["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return added
