"""Make streamed OpenAI Chat Completions report usage even when the client did not ask for it.

Without `stream_options.include_usage: true`, a Chat Completions stream carries no usage at all, so the
call could not be priced. This plugin turns the option on in the upstream request and then hides its
two effects from the client, which receives the stream it asked for:

- The extra chunk with `"choices": []` and the usage is withheld from the client. Every
  `tollhouse_sse_event` implementation, `plugins.usage_openai` included, still sees it.
- The `"usage":null` member that the option adds to every other chunk is cut out of the event's bytes.

The member is removed as text. That is safe because a JSON string cannot contain `"usage"` with
unescaped quotes, so the only match in a chunk is the top-level key.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from addons import hookimpl

if TYPE_CHECKING:
    from mitmproxy import http

    from addons.call import Call
    from addons.sse import SSEEvent

#: `call.metadata` key set to True when this plugin turned `include_usage` on for the call.
INJECTED_KEY = "stream_usage.injected"

_INCLUDE_USAGE = {"include_usage": True}
# Kinds known to accept `stream_options.include_usage`.
# NOTE: openai-compatible servers are left out because not all of them accept the option.
_USAGE_OPTION_KINDS = ("openai", "azure")
#: `call.metadata` key that `plugins.translation` sets on calls it translates.
TRANSLATED_KEY = "translation.active"
# `"usage":null` with the comma that joins it to its neighbour: before it when it is not the first
# member, otherwise after it. Optional whitespace covers servers that do not send compact JSON.
_USAGE_NULL_MEMBER = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')


def _client_requested_usage(request_json: dict[str, Any]) -> bool:
    options = request_json.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _rewrite_body(flow: http.HTTPFlow, request_json: dict[str, Any]) -> None:
    """Set `stream_options.include_usage` to true in the upstream request body and in `request_json`."""
    content = flow.request.content or b""
    stripped = content.lstrip()
    if b'"stream_options"' not in content and stripped.startswith(b"{"):
        # Insert the member as the first key, so every byte the client sent is kept as it was.
        offset = len(content) - len(stripped) + 1
        member = b'"stream_options":{"include_usage":true}'
        rest = stripped[1:].lstrip()
        separator = b"" if rest.startswith(b"}") else b","
        flow.request.content = content[:offset] + member + separator + content[offset:]
        request_json["stream_options"] = dict(_INCLUDE_USAGE)
        return

    options = request_json.get("stream_options")
    if isinstance(options, dict):
        request_json["stream_options"] = {**options, **_INCLUDE_USAGE}
    else:
        request_json["stream_options"] = dict(_INCLUDE_USAGE)
    flow.request.content = json.dumps(request_json, ensure_ascii=False, separators=(",", ":")).encode()


@hookimpl
def tollhouse_upstream_request(call: Call, flow: http.HTTPFlow) -> None:
    if flow.response is not None:
        return
    if call.provider is None or call.provider.kind not in _USAGE_OPTION_KINDS or call.endpoint != "chat.completions":
        return
    if call.metadata.get(TRANSLATED_KEY):
        # A translated stream is rebuilt event by event and needs the usage chunk itself.
        return
    request_json = call.request_json
    if not call.stream or request_json is None or _client_requested_usage(request_json):
        return

    _rewrite_body(flow, request_json)
    call.rewrite_stream = True
    call.metadata[INJECTED_KEY] = True


def _is_usage_chunk(event: SSEEvent) -> bool:
    chunk = event.json
    return (
        isinstance(chunk, dict)
        and chunk.get("choices") == []
        and isinstance(chunk.get("usage"), dict)
    )


@hookimpl
def tollhouse_sse_event(call: Call, event: SSEEvent) -> bool | None:
    if not call.metadata.get(INJECTED_KEY):
        return None
    data = event.data
    if '"usage"' not in data:
        return None
    if '"usage":null' not in data and _is_usage_chunk(event):
        return False
    event.raw = _USAGE_NULL_MEMBER.sub(b"", event.raw, count=1)
    return None
