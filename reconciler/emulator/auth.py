"""The V4 (HMAC-SHA256) signature check, as a pure function of the request.

:func:`verify_signature` re-derives the signature with
:func:`reconciler.api.signing.compute_signature`, the very kernel the client signs
with, so the emulator and the client cannot drift apart on canonicalisation;
``tests/test_signing.py`` pins that kernel to the official SDK's vectors. The
checks run in the order the real gateway reports them (missing header, unknown
key, clock skew, scope, session token, signed headers, body hash, signature),
and each raises the API's documented error as an :class:`~reconciler.emulator.errors.ApiFault`.

Messages never echo the secret key, the session token or the canonical request
(which would carry the token); the token is compared in constant time.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from reconciler.api import signing
from reconciler.emulator.errors import ApiFault

__all__ = ["CLOCK_SKEW", "Authorization", "parse_authorization", "verify_signature"]

#: X-Date may be this far from the server's clock either way.
CLOCK_SKEW: Final = timedelta(minutes=15)

_AUTH_RE: Final = re.compile(
    r"^HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<names>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-fA-F]+)\s*$"
)


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization`` header."""

    access_key: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Authorization:
    """Split ``HMAC-SHA256 Credential=AK/scope, SignedHeaders=..., Signature=...``."""
    if "Signature=" not in value:
        raise ApiFault("MissingSignature", "The request is missing signature.", status=401)
    match = _AUTH_RE.match(value.strip())
    if match is None:
        raise ApiFault(
            "MissingRequestInfo",
            "The Authorization header is malformed (expected HMAC-SHA256 "
            "Credential=AK/date/region/service/request, SignedHeaders=..., Signature=...).",
            status=400,
        )
    parts = match["cred"].split("/")
    if len(parts) != 5 or not all(parts):
        raise ApiFault(
            "MissingRequestInfo",
            "The credential must be AK/date/region/service/request.",
            status=400,
        )
    names = tuple(match["names"].lower().split(";"))
    return Authorization(
        access_key=parts[0],
        date=parts[1],
        region=parts[2],
        service=parts[3],
        terminator=parts[4],
        signed_headers=names,
        signature=match["sig"].lower(),
    )


def _signature_mismatch(detail: str) -> ApiFault:
    return ApiFault(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        f"Check your Secret Access Key and signing method. ({detail})",
        status=401,
    )


def verify_signature(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    credentials: Mapping[str, str],
    session_tokens: Mapping[str, str],
    region: str,
    service: str,
    now: datetime,
) -> str:
    """Check a request's V4 signature; return its access key or raise :class:`ApiFault`.

    ``headers`` is looked up case-insensitively (pass the request's own
    multidict or a lower-cased dict); ``Host`` is taken as signed, without a
    default port.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw = lowered.get("authorization")
    if not raw:
        raise ApiFault(
            "MissingAuthenticationToken", "Request is missing Authentication Token.", status=401
        )
    auth = parse_authorization(raw)
    secret = credentials.get(auth.access_key)
    if secret is None:
        raise ApiFault(
            "InvalidAccessKey",
            f"The accesskey [{auth.access_key}] included in the request is invalid.",
            status=401,
        )
    stamp = lowered.get("x-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise ApiFault(
            "InvalidTimestamp", "X-Date is missing or not YYYYMMDD'T'HHMMSS'Z'.", status=400
        ) from None
    if abs(now - signed_at) > CLOCK_SKEW:
        raise ApiFault("InvalidTimestamp", "The signature of the request is expired.", status=400)
    scope = (auth.date, auth.region, auth.service, auth.terminator)
    if scope != (stamp[:8], region, service, "request"):
        raise _signature_mismatch(
            f"credential scope {'/'.join(scope)} should be {stamp[:8]}/{region}/{service}/request"
        )
    token = session_tokens.get(auth.access_key)
    if token is not None:
        sent = lowered.get("x-security-token", "")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise ApiFault(
                "InvalidSecurityToken",
                "The security token included in the request is missing or invalid.",
                status=401,
            )
        if "x-security-token" not in auth.signed_headers:
            raise _signature_mismatch("X-Security-Token must be signed")
    if "x-date" not in auth.signed_headers:
        raise _signature_mismatch("X-Date must be signed")
    body_hash = signing.sha256_hex(body)
    claimed = lowered.get("x-content-sha256")
    if claimed is not None and claimed.strip().lower() != body_hash:
        raise _signature_mismatch("X-Content-Sha256 does not match the body")
    to_sign: dict[str, str] = {}
    for name in auth.signed_headers:
        if name not in lowered:
            raise _signature_mismatch(f"signed header {name!r} is not in the request")
        to_sign[name] = signing.signed_host(lowered[name]) if name == "host" else lowered[name]
    _, expected = signing.compute_signature(
        secret_key=secret,
        region=region,
        service=service,
        method=method,
        path=path,
        query=query,
        headers=to_sign,
        body_hash=body_hash,
        date=stamp,
    )
    if not hmac.compare_digest(expected, auth.signature):
        raise _signature_mismatch("signature differs")
    return auth.access_key
