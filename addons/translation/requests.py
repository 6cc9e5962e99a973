"""Request bodies: OpenAI Chat Completions to Anthropic Messages and back.

A field without an equivalent is dropped when losing it only changes sampling or bookkeeping (`seed`,
penalties, `store`, `service_tier`). It is rejected with `TranslationError` when the client would otherwise
get a response of a different shape than it requested (`n > 1`, `logprobs`, audio output).
"""

from __future__ import annotations

import json
import re
from typing import Any

from addons.translation.errors import TranslationError

__all__ = ["chat_to_messages_request", "messages_to_chat_request"]

#: Image types that Anthropic accepts in a base64 image source.
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

#: OpenAI accepts at most this many stop sequences.
MAX_OPENAI_STOP_SEQUENCES = 4

# Anthropic's `output_config.effort` values; OpenAI's `reasoning_effort` uses the same words for these.
_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})

_DATA_URI = re.compile(r"data:(?P<media_type>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[^;,]*)*;base64,(?P<data>.*)", re.S)

# --- OpenAI Chat -> Anthropic Messages ---------------------------------------------------------------


def chat_to_messages_request(body: dict[str, Any], *, default_max_tokens: int = 4096) -> dict[str, Any]:
    """Translate an OpenAI Chat Completions request body into an Anthropic Messages request body.

    System and developer messages, wherever they appear, are collected in order into `system`. Tool
    messages become `tool_result` blocks in a user turn, and consecutive turns of the same role are
    merged, because Anthropic requires user and assistant turns to alternate.

    :raises TranslationError: for a field that Anthropic cannot express, naming the field.
    """
    _reject_unsupported_chat_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise TranslationError("model", "a model name (string) is required")

    result: dict[str, Any] = {"model": model}
    system, messages = _chat_messages_to_anthropic(body.get("messages"))
    if system:
        result["system"] = system
    result["messages"] = messages
    result["max_tokens"] = _max_tokens(body, default_max_tokens)

    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise TranslationError("temperature", "must be a number from 0 to 2")
        # OpenAI allows 0..2 and Anthropic 0..1. Values above 1 are clamped, not halved, so that the
        # common values 0..1 keep their meaning.
        result["temperature"] = min(temperature, 1)
    if body.get("top_p") is not None:
        result["top_p"] = body["top_p"]

    stop = body.get("stop")
    if isinstance(stop, str):
        result["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        result["stop_sequences"] = list(stop)
    elif stop is not None and stop != []:
        raise TranslationError("stop", "must be a string or a list of strings")

    if body.get("stream"):
        result["stream"] = True

    tools = body.get("tools")
    if tools:
        result["tools"] = [_chat_tool_to_anthropic(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    tool_choice = _chat_tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tool_choice is not None:
        result["tool_choice"] = tool_choice

    user_id = _user_id(body)
    if user_id is not None:
        result["metadata"] = {"user_id": user_id}

    output_config = _output_config(body)
    if output_config:
        result["output_config"] = output_config
    return result


def _reject_unsupported_chat_fields(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError("n", "Anthropic returns one choice per request, so only n=1 is supported")
    if body.get("logprobs"):
        raise TranslationError("logprobs", "Anthropic does not return log probabilities")
    if body.get("top_logprobs") is not None:
        raise TranslationError("top_logprobs", "Anthropic does not return log probabilities")
    if body.get("logit_bias"):
        raise TranslationError("logit_bias", "Anthropic does not support token biases")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise TranslationError("modalities", "Anthropic returns text only")
    for name in ("audio", "prediction", "web_search_options", "functions", "function_call"):
        if body.get(name) is not None:
            raise TranslationError(name, "this field has no Anthropic equivalent")


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TranslationError(name, "must be a positive integer")
        return value
    return default


def _user_id(body: dict[str, Any]) -> str | None:
    for value in (body.get("safety_identifier"), body.get("user")):
        if isinstance(value, str) and value:
            return value
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user"), str) and metadata["user"]:
        return metadata["user"]
    return None


def _output_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            schema = response_format.get("json_schema")
            if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
                raise TranslationError("response_format.json_schema.schema", "a JSON Schema object is required")
            config["format"] = {"type": "json_schema", "schema": schema["schema"]}
        elif kind == "json_object":
            raise TranslationError(
                "response_format.type",
                "Anthropic has no plain JSON mode; send a json_schema response format instead",
            )
        elif kind != "text":
            raise TranslationError("response_format.type", f"unsupported response format {kind!r}")

    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise TranslationError(
                "reasoning_effort", f"Anthropic supports {', '.join(sorted(_EFFORTS))}, not {effort!r}"
            )
        config["effort"] = effort
    return config


def _chat_tool_to_anthropic(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise TranslationError(f"{path}.type", "only function tools can be translated")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TranslationError(f"{path}.function.name", "a function name is required")
    result: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        result["description"] = function["description"]
    result["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is not None:
        result["strict"] = function["strict"]
    return result


def _chat_tool_choice_to_anthropic(choice: Any, parallel_tool_calls: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "none":
        result = {"type": "none"}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TranslationError("tool_choice.function.name", "a function name is required")
        result = {"type": "tool", "name": function["name"]}
    else:
        raise TranslationError("tool_choice", "must be auto, none, required or a function choice")

    if parallel_tool_calls is False:
        if result is None:
            result = {"type": "auto"}
        # Anthropic's "none" choice takes no parallel-use flag, and no tool call means none in parallel.
        if result["type"] != "none":
            result["disable_parallel_tool_use"] = True
    return result


def _chat_messages_to_anthropic(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the system text blocks and the alternating user/assistant turns."""
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages", "a non-empty list of messages is required")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TranslationError(path, "each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            # NOTE: a system message in the middle of the conversation is moved to the top-level system
            # prompt with the others, because Anthropic has no system turns. Its position is lost.
            system.extend(_text_blocks(message.get("content"), f"{path}.content"))
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), f"{path}.content")
            turn_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, path)
            turn_role = "assistant"
        elif role == "tool":
            blocks = [_tool_result_block(message, path)]
            turn_role = "user"
        else:
            raise TranslationError(f"{path}.role", f"unsupported role {role!r}")

        # Anthropic rejects empty messages, so a message without content is dropped.
        if not blocks:
            continue
        if turns and turns[-1]["role"] == turn_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": turn_role, "content": blocks})
    if not turns:
        raise TranslationError("messages", "at least one user or assistant message with content is required")
    return system, turns


def _text_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    """Translate content that may only contain text (system, developer and tool messages)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(path, "must be a string or a list of content parts")
    blocks = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise TranslationError(f"{path}[{j}].type", f"only text parts are allowed here, not {kind!r}")
        if part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _user_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return _text_blocks(content, path)
    if not isinstance(content, list):
        raise TranslationError(path, "must be a string or a list of content parts")
    blocks = []
    for j, part in enumerate(content):
        part_path = f"{path}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), f"{part_path}.image_url"))
        else:
            raise TranslationError(f"{part_path}.type", f"content part {kind!r} cannot be sent to Anthropic")
    return blocks


def _image_block(image_url: Any, path: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise TranslationError(f"{path}.url", "an image URL is required")
    if url.startswith("data:"):
        match = _DATA_URI.fullmatch(url)
        if match is None:
            raise TranslationError(f"{path}.url", "a data URI must have the form data:<media type>;base64,<data>")
        media_type = match["media_type"].lower()
        if media_type not in IMAGE_MEDIA_TYPES:
            raise TranslationError(
                f"{path}.url", f"Anthropic accepts {', '.join(sorted(IMAGE_MEDIA_TYPES))} images, not {media_type}"
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": match["data"]}}
    if url.startswith(("https://", "http://")):
        # `detail` has no Anthropic equivalent and is dropped.
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"{path}.url", "must be an http(s) URL or a base64 data URI")


def _assistant_blocks(message: dict[str, Any], path: str) -> list[dict[str, Any]]:
    content = message.get("content")
    content_path = f"{path}.content"
    if content is None or isinstance(content, str):
        blocks = _text_blocks(content, content_path)
    elif isinstance(content, list):
        blocks = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
            elif kind == "refusal" and part.get("refusal"):
                blocks.append({"type": "text", "text": part["refusal"]})
            elif kind not in ("text", "refusal"):
                raise TranslationError(f"{content_path}[{j}].type", f"content part {kind!r} is not allowed here")
    else:
        raise TranslationError(content_path, "must be a string, a list of content parts or null")

    for k, call in enumerate(message.get("tool_calls") or []):
        blocks.append(_tool_use_block(call, f"{path}.tool_calls[{k}]"))
    if message.get("function_call") is not None:
        raise TranslationError(f"{path}.function_call", "legacy function calls are not supported; use tool_calls")
    return blocks


def _tool_use_block(call: Any, path: str) -> dict[str, Any]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise TranslationError(f"{path}.type", "only function tool calls can be translated")
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TranslationError(f"{path}.function.name", "a function name is required")
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise TranslationError(f"{path}.id", "a tool call id is required")
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):
        raise TranslationError(f"{path}.function.arguments", "must be a string of JSON")
    if not arguments.strip():
        tool_input: Any = {}
    else:
        try:
            tool_input = json.loads(arguments)
        except ValueError as e:
            raise TranslationError(f"{path}.function.arguments", f"is not valid JSON ({e})") from e
        if not isinstance(tool_input, dict):
            raise TranslationError(f"{path}.function.arguments", "must be a JSON object")
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": tool_input}


def _tool_result_block(message: dict[str, Any], path: str) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise TranslationError(f"{path}.tool_call_id", "a tool call id is required")
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_call_id}
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        text = _text_blocks(content, f"{path}.content")
        if text:
            block["content"] = text
    return block


# --- Anthropic Messages -> OpenAI Chat ---------------------------------------------------------------


def messages_to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages request body into an OpenAI Chat Completions request body.

    `tool_result` blocks become `tool` messages placed before the rest of their user turn, because
    OpenAI requires tool messages to follow the assistant message that called the tools. Thinking blocks
    are dropped. A streamed request requests the final usage chunk (`stream_options.include_usage`).

    :raises TranslationError: for a field that OpenAI Chat cannot express, naming the field.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise TranslationError("model", "a model name (string) is required")
    result: dict[str, Any] = {"model": model}

    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _system_to_chat(system)})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise TranslationError("messages", "a non-empty list of messages is required")
    for i, message in enumerate(raw_messages):
        messages.extend(_anthropic_message_to_chat(message, f"messages[{i}]"))
    result["messages"] = messages

    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        # max_completion_tokens replaces the deprecated max_tokens, which reasoning models reject.
        result["max_completion_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            result[name] = body[name]
    # NOTE: top_k has no OpenAI equivalent and is dropped.

    stop_sequences = body.get("stop_sequences")
    if stop_sequences:
        if len(stop_sequences) > MAX_OPENAI_STOP_SEQUENCES:
            raise TranslationError(
                "stop_sequences", f"OpenAI accepts at most {MAX_OPENAI_STOP_SEQUENCES} stop sequences"
            )
        result["stop"] = list(stop_sequences)

    if body.get("stream"):
        result["stream"] = True
        result["stream_options"] = {"include_usage": True}

    tools = body.get("tools")
    if tools:
        result["tools"] = [_anthropic_tool_to_chat(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        choice, parallel = _anthropic_tool_choice_to_chat(tool_choice)
        if choice is not None:
            result["tool_choice"] = choice
        if parallel is False:
            result["parallel_tool_calls"] = False

    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        result["user"] = metadata["user_id"]

    output_config = body.get("output_config")
    if isinstance(output_config, dict):
        response_format = output_config.get("format")
        if isinstance(response_format, dict):
            if response_format.get("type") != "json_schema" or not isinstance(response_format.get("schema"), dict):
                raise TranslationError("output_config.format", "only a json_schema format with a schema is supported")
            result["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": response_format["schema"]},
            }
        if output_config.get("effort") is not None:
            result["reasoning_effort"] = output_config["effort"]
    # NOTE: `thinking` is dropped. OpenAI reasoning models choose their own reasoning budget.
    return result


def _system_to_chat(system: Any) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise TranslationError("system", "must be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise TranslationError(f"system[{j}].type", "only text blocks are allowed in the system prompt")
        parts.append({"type": "text", "text": block.get("text", "")})
    return parts


def _anthropic_message_to_chat(message: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise TranslationError(path, "each message must be an object")
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise TranslationError(f"{path}.role", f"must be user or assistant, not {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{path}.content", "must be a string or a list of content blocks")
    if role == "assistant":
        return [_assistant_message_to_chat(content, f"{path}.content")]
    return _user_message_to_chat(content, f"{path}.content")


def _assistant_message_to_chat(blocks: list[Any], path: str) -> dict[str, Any]:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
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
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(f"{path}[{j}].type", f"assistant block {kind!r} cannot be sent to OpenAI")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _user_message_to_chat(blocks: list[Any], path: str) -> list[dict[str, Any]]:
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        block_path = f"{path}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block.get("source"), f"{block_path}.source"))
        elif kind == "tool_result":
            text, images = _tool_result_content(block.get("content"), f"{block_path}.content")
            # NOTE: OpenAI tool messages have no error flag, so `is_error` is dropped.
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            # Tool messages carry text only, so images of a tool result follow in a user message.
            parts.extend(images)
        else:
            raise TranslationError(f"{block_path}.type", f"content block {kind!r} cannot be sent to OpenAI")
    result = list(tool_messages)
    if parts:
        result.append({"role": "user", "content": parts})
    return result


def _tool_result_content(content: Any, path: str) -> tuple[str, list[dict[str, Any]]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise TranslationError(path, "must be a string or a list of content blocks")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "image":
            images.append(_image_part(block.get("source"), f"{path}[{j}].source"))
        else:
            raise TranslationError(f"{path}[{j}].type", f"tool result block {kind!r} cannot be sent to OpenAI")
    return "\n\n".join(texts), images


def _image_part(source: Any, path: str) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url":
        url = source.get("url")
    else:
        raise TranslationError(f"{path}.type", f"image source {kind!r} cannot be sent to OpenAI")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_tool_to_chat(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise TranslationError(path, "each tool must be an object")
    if tool.get("type", "custom") != "custom":
        raise TranslationError(f"{path}.type", f"server tool {tool.get('type')!r} cannot be sent to OpenAI")
    if not isinstance(tool.get("name"), str):
        raise TranslationError(f"{path}.name", "a tool name is required")
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _anthropic_tool_choice_to_chat(choice: Any) -> tuple[Any, bool | None]:
    """Return the OpenAI `tool_choice` and `parallel_tool_calls` values (None: leave unset)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = False if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise TranslationError("tool_choice.name", "a tool name is required")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise TranslationError("tool_choice.type", f"must be auto, any, tool or none, not {kind!r}")
