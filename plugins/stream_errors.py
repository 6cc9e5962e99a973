"""Records error events that arrive inside a streamed answer whose status was already 200.

OpenAI Chat Completions sends a `data:` event whose JSON has a top-level `error` object; the Responses
API sends an `error` event or ends with `response.failed`; Anthropic sends `event: error`. The client
sees the error in its SDK; this plugin puts it into the row's `error` column.
"""

from __future__ import annotations

import json

from addons import hookimpl

_MAX_MESSAGE = 500


@hookimpl
def tollhouse_sse_event(call, event) -> None:
    name = event.event
    data = event.data
    if name not in ("error", "response.failed") and not data.startswith('{"error"'):
        return
    try:
        payload = json.loads(data)
    except ValueError:
        return
    if not isinstance(payload, dict):
        return
    error = payload.get("error")
    if name == "response.failed":
        error = (payload.get("response") or {}).get("error")
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code") or "error"
        message = error.get("message") or ""
    else:
        kind = payload.get("code") or "error"
        message = payload.get("message") or ""
    call.error = f"upstream error event in the stream: {kind}: {message}"[:_MAX_MESSAGE]
