"""Token usage and stop reasons in each provider's shape.

The two formats count input differently. OpenAI's `prompt_tokens` includes cached tokens (and cache
writes), while Anthropic's `input_tokens` is only the uncached part, with cache reads and cache writes
counted in separate fields. Both count reasoning (thinking) tokens inside the output count.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FINISH_REASONS",
    "STOP_REASONS",
    "anthropic_usage",
    "openai_usage",
]

#: OpenAI `finish_reason` for each Anthropic `stop_reason`. Unlisted reasons map to "stop".
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    # NOTE: pause_turn means a server tool paused and the caller should resume, which an OpenAI client
    # cannot express. It is reported as a normal stop.
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: Anthropic `stop_reason` for each OpenAI `finish_reason`. Unlisted reasons map to "end_turn".
#: OpenAI does not say whether a stop sequence matched, so "stop" is always "end_turn".
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _count(mapping: Any, key: str) -> int:
    if not isinstance(mapping, dict):
        return 0
    value = mapping.get(key)
    return value if isinstance(value, int) else 0


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Convert an Anthropic `usage` object into an OpenAI Chat `usage` object.

    `prompt_tokens` is the whole input (uncached + cache reads + cache writes). The 5-minute and 1-hour
    split of cache writes has no OpenAI field and is lost.
    """
    uncached = _count(usage, "input_tokens")
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    output = _count(usage, "output_tokens")
    prompt = uncached + cache_read + cache_write
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write},
    }
    thinking = _count(usage.get("output_tokens_details"), "thinking_tokens")
    if thinking:
        result["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return result


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Convert an OpenAI Chat `usage` object (or None) into an Anthropic `usage` object.

    `input_tokens` is the uncached part: `prompt_tokens - cached_tokens - cache_write_tokens`.
    """
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cache_read = _count(details, "cached_tokens")
    cache_write = _count(details, "cache_write_tokens")
    prompt = _count(usage, "prompt_tokens")
    return {
        "input_tokens": max(prompt - cache_read - cache_write, 0),
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": _count(usage, "completion_tokens"),
    }
