"""Project keys at the proxy: who may call, what upstream receives, and that real keys never leak.

Every call goes through a real `tollhouse run` process to the fake upstream on a loopback port.
"""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx2
import openai
import pytest

from conftest import (
    ALPHA_KEY,
    ANTHROPIC_REAL_KEY,
    BETA_KEY,
    GATEWAY_ENV,
    OPENAI_REAL_KEY,
    anthropic_client,
    openai_client,
    rules_text,
    use_gateway,
)
from addons.testing.gateway_process import start_gateway

MODEL = "tollhouse-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]
UNKNOWN_KEY = "th-unknown-key-00000000"
OPENAI_URL = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
REAL_KEYS = (OPENAI_REAL_KEY, ANTHROPIC_REAL_KEY)
# Echoed by the fake's 401, which repeats the presented key in full.
WRONG_OPENAI_KEY = "sk-wrong-openai-fedcba9876543210fedcba98"


def call_openai(client: openai.OpenAI):
    return client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)


def call_anthropic(client: anthropic.Anthropic):
    return client.messages.with_raw_response.create(model=MODEL, max_tokens=50, messages=MESSAGES)


def request_id(response) -> str:
    return response.headers["x-tollhouse-request-id"]


def assert_openai_error_format(body: dict) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)


def assert_anthropic_error_format(body: dict, error_type: str, rid: str) -> None:
    assert set(body) == {"type", "error", "request_id"}
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    assert body["request_id"] == rid


def assert_rejected_row(gateway, rid: str, provider: str) -> None:
    row = gateway.wait_row(rid)
    assert row["status"] == 401
    assert row["provider"] == provider
    assert row["project"] is None
    assert row["cost_usd"] == Decimal(0)
    assert row["price_flag"] == "not_billed"
    assert row["error"]


# -- rejected calls --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, UNKNOWN_KEY], ids=["missing", "unknown"])
def test_openai_bad_key_rejected(fake, proxy_env, key):
    before = len(fake.received)
    if key is None:
        client = openai_client("unused")
        options = {"extra_headers": {"Authorization": openai.Omit()}}
    else:
        client = openai_client(key)
        options = {}

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **options)

    response = caught.value.response
    assert response.status_code == 401
    body = response.json()
    assert_openai_error_format(body)
    message = body["error"]["message"]
    assert "OPENAI_API_KEY" in message
    assert ("missing" if key is None else "unknown") in message
    assert len(fake.received) == before
    assert_rejected_row(proxy_env, request_id(response), "openai")


@pytest.mark.parametrize("key", [None, UNKNOWN_KEY], ids=["missing", "unknown"])
def test_anthropic_bad_key_rejected(fake, proxy_env, key):
    before = len(fake.received)
    if key is None:
        client = anthropic_client("unused")
        options = {"extra_headers": {"Authorization": anthropic.Omit()}}
    else:
        client = anthropic_client(key)
        options = {}

    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model=MODEL, max_tokens=50, messages=MESSAGES, **options)

    response = caught.value.response
    assert response.status_code == 401
    rid = request_id(response)
    body = response.json()
    assert_anthropic_error_format(body, "authentication_error", rid)
    message = body["error"]["message"]
    assert "ANTHROPIC_API_KEY" in message
    assert ("missing" if key is None else "unknown") in message
    assert len(fake.received) == before
    assert_rejected_row(proxy_env, rid, "anthropic")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("header", ["", "Bearer"], ids=["empty", "bearer-without-token"])
def test_empty_authorization_is_missing_key(fake, proxy_env, provider, header):
    before = len(fake.received)
    headers = {"authorization": header, "content-type": "application/json"}
    if provider == "anthropic":
        url = ANTHROPIC_URL
        headers["anthropic-version"] = "2023-06-01"
        payload = {"model": MODEL, "max_tokens": 50, "messages": MESSAGES}
    else:
        url = OPENAI_URL
        payload = {"model": MODEL, "messages": MESSAGES}

    with httpx2.Client(timeout=20.0) as client:
        response = client.post(url, headers=headers, content=json.dumps(payload))

    assert response.status_code == 401
    rid = request_id(response)
    body = response.json()
    if provider == "anthropic":
        assert_anthropic_error_format(body, "authentication_error", rid)
        message = body["error"]["message"]
    else:
        assert_openai_error_format(body)
        message = body["error"]["message"]
    assert "missing project key" in message
    assert len(fake.received) == before
    assert_rejected_row(proxy_env, rid, provider)


# -- accepted calls and what upstream receives -----------------------------------------------------


def assert_no_client_key(headers: list[tuple[str, str]]) -> None:
    for name, value in headers:
        assert ALPHA_KEY not in value, f"client key in upstream header {name}"
        assert BETA_KEY not in value, f"client key in upstream header {name}"


def test_anthropic_x_api_key_accepted(fake, proxy_env, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    client = anthropic.Anthropic(api_key=None, default_headers={"x-api-key": ALPHA_KEY}, max_retries=0, timeout=20.0)
    before = len(fake.received)

    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=50, messages=MESSAGES, extra_headers={"Authorization": anthropic.Omit()}
    )

    assert raw.parse().content[0].text
    assert [request.header("authorization") for request in fake.received[before:]] == [None]
    received = fake.received[before]
    assert [value for name, value in received.headers if name.lower() == "x-api-key"] == [ANTHROPIC_REAL_KEY]
    assert_no_client_key(received.headers)
    assert proxy_env.wait_row(request_id(raw))["project"] == "alpha"


def test_anthropic_bearer_accepted(fake, proxy_env):
    before = len(fake.received)

    raw = call_anthropic(anthropic_client(ALPHA_KEY))

    assert raw.http_request.headers["authorization"] == f"Bearer {ALPHA_KEY}"
    assert raw.parse().content[0].text
    assert len(fake.received) == before + 1
    received = fake.received[before]
    assert [value for name, value in received.headers if name.lower() == "x-api-key"] == [ANTHROPIC_REAL_KEY]
    assert received.header("authorization") is None
    assert_no_client_key(received.headers)
    assert proxy_env.wait_row(request_id(raw))["project"] == "alpha"


def test_openai_upstream_gets_real_key(fake, proxy_env):
    before = len(fake.received)

    raw = call_openai(openai_client(ALPHA_KEY))

    assert raw.parse().choices[0].message.content
    assert len(fake.received) == before + 1
    received = fake.received[before]
    assert [value for name, value in received.headers if name.lower() == "authorization"] == [
        f"Bearer {OPENAI_REAL_KEY}"
    ]
    assert received.header("x-api-key") is None
    assert_no_client_key(received.headers)
    assert proxy_env.wait_row(request_id(raw))["project"] == "alpha"


def test_beta_sha256_key_accepted(fake, proxy_env):
    before = len(fake.received)

    raw = call_openai(openai_client(BETA_KEY))

    assert raw.status_code == 200
    assert_no_client_key(fake.received[before].headers)
    row = proxy_env.wait_row(request_id(raw))
    assert row["project"] == "beta"
    assert row["status"] == 200


# -- proxy URL credentials -------------------------------------------------------------------------


def test_proxy_url_credentials_accepted(fake, proxy_env, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://alpha:{ALPHA_KEY}@127.0.0.1:{proxy_env.port}")
    before = len(fake.received)

    raw = call_openai(openai_client("dummy-sdk-key"))

    assert raw.status_code == 200
    assert len(fake.received) == before + 1
    received = fake.received[before]
    assert received.header("proxy-authorization") is None
    assert received.header("authorization") == f"Bearer {OPENAI_REAL_KEY}"
    assert_no_client_key(received.headers)
    row = proxy_env.wait_row(request_id(raw))
    assert row["project"] == "alpha"
    assert row["status"] == 200


def test_proxy_url_wrong_project_rejected(fake, proxy_env, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://beta:{ALPHA_KEY}@127.0.0.1:{proxy_env.port}")
    before = len(fake.received)

    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client("dummy-sdk-key").messages.create(model=MODEL, max_tokens=50, messages=MESSAGES)

    response = caught.value.response
    assert response.status_code == 401
    assert_anthropic_error_format(response.json(), "authentication_error", request_id(response))
    assert len(fake.received) == before
    assert_rejected_row(proxy_env, request_id(response), "anthropic")


# -- real keys never leak --------------------------------------------------------------------------


def assert_no_real_key(text: str, where: str, keys=REAL_KEYS) -> None:
    for key in keys:
        assert key not in text, f"real key in {where}"
        # The last characters alone identify a key too, so a partly masked echo also fails the check.
        assert key[-12:] not in text, f"end of a real key in {where}"


def test_real_keys_absent_everywhere(fake, proxy_env):
    responses = [
        call_openai(openai_client(ALPHA_KEY)),
        call_anthropic(anthropic_client(ALPHA_KEY)),
    ]
    errors = []
    for client, send in ((openai_client(UNKNOWN_KEY), call_openai), (anthropic_client(UNKNOWN_KEY), call_anthropic)):
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as caught:
            send(client)
        errors.append(caught.value)
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client(ALPHA_KEY).chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-fault": "status:500"}
        )
    errors.append(caught.value)

    rids = [request_id(raw) for raw in responses] + [request_id(error.response) for error in errors]
    for raw in responses:
        assert_no_real_key(raw.http_response.text, "a response body")
        assert_no_real_key(str(raw.headers), "response headers")
    for error in errors:
        assert_no_real_key(str(error), "an SDK error message")
        assert_no_real_key(error.response.text, "an error body")
        assert_no_real_key(str(error.response.headers), "error response headers")
    rows = [proxy_env.wait_row(rid) for rid in rids]
    assert_no_real_key(repr(rows), "the request log")
    assert_no_real_key(proxy_env.stderr(), "the gateway log")


def test_echoed_wrong_key_masked(fake, tmp_path, monkeypatch):
    env = dict(GATEWAY_ENV, OPENAI_API_KEY=WRONG_OPENAI_KEY)
    gateway = start_gateway(tmp_path / "gateway", rules_text(fake.port, bodies="true"), env)
    try:
        use_gateway(gateway, monkeypatch)
        before = len(fake.received)

        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(ALPHA_KEY).chat.completions.create(model=MODEL, messages=MESSAGES)

        # The fake rejected the wrong key and echoed it in full, so the gateway had to mask it.
        assert len(fake.received) == before + 1
        assert WRONG_OPENAI_KEY in fake.sent[before].body.decode()
        error = caught.value
        assert error.response.status_code == 401
        assert_openai_error_format(error.response.json())
        keys = (WRONG_OPENAI_KEY,)
        assert_no_real_key(str(error), "the SDK error message", keys)
        assert_no_real_key(error.response.text, "the client's error body", keys)
        row = gateway.wait_row(request_id(error.response))
        assert row["status"] == 401
        assert row["project"] == "alpha"
        assert row["price_flag"] == "not_billed"
        assert row["error"].startswith("Incorrect API key provided")
        assert_no_real_key(repr(row), "the request log row", keys)
    finally:
        gateway.stop()
    assert_no_real_key(gateway.stderr(), "the gateway log", keys)


def test_body_log_masks_presented_key(fake, tmp_path, monkeypatch):
    gateway = start_gateway(tmp_path / "gateway", rules_text(fake.port, bodies="true"), GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        # Project beta is stored only as a digest; its key is known to the gateway only as presented.
        raw = openai_client(BETA_KEY).chat.completions.with_raw_response.create(
            model="tollhouse-test-model", messages=[{"role": "user", "content": f"my key is {BETA_KEY}"}]
        )
        row = gateway.wait_row(raw.headers["x-tollhouse-request-id"])
    finally:
        gateway.stop()

    assert row["project"] == "beta"
    assert BETA_KEY not in row["request_body"]
    assert "my key is [redacted]" in row["request_body"]
