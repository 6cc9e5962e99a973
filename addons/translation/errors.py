"""Errors of the translation layer, and upstream error bodies rewritten into the client's format."""

from __future__ import annotations

import json
from typing import Any

from addons.errors import error_body

__all__ = [
    "TranslationError",
    "anthropic_error_type",
    "error_to_anthropic",
    "error_to_openai",
    "openai_stream_error",
]

# The HTTP status Anthropic sends with each `error.type`, used for errors that arrive inside a stream
# (after the 200 was sent), where only the type is known.
_ANTHROPIC_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# Anthropic `error.type` for OpenAI `error.type` or `error.code` values seen inside a stream.
_OPENAI_STREAM_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "invalid_api_key": "authentication_error",
    "rate_limit_exceeded": "rate_limit_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "tokens": "rate_limit_error",
    "requests": "rate_limit_error",
    "server_error": "api_error",
}

# Maximum number of characters of a non-JSON error body quoted in a translated error message.
_MAX_QUOTED_CHARS = 500


class TranslationError(ValueError):
    """A request that cannot be expressed in the other provider's format.

    `field` is the JSON path of the offending field in the client's request, such as "n" or
    "messages[2].content[1].type". `str(error)` is a message for the client that names the field.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"Invalid value for '{field}': {reason}")


def _parse_error(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    return error if isinstance(error, dict) else None


def _fallback_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()[:_MAX_QUOTED_CHARS]
    if text:
        return f"The upstream provider returned HTTP {status}: {text}"
    return f"The upstream provider returned HTTP {status} with an empty body."


def error_to_openai(status: int, body: bytes) -> bytes:
    """Rewrite an Anthropic error body into OpenAI's `{"error": {...}}` format.

    The message is kept and `type` follows the status. The Anthropic `error.type` becomes `code`, so the
    client can still tell an `overloaded_error` from an `api_error`.
    """
    error = _parse_error(body)
    if error is None:
        return json.dumps(error_body("openai", status, _fallback_message(status, body))).encode()
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = _fallback_message(status, body)
    code = error.get("type") if isinstance(error.get("type"), str) else None
    return json.dumps(error_body("openai", status, message, code)).encode()


def error_to_anthropic(status: int, body: bytes) -> bytes:
    """Rewrite an OpenAI error body into Anthropic's `{"type": "error", "error": {...}}` format.

    The message is kept and `error.type` follows the status, as Anthropic's own errors do.
    """
    error = _parse_error(body)
    message = error.get("message") if error is not None else None
    if not isinstance(message, str) or not message:
        message = _fallback_message(status, body)
    return json.dumps(error_body("anthropic", status, message)).encode()


def openai_stream_error(error: dict[str, Any]) -> dict[str, Any]:
    """Return the OpenAI `error` object for the `error` object of an Anthropic `error` event."""
    error_type = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "The upstream provider reported an error during streaming."
    status = _ANTHROPIC_TYPE_STATUS.get(error_type, 500)
    return error_body("openai", status, message, error_type)["error"]


def anthropic_error_type(error: dict[str, Any]) -> str:
    """Return the Anthropic `error.type` for an OpenAI `error` object sent inside a stream."""
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and value in _OPENAI_STREAM_TYPES:
            return _OPENAI_STREAM_TYPES[value]
    return "api_error"
