"""The base-URL listener: SDKs and curl pointed at `http://gateway/v1`, Portkey headers, translation,
Azure and OpenAI-compatible providers, and rows identical to the forward proxy's."""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import anthropic
import genai_prices
import openai
import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons.gateway import Gateway
from addons.routing import BASE_URL_PLACEHOLDER
from addons.rules import RulesError, parse_rules
from addons.testing.gateway_process import start_gateway
from conftest import ALPHA_KEY, ANTHROPIC_REAL_KEY, GATEWAY_ENV, OPENAI_REAL_KEY, anthropic_client, openai_client, rules_text, use_gateway

OVERRIDE_MODEL = "tollhouse-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]
# Rates of OVERRIDE_MODEL in the test rules, USD per million tokens.
INPUT_RATE = Decimal("1.50")
OUTPUT_RATE = Decimal("6.00")
MILLION = Decimal(1_000_000)

EXTRA_PROVIDERS = """\
  azure:
    kind: azure
    base_url: http://127.0.0.1:{port}
    key_env: OPENAI_API_KEY
    hosts: [tollhouse-test.openai.azure.com]
    deployments:
      prod-4o: gpt-4o
  groq:
    kind: openai-compatible
    base_url: http://127.0.0.1:{port}/openai
    key_env: OPENAI_API_KEY
    price_provider: groq
  local:
    kind: openai-compatible
    base_url: http://127.0.0.1:{port}/ollama/
    key_env: OPENAI_API_KEY
"""

ROUTES = """
routes:
  cheap-claude:
    provider: anthropic
    override_params:
      model: claude-haiku-4-5
"""


def base_url_rules(fake_port: int) -> str:
    text = rules_text(fake_port, routes=ROUTES)
    return text.replace("providers:\n", "providers:\n" + EXTRA_PROVIDERS.format(port=fake_port), 1)


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    process = start_gateway(tmp_path_factory.mktemp("base-url"), base_url_rules(fake.port), GATEWAY_ENV)
    yield process
    process.stop()


@pytest.fixture
def direct_env(gw, monkeypatch):
    """Clear proxy and base-URL settings, so that clients use only what a test gives them."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return gw


def openai_direct(gw, key: str = ALPHA_KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=gw.base_url + "/v1", max_retries=0, timeout=20.0, **kwargs)


def anthropic_direct(gw, key: str = ALPHA_KEY, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=gw.base_url, max_retries=0, timeout=20.0, **kwargs)


def override_cost(input_tokens: int, cache_read: int, output_tokens: int) -> Decimal:
    # The test rules give OVERRIDE_MODEL no cache rates, so cache reads cost the input rate.
    return ((input_tokens + cache_read) * INPUT_RATE + output_tokens * OUTPUT_RATE) / MILLION


def genai_cost(model: str, provider_id: str, row: dict) -> Decimal:
    usage = genai_prices.Usage(
        input_tokens=row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"],
        cache_read_tokens=row["cache_read_tokens"],
        cache_write_tokens=row["cache_write_tokens"],
        output_tokens=row["output_tokens"],
    )
    price = genai_prices.calc_price(usage, model, provider_id=provider_id, genai_request_timestamp=row["ts"])
    return price.total_price.quantize(Decimal("1E-10"))


def last_received(fake):
    return fake.received[-1]


# -- SDKs pointed at the base URL -------------------------------------------------------------------


def test_openai_sdk_base_url(direct_env, fake):
    gw = direct_env
    raw = openai_direct(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    completion = raw.parse()

    request_id = raw.headers["x-tollhouse-request-id"]
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert raw.headers["x-portkey-provider"] == "openai"
    assert raw.headers["x-portkey-trace-id"] == request_id
    sent = last_received(fake)
    assert sent.path == "/v1/chat/completions"
    assert sent.header("authorization") == f"Bearer {OPENAI_REAL_KEY}"
    row = gw.wait_row(request_id)
    assert row["listener"] == "base_url"
    assert row["provider"] == "openai"
    assert row["project"] == "alpha"
    assert row["endpoint"] == "chat.completions"
    assert row["path"] == "/v1/chat/completions"
    assert row["price_flag"] == "priced"


def test_anthropic_sdk_base_url(direct_env, fake):
    gw = direct_env
    raw = anthropic_direct(gw).messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES)
    message = raw.parse()

    assert message.content[0].text == "Hello from the fake upstream."
    assert raw.headers["x-portkey-provider"] == "anthropic"
    sent = last_received(fake)
    assert sent.path == "/v1/messages"
    assert sent.header("x-api-key") == ANTHROPIC_REAL_KEY
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["listener"] == "base_url"
    assert row["provider"] == "anthropic"
    assert row["endpoint"] == "messages"
    assert row["project"] == "alpha"


def test_environment_only_clients(direct_env, fake, monkeypatch):
    gw = direct_env
    monkeypatch.setenv("OPENAI_BASE_URL", gw.base_url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", ALPHA_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", gw.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ALPHA_KEY)

    chat = openai.OpenAI(max_retries=0).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    message = anthropic.Anthropic(max_retries=0).messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=32, messages=MESSAGES
    )

    assert chat.status_code == 200
    assert message.status_code == 200
    chat_row = gw.wait_row(chat.headers["x-tollhouse-request-id"])
    message_row = gw.wait_row(message.headers["x-tollhouse-request-id"])
    assert (chat_row["provider"], chat_row["project"], chat_row["status"]) == ("openai", "alpha", 200)
    assert (message_row["provider"], message_row["project"], message_row["status"]) == ("anthropic", "alpha", 200)


def test_models_list_goes_to_openai(direct_env, fake):
    models = openai_direct(direct_env).models.list()

    assert "gpt-4o" in [model.id for model in models.data]
    assert last_received(fake).path == "/v1/models"


def test_count_tokens_to_openai_is_400(direct_env, fake):
    before = len(fake.received)
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_direct(direct_env).messages.count_tokens(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-portkey-provider": "openai"}
        )
    assert "/v1/messages/count_tokens" in raised.value.body["error"]["message"]
    assert len(fake.received) == before


def test_missing_project_key_is_401(direct_env, fake):
    before = len(fake.received)
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_direct(direct_env, key="not-a-project-key").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "unknown project key" in raised.value.message
    assert len(fake.received) == before


def test_unknown_key_with_bad_provider_is_401(direct_env, fake):
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_direct(direct_env, key="not-a-project-key").chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-portkey-provider": "nope"}
        )
    assert "openai, anthropic" not in raised.value.message


def test_unknown_path_is_404(direct_env, fake):
    before = len(fake.received)
    with pytest.raises(openai.NotFoundError) as raised:
        openai_direct(direct_env).post("/audio/speech", body={"model": "tts-1"}, cast_to=object)
    assert "/v1/audio/speech" in raised.value.message
    assert len(fake.received) == before


# -- Portkey headers and translation ---------------------------------------------------------------


@pytest.mark.skipif(subprocess.run(["which", "curl"], capture_output=True).returncode != 0, reason="curl is not installed")
def test_portkey_curl_call_to_claude(direct_env, fake):
    gw = direct_env
    body = {"model": "claude-sonnet-4-5", "messages": MESSAGES, "max_tokens": 50}
    result = subprocess.run(
        [
            "curl", "-sS", "--max-time", "20", "-D", "-", f"{gw.base_url}/v1/chat/completions",
            "-H", "content-type: application/json",
            "-H", f"x-portkey-api-key: {ALPHA_KEY}",
            "-H", "x-portkey-provider: anthropic",
            "-H", "x-portkey-trace-id: trace-curl-1",
            "-H", 'x-portkey-metadata: {"team": "search", "_user": "u-7"}',
            "-d", json.dumps(body),
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )
    head, _, payload = result.stdout.replace("\r\n", "\n").partition("\n\n")
    headers = dict(line.lower().split(": ", 1) for line in head.splitlines()[1:])
    completion = json.loads(payload)

    assert head.startswith("HTTP/1.1 200")
    assert headers["x-portkey-provider"] == "anthropic"
    assert headers["x-portkey-trace-id"] == "trace-curl-1"
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    sent = last_received(fake)
    assert sent.path == "/v1/messages"
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.header("x-api-key") == ANTHROPIC_REAL_KEY
    assert [name for name, _ in sent.headers if name.lower().startswith("x-portkey-")] == []
    assert sent.json["max_tokens"] == 50
    row = gw.wait_row(headers["x-tollhouse-request-id"])
    assert row["provider"] == "anthropic"
    assert row["endpoint"] == "messages"
    assert row["path"] == "/v1/chat/completions"
    assert json.loads(row["tags"]) == {"trace_id": "trace-curl-1", "team": "search", "_user": "u-7"}


def test_translated_chat_to_claude_cost(direct_env, fake):
    gw = direct_env
    usage = {"input_tokens": 120, "cache_read_input_tokens": 2000, "output_tokens": 45}
    raw = openai_direct(gw).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", messages=MESSAGES,
        extra_headers={"x-portkey-provider": "anthropic", "x-fake-usage": json.dumps(usage)},
    )
    completion = raw.parse()

    assert completion.usage.prompt_tokens == 2120
    assert completion.usage.completion_tokens == 45
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (120, 2000, 45)
    assert row["response_model"] == "claude-sonnet-4-5-20250929"
    assert row["price_flag"] == "priced"
    assert row["cost_usd"] == genai_cost("claude-sonnet-4-5-20250929", "anthropic", row)


def test_translated_stream_openai_client(direct_env, fake):
    gw = direct_env
    usage = {"input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 300}
    with openai_direct(gw).chat.completions.with_streaming_response.create(
        model=OVERRIDE_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-portkey-provider": "anthropic", "x-fake-usage": json.dumps(usage), "x-fake-text": "one%20two%20three"},
    ) as raw:
        request_id = raw.headers["x-tollhouse-request-id"]
        chunks = list(raw.parse())

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert text == "one two three"
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 1200
    assert chunks[-1].usage.completion_tokens == 300
    row = gw.wait_row(request_id)
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (200, 1000, 300)
    assert row["stream"] is True
    assert row["endpoint"] == "messages"
    assert row["price_flag"] == "override"
    assert row["cost_usd"] == override_cost(200, 1000, 300)


def test_translated_stream_anthropic_client(direct_env, fake):
    gw = direct_env
    usage = {"prompt_tokens": 1500, "completion_tokens": 200, "prompt_tokens_details": {"cached_tokens": 1000}}
    client = anthropic_direct(gw)
    with client.messages.stream(
        model=OVERRIDE_MODEL, max_tokens=256, messages=MESSAGES,
        extra_headers={"x-portkey-provider": "openai", "x-fake-usage": json.dumps(usage), "x-fake-text": "alpha%20beta"},
    ) as stream:
        event_types = [event.type for event in stream]
        final = stream.get_final_message()
        request_id = stream.response.headers["x-tollhouse-request-id"]

    assert event_types[0] == "message_start"
    assert event_types[-1] == "message_stop"
    assert final.content[0].text == "alpha beta"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 200
    sent = last_received(fake)
    assert sent.path == "/v1/chat/completions"
    assert sent.json["stream_options"] == {"include_usage": True}
    assert sent.header("anthropic-version") is None
    row = gw.wait_row(request_id)
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (500, 1000, 200)
    assert row["endpoint"] == "chat.completions"
    assert row["path"] == "/v1/messages"
    assert row["price_flag"] == "override"
    assert row["cost_usd"] == override_cost(500, 1000, 200)


def test_translated_messages_to_openai_json(direct_env, fake):
    gw = direct_env
    raw = anthropic_direct(gw).messages.with_raw_response.create(
        model="gpt-4o", max_tokens=64, messages=MESSAGES, extra_headers={"x-portkey-provider": "openai"}
    )
    message = raw.parse()

    assert message.type == "message"
    assert message.content[0].text == "Hello from the fake upstream."
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["provider"] == "openai"
    assert row["response_model"] == "gpt-4o-2024-08-06"
    assert row["cost_usd"] == genai_cost("gpt-4o-2024-08-06", "openai", row)


def test_translated_upstream_error_in_client_format(direct_env, fake):
    with pytest.raises(openai.RateLimitError) as raised:
        openai_direct(direct_env).chat.completions.create(
            model="claude-sonnet-4-5", messages=MESSAGES,
            extra_headers={"x-portkey-provider": "anthropic", "x-fault": "status:429,retry-after:1"},
        )
    assert raised.value.body["type"] == "rate_limit_error"


def test_config_header_override_params(direct_env, fake):
    config = {"provider": "anthropic", "override_params": {"model": "claude-haiku-4-5"}}
    raw = openai_direct(direct_env).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", messages=MESSAGES, extra_headers={"x-portkey-config": json.dumps(config)}
    )

    assert raw.headers["x-portkey-provider"] == "anthropic"
    assert last_received(fake).json["model"] == "claude-haiku-4-5"
    row = direct_env.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["model"] == "claude-haiku-4-5"


def test_config_header_names_a_route(direct_env, fake):
    raw = openai_direct(direct_env).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", messages=MESSAGES, extra_headers={"x-portkey-config": "cheap-claude"}
    )

    assert raw.headers["x-portkey-provider"] == "anthropic"
    assert last_received(fake).json["model"] == "claude-haiku-4-5"


# -- 400s in the client's format -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"x-portkey-provider": "nope"}, {}, ["x-portkey-provider", "'nope'", "openai, anthropic"]),
        ({"x-portkey-config": "{not json"}, {}, ["x-portkey-config", "not valid JSON"]),
        ({"x-portkey-config": '["anthropic"]'}, {}, ["x-portkey-config", "JSON object"]),
        ({"x-portkey-config": '{"provider": 7}'}, {}, ["x-portkey-config", "provider must be a string"]),
        ({"x-portkey-config": "no-such-route"}, {}, ["x-portkey-config", "'no-such-route'", "cheap-claude"]),
        ({"x-portkey-metadata": "[1]"}, {}, ["x-portkey-metadata", "JSON object"]),
        ({"x-portkey-provider": "anthropic"}, {"n": 2}, ["'n'", "n=1"]),
        (
            {"x-portkey-provider": "anthropic"},
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
            ["messages[0].content[0]"],
        ),
    ],
    ids=["unknown-provider", "config-not-json", "config-not-object", "config-bad-provider", "unknown-route",
         "metadata-not-object", "n-above-1", "audio-part"],
)
def test_openai_client_gets_400(direct_env, fake, headers, body, expected):
    before = len(fake.received)
    with pytest.raises(openai.BadRequestError) as raised:
        openai_direct(direct_env).chat.completions.create(
            model="claude-sonnet-4-5", messages=body.pop("messages", MESSAGES), extra_headers=headers, extra_body=body
        )

    error = raised.value.body
    assert error["type"] == "invalid_request_error"
    for part in expected:
        assert part in error["message"]
    assert len(fake.received) == before
    row = direct_env.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert row["status"] == 400
    assert row["price_flag"] == "not_billed"


def test_anthropic_client_gets_400_in_its_format(direct_env, fake):
    before = len(fake.received)
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_direct(direct_env).messages.create(
            model="claude-sonnet-4-5", max_tokens=16, messages=MESSAGES, extra_headers={"x-portkey-provider": "nope"}
        )

    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "x-portkey-provider" in raised.value.body["error"]["message"]
    assert len(fake.received) == before


def test_embeddings_to_anthropic_is_400(direct_env, fake):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_direct(direct_env).embeddings.create(
            model="text-embedding-3-small", input="hi", extra_headers={"x-portkey-provider": "anthropic"}
        )
    assert "/v1/embeddings" in raised.value.message


# -- Azure and OpenAI-compatible providers ---------------------------------------------------------


def test_azure_deployment_falls_back_to_openai(direct_env, fake):
    gw = direct_env
    client = openai.AzureOpenAI(
        azure_endpoint=gw.base_url, api_key=ALPHA_KEY, api_version="2024-10-21", max_retries=0, timeout=20.0
    )
    config = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "azure"}, {"provider": "openai"}]})
    raw = client.chat.completions.with_raw_response.create(
        model="prod-4o", messages=MESSAGES,
        extra_headers={"x-portkey-config": config, "x-fault": "status:503, times:1, kind:openai"},
    )

    assert raw.parse().choices[0].message.role == "assistant"
    sent = last_received(fake)
    # OpenAI knows no deployments: the body names the model that the rules map prod-4o to.
    assert sent.path == "/v1/chat/completions"
    assert json.loads(sent.body)["model"] == "gpt-4o"
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert [(a["provider"], a["model"], a["status"]) for a in attempts] == [("azure", "prod-4o", 503), ("openai", "gpt-4o", 200)]
    assert (row["provider"], row["model"]) == ("openai", "gpt-4o")
    assert row["cost_usd"] == genai_cost("gpt-4o", "openai", row)


def test_azure_deployment_url(direct_env, fake):
    gw = direct_env
    client = openai.AzureOpenAI(
        azure_endpoint=gw.base_url, api_key=ALPHA_KEY, api_version="2024-10-21", max_retries=0, timeout=20.0
    )
    raw = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)

    assert raw.headers["x-portkey-provider"] == "azure"
    sent = last_received(fake)
    assert sent.path == "/openai/deployments/prod-4o/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.header("api-key") == OPENAI_REAL_KEY
    assert sent.header("authorization") is None
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["provider"] == "azure"
    assert row["endpoint"] == "chat.completions"
    assert row["path"] == "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    assert row["price_flag"] == "priced"
    assert row["cost_usd"] == genai_cost("gpt-4o", "azure", row)


def test_azure_v1_url_with_api_key_header(direct_env, fake):
    gw = direct_env
    client = openai.OpenAI(
        api_key="placeholder", base_url=gw.base_url + "/openai/v1", default_headers={"api-key": ALPHA_KEY},
        max_retries=0, timeout=20.0,
    )
    raw = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)

    sent = last_received(fake)
    assert sent.path == "/openai/v1/chat/completions"
    assert sent.header("api-key") == OPENAI_REAL_KEY
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["provider"] == "azure"
    assert row["project"] == "alpha"
    assert row["model"] == "prod-4o"
    assert row["cost_usd"] == genai_cost("gpt-4o", "azure", row)


def test_openai_compatible_with_path_prefix(direct_env, fake):
    gw = direct_env
    raw = openai_direct(gw).chat.completions.with_raw_response.create(
        model="llama-3.1-8b-instant", messages=MESSAGES, extra_headers={"x-portkey-provider": "groq"}
    )

    assert raw.headers["x-portkey-provider"] == "groq"
    sent = last_received(fake)
    assert sent.path == "/openai/v1/chat/completions"
    assert sent.header("authorization") == f"Bearer {OPENAI_REAL_KEY}"
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["provider"] == "groq"
    assert row["endpoint"] == "chat.completions"
    assert row["price_flag"] == "priced"
    assert row["cost_usd"] == genai_cost("llama-3.1-8b-instant", "groq", row)


def test_openai_compatible_without_prices(direct_env, fake):
    gw = direct_env
    raw = openai_direct(gw).chat.completions.with_raw_response.create(
        model="llama3.2", messages=MESSAGES, extra_headers={"x-portkey-provider": "local"}
    )

    assert last_received(fake).path == "/ollama/v1/chat/completions"
    row = gw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert row["provider"] == "local"
    assert row["output_tokens"] == 5
    assert row["cost_usd"] is None
    assert row["price_flag"] == "unknown_model"


# -- the two listeners log the same rows -----------------------------------------------------------

# Columns that differ between two runs of the same call, or name the listener.
_PER_CALL_COLUMNS = {"ts", "request_id", "latency_ms", "ttfb_ms", "listener"}


def _openai_chat(client):
    return client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-text": "same"})


def _openai_stream(client):
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-text": "same%20stream"}
    ) as raw:
        list(raw.parse())
        return raw


def _anthropic_message(client):
    return client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES, extra_headers={"x-fake-text": "same"}
    )


def _anthropic_stream(client):
    with client.messages.with_streaming_response.create(
        model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES, stream=True, extra_headers={"x-fake-text": "same"}
    ) as raw:
        list(raw.parse())
        return raw


def _azure_client(endpoint: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=endpoint, api_key=ALPHA_KEY, api_version="2024-10-21", max_retries=0, timeout=20.0)


def _clients(gw, sdk: str):
    """Return a client of `sdk` for the base-URL listener and a factory for one that uses the proxy."""
    if sdk == "openai":
        return openai_direct(gw), openai_client
    if sdk == "azure":
        return _azure_client(gw.base_url), lambda: _azure_client(AZURE_PROXY_ENDPOINT)
    return anthropic_direct(gw), anthropic_client


# The Azure resource host that the test rules intercept in the forward proxy; it is never resolved.
AZURE_PROXY_ENDPOINT = "https://tollhouse-test.openai.azure.com"


@pytest.mark.parametrize(
    ("sdk", "call"),
    [
        ("openai", _openai_chat),
        ("openai", _openai_stream),
        ("anthropic", _anthropic_message),
        ("anthropic", _anthropic_stream),
        ("azure", _openai_chat),
        ("azure", _openai_stream),
    ],
    ids=["openai-chat", "openai-stream", "anthropic-message", "anthropic-stream", "azure-chat", "azure-stream"],
)
def test_listeners_log_identical_rows(gw, fake, monkeypatch, sdk, call):
    direct, make_proxied = _clients(gw, sdk)
    base_url_response = call(direct)
    use_gateway(gw, monkeypatch)
    proxy_response = call(make_proxied())

    base_url_row = gw.wait_row(base_url_response.headers["x-tollhouse-request-id"])
    proxy_row = gw.wait_row(proxy_response.headers["x-tollhouse-request-id"])
    assert base_url_row["listener"] == "base_url"
    assert proxy_row["listener"] == "proxy"
    for column in proxy_row:
        if column not in _PER_CALL_COLUMNS:
            assert base_url_row[column] == proxy_row[column], column


# -- the egress guard ------------------------------------------------------------------------------


def test_guard_blocks_placeholder_target():
    raw = {
        "providers": {"openai": {"kind": "openai", "base_url": "http://127.0.0.1:18080", "key_env": "OPENAI_API_KEY"}},
        "projects": {"alpha": {"key_env": "TH_TEST_ALPHA_KEY"}},
    }
    gateway = Gateway(parse_rules(raw, base_dir=Path("/nonexistent")), pm=None, store=None, redactor=None)
    server = connection.Server(address=BASE_URL_PLACEHOLDER)
    data = server_hooks.ServerConnectionHookData(server=server, client=tflow.tclient_conn())

    gateway.server_connect(data)

    assert server.error is not None
    assert "127.0.0.1:9" in server.error


def test_default_rules_listen_on_8787():
    raw = {
        "providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"}},
        "projects": {"alpha": {"key_env": "TH_TEST_ALPHA_KEY"}},
    }
    rules = parse_rules(raw, base_dir=Path("/nonexistent"))
    assert (rules.base_url_listen_host, rules.base_url_listen_port) == ("0.0.0.0", 8787)


def test_ready_lines_in_order(gw):
    assert gw.stdout_lines[0] == f"tollhouse listening on 127.0.0.1:{gw.port}\n"
    assert gw.stdout_lines[1] == f"tollhouse base-url listening on 127.0.0.1:{gw.base_url_port}\n"


# -- rules -----------------------------------------------------------------------------------------


def _rules_with(provider: dict | None = None, **top) -> dict:
    providers = {"openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"}}
    if provider is not None:
        providers["extra"] = provider
    return {"providers": providers, "projects": {"alpha": {"key_env": "TH_TEST_ALPHA_KEY"}}, **top}


def test_rules_accept_new_kinds():
    rules = parse_rules(
        _rules_with(
            {"kind": "openai-compatible", "base_url": "https://api.groq.com/openai/", "key_env": "GROQ_API_KEY",
             "price_provider": "groq"},
            routes={"fast": {"provider": "extra", "override_params": {"model": "llama-3.1-8b-instant"}}},
        ),
        base_dir=Path("/nonexistent"),
    )
    extra = rules.providers["extra"]
    assert (extra.host, extra.port, extra.base_path, extra.hosts) == ("api.groq.com", 443, "/openai", ())
    assert extra.api_format == "openai"
    assert extra.price_provider == "groq"
    assert rules.routes["fast"].override_params == {"model": "llama-3.1-8b-instant"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_rules_with({"kind": "openai", "base_url": "https://x.example/api", "key_env": "K"}), ["providers.extra.base_url", "has a path"]),
        (_rules_with({"kind": "openai-compatible", "base_url": "https://x.example/v1", "key_env": "K"}), ["ends with /v1", "Leave out"]),
        (_rules_with({"kind": "openai", "base_url": "https://x.example", "key_env": "K", "deployments": {"a": "gpt-4o"}}), ["deployments", "only valid for kind azure"]),
        (_rules_with({"kind": "azure", "base_url": "https://r.openai.azure.com", "key_env": "K", "deployments": {"a": 5}}), ["deployments.a", "not a model name"]),
        (_rules_with(routes={"r": {"provider": "nope"}}), ["routes.r.provider", "Use one of: openai"]),
        (_rules_with(listen="0.0.0.0:8080", base_url_listen="127.0.0.1:8080"), ["base_url_listen", "its own port"]),
    ],
    ids=["path-for-openai", "trailing-v1", "deployments-not-azure", "deployment-not-string", "route-provider", "same-port"],
)
def test_rules_reject_invalid_settings(raw, expected):
    with pytest.raises(RulesError) as raised:
        parse_rules(raw, base_dir=Path("/nonexistent"))
    for part in expected:
        assert part in str(raised.value)


@pytest.mark.parametrize(
    ("base_url", "expected_flag"),
    [("https://api.groq.com/openai", "priced"), ("http://127.0.0.1:11434", "unknown_model")],
    ids=["groq-host", "local-server"],
)
def test_compatible_price_provider_from_base_url(base_url, expected_flag):
    from datetime import datetime, timezone

    from addons.call import Call, Usage
    from plugins import pricing

    rules = parse_rules(
        _rules_with({"kind": "openai-compatible", "base_url": base_url, "key_env": "GROQ_API_KEY"}),
        base_dir=Path("/nonexistent"),
    )
    pricing.tollhouse_configure(rules)
    call = Call(request_id="t", listener="base_url", provider=rules.providers["extra"], model="llama-3.1-8b-instant",
                ts=datetime(2026, 12, 1, tzinfo=timezone.utc), status=200, endpoint="chat.completions")
    call.usage = Usage(input_tokens=1000, output_tokens=100)

    price = pricing.price_call(call)

    assert price.flag == expected_flag
    if expected_flag == "priced":
        expected = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1000, output_tokens=100), "llama-3.1-8b-instant", provider_id="groq",
            genai_request_timestamp=call.ts,
        ).total_price
        assert price.cost_usd == expected
    else:
        assert price.cost_usd is None
