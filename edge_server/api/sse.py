"""Server-sent events: chunk objects -> `data: ...` events, `[DONE]`, heartbeats, mid-stream errors."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
# An SSE comment: every client skips it, but writing it tells the server whether the client is still there.
PING = b": ping\n\n"


def to_json(payload: BaseModel | dict[str, Any]) -> str:
    """Compact JSON for the wire (never contains a raw newline, so one event is one line)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json()
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One `data: <json>` event followed by the blank line that ends it."""
    return b"data: " + to_json(payload).encode("utf-8") + b"\n\n"
