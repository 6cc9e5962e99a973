"""Fallbacks, retries, timeouts, load balancing and circuit breakers, end to end.

Every test calls a real gateway process through the official SDKs, in forward-proxy mode
(HTTPS_PROXY) or base-URL mode, against the fake upstream. Faults are steered per target with
`x-fault: ..., model:NAME`, which the gateway forwards to every attempt.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from decimal import Decimal

import anthropic
import genai_prices
import openai
import pytest

from mitmproxy.certs import CertStore

from addons.testing.gateway_process import start_gateway
from conftest import ALPHA_KEY, GATEWAY_ENV, anthropic_client, openai_client, rules_text, use_gateway

CLAUDE = "claude-sonnet-4-20250514"
GPT = "gpt-4o"
MESSAGES = [{"role": "user", "content": "hi"}]
# A provider key the fake upstream rejects; its 401 message repeats the key in full.
WRONG_KEY = "sk-wrong-openai-0123456789abcdef0123"


def closed_port() -> int:
    """Return a loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UntrustedTLSServer:
    """A loopback TLS server whose self-signed certificate no client trusts; it closes every connection."""

    def __init__(self, workdir):
        CertStore.from_store(str(workdir), "untrusted", 2048)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(workdir / "untrusted-ca.pem"))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            connection.settimeout(5)
            self.handshakes += 1
            try:
                self.context.wrap_socket(connection, server_side=True).close()
            except (OSError, ssl.SSLError):
                connection.close()

    def close(self) -> None:
        self.sock.close()


class ResetServer:
    """A loopback server that accepts each connection and resets it at once, before any response."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            # Linger 0 makes close() send a TCP reset instead of a normal close.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def reset_server():
    server = ResetServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    server = UntrustedTLSServer(tmp_path_factory.mktemp("untrusted-tls"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def slow_fake():
    from addons.testing.fake_upstream import FakeUpstream
    from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY

    upstream = FakeUpstream(chunk_delay=0.05).start_in_thread()
    upstream.expected_keys.update(openai=OPENAI_REAL_KEY, anthropic=ANTHROPIC_REAL_KEY)
    yield upstream
    upstream.stop_thread()


def fallback_rules(fake_port: int, tls_port: int, slow_port: int = 9, reset_port: int = 9) -> str:
    dead = closed_port()
    extra_providers = f"""\
  dead:
    kind: openai-compatible
    base_url: http://127.0.0.1:{dead}
    key_env: OPENAI_API_KEY
    price_provider: openai
  tls-mismatch:
    kind: anthropic
    base_url: https://127.0.0.1:{tls_port}
    key_env: ANTHROPIC_API_KEY
    hosts: [tls-mismatch.invalid]
  wrong-key:
    kind: openai-compatible
    base_url: http://127.0.0.1:{fake_port}
    key_env: TH_WRONG_OPENAI_KEY
    price_provider: openai
  reset:
    kind: anthropic
    base_url: http://127.0.0.1:{reset_port}
    key_env: ANTHROPIC_API_KEY
    hosts: [reset.invalid]
  slow-anthropic:
    kind: anthropic
    base_url: http://127.0.0.1:{slow_port}
    key_env: ANTHROPIC_API_KEY
    hosts: [slow-anthropic.invalid]
"""
    routes = f"""
fallbacks:
  backoff_initial: 0.01
  backoff_max: 0.05
  retry_after_max: 1.5
  breaker_failures: 1000
routes:
  claude-to-gpt:
    match: {{provider: anthropic, model: {CLAUDE}}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: anthropic, model: {CLAUDE}}}
      - {{provider: openai, model: {GPT}}}
  mini-to-haiku:
    match: {{provider: openai, model: gpt-4o-mini}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: openai, model: gpt-4o-mini}}
      - {{provider: anthropic, model: claude-haiku-4-5}}
  same-provider:
    match: {{provider: openai, model: gpt-4.1-mini}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: openai, model: gpt-4.1-mini}}
      - {{provider: openai, model: gpt-4.1}}
  dead-first:
    match: {{provider: openai, model: gpt-4.1-nano}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: dead, model: gpt-4.1-nano}}
      - {{provider: openai, model: gpt-4.1-nano}}
  tls-first:
    match: {{provider: anthropic, model: claude-haiku-4-5}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: tls-mismatch, model: claude-haiku-4-5}}
      - {{provider: anthropic, model: claude-haiku-4-5}}
  slow-first:
    match: {{provider: openai, model: gpt-4o-2024-08-06}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: openai, model: gpt-4o-2024-08-06, request_timeout: 300}}
      - {{provider: openai, model: gpt-4o}}
  retry-then-fallback:
    match: {{provider: openai, model: gpt-4o-2024-11-20}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: openai, model: gpt-4o-2024-11-20, retry: {{attempts: 2}}}}
      - {{provider: openai, model: gpt-4o}}
  listed-404:
    match: {{provider: openai, model: gpt-4-turbo}}
    strategy: {{mode: fallback, on_status_codes: [404, 503]}}
    targets:
      - {{provider: openai, model: gpt-4-turbo}}
      - {{provider: openai, model: gpt-4o}}
  seed-example:
    strategy: {{mode: fallback}}
    targets:
      - {{provider: anthropic, override_params: {{model: {CLAUDE}}}}}
      - {{provider: openai, override_params: {{model: {GPT}}}}}
"""
    text = rules_text(fake_port, routes=routes)
    return text.replace("providers:\n", "providers:\n" + extra_providers, 1)


@pytest.fixture(scope="module")
def fgw(fake, tls_server, slow_fake, reset_server, tmp_path_factory):
    rules = fallback_rules(fake.port, tls_server.port, slow_fake.port, reset_server.port)
    env = {**GATEWAY_ENV, "TH_WRONG_OPENAI_KEY": WRONG_KEY}
    process = start_gateway(tmp_path_factory.mktemp("fallbacks"), rules, env)
    yield process
    process.stop()


@pytest.fixture
def via_proxy(fgw, monkeypatch):
    return use_gateway(fgw, monkeypatch)



# gpt-4o at $2.50 input and $10.00 output per million tokens (genai-prices 0.2.3); claude-sonnet-4 at
# $3.00 and $15.00; claude-haiku-4-5 at $1.00 and $5.00.
def cost(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    rates = {
        GPT: (Decimal("2.50"), Decimal("10.00")),
        "gpt-4.1": (Decimal("2.00"), Decimal("8.00")),
        "gpt-4.1-nano": (Decimal("0.10"), Decimal("0.40")),
        CLAUDE: (Decimal("3.00"), Decimal("15.00")),
        "claude-haiku-4-5": (Decimal("1.00"), Decimal("5.00")),
    }
    rate_in, rate_out = rates[model]
    return (rate_in * input_tokens + rate_out * output_tokens) / Decimal(1_000_000)


def attempts_of(row: dict) -> list[tuple]:
    return [(a["option"], a["provider"], a["model"], a["status"], a["sent"]) for a in json.loads(row["attempts"])]


def fault(value: str) -> dict[str, str]:
    return {"x-fault": value}


# -- forward proxy, Anthropic SDK, fallback to OpenAI --------------------------------------------


def test_529_falls_back_cross_provider(via_proxy):
    raw = anthropic_client().messages.with_raw_response.create(
        model=CLAUDE, max_tokens=50, messages=MESSAGES,
        extra_headers={**fault(f"status:529, model:{CLAUDE}"), "x-fake-text": "from%20gpt"},
    )
    message = raw.parse()

    assert message.type == "message"
    assert message.content[0].text == "from gpt"
    assert raw.headers["x-tollhouse-attempts"] == "2"
    assert raw.headers["x-tollhouse-served-by"] == "config.targets[1]"
    assert raw.headers["x-portkey-last-used-option-index"] == "config.targets[1]"
    assert raw.headers["x-portkey-retry-attempt-count"] == "0"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    assert attempts_of(row) == [
        ("config.targets[0]", "anthropic", CLAUDE, 529, True),
        ("config.targets[1]", "openai", GPT, 200, True),
    ]
    assert row["route"] == "claude-to-gpt"
    assert row["served_by"] == "config.targets[1]"
    assert row["attempt_count"] == 2
    assert (row["provider"], row["model"], row["status"], row["error"]) == ("openai", GPT, 200, None)
    assert (row["input_tokens"], row["output_tokens"]) == (message.usage.input_tokens, message.usage.output_tokens)
    assert row["cost_usd"] == cost(GPT, row["input_tokens"], row["output_tokens"])
    assert row["price_flag"] == "priced"


def test_529_stream_falls_back_cross_provider(via_proxy):
    client = anthropic_client()
    with client.messages.stream(
        model=CLAUDE, max_tokens=50, messages=MESSAGES,
        extra_headers={**fault(f"status:529, model:{CLAUDE}"), "x-fake-text": "streamed%20by%20gpt"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-tollhouse-request-id"]
        attempts = stream.response.headers["x-tollhouse-attempts"]

    assert text == "streamed by gpt"
    assert final.stop_reason == "end_turn"
    assert attempts == "2"
    row = via_proxy.wait_row(request_id)
    assert attempts_of(row)[1] == ("config.targets[1]", "openai", GPT, 200, True)
    assert row["stream"] is True
    assert (row["input_tokens"], row["output_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)
    assert row["cost_usd"] == cost(GPT, row["input_tokens"], row["output_tokens"])
    assert row["error"] is None


def test_overloaded_event_before_content_falls_back(via_proxy):
    client = anthropic_client()
    with client.messages.stream(
        model=CLAUDE, max_tokens=50, messages=MESSAGES,
        extra_headers={**fault(f"early-error, model:{CLAUDE}"), "x-fake-text": "rescued"},
    ) as stream:
        text = "".join(stream.text_stream)
        request_id = stream.response.headers["x-tollhouse-request-id"]

    assert text == "rescued"
    row = via_proxy.wait_row(request_id)
    attempts = json.loads(row["attempts"])
    assert [a["status"] for a in attempts] == [200, 200]
    assert attempts[0]["error"] == "error event before any content: overloaded_error: Overloaded"
    assert row["served_by"] == "config.targets[1]"
    assert row["error"] is None
    assert row["cost_usd"] == cost(GPT, row["input_tokens"], row["output_tokens"])


def test_error_after_content_is_not_retried(via_proxy):
    client = anthropic_client()
    with pytest.raises(anthropic.APIStatusError) as raised:
        with client.messages.stream(
            model=CLAUDE, max_tokens=50, messages=MESSAGES,
            extra_headers={**fault(f"midstream-error, model:{CLAUDE}"), "x-fake-text": "one%20two%20three%20four"},
        ) as stream:
            for _ in stream.text_stream:
                pass
    assert "Overloaded" in str(raised.value)
    row = via_proxy.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert row["error"] == "upstream error event in the stream: overloaded_error: Overloaded"
    assert attempts_of(row) == [("config.targets[0]", "anthropic", CLAUDE, 200, True)]
    assert row["served_by"] == "config.targets[0]"


def test_cut_stream_ends_with_error_event(via_proxy):
    client = anthropic_client()
    received = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        with client.messages.stream(
            model=CLAUDE, max_tokens=50, messages=MESSAGES,
            extra_headers={**fault(f"cut, model:{CLAUDE}"), "x-fake-text": "word%20" * 40},
        ) as stream:
            for piece in stream.text_stream:
                received.append(piece)
    assert received, "content arrived before the cut"
    assert "ended before the response was complete" in str(raised.value)
    row = via_proxy.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert row["error"].startswith("upstream stream broke after content was sent: ")
    assert row["attempt_count"] == 1
    assert row["served_by"] == "config.targets[0]"
    assert row["price_flag"] == "partial"


# -- forward proxy, OpenAI SDK --------------------------------------------------------------------


def test_openai_503_falls_back_to_anthropic(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES,
        extra_headers={**fault("status:503, model:gpt-4o-mini"), "x-fake-text": "haiku%20here"},
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "haiku here"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    assert attempts_of(row) == [
        ("config.targets[0]", "openai", "gpt-4o-mini", 503, True),
        ("config.targets[1]", "anthropic", "claude-haiku-4-5", 200, True),
    ]
    assert row["cost_usd"] == cost("claude-haiku-4-5", row["input_tokens"], row["output_tokens"])


def test_openai_stream_500_same_provider(via_proxy):
    stream = openai_client().chat.completions.create(
        model="gpt-4.1-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={**fault("status:500, model:gpt-4.1-mini"), "x-fake-text": "second%20model"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "second model"
    usage = chunks[-1].usage
    row = via_proxy.wait_row(stream.response.headers["x-tollhouse-request-id"])
    rows = [row]
    assert attempts_of(rows[0]) == [
        ("config.targets[0]", "openai", "gpt-4.1-mini", 500, True),
        ("config.targets[1]", "openai", "gpt-4.1", 200, True),
    ]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert rows[0]["cost_usd"] == cost("gpt-4.1", usage.prompt_tokens, usage.completion_tokens)


def test_connection_refused_falls_back(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(model="gpt-4.1-nano", messages=MESSAGES)
    assert raw.parse().choices[0].message.role == "assistant"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert (attempts[0]["provider"], attempts[0]["status"]) == ("dead", None)
    assert re.fullmatch(
        r"provider 'dead': connection to 127\.0\.0\.1:(\d+) failed: "
        r"Connect call failed \('127\.0\.0\.1', \1\)",
        attempts[0]["error"],
    )
    assert (attempts[1]["provider"], attempts[1]["status"]) == ("openai", 200)
    assert row["cost_usd"] == cost("gpt-4.1-nano", row["input_tokens"], row["output_tokens"])


def test_tls_failure_falls_back(via_proxy):
    raw = anthropic_client().messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=20, messages=MESSAGES)
    assert raw.parse().type == "message"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert (attempts[0]["provider"], attempts[0]["status"]) == ("tls-mismatch", None)
    assert "CERTIFICATE_VERIFY_FAILED" in attempts[0]["error"]
    assert (attempts[1]["provider"], attempts[1]["status"]) == ("anthropic", 200)


def test_first_byte_timeout_falls_back(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(
        model="gpt-4o-2024-08-06", messages=MESSAGES, extra_headers=fault("slow:3, model:gpt-4o-2024-08-06"),
    )
    assert raw.parse().model.startswith("gpt-4o")
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert attempts[0]["error"] == "no first byte from provider 'openai' within 0.3 s (request_timeout)"
    assert attempts[0]["status"] is None
    assert (attempts[1]["model"], attempts[1]["status"]) == (GPT, 200)


def test_retries_then_succeeds(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(
        model="gpt-4o-2024-11-20", messages=MESSAGES,
        extra_headers=fault("status:429, retry-after:0.2, times:2, model:gpt-4o-2024-11-20"),
    )
    assert raw.parse().choices[0].message.role == "assistant"
    assert raw.headers["x-tollhouse-attempts"] == "3"
    assert raw.headers["x-portkey-retry-attempt-count"] == "2"
    assert raw.headers["x-portkey-last-used-option-index"] == "config.targets[0]"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    assert [a["status"] for a in json.loads(row["attempts"])] == [429, 429, 200]
    assert {a["option"] for a in json.loads(row["attempts"])} == {"config.targets[0]"}
    # The waits honour Retry-After: the backoff alone (at most 0.05 s here) is shorter.
    waits = [line for line in via_proxy.stderr().splitlines() if row["request_id"] in line and "retrying" in line]
    assert len(waits) == 2
    assert all(" in 0.20 s " in line for line in waits)


def test_retry_after_over_cap_falls_back(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(
        model="gpt-4o-2024-11-20", messages=MESSAGES,
        extra_headers=fault("status:429, retry-after:5, model:gpt-4o-2024-11-20"),
    )
    assert raw.parse().choices[0].message.role == "assistant"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    assert [(a["option"], a["status"]) for a in json.loads(row["attempts"])] == [
        ("config.targets[0]", 429),
        ("config.targets[1]", 200),
    ]
    assert any(row["request_id"] in line and "exceeds fallbacks.retry_after_max" in line for line in via_proxy.stderr().splitlines())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_do_not_fall_back(via_proxy, status):
    with pytest.raises(anthropic.APIStatusError) as raised:
        anthropic_client().messages.create(
            model=CLAUDE, max_tokens=20, messages=MESSAGES, extra_headers=fault(f"status:{status}, model:{CLAUDE}"),
        )
    assert raised.value.status_code == status
    body = raised.value.response.json()
    assert body["type"] == "error"
    assert raised.value.response.headers["x-tollhouse-attempts"] == "1"
    row = via_proxy.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert attempts_of(row) == [("config.targets[0]", "anthropic", CLAUDE, status, True)]
    assert row["cost_usd"] == Decimal(0)


def test_listed_status_falls_back(via_proxy):
    raw = openai_client().chat.completions.with_raw_response.create(
        model="gpt-4-turbo", messages=MESSAGES, extra_headers=fault("status:404, model:gpt-4-turbo"),
    )
    assert raw.parse().choices[0].message.role == "assistant"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    assert [a["status"] for a in json.loads(row["attempts"])] == [404, 200]


def test_every_target_fails(via_proxy):
    with pytest.raises(anthropic.APIStatusError) as raised:
        anthropic_client().messages.create(model=CLAUDE, max_tokens=20, messages=MESSAGES, extra_headers=fault("status:503"))
    assert raised.value.status_code == 503
    body = raised.value.response.json()
    assert body["type"] == "error"
    # The last target's 503 reaches the Anthropic client translated to Anthropic's error type.
    assert body["error"]["type"] == "overloaded_error"
    row = via_proxy.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert [(a["provider"], a["status"]) for a in json.loads(row["attempts"])] == [("anthropic", 503), ("openai", 503)]
    assert row["status"] == 503
    assert row["cost_usd"] == Decimal(0)


# -- base-URL listener -------------------------------------------------------------------------------


SEED_CONFIG = json.dumps({
    "strategy": {"mode": "fallback"},
    "targets": [
        {"provider": "anthropic", "override_params": {"model": CLAUDE}},
        {"provider": "openai", "override_params": {"model": GPT}},
    ],
})


@pytest.mark.parametrize("config", [SEED_CONFIG, "seed-example"], ids=["header-json", "route-name"])
def test_base_url_seed_example(fgw, config):
    client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{fgw.base_url}/v1", max_retries=0, timeout=20.0)
    raw = client.chat.completions.with_raw_response.create(
        model="anything", messages=MESSAGES,
        extra_headers={"x-portkey-config": config, **fault(f"status:529, model:{CLAUDE}"), "x-fake-text": "ok"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "ok"
    assert raw.headers["x-portkey-last-used-option-index"] == "config.targets[1]"
    assert raw.headers["x-portkey-provider"] == "openai"
    row = fgw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert attempts_of(row) == [
        ("config.targets[0]", "anthropic", CLAUDE, 529, True),
        ("config.targets[1]", "openai", GPT, 200, True),
    ]
    assert row["route"] == ("x-portkey-config" if config.startswith("{") else "seed-example")
    assert row["listener"] == "base_url"


def test_base_url_anthropic_stream_falls_back(fgw):
    client = anthropic.Anthropic(api_key=ALPHA_KEY, base_url=fgw.base_url, max_retries=0, timeout=20.0)
    with client.messages.stream(
        model="anything", max_tokens=50, messages=MESSAGES,
        extra_headers={"x-portkey-config": SEED_CONFIG, **fault(f"early-error, model:{CLAUDE}"), "x-fake-text": "via%20gpt"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-tollhouse-request-id"]
    assert text == "via gpt"
    row = fgw.wait_row(request_id)
    assert row["served_by"] == "config.targets[1]"
    assert row["cost_usd"] == cost(GPT, final.usage.input_tokens, final.usage.output_tokens)


def test_base_url_bad_config_is_400(fgw):
    client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{fgw.base_url}/v1", max_retries=0, timeout=20.0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="x", messages=MESSAGES,
            extra_headers={"x-portkey-config": json.dumps({"strategy": {"mode": "sometimes"}, "targets": [{"provider": "openai"}]})},
        )
    assert raised.value.body["message"] == (
        "tollhouse: x-portkey-config: config.strategy.mode must be one of fallback, loadbalance, single, got 'sometimes'."
    )


def test_upstream_connections_are_reused(fgw, fake):
    fake.clear()
    for _ in range(4):
        client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{fgw.base_url}/v1", max_retries=0, timeout=20.0)
        client.chat.completions.create(
            model="x", messages=MESSAGES,
            extra_headers={"x-portkey-config": SEED_CONFIG, **fault(f"status:529, model:{CLAUDE}")},
        )
        client.close()
    connections = {request.connection_id for request in fake.received}
    assert len(fake.received) == 8
    assert len(connections) < 8


# -- circuit breaker, load balancing and metrics on a gateway of their own ---------------------------


def breaker_rules(fake_port: int) -> str:
    routes = f"""
fallbacks:
  backoff_initial: 0.01
  breaker_failures: 2
  breaker_cooldown: 600
routes:
  guarded:
    match: {{provider: openai, model: gpt-4o-mini}}
    strategy: {{mode: fallback}}
    targets:
      - {{provider: openai, model: gpt-4o-mini}}
      - {{provider: openai, model: {GPT}}}
  balanced:
    match: {{provider: openai, model: gpt-4.1}}
    strategy: {{mode: loadbalance}}
    targets:
      - {{provider: openai, model: gpt-4.1, weight: 1}}
      - {{provider: anthropic, model: claude-haiku-4-5, weight: 1}}
      - {{provider: anthropic, model: {CLAUDE}, weight: 0}}
"""
    return rules_text(fake_port, routes=routes)


@pytest.fixture(scope="module")
def bgw(fake, tmp_path_factory):
    process = start_gateway(tmp_path_factory.mktemp("breaker"), breaker_rules(fake.port), GATEWAY_ENV)
    yield process
    process.stop()


def metric_samples(gateway) -> dict[tuple[str, tuple], float]:
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx2.get(f"http://127.0.0.1:{gateway.admin_port}/metrics", timeout=10.0, trust_env=False)
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_breaker_skips_failing_target(bgw, monkeypatch):
    use_gateway(bgw, monkeypatch)
    client = openai_client()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=fault("status:503, model:gpt-4o-mini"),
        )
        row = bgw.wait_row(raw.headers["x-tollhouse-request-id"])
        assert [(a["model"], a["status"]) for a in json.loads(row["attempts"])] == [("gpt-4o-mini", 503), (GPT, 200)]

    # Two failures in a row opened the breaker: the next call, which would succeed, skips the target.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-tollhouse-attempts"] == "1"
    assert raw.headers["x-tollhouse-served-by"] == "config.targets[1]"
    row = bgw.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert (attempts[0]["model"], attempts[0]["sent"], attempts[0]["status"]) == ("gpt-4o-mini", False, None)
    assert attempts[0]["error"].startswith("circuit breaker open for route:guarded openai/gpt-4o-mini; next probe in ")
    assert (attempts[1]["model"], attempts[1]["status"]) == (GPT, 200)
    assert row["attempt_count"] == 1

    log = bgw.stderr()
    first = bgw.rows("route = 'guarded'")[0]["request_id"]
    assert f"call {first}: falling back to config.targets[1] after status 503" in log
    assert f"call {row['request_id']}: skipped openai/gpt-4o-mini (config.targets[0]): circuit breaker open" in log

    found = metric_samples(bgw)
    assert found[("tollhouse_fallbacks_total", (("project", "alpha"),))] == 3
    assert ("tollhouse_retries_total", (("project", "alpha"),)) not in found


def test_loadbalance_uses_weighted_targets(bgw, monkeypatch):
    use_gateway(bgw, monkeypatch)
    client = openai_client()
    served = []
    for _ in range(24):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-text": "lb"})
        assert raw.parse().choices[0].message.content == "lb"
        assert raw.headers["x-tollhouse-attempts"] == "1"
        served.append(raw.headers["x-tollhouse-served-by"])
    # Both weight-1 targets serve some calls (all 24 on one has probability 2 * 0.5**24); weight 0 none.
    assert set(served) == {"config.targets[0]", "config.targets[1]"}


def test_cut_json_answer_falls_back(via_proxy):
    raw = anthropic_client().messages.with_raw_response.create(
        model=CLAUDE, max_tokens=50, messages=MESSAGES,
        extra_headers={**fault(f"cut, model:{CLAUDE}"), "x-fake-text": "whole"},
    )
    assert raw.parse().content[0].text == "whole"
    row = via_proxy.wait_row(raw.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert attempts[0]["status"] is None
    assert "peer closed connection without sending complete message body" in attempts[0]["error"]
    assert (attempts[1]["provider"], attempts[1]["status"]) == ("openai", 200)


def test_translated_cut_stream_ends_with_openai_error(fgw):
    client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{fgw.base_url}/v1", max_retries=0, timeout=20.0)
    stream = client.chat.completions.create(
        model="x", messages=MESSAGES, stream=True,
        extra_headers={"x-portkey-config": SEED_CONFIG, **fault(f"cut, model:{CLAUDE}"), "x-fake-text": "word%20" * 40},
    )
    pieces = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert pieces, "content arrived before the cut"
    assert "ended before the response was complete" in str(raised.value)
    row = fgw.wait_row(stream.response.headers["x-tollhouse-request-id"])
    assert row["error"].startswith("upstream stream broke after content was sent: ")
    assert row["served_by"] == "config.targets[0]"


def test_client_leaving_relayed_stream_is_logged(fgw, slow_fake):
    import httpx2

    body = {"model": CLAUDE, "max_tokens": 50, "stream": True, "messages": MESSAGES}
    # A retry makes the call go through the relay; the slow fake pauses 50 ms between writes.
    config = json.dumps({"provider": "slow-anthropic", "retry": {"attempts": 1}})
    headers = {
        "x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01", "x-portkey-config": config,
        "x-fake-text": "word%20" * 200,
    }
    with httpx2.Client(trust_env=False, timeout=20.0) as client:
        with client.stream("POST", f"{fgw.base_url}/v1/messages", json=body, headers=headers) as response:
            request_id = response.headers["x-tollhouse-request-id"]
            next(response.iter_bytes())
    row = fgw.wait_row(request_id)
    assert row["status"] == 200
    assert row["error"].startswith("stream ended early")
    assert row["price_flag"] == "partial"
    assert row["served_by"] == "config"


# -- every trigger and non-trigger, in both listener modes, streamed and not ---------------------------

# (name, first target, x-fault for the first target's model): each first target fails in its own way.
TRIGGERS = [
    ("429", {"provider": "anthropic", "model": CLAUDE}, f"status:429, model:{CLAUDE}"),
    ("500", {"provider": "anthropic", "model": CLAUDE}, f"status:500, model:{CLAUDE}"),
    ("503", {"provider": "anthropic", "model": CLAUDE}, f"status:503, model:{CLAUDE}"),
    ("529", {"provider": "anthropic", "model": CLAUDE}, f"status:529, model:{CLAUDE}"),
    ("refused", {"provider": "dead", "model": "gpt-4.1-nano"}, None),
    ("tls", {"provider": "tls-mismatch", "model": CLAUDE}, None),
    ("timeout", {"provider": "anthropic", "model": CLAUDE, "request_timeout": 300}, f"slow:3, model:{CLAUDE}"),
    ("reset", {"provider": "reset", "model": CLAUDE}, None),
    ("early-error", {"provider": "anthropic", "model": CLAUDE}, f"early-error, model:{CLAUDE}"),
]
# The second target: the same provider as the client (same) or the other one (cross).
SECOND_TARGETS = {
    "openai": {"same": {"provider": "openai", "model": GPT}, "cross": {"provider": "anthropic", "model": "claude-haiku-4-5"}},
    "anthropic": {"same": {"provider": "anthropic", "model": "claude-haiku-4-5"}, "cross": {"provider": "openai", "model": GPT}},
}


def call_through(gw, listener: str, client_format: str, stream: bool, headers: dict[str, str], monkeypatch):
    """Make one call with the official SDK; return (text, response headers)."""
    if listener == "proxy":
        use_gateway(gw, monkeypatch)
        kwargs = {}
    else:
        for name in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        kwargs = {"base_url": f"{gw.base_url}/v1" if client_format == "openai" else gw.base_url}
    if client_format == "openai":
        client = openai_client(**kwargs)
        if stream:
            response = client.chat.completions.create(model=CLAUDE, messages=MESSAGES, stream=True, extra_headers=headers)
            text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
            return text, response.response.headers
        raw = client.chat.completions.with_raw_response.create(model=CLAUDE, messages=MESSAGES, extra_headers=headers)
        return raw.parse().choices[0].message.content, raw.headers
    client = anthropic_client(**kwargs)
    if stream:
        with client.messages.stream(model=CLAUDE, max_tokens=50, messages=MESSAGES, extra_headers=headers) as response:
            return "".join(response.text_stream), response.response.headers
    raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=50, messages=MESSAGES, extra_headers=headers)
    return raw.parse().content[0].text, raw.headers


@pytest.mark.parametrize("listener", ["proxy", "base_url"])
@pytest.mark.parametrize("client_format", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("trigger", TRIGGERS, ids=[t[0] for t in TRIGGERS])
def test_trigger_matrix(fgw, monkeypatch, listener, client_format, stream, trigger):
    name, first, first_fault = trigger
    if name == "early-error" and not stream:
        pytest.skip("an error event before content exists only in a stream")
    kind = "same" if (listener, client_format) in (("proxy", "openai"), ("base_url", "anthropic")) else "cross"
    second = SECOND_TARGETS[client_format][kind]
    config = {"strategy": {"mode": "fallback"}, "targets": [first, second]}
    headers = {"x-portkey-config": json.dumps(config), "x-fake-text": f"served%20after%20{name}"}
    if first_fault:
        headers["x-fault"] = first_fault

    text, response_headers = call_through(fgw, listener, client_format, stream, headers, monkeypatch)

    assert text == f"served after {name}"
    assert response_headers["x-tollhouse-attempts"] == "2"
    assert response_headers["x-portkey-last-used-option-index"] == "config.targets[1]"
    row = fgw.wait_row(response_headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert [a["provider"] for a in attempts] == [first["provider"], second["provider"]]
    assert attempts[1]["status"] == 200
    expected_first_status = {"429": 429, "500": 500, "503": 503, "529": 529, "early-error": 200}.get(name)
    assert attempts[0]["status"] == expected_first_status
    assert (row["status"], row["error"], row["stream"], row["listener"]) == (200, None, stream, listener)
    assert (row["provider"], row["model"]) == (second["provider"], second["model"])
    assert row["cost_usd"] == cost(second["model"], row["input_tokens"], row["output_tokens"])
    assert row["cost_usd"] > 0


@pytest.mark.parametrize("listener", ["proxy", "base_url"])
@pytest.mark.parametrize("client_format", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_non_trigger_matrix(fgw, monkeypatch, listener, client_format, stream, status):
    config = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "anthropic", "model": CLAUDE}, {"provider": "openai", "model": GPT}]}
    headers = {"x-portkey-config": json.dumps(config), "x-fault": f"status:{status}, model:{CLAUDE}"}
    error_type = openai.APIStatusError if client_format == "openai" else anthropic.APIStatusError

    with pytest.raises(error_type) as raised:
        call_through(fgw, listener, client_format, stream, headers, monkeypatch)

    assert raised.value.status_code == status
    response = raised.value.response
    body = response.json()
    if client_format == "openai":
        assert set(body["error"]) >= {"message", "type"}
    else:
        assert body["type"] == "error"
    assert response.headers["x-tollhouse-attempts"] == "1"
    row = fgw.wait_row(response.headers["x-tollhouse-request-id"])
    assert [(a["provider"], a["status"]) for a in json.loads(row["attempts"])] == [("anthropic", status)]
    assert (row["status"], row["cost_usd"], row["price_flag"]) == (status, Decimal(0), "not_billed")


def test_sigterm_finishes_relayed_stream(tmp_path, monkeypatch, slow_fake):
    import signal

    rules = rules_text(slow_fake.port, routes=f"""
routes:
  retried:
    match: {{provider: anthropic, model: {CLAUDE}}}
    retry: {{attempts: 1}}
    provider: anthropic
""")
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        stream = anthropic_client().messages.create(
            model=CLAUDE, max_tokens=500, messages=MESSAGES, stream=True,
            extra_headers={**fault(f"status:529, times:1, model:{CLAUDE}"), "x-fake-text": "word%20" * 30},
        )
        request_id = stream.response.headers["x-tollhouse-request-id"]
        events = []
        for event in stream:
            events.append(event)
            if len(events) == 1:
                gateway.process.send_signal(signal.SIGTERM)
        exit_code = gateway.process.wait(timeout=30)
    finally:
        if gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)

    assert exit_code == 0
    assert events[-1].type == "message_stop"
    text = "".join(event.delta.text for event in events if event.type == "content_block_delta")
    assert text == "word " * 30
    from addons.logstore import connect_readonly

    with connect_readonly(gateway.database, timeout=10.0) as con:
        status, error, attempts = con.execute(
            "SELECT status, error, attempts FROM requests WHERE request_id = ?", [request_id]
        ).fetchone()
    assert (status, error) == (200, None)
    assert [a["status"] for a in json.loads(attempts)] == [529, 200]


# -- what an impatient client, a slow stream, a bad answer and shared state must not break -----------


class BadAnswerServer:
    """A loopback server answering 200 with an HTML page, or for a stream request with an empty stream."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        data += connection.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                    while len(body) < length:
                        body += connection.recv(65536)
                except (OSError, AttributeError):
                    continue
                self.requests += 1
                if b"done-only" in body:
                    events = b"data: [DONE]\n\n"
                    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(events), events)
                elif b'"stream":true' in body.replace(b" ", b""):
                    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\n\r\n"
                else:
                    page = b"<html><body>maintenance</body></html>"
                    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s" % (len(page), page)
                connection.sendall(reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def bad_answer_server():
    server = BadAnswerServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cgw(fake, bad_answer_server, slow_fake, tmp_path_factory):
    """A gateway with the response cache on, a provider that answers garbage and a slow one."""
    extra = f"""\
  garbage:
    kind: openai-compatible
    base_url: http://127.0.0.1:{bad_answer_server.port}
    key_env: OPENAI_API_KEY
    price_provider: openai
  slow-openai:
    kind: openai-compatible
    base_url: http://127.0.0.1:{slow_fake.port}
    key_env: OPENAI_API_KEY
    price_provider: openai
"""
    policy = """
fallbacks:
  backoff_initial: 0.01
  retry_after_max: 30
cache:
  enabled: true
"""
    rules = rules_text(fake.port, cache=policy).replace("providers:\n", "providers:\n" + extra, 1)
    process = start_gateway(tmp_path_factory.mktemp("careful"), rules, GATEWAY_ENV)
    yield process
    process.stop()


def base_url_openai(gw):
    return openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{gw.base_url}/v1", max_retries=0, timeout=20.0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_garbage_answer_falls_back(cgw, stream):
    config = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "garbage"}, {"provider": "openai"}]})
    headers = {"x-portkey-config": config, "x-fake-text": "real%20answer", "cache-control": "no-store"}
    client = base_url_openai(cgw)
    if stream:
        response = client.chat.completions.create(model=GPT, messages=MESSAGES, stream=True, extra_headers=headers)
        text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        response_headers = response.response.headers
    else:
        raw = client.chat.completions.with_raw_response.create(model=GPT, messages=MESSAGES, extra_headers=headers)
        text, response_headers = raw.parse().choices[0].message.content, raw.headers
    assert text == "real answer"
    row = cgw.wait_row(response_headers["x-tollhouse-request-id"])
    first = json.loads(row["attempts"])[0]
    assert (first["provider"], first["status"]) == ("garbage", None)
    if stream:
        assert first["error"] == "provider 'garbage' ended its stream without any content"
    else:
        assert first["error"] == "provider 'garbage' answered 200 with a body that is not a JSON object (37 bytes)"


def test_request_timeout_covers_first_content(cgw):
    # The slow fake pauses 50 ms between writes, so its first content event comes after the first
    # bytes but well after 150 ms.
    config = json.dumps({
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "slow-openai", "request_timeout": 150}, {"provider": "openai"}],
    })
    response = base_url_openai(cgw).chat.completions.create(
        model=GPT, messages=MESSAGES, stream=True,
        extra_headers={"x-portkey-config": config, "x-fake-text": "word%20" * 5, "cache-control": "no-store"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
    assert text == "word " * 5
    row = cgw.wait_row(response.response.headers["x-tollhouse-request-id"])
    first = json.loads(row["attempts"])[0]
    assert first["error"] == "no content from provider 'slow-openai' within 0.15 s (request_timeout)"
    assert row["served_by"] == "config.targets[1]"


def test_client_leaving_stops_retries(cgw, fake):
    marker = uuid.uuid4().hex
    config = json.dumps({"provider": "openai", "retry": {"attempts": 3}})
    client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{cgw.base_url}/v1", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model=GPT, messages=[{"role": "user", "content": marker}],
            extra_headers={"x-portkey-config": config, "x-fault": "status:429, retry-after:2", "cache-control": "no-store"},
        )
    rows = wait_rows(cgw, "route = 'x-portkey-config' AND error LIKE '%Client disconnected%'")
    row = rows[-1]
    assert [(a["status"], a["sent"]) for a in json.loads(row["attempts"])] == [(429, True)]
    # The relay stopped when the client left: upstream got the first request and no retry.
    time.sleep(2.5)
    assert sum(1 for request in fake.received if marker.encode() in request.body) == 1
    assert f"call {row['request_id']}: the client went away; stopped trying targets after 1 finished attempt(s)" in cgw.stderr()


def wait_rows(gw, where: str, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = gw.rows(where)
        if rows:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"no row where {where} after {timeout} s")


def test_count_tokens_keeps_upstream_error(cgw):
    config = json.dumps({
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "anthropic", "model": CLAUDE}, {"provider": "openai", "model": GPT}],
    })
    client = anthropic.Anthropic(api_key=ALPHA_KEY, base_url=cgw.base_url, max_retries=0, timeout=20.0)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.count_tokens(
            model=CLAUDE, messages=MESSAGES,
            extra_headers={"x-portkey-config": config, "x-fault": f"status:529, model:{CLAUDE}"},
        )
    # The OpenAI target cannot count Anthropic tokens; the client gets Anthropic's own 529, not a 400.
    assert raised.value.status_code == 529
    assert raised.value.response.json()["error"]["type"] == "overloaded_error"
    row = cgw.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    attempts = json.loads(row["attempts"])
    assert [(a["provider"], a["status"], a["sent"]) for a in attempts] == [("anthropic", 529, True), ("openai", 400, False)]
    assert (row["provider"], row["served_by"], row["status"]) == ("anthropic", "config.targets[0]", 529)


def test_cache_key_includes_routing_config(cgw):
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": marker}]
    config_a = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "anthropic", "model": CLAUDE}, {"provider": "openai", "model": GPT}]})
    config_b = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "anthropic", "model": "claude-haiku-4-5"}, {"provider": "openai", "model": "gpt-4.1"}]})
    client = base_url_openai(cgw)

    def call(config: str):
        raw = client.chat.completions.with_raw_response.create(
            model="x", messages=messages, extra_headers={"x-portkey-config": config, "x-fault": "status:529, kind:anthropic"},
        )
        return raw.parse(), raw.headers

    first, first_headers = call(config_a)
    other, other_headers = call(config_b)
    again, again_headers = call(config_a)

    assert first_headers["x-tollhouse-cache"] == "MISS"
    assert first.model.startswith(GPT)
    assert other_headers["x-tollhouse-cache"] == "MISS"
    assert other.model.startswith("gpt-4.1")
    assert again_headers["x-tollhouse-cache"] == "HIT"
    assert again.model == first.model
    # A hit was not routed at all: no attempt headers are replayed from the stored answer.
    assert "x-tollhouse-attempts" not in again_headers
    assert "x-tollhouse-served-by" not in again_headers


def test_deep_config_is_400(fgw):
    config: dict = {"provider": "openai"}
    for _ in range(600):
        config = {"strategy": {"mode": "fallback"}, "targets": [config]}
    with pytest.raises(openai.BadRequestError) as raised:
        base_url_openai(fgw).chat.completions.create(
            model=GPT, messages=MESSAGES, extra_headers={"x-portkey-config": json.dumps(config)},
        )
    assert raised.value.body["message"] == (
        "tollhouse: x-portkey-config: config.targets[0].targets[0].targets[0].targets[0].targets[0].targets[0]"
        ".targets[0].targets[0].targets[0] is nested too deeply; a config may nest targets at most 8 levels."
    )
    row = fgw.wait_row(raised.value.response.headers["x-tollhouse-request-id"])
    assert row["status"] == 400


def test_header_config_does_not_open_route_breaker():
    from addons.breaker import CircuitBreakers
    from addons.fallback import target_key
    from addons.rules import parse_rules
    from pathlib import Path

    rules = parse_rules(
        {"providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "K"}},
         "projects": {"alpha": {"key_env": "A"}}},
        base_dir=Path("/nonexistent"),
    )
    breakers = CircuitBreakers(failures=2, cooldown=30, clock=lambda: 0.0)
    openai_provider = rules.providers["openai"]
    own = target_key(openai_provider, GPT, "config:alpha:0123456789abcdef")
    shared = target_key(openai_provider, GPT, "route:guarded")
    breakers.record_failure(own)
    breakers.record_failure(own)
    assert breakers.is_open(own)
    assert not breakers.is_open(shared)
    assert breakers.acquire(shared)


def test_single_target_config_goes_direct(fgw):
    client = base_url_openai(fgw)
    raw = client.chat.completions.with_raw_response.create(
        model="x", messages=MESSAGES, extra_headers={"x-portkey-config": json.dumps({"provider": "openai", "model": GPT})},
    )
    assert raw.headers["x-portkey-last-used-option-index"] == "config"
    assert raw.headers["x-tollhouse-served-by"] == "config"
    assert raw.headers["x-tollhouse-attempts"] == "1"
    row = fgw.wait_row(raw.headers["x-tollhouse-request-id"])
    assert (row["served_by"], row["attempt_count"], row["attempts"], row["model"]) == ("config", 1, None, GPT)

    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model=GPT, messages=MESSAGES, extra_headers={"x-portkey-config": json.dumps({"provider": "dead"})},
        )
    assert raised.value.status_code == 502
    assert "x-portkey-last-used-option-index" not in raised.value.response.headers
    failed = wait_rows(fgw, "provider = 'dead' AND attempts IS NULL")[-1]
    assert (failed["status"], failed["served_by"]) == (502, None)


def test_sigterm_past_grace_ends_relayed_stream(tmp_path, monkeypatch, slow_fake):
    import signal

    rules = rules_text(slow_fake.port, routes=f"""
routes:
  retried:
    match: {{provider: anthropic, model: {CLAUDE}}}
    retry: {{attempts: 1}}
    provider: anthropic
""").replace("shutdown_grace: 20", "shutdown_grace: 1")
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        stream = anthropic_client().messages.create(
            model=CLAUDE, max_tokens=500, messages=MESSAGES, stream=True,
            extra_headers={"x-fake-text": "word%20" * 400},
        )
        request_id = stream.response.headers["x-tollhouse-request-id"]
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(anthropic.APIStatusError) as raised:
            for _ in stream:
                pass
        exit_code = gateway.process.wait(timeout=30)
    finally:
        if gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)

    assert exit_code == 0
    assert "The gateway is shutting down and ended the response early." in str(raised.value)
    from addons.logstore import connect_readonly

    with connect_readonly(gateway.database, timeout=10.0) as con:
        status, error, flag = con.execute(
            "SELECT status, error, price_flag FROM requests WHERE request_id = ?", [request_id]
        ).fetchone()
    assert (status, error, flag) == (200, "the gateway stopped before the stream ended", "partial")


def test_done_only_stream_falls_back(cgw):
    config = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "garbage"}, {"provider": "openai"}]})
    response = base_url_openai(cgw).chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": "done-only"}], stream=True,
        extra_headers={"x-portkey-config": config, "x-fake-text": "after%20done", "cache-control": "no-store"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in response if c.choices) == "after done"
    row = cgw.wait_row(response.response.headers["x-tollhouse-request-id"])
    assert json.loads(row["attempts"])[0]["error"] == "provider 'garbage' ended its stream without any content"


@pytest.mark.parametrize(
    "config",
    [
        {"provider": "anthropic", "model": "claude-haiku-4-5"},
        {"strategy": {"mode": "fallback"}, "targets": [{"provider": "garbage"}, {"provider": "anthropic", "model": "claude-haiku-4-5"}]},
    ],
    ids=["direct", "relayed"],
)
def test_cached_translated_answer_keeps_client_format(cgw, config):
    marker = uuid.uuid4().hex
    client = base_url_openai(cgw)
    headers = {"x-portkey-config": json.dumps(config), "x-fake-text": "cached%20text"}

    first = client.chat.completions.with_raw_response.create(model="x", messages=[{"role": "user", "content": marker}], extra_headers=headers)
    again = client.chat.completions.with_raw_response.create(model="x", messages=[{"role": "user", "content": marker}], extra_headers=headers)

    assert first.headers["x-tollhouse-cache"] == "MISS"
    assert again.headers["x-tollhouse-cache"] == "HIT"
    assert again.parse().object == "chat.completion"
    assert again.parse().choices[0].message.content == "cached text"
    assert json.loads(again.content) == json.loads(first.content)


def test_client_leaving_logs_attempt_in_flight(cgw):
    marker = uuid.uuid4().hex
    config = json.dumps({"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}, {"provider": "anthropic"}]})
    client = openai.OpenAI(api_key=ALPHA_KEY, base_url=f"{cgw.base_url}/v1", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model=GPT, messages=[{"role": "user", "content": marker}],
            extra_headers={"x-portkey-config": config, "x-fault": "slow:3", "cache-control": "no-store"},
        )
    row = wait_rows(cgw, "route = 'x-portkey-config' AND error LIKE '%Client disconnected%' AND attempts LIKE '%not finished%'")[-1]
    attempts = json.loads(row["attempts"])
    assert [(a["provider"], a["status"], a["error"], a["sent"]) for a in attempts] == [
        ("openai", None, "not finished: the client went away", True),
    ]
    assert row["attempt_count"] == 1


def test_sigterm_during_retry_wait_answers_503(tmp_path, monkeypatch):
    import signal

    from addons.testing.fake_upstream import FakeUpstream
    from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY

    fake = FakeUpstream(expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}).start_in_thread()
    rules = rules_text(fake.port, routes=f"""
fallbacks:
  retry_after_max: 30
routes:
  patient:
    match: {{provider: anthropic, model: {CLAUDE}}}
    retry: {{attempts: 2}}
    provider: anthropic
""").replace("shutdown_grace: 20", "shutdown_grace: 1")
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        client = anthropic_client()
        result: dict = {}

        def call() -> None:
            try:
                client.messages.create(model=CLAUDE, max_tokens=20, messages=MESSAGES, extra_headers=fault("status:429, retry-after:10"))
            except anthropic.APIStatusError as e:
                result["error"] = e

        worker = threading.Thread(target=call)
        worker.start()
        deadline = time.monotonic() + 10
        while "retrying anthropic" not in gateway.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.process.send_signal(signal.SIGTERM)
        worker.join(30)
        exit_code = gateway.process.wait(timeout=30)
    finally:
        if gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)
        fake.stop_thread()

    assert exit_code == 0
    error = result["error"]
    assert error.status_code == 503
    assert error.response.json()["type"] == "error"
    assert error.response.json()["error"]["message"] == (
        "tollhouse: the gateway is shutting down and stopped trying targets for this call; retry it."
    )
    assert error.response.headers["retry-after"] == "5"
    from addons.logstore import connect_readonly

    with connect_readonly(gateway.database, timeout=10.0) as con:
        status, row_error, attempts = con.execute(
            "SELECT status, error, attempts FROM requests WHERE request_id = ?", [error.response.headers["x-tollhouse-request-id"]]
        ).fetchone()
    assert (status, row_error) == (503, "the gateway stopped before any target answered")
    assert [a["status"] for a in json.loads(attempts)] == [429]


def test_responses_stream_early_error_falls_back(fgw):
    config = json.dumps({
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "openai", "model": "gpt-4.1-mini"}, {"provider": "openai", "model": GPT}],
    })
    client = base_url_openai(fgw)
    with client.responses.stream(
        model="x", input="hi",
        extra_headers={"x-portkey-config": config, "x-fault": "early-error, model:gpt-4.1-mini", "x-fake-text": "second"},
    ) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
    assert text == "second"
    row = wait_rows(fgw, "endpoint = 'responses' AND served_by = 'config.targets[1]'")[-1]
    first = json.loads(row["attempts"])[0]
    assert first["status"] == 200
    assert first["error"] == (
        "error event before any content: server_error: The server had an error while processing your request. "
        "Sorry about that!"
    )


def test_attempt_errors_never_store_keys(fgw):
    config = json.dumps({
        "strategy": {"mode": "fallback", "on_status_codes": [401]},
        "targets": [{"provider": "wrong-key", "model": GPT}, {"provider": "openai", "model": GPT}],
    })
    raw = base_url_openai(fgw).chat.completions.with_raw_response.create(
        model=GPT, messages=MESSAGES, extra_headers={"x-portkey-config": config},
    )
    assert raw.parse().choices[0].message.role == "assistant"
    row = fgw.wait_row(raw.headers["x-tollhouse-request-id"])
    first = json.loads(row["attempts"])[0]
    assert first["status"] == 401
    assert first["error"].startswith("Incorrect API key provided: ")
    assert WRONG_KEY not in row["attempts"]
    assert WRONG_KEY not in fgw.stderr()
