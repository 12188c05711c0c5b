"""The signer reproduces every signature Volcengine's own SDK made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.api.credentials import Credentials
from reconciler.api.signing import sign

VECTORS = Path(__file__).parent / "data" / "signing-vectors.json"


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: str(c["name"]))
def test_signature_matches_sdk(case: dict[str, Any]) -> None:
    req, cred = case["request"], case["credentials"]
    added = sign(
        credentials=Credentials(cred["access_key"], cred["secret_key"], cred["session_token"]),
        region=case["region"],
        service=case["service"],
        method=req["method"],
        host=req["host"],
        path=req["path"],
        query=req["query"],
        headers=req["headers"],
        body=req["body"].encode("utf-8"),
        date=req["x_date"],
    )
    for name, value in case["expected"].items():
        assert added[name] == value, name
    if cred["session_token"]:
        assert added["X-Security-Token"] == cred["session_token"]


def test_vectors_cover_session_tokens_and_get() -> None:
    cases = _cases()
    assert len(cases) >= 13
    assert any(c["credentials"]["session_token"] for c in cases)
    assert any(c["request"]["method"] == "GET" for c in cases)
