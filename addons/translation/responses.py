"""Non-streamed responses: Anthropic message to OpenAI chat completion and back."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from addons.translation.usage import FINISH_REASONS, STOP_REASONS, anthropic_usage, openai_usage

__all__ = [
    "chat_id_for",
    "chat_to_messages_response",
    "message_id_for",
    "messages_to_chat_response",
]

_CHAT_PREFIX = "chatcmpl-"
_MESSAGE_PREFIX = "msg_"


def chat_id_for(message_id: str | None) -> str:
    """Return the chat completion id for an Anthropic message id: `msg_X` becomes `chatcmpl-X`."""
    if not message_id:
        return _CHAT_PREFIX + uuid.uuid4().hex
    return _CHAT_PREFIX + message_id.removeprefix(_MESSAGE_PREFIX)


def message_id_for(chat_id: str | None) -> str:
    """Return the Anthropic message id for a chat completion id: `chatcmpl-X` becomes `msg_X`."""
    if not chat_id:
        return _MESSAGE_PREFIX + uuid.uuid4().hex
    return _MESSAGE_PREFIX + chat_id.removeprefix(_CHAT_PREFIX)


def messages_to_chat_response(body: dict[str, Any], *, model: str | None = None) -> dict[str, Any]:
    """Translate an Anthropic Messages response into an OpenAI chat completion.

    Text blocks are joined into `content`, and tool_use blocks become `tool_calls` with the input as a
    JSON string. Thinking blocks are dropped. `model` replaces the response's model name when given.
    """
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in body.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )

    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": chat_id_for(body.get("id")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(body.get("stop_reason"), "stop"),
            }
        ],
        "usage": openai_usage(body.get("usage") or {}),
    }


def chat_to_messages_response(body: dict[str, Any], *, model: str | None = None) -> dict[str, Any]:
    """Translate an OpenAI chat completion into an Anthropic Messages response.

    Only the first choice is used, because a translated request always requests one. `model` replaces
    the response's model name when given.
    """
    choices = body.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}

    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
    if text:
        content.append({"type": "text", "text": text})
    if message.get("refusal"):
        content.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _parse_arguments(function.get("arguments")),
            }
        )

    return {
        "id": message_id_for(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model or body.get("model"),
        "content": content,
        "stop_reason": STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": anthropic_usage(body.get("usage")),
    }


def _parse_arguments(arguments: Any) -> Any:
    """Return tool call arguments as an object. Empty arguments are `{}`."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        # NOTE: a model can produce arguments that are not JSON. They are kept as a string under
        # "arguments", so that nothing is lost, although Anthropic clients expect an object of the schema.
        return {"arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}
