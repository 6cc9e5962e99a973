"""Streamed responses, translated one upstream event at a time.

Each translator keeps the little state the target format needs (ids, which block is open, the usage seen
so far) and returns complete SSE events as bytes, ready to send to the client. They run on the gateway's
event loop once per upstream event, so each emitted event costs one `json.dumps` and nothing is re-parsed.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from addons.translation.errors import anthropic_error_type, openai_stream_error
from addons.translation.responses import chat_id_for, message_id_for
from addons.translation.usage import FINISH_REASONS, STOP_REASONS, anthropic_usage, openai_usage

__all__ = ["ChatToMessagesStream", "MessagesToChatStream"]

_DONE = b"data: [DONE]\n\n"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class MessagesToChatStream:
    """Translate an Anthropic Messages event stream into OpenAI chat completion chunks.

    `include_usage` is the client's `stream_options.include_usage`: when True, a chunk with
    `choices: []` and the usage is sent after the finish_reason chunk, as OpenAI does. `model` replaces
    the upstream model name when given. One instance translates one stream.
    """

    def __init__(self, *, include_usage: bool, model: str | None = None) -> None:
        self._include_usage = include_usage
        self._model = model
        self._id = ""
        self._created = int(time.time())
        self._started = False
        #: Anthropic content block index -> OpenAI tool_calls index, for tool_use blocks only.
        self._tool_indexes: dict[int, int] = {}
        #: OpenAI tool_calls indexes that have received a non-empty arguments fragment.
        self._tools_with_arguments: set[int] = set()
        self._usage: dict[str, Any] = {}
        self._finish_sent = False
        self._ended = False

    def feed(self, event: str | None, data: dict[str, Any]) -> bytes:
        """Translate one upstream event (its `event:` name and parsed `data`) into zero or more chunks."""
        if self._ended or not isinstance(data, dict):
            return b""
        kind = data.get("type") or event
        if kind == "message_start":
            return self._start(data.get("message") or {})
        if kind == "content_block_start":
            return self._ensure_started() + self._block_start(data.get("index"), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._ensure_started() + self._block_delta(data.get("index"), data.get("delta") or {})
        if kind == "content_block_stop":
            return self._block_stop(data.get("index"))
        if kind == "message_delta":
            return self._ensure_started() + self._message_delta(data)
        if kind == "message_stop":
            return self._message_stop()
        if kind == "error":
            self._ended = True
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            return self._event({"error": openai_stream_error(error)})
        # ping and event types added later produce nothing.
        return b""

    def finish(self) -> bytes:
        """Return what is still owed to the client when the upstream stream has ended.

        A stream that ended after `message_delta` gets its usage chunk and `[DONE]`. A stream cut before
        that gets an error chunk and no `[DONE]`, so the client does not take a partial response for
        a complete one.
        """
        if self._ended:
            return b""
        if self._finish_sent:
            return self._message_stop()
        self._ended = True
        return self._event(
            {
                "error": {
                    "message": "The upstream stream ended before the response was complete.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )

    # Chunk framing

    def _event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(payload).encode() + b"\n\n"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return self._event(chunk)

    # Event handlers

    def _start(self, message: dict[str, Any]) -> bytes:
        if self._started:
            return b""
        self._started = True
        self._id = chat_id_for(message.get("id"))
        if self._model is None:
            self._model = message.get("model")
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage.update(usage)
        return self._chunk({"role": "assistant", "content": ""})

    def _ensure_started(self) -> bytes:
        # An upstream that skips message_start still gets a role chunk first, with a generated id.
        return b"" if self._started else self._start({})

    def _block_start(self, index: Any, block: dict[str, Any]) -> bytes:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return self._chunk({"content": text}) if text else b""
        if kind != "tool_use":
            # thinking, redacted_thinking and server tool blocks have no Chat Completions equivalent.
            return b""
        ordinal = len(self._tool_indexes)
        self._tool_indexes[index] = ordinal
        call = {
            "index": ordinal,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return self._chunk({"tool_calls": [call]})

    def _block_delta(self, index: Any, delta: dict[str, Any]) -> bytes:
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self._chunk({"content": text}) if text else b""
        if kind == "input_json_delta":
            ordinal = self._tool_indexes.get(index)
            fragment = delta.get("partial_json")
            if ordinal is None or not fragment:
                return b""
            self._tools_with_arguments.add(ordinal)
            return self._chunk({"tool_calls": [{"index": ordinal, "function": {"arguments": fragment}}]})
        # thinking_delta, signature_delta and citations_delta are dropped.
        return b""

    def _block_stop(self, index: Any) -> bytes:
        ordinal = self._tool_indexes.get(index)
        if ordinal is None or ordinal in self._tools_with_arguments:
            return b""
        # A tool called without input streams only an empty fragment. OpenAI clients parse the
        # arguments as JSON, and "" is not JSON, so the call gets "{}".
        self._tools_with_arguments.add(ordinal)
        return self._chunk({"tool_calls": [{"index": ordinal, "function": {"arguments": "{}"}}]})

    def _message_delta(self, data: dict[str, Any]) -> bytes:
        usage = data.get("usage")
        if isinstance(usage, dict):
            # message_delta counts are cumulative totals that replace the message_start values.
            self._usage.update({key: value for key, value in usage.items() if value is not None})
        if self._finish_sent:
            return b""
        self._finish_sent = True
        stop_reason = (data.get("delta") or {}).get("stop_reason")
        return self._chunk({}, FINISH_REASONS.get(stop_reason, "stop"))

    def _message_stop(self) -> bytes:
        out = self._ensure_started()
        if not self._finish_sent:
            self._finish_sent = True
            out += self._chunk({}, "stop")
        self._ended = True
        if self._include_usage:
            out += self._event(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": openai_usage(self._usage),
                }
            )
        return out + _DONE


class ChatToMessagesStream:
    """Translate OpenAI chat completion chunks into an Anthropic Messages event stream.

    Every event is sent with an `event:` line, because the Anthropic SDK ignores events without one.
    The upstream request should ask for `stream_options.include_usage`, otherwise the usage reported to
    the client is 0. `model` replaces the upstream model name when given. One instance translates one
    stream, and only the first choice (index 0) is translated.
    """

    def __init__(self, *, model: str | None = None) -> None:
        self._model = model
        self._started = False
        self._next_block = 0
        #: Anthropic index of the open content block, or None.
        self._open_block: int | None = None
        self._open_is_text = False
        #: OpenAI tool_calls index -> Anthropic content block index.
        self._tool_blocks: dict[int, int] = {}
        self._stop_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._ended = False

    def feed(self, data: dict[str, Any] | None) -> bytes:
        """Translate one upstream chunk, or the `[DONE]` sentinel when `data` is None."""
        if self._ended:
            return b""
        if data is None:
            return self._end()
        error = data.get("error")
        if error is not None:
            return self._error(error if isinstance(error, dict) else {"message": str(error)})

        out = b""
        choices = data.get("choices") or []
        usage = data.get("usage")
        if not self._started:
            if not choices and not usage:
                # Azure starts with a chunk that carries only content filter results.
                return b""
            out += self._start(data)
        for choice in choices:
            if choice.get("index", 0) == 0:
                out += self._choice(choice)
        if usage:
            self._usage = usage
            if self._stop_reason is not None:
                out += self._end()
        return out

    def finish(self) -> bytes:
        """Return what is still owed to the client when the upstream stream has ended.

        A stream that ended after its finish_reason gets `message_delta` and `message_stop` (usage 0 if
        none was sent). A stream cut before that gets an `error` event.
        """
        if self._ended:
            return b""
        if self._stop_reason is not None:
            return self._end()
        return self._error(
            {"type": "server_error", "message": "The upstream stream ended before the response was complete."}
        )

    # Event framing

    @staticmethod
    def _event(name: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _dumps(payload).encode() + b"\n\n"

    def _start(self, data: dict[str, Any]) -> bytes:
        self._started = True
        message = {
            "id": message_id_for(data.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model or data.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The real counts arrive with OpenAI's last chunk and are sent in message_delta.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return self._event("message_start", {"type": "message_start", "message": message})

    def _open(self, block: dict[str, Any], is_text: bool) -> bytes:
        out = self._close()
        index = self._next_block
        self._next_block += 1
        self._open_block = index
        self._open_is_text = is_text
        start = {"type": "content_block_start", "index": index, "content_block": block}
        out += self._event("content_block_start", start)
        return out

    def _close(self) -> bytes:
        if self._open_block is None:
            return b""
        index, self._open_block = self._open_block, None
        return self._event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return self._event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    # Chunk handlers

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = b""
        delta = choice.get("delta") or {}
        for field in ("content", "refusal"):
            text = delta.get(field)
            if not text:
                # Empty strings must not open a block, because Anthropic rejects empty text blocks.
                continue
            if self._open_block is None or not self._open_is_text:
                out += self._open({"type": "text", "text": ""}, is_text=True)
            out += self._delta(self._open_block, {"type": "text_delta", "text": text})
        for call in delta.get("tool_calls") or []:
            out += self._tool_call(call)
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            out += self._close()
            self._stop_reason = STOP_REASONS.get(finish_reason, "end_turn")
        return out

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        out = b""
        ordinal = call.get("index", 0)
        function = call.get("function") or {}
        block_index = self._tool_blocks.get(ordinal)
        if block_index is None:
            # Some OpenAI-compatible servers omit the call id. Anthropic clients need one to send the result.
            call_id = call.get("id") or f"toolu_{uuid.uuid4().hex}"
            block = {"type": "tool_use", "id": call_id, "name": function.get("name"), "input": {}}
            out += self._open(block, is_text=False)
            block_index = self._tool_blocks[ordinal] = self._open_block
        arguments = function.get("arguments")
        if arguments:
            # NOTE: if upstream interleaved fragments of several calls, a fragment may target a block that
            # was already closed. OpenAI sends calls one after another, so this is not handled.
            out += self._delta(block_index, {"type": "input_json_delta", "partial_json": arguments})
        return out

    def _end(self) -> bytes:
        out = b""
        if not self._started:
            out += self._start({})
        out += self._close()
        self._ended = True
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None},
            "usage": anthropic_usage(self._usage),
        }
        out += self._event("message_delta", message_delta)
        return out + self._event("message_stop", {"type": "message_stop"})

    def _error(self, error: dict[str, Any]) -> bytes:
        self._ended = True
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = "The upstream provider reported an error during streaming."
        payload = {"type": "error", "error": {"type": anthropic_error_type(error), "message": message}}
        return self._event("error", payload)
