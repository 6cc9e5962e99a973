"""Passes a streamed answer to the client chunk by chunk while plugins watch its events."""

from __future__ import annotations

import logging
import time

from addons.call import Call
from addons.hook_calls import HookImplementations
from addons.sse import SSEReader

logger = logging.getLogger(__name__)

# Names of the events that end a stream: Anthropic Messages and the OpenAI Responses API. OpenAI Chat
# Completions ends with `data: [DONE]` instead.
_FINAL_EVENTS = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed"})


class StreamTap:
    """mitmproxy's `flow.response.stream` callable for server-sent events.

    mitmproxy calls it on the event loop for every network read from upstream and once with b"" at
    the end; what it returns goes to the client at once. Without `rewrite`, the client receives
    upstream's bytes unchanged (compressed, if they were) and the hook only observes. With `rewrite`,
    the client receives the decoded bytes of each complete event that no hook implementation withheld;
    a partial event waits for its remaining bytes.

    In rewrite mode it returns a list of byte strings, which mitmproxy sends one by one.
    """

    __slots__ = ("call", "hook", "reader", "rewrite", "_failed_plugins", "_undecodable")

    def __init__(self, call: Call, hook: HookImplementations, content_encoding: str | None, rewrite: bool):
        self.call = call
        self.hook = hook
        self.reader = SSEReader(content_encoding)
        self.rewrite = rewrite
        # Plugins that raised on an event of this stream; they see none of its later events.
        self._failed_plugins: set[str] = set()
        self._undecodable = False

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if chunk and self.call.first_byte is None:
            self.call.first_byte = time.monotonic()
        if self._undecodable:
            return chunk
        try:
            events = self.reader.feed(chunk) if chunk else self.reader.close()
        except Exception as e:
            # An undecodable stream still reaches the client unchanged; only its usage is lost.
            return self._give_up(chunk, e)

        for event in events:
            if event.event in _FINAL_EVENTS or event.data == "[DONE]":
                self.call.stream_finished = True

        if not self.rewrite:
            for event in events:
                self._observe(event)
            return chunk

        kept = []
        for event in events:
            if False not in self._observe(event):
                kept.append(event.raw)
        # A list, never b"": mitmproxy would send an empty chunk, which ends a chunked HTTP/1.1 body.
        return [b"".join(kept)] if kept else []

    def _observe(self, event) -> list:
        return self.hook.call_each({"call": self.call, "event": event}, self._plugin_failed, self._failed_plugins)

    def _plugin_failed(self, plugin_name: str, e: Exception) -> None:
        self._failed_plugins.add(plugin_name)
        if self.call.error is None:
            self.call.error = f"plugin {plugin_name} failed in tollhouse_sse_event: {type(e).__name__}: {e}"
        logger.error(
            "call %s: plugin %s failed in tollhouse_sse_event; it sees no more events of this stream",
            self.call.request_id,
            plugin_name,
            exc_info=e,
        )

    def _give_up(self, chunk: bytes, e: Exception) -> bytes:
        self._undecodable = True
        self.call.error = f"stream could not be decoded: {type(e).__name__}: {e}"
        logger.warning("call %s: %s", self.call.request_id, self.call.error)
        # NOTE: in rewrite mode the client already received decoded bytes; the rest is passed raw.
        return chunk
