"""Request translation between OpenAI Chat Completions and Anthropic Messages, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addons.translation import TranslationError, chat_to_messages_request, messages_to_chat_request

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"

PNG_B64 = "iVBORw0KGgo="


def chat(*messages, **fields):
    return {"model": "claude-sonnet-4-5", "messages": list(messages), **fields}


def anthropic(*messages, **fields):
    return {"model": "gpt-4.1", "max_tokens": 100, "messages": list(messages), **fields}


def user(content):
    return {"role": "user", "content": content}


# --- OpenAI Chat -> Anthropic Messages -----------------------------------------------------------


def test_chat_minimal_request():
    result = chat_to_messages_request(chat(user("Hi")))

    assert result == {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 4096,
    }


def test_chat_system_and_developer_collected():
    body = chat(
        {"role": "system", "content": "Be terse."},
        user("Hi"),
        {"role": "assistant", "content": "Hello."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        user("Again"),
    )

    result = chat_to_messages_request(body)

    assert result["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Answer in French."},
    ]
    # The developer message between two turns is hoisted, so the user turns stay separate.
    assert result["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]


def test_chat_consecutive_user_messages_merged():
    result = chat_to_messages_request(chat(user("one"), user("two")))

    assert result["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 4096),
        ({"max_tokens": 300}, 300),
        ({"max_completion_tokens": 500}, 500),
        ({"max_tokens": 300, "max_completion_tokens": 500}, 500),
    ],
)
def test_chat_max_tokens(fields, expected):
    assert chat_to_messages_request(chat(user("Hi"), **fields))["max_tokens"] == expected


def test_chat_default_max_tokens_argument():
    assert chat_to_messages_request(chat(user("Hi")), default_max_tokens=1024)["max_tokens"] == 1024


@pytest.mark.parametrize(("temperature", "expected"), [(0, 0), (0.7, 0.7), (1, 1), (1.5, 1), (2, 1)])
def test_chat_temperature_clamped(temperature, expected):
    assert chat_to_messages_request(chat(user("Hi"), temperature=temperature))["temperature"] == expected


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["a", "b"], ["a", "b"])],
)
def test_chat_stop_to_stop_sequences(stop, expected):
    assert chat_to_messages_request(chat(user("Hi"), stop=stop))["stop_sequences"] == expected


def test_chat_sampling_stream_and_user_fields():
    body = chat(user("Hi"), top_p=0.9, stream=True, stream_options={"include_usage": True}, user="u-17", seed=4)

    result = chat_to_messages_request(body)

    assert result["top_p"] == 0.9
    assert result["stream"] is True
    assert result["metadata"] == {"user_id": "u-17"}
    assert "seed" not in result
    assert "stream_options" not in result


def test_chat_metadata_user_to_user_id():
    result = chat_to_messages_request(chat(user("Hi"), metadata={"user": "u-9", "team": "x"}))

    assert result["metadata"] == {"user_id": "u-9"}


def test_chat_tools_and_choices():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup_sku",
                "description": "Stock level",
                "parameters": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]},
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "ping"}},
    ]

    result = chat_to_messages_request(chat(user("Hi"), tools=tools, tool_choice="required"))

    assert result["tools"] == [
        {
            "name": "lookup_sku",
            "description": "Stock level",
            "input_schema": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]},
            "strict": True,
        },
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert result["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "auto"}, {"type": "auto"}),
        ({"tool_choice": "none"}, {"type": "none"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        ({"tool_choice": {"type": "function", "function": {"name": "ping"}}}, {"type": "tool", "name": "ping"}),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
        ({"parallel_tool_calls": True}, None),
    ],
)
def test_chat_tool_choice_table(fields, expected):
    result = chat_to_messages_request(chat(user("Hi"), **fields))

    assert result.get("tool_choice") == expected


def test_chat_tool_calls_and_results():
    body = chat(
        user("Stock of A-17 and B-2?"),
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup_sku", "arguments": '{"sku":"A-17"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "in stock: 4"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "pong"}]},
        user("Thanks. Summarise."),
    )

    result = chat_to_messages_request(body)

    assert result["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Stock of A-17 and B-2?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "lookup_sku", "input": {"sku": "A-17"}},
                {"type": "tool_use", "id": "call_2", "name": "ping", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "in stock: 4"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "pong"}]},
                {"type": "text", "text": "Thanks. Summarise."},
            ],
        },
    ]


def test_chat_assistant_empty_content_with_tool_calls():
    call = {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
    body = chat(user("Hi"), {"role": "assistant", "content": "", "tool_calls": [call]})

    result = chat_to_messages_request(body)

    assert result["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "call_1", "name": "ping", "input": {}}],
    }


def test_chat_empty_assistant_message_dropped():
    body = chat(user("Hi"), {"role": "assistant", "content": None}, user("Again"))

    result = chat_to_messages_request(body)

    assert result["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"}]}
    ]


def test_chat_images():
    parts = [
        {"type": "text", "text": "What is on these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
    ]

    result = chat_to_messages_request(chat(user(parts)))

    assert result["messages"][0]["content"] == [
        {"type": "text", "text": "What is on these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.png"}},
    ]


def test_chat_response_format_and_effort():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}

    result = chat_to_messages_request(chat(user("Hi"), response_format=response_format, reasoning_effort="high"))

    assert result["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "high"}


def test_chat_recorded_tool_conversation():
    path = RECORDED / "openai-chat-stream-usage.json"
    if not path.exists():
        pytest.skip(f"recorded fixtures not found at {RECORDED}")
    body = json.loads(path.read_text())["request"]["body"]

    result = chat_to_messages_request(body)

    assert result["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the capital of the UK? Use the tool, then answer."}],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_000000000000000000000fx2",
                    "name": "get_capital",
                    "input": {"country": "UK"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_000000000000000000000fx2", "content": "London"}],
        },
    ]
    assert result["tool_choice"] == {"type": "auto"}
    assert result["stream"] is True
    assert [tool["name"] for tool in result["tools"]] == ["get_capital"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (chat(user("Hi"), n=2), "n"),
        (chat(user("Hi"), logprobs=True), "logprobs"),
        (chat(user("Hi"), top_logprobs=3), "top_logprobs"),
        (chat(user("Hi"), logit_bias={"50256": -100}), "logit_bias"),
        (chat(user("Hi"), modalities=["text", "audio"]), "modalities"),
        (chat(user("Hi"), response_format={"type": "json_object"}), "response_format.type"),
        (chat(user("Hi"), reasoning_effort="minimal"), "reasoning_effort"),
        (chat(user("Hi"), tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
        (chat(user("Hi"), tool_choice={"type": "allowed_tools"}), "tool_choice"),
        (chat(user("Hi"), max_tokens=0), "max_tokens"),
        (
            chat(user("Hi"), user([{"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {}}])),
            "messages[1].content[1].type",
        ),
        (chat(user([{"type": "file", "file": {"file_id": "file-abc"}}])), "messages[0].content[0].type"),
        (
            chat(user([{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}])),
            "messages[0].content[0].image_url.url",
        ),
        (
            chat(user([{"type": "image_url", "image_url": {"url": "ftp://example.test/cat.png"}}])),
            "messages[0].content[0].image_url.url",
        ),
        (
            chat(
                user("Hi"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (chat({"role": "tool", "content": "x"}), "messages[0].tool_call_id"),
        (chat({"role": "function", "name": "f", "content": "x"}), "messages[0].role"),
        (chat(), "messages"),
    ],
)
def test_chat_untranslatable_field_named(body, field):
    with pytest.raises(TranslationError) as info:
        chat_to_messages_request(body)

    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_chat_error_message_n():
    with pytest.raises(TranslationError) as info:
        chat_to_messages_request(chat(user("Hi"), n=3))

    assert str(info.value) == (
        "Invalid value for 'n': Anthropic returns one choice per request, so only n=1 is supported"
    )


def test_translation_error_is_value_error():
    assert issubclass(TranslationError, ValueError)


# --- Anthropic Messages -> OpenAI Chat -----------------------------------------------------------


def test_anthropic_minimal_request():
    result = messages_to_chat_request(anthropic(user("Hi")))

    assert result == {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 100,
    }


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be terse.", "Be terse."),
        (
            [
                {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "B"},
            ],
            [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "B"}],
        ),
    ],
)
def test_anthropic_system_to_message(system, expected):
    result = messages_to_chat_request(anthropic(user("Hi"), system=system))

    assert result["messages"][0] == {"role": "system", "content": expected}


def test_anthropic_tool_use_and_results():
    body = anthropic(
        user("Stock of A-17?"),
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Let me look.", "signature": "EqQB"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup_sku", "input": {"sku": "A-17"}},
                {"type": "tool_use", "id": "toolu_2", "name": "ping", "input": {}},
            ],
        },
        user(
            [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "in stock: 4"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [
                        {"type": "text", "text": "pong"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    ],
                    "is_error": False,
                },
                {"type": "text", "text": "Summarise."},
            ]
        ),
    )

    result = messages_to_chat_request(body)

    assert result["messages"] == [
        {"role": "user", "content": "Stock of A-17?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "lookup_sku", "arguments": '{"sku": "A-17"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "ping", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "in stock: 4"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "pong"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                {"type": "text", "text": "Summarise."},
            ],
        },
    ]


def test_anthropic_assistant_tool_use_only_has_null_content():
    body = anthropic(
        user("Hi"), {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
    )

    assert messages_to_chat_request(body)["messages"][1]["content"] is None


def test_anthropic_images():
    blocks = [
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.png"}},
        {"type": "text", "text": "What is this?"},
    ]

    result = messages_to_chat_request(anthropic(user(blocks)))

    assert result["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
        {"type": "text", "text": "What is this?"},
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected_choice", "expected_parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        ({"type": "tool", "name": "ping"}, {"type": "function", "function": {"name": "ping"}}, None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ],
)
def test_anthropic_tool_choice_table(tool_choice, expected_choice, expected_parallel):
    result = messages_to_chat_request(anthropic(user("Hi"), tool_choice=tool_choice))

    assert result["tool_choice"] == expected_choice
    assert result.get("parallel_tool_calls") == expected_parallel


def test_anthropic_tools_and_sampling():
    tools = [
        {"name": "lookup_sku", "description": "Stock level", "input_schema": {"type": "object"}, "strict": True},
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    body = anthropic(
        user("Hi"),
        tools=tools,
        temperature=0.3,
        top_p=0.8,
        top_k=5,
        stop_sequences=["END", "STOP"],
        metadata={"user_id": "u-17"},
    )

    result = messages_to_chat_request(body)

    assert result["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup_sku",
                "description": "Stock level",
                "parameters": {"type": "object"},
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert result["temperature"] == 0.3
    assert result["top_p"] == 0.8
    assert "top_k" not in result
    assert result["stop"] == ["END", "STOP"]
    assert result["user"] == "u-17"


def test_anthropic_stream_asks_for_usage():
    result = messages_to_chat_request(anthropic(user("Hi"), stream=True))

    assert result["stream"] is True
    assert result["stream_options"] == {"include_usage": True}


def test_anthropic_output_config():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = anthropic(user("Hi"), output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"})

    result = messages_to_chat_request(body)

    assert result["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    assert result["reasoning_effort"] == "low"


def test_anthropic_recorded_request():
    path = RECORDED / "anthropic-stream-tool-use.json"
    if not path.exists():
        pytest.skip(f"recorded fixtures not found at {RECORDED}")
    body = json.loads(path.read_text())["request"]["body"]

    result = messages_to_chat_request(body)

    assert result == {
        "model": "claude-haiku-4-5-20251001",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Generate one name for a pet pelican"}]}],
        "max_completion_tokens": 8192,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {"name": "pelican_name_generator", "parameters": {"properties": {}, "type": "object"}},
            }
        ],
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (anthropic(user("Hi"), stop_sequences=["a", "b", "c", "d", "e"]), "stop_sequences"),
        (
            anthropic(user([{"type": "document", "source": {"type": "base64", "data": "JVBER"}}])),
            "messages[0].content[0].type",
        ),
        (anthropic(user("Hi"), tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type"),
        (anthropic(user("Hi"), tool_choice={"type": "sometimes"}), "tool_choice.type"),
        (anthropic(user("Hi"), system=[{"type": "image"}]), "system[0].type"),
        (anthropic({"role": "system", "content": "x"}), "messages[0].role"),
    ],
)
def test_anthropic_untranslatable_field_named(body, field):
    with pytest.raises(TranslationError) as info:
        messages_to_chat_request(body)

    assert info.value.field == field
    assert f"'{field}'" in str(info.value)
