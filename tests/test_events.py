"""Event subscribers: they see every written event, redacted, and can never break the caller."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from reconciler.eventlog import setup as events


def test_subscribers_see_redacted_events_and_a_failing_one_breaks_nothing() -> None:
    seen: list[Mapping[str, Any]] = []

    def failing(_: Mapping[str, Any]) -> None:
        raise RuntimeError("a broken subscriber")

    out = io.StringIO()
    events.configure(fmt="json", level="info", stream=out)
    events.register_secret("s3cr3t-value")
    unsubscribe_failing = events.subscribe(failing)
    unsubscribe = events.subscribe(seen.append)
    try:
        log = events.get_logger()
        log.info(
            "task.synced",
            app_id="a",
            note="key s3cr3t-value",
            sk="raw",
            nested={"urls": ["https://h/s3cr3t-value"], "password": "pw", "n": 1},
        )
        log.debug("call.attempt", app_id="a")  # below the level: heard, not written
        unsubscribe()
        log.info("after.unsubscribe")
    finally:
        unsubscribe_failing()
        events.configure(fmt="json", level="info")
    assert [e["event"] for e in seen] == ["task.synced", "call.attempt"]
    assert seen[0]["note"] == "key [redacted]" and seen[0]["sk"] == "[redacted]"
    assert seen[0]["nested"] == {"urls": ["https://h/[redacted]"], "password": "[redacted]", "n": 1}
    assert "s3cr3t-value" not in out.getvalue() and '"pw"' not in out.getvalue()
    assert seen[0]["level"] == "info" and "timestamp" in seen[0]
    written = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert written == ["task.synced", "after.unsubscribe"]
