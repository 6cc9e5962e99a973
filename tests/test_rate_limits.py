"""Rate limits per project (requests and tokens per minute, concurrent calls) and per provider (a
concurrency cap with a bounded queue), through real gateway processes and at unit level."""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from mitmproxy.test import tflow

from addons.call import Call, Usage
from addons.policy_rules import ProviderLimits
from addons.rules import Rules, RulesError, parse_rules
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import GatewayProcess, start_gateway
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
from plugins import rate_limits
from plugins.rate_limits import ProviderGate, SlidingWindow

TIMEOUT = 30.0
CHAT_URL = "https://api.openai.com/v1/chat/completions"
MESSAGES_URL = "https://api.anthropic.com/v1/messages"


# --- unit level ------------------------------------------------------------------------------------


def test_sliding_window_expires_after_60_s():
    window = SlidingWindow()
    window.add(100.0, 1)
    window.add(130.0, 1)

    window.expire(159.9)
    assert window.total == 2
    window.expire(160.0)
    assert window.total == 1
    assert window.seconds_until_room(160.0, 1, 1) == pytest.approx(30.0)


def test_sliding_window_settle_replaces_estimate():
    window = SlidingWindow()
    entry = window.add(0.0, 500)
    window.add(1.0, 100)

    window.settle(entry, 20)
    assert window.total == 120
    window.expire(60.0)
    assert window.total == 100
    window.settle(entry, 999)  # expired: no effect on the total
    assert window.total == 100


def test_sliding_window_room_for_large_amount():
    window = SlidingWindow()
    window.add(0.0, 400)
    window.add(10.0, 400)

    # 1000 tokens, 800 used: 300 more fit once the first 400 expire at 60 s.
    assert window.seconds_until_room(20.0, 1000, 300) == pytest.approx(40.0)
    assert window.seconds_until_room(20.0, 1000, 700) == pytest.approx(50.0)


def test_provider_gate_queue_bounded():
    async def scenario() -> tuple[list[bool], int]:
        gate = ProviderGate(ProviderLimits(max_concurrent=1, max_queue=1, queue_timeout=5.0))
        assert await gate.acquire() is True
        waiting = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        rejected = await gate.acquire()
        gate.release()
        admitted = await waiting
        gate.release()
        return [admitted, rejected], gate.active

    results, active = asyncio.run(scenario())
    assert results == [True, False]
    assert active == 0


def test_provider_gate_wait_times_out():
    async def scenario() -> tuple[bool, int, int]:
        gate = ProviderGate(ProviderLimits(max_concurrent=1, max_queue=5, queue_timeout=0.05))
        await gate.acquire()
        admitted = await gate.acquire()
        return admitted, len(gate.waiters), gate.active

    assert asyncio.run(scenario()) == (False, 0, 1)


def test_provider_gate_cancelled_waiter_leaves_queue():
    async def scenario() -> tuple[int, int]:
        gate = ProviderGate(ProviderLimits(max_concurrent=1, max_queue=5, queue_timeout=5.0))
        await gate.acquire()
        waiting = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        gate.release()
        return len(gate.waiters), gate.active

    assert asyncio.run(scenario()) == (0, 0)


def configured_limits(rules_section: dict) -> Rules:
    """Configure the rate-limit plugin in this process with `rules_section` as the rules' `rate_limits`."""
    rules = parse_rules(
        {
            "providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"}},
            "projects": {"alpha": {"key_sha256": "0" * 64}},
            "rate_limits": rules_section,
        },
        base_dir=Path("."),
    )
    rate_limits.tollhouse_configure(rules)
    return rules


def unit_call(rules, max_tokens: int | None = None) -> tuple[Call, object]:
    body = {"model": "gpt-4o", "messages": []}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    flow = tflow.tflow()
    flow.request.content = json.dumps(body).encode()
    call = Call(
        request_id=f"th_{uuid.uuid4().hex}", listener="proxy", provider=rules.providers["openai"],
        project=rules.projects["alpha"], endpoint="chat.completions", request_json=body,
    )
    return call, flow


def admit(rules, max_tokens: int | None = None) -> tuple[Call, object]:
    call, flow = unit_call(rules, max_tokens)
    asyncio.run(rate_limits.tollhouse_request(call=call, flow=flow))
    return call, flow


def test_rpm_window_with_injected_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(rate_limits, "clock", lambda: now[0])
    rules = configured_limits({"projects": {"alpha": {"requests_per_minute": 2}}})

    first, first_flow = admit(rules)
    now[0] += 20.0
    second, second_flow = admit(rules)
    now[0] += 10.0
    third, third_flow = admit(rules)

    assert first_flow.response is None
    assert second_flow.response is None
    assert third_flow.response.status_code == 429
    # The first request leaves the window 60 s after it was admitted, 30 s from now.
    assert third_flow.response.headers["retry-after"] == "30"
    assert third_flow.response.headers["x-ratelimit-reset-requests"] == "30s"

    now[0] += 30.0
    fourth, fourth_flow = admit(rules)
    assert fourth_flow.response is None
    for call in (first, second, third, fourth):
        rate_limits.tollhouse_call_end(call=call)
    assert rate_limits._state.projects["alpha"].active == 0


def test_tpm_settles_real_usage(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(rate_limits, "clock", lambda: now[0])
    rules = configured_limits({"projects": {"alpha": {"tokens_per_minute": 1000}}})

    call, flow = admit(rules, max_tokens=900)
    state = rate_limits._state.projects["alpha"]
    body_tokens = math.ceil(len(flow.request.raw_content) / rate_limits.BYTES_PER_TOKEN)
    assert state.tokens.total == 900 + body_tokens
    _, rejected_flow = admit(rules, max_tokens=100)
    assert rejected_flow.response.status_code == 429

    call.usage = Usage(input_tokens=30, output_tokens=70)
    call.status = 200
    rate_limits.tollhouse_call_end(call=call)
    assert state.tokens.total == 100

    _, admitted_flow = admit(rules, max_tokens=800)
    assert admitted_flow.response is None


def test_refused_call_consumes_no_quota(monkeypatch):
    monkeypatch.setattr(rate_limits, "clock", lambda: 0.0)
    rules = configured_limits({"projects": {"alpha": {"requests_per_minute": 5, "tokens_per_minute": 1000}}})

    _, flow = admit(rules, max_tokens=5000)
    state = rate_limits._state.projects["alpha"]

    assert flow.response.status_code == 429
    assert state.requests.total == 0
    assert state.tokens.total == 0
    assert state.active == 0


def test_rules_reject_unknown_project():
    from addons.policy_rules import parse_rate_limits

    with pytest.raises(RulesError, match=r"rate_limits\.projects\.gamma"):
        parse_rate_limits({"projects": {"gamma": {"requests_per_minute": 1}}}, {"alpha": None}, {"openai": None})


# --- gateway level ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    server = FakeUpstream(expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}).start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture(scope="module")
def gateways(upstream, tmp_path_factory):
    """Start gateways on demand, one per rules text, and stop them all at the end of the module."""
    started: dict[str, GatewayProcess] = {}

    def get(name: str, extra: str) -> GatewayProcess:
        if name not in started:
            rules = rules_text(upstream.port, limits=extra)
            started[name] = start_gateway(tmp_path_factory.mktemp(name), rules, GATEWAY_ENV)
        return started[name]

    yield get
    for process in started.values():
        process.stop()


def chat_body(marker: str, **extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": f"limits {marker}"}], **extra}


def upstream_count(upstream: FakeUpstream, marker: str) -> int:
    return sum(1 for request in upstream.received if marker.encode() in request.body)


def ssl_context(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gateway.ca_cert))


def request_headers(key: str, url: str, extra: dict | None) -> dict:
    headers = {"authorization": f"Bearer {key}", **(extra or {})}
    if url == MESSAGES_URL:
        # The fake responds in Anthropic's format whenever this header is present.
        headers["anthropic-version"] = "2023-06-01"
    return headers


def post(gateway: GatewayProcess, body: dict, key: str = ALPHA_KEY, url: str = CHAT_URL, headers: dict | None = None):
    all_headers = request_headers(key, url, headers)
    with httpx2.Client(proxy=gateway.proxy_url, verify=ssl_context(gateway), trust_env=False, timeout=TIMEOUT) as client:
        return client.post(url, json=body, headers=all_headers)


def post_concurrently(gateway: GatewayProcess, bodies: list[dict], key: str = ALPHA_KEY, url: str = CHAT_URL, headers=None):
    """Send every body at once, each on its own connection, and return the responses in order."""

    async def run() -> list[httpx2.Response]:
        limits = httpx2.Limits(max_connections=len(bodies), max_keepalive_connections=0)
        async with httpx2.AsyncClient(
            proxy=gateway.proxy_url, verify=ssl_context(gateway), trust_env=False, timeout=TIMEOUT, limits=limits
        ) as client:
            all_headers = request_headers(key, url, headers)
            return await asyncio.gather(*(client.post(url, json=body, headers=all_headers) for body in bodies))

    return asyncio.run(run())


RPM_RULES = """
rate_limits:
  projects:
    alpha:
      requests_per_minute: 25
"""


def test_rpm_exact_under_200_concurrent_calls(gateways, upstream):
    gateway = gateways("rpm", RPM_RULES)
    marker = uuid.uuid4().hex

    responses = post_concurrently(gateway, [chat_body(f"{marker} {i}") for i in range(200)])

    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 25
    assert statuses.count(429) == 175
    assert upstream_count(upstream, marker) == 25
    rejected = [response for response in responses if response.status_code == 429]
    assert {r.headers["x-tollhouse-limit"] for r in rejected} == {"rate_limits.projects.alpha.requests_per_minute"}
    assert {r.headers["x-ratelimit-limit-requests"] for r in rejected} == {"25"}
    assert {r.headers["x-ratelimit-remaining-requests"] for r in rejected} == {"0"}

    rows = [gateway.wait_row(r.headers["x-tollhouse-request-id"]) for r in rejected[:5]]
    for row in rows:
        assert row["status"] == 429
        assert row["cost_usd"] == Decimal(0)
        assert row["price_flag"] == "not_billed"
        assert "25 requests per minute" in row["error"]


RPM_ONE_RULES = """
rate_limits:
  projects:
    alpha:
      requests_per_minute: 1
    beta:
      requests_per_minute: 1
"""


def test_rpm_429_openai_format(gateways, monkeypatch):
    gateway = gateways("rpm-one", RPM_ONE_RULES)
    use_gateway(gateway, monkeypatch)
    client = openai_client()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "one"}])

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "two"}])

    error = caught.value
    assert error.status_code == 429
    assert error.body["type"] == "rate_limit_error"
    assert error.body["code"] == "rate_limit_exceeded"
    assert "project 'alpha'" in error.body["message"]
    assert "rate_limits.projects.alpha.requests_per_minute" in error.body["message"]
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == f"{headers['retry-after']}s"


def test_rpm_429_anthropic_format(gateways, monkeypatch):
    gateway = gateways("rpm-one", RPM_ONE_RULES)
    use_gateway(gateway, monkeypatch)
    client = anthropic_client(BETA_KEY)
    client.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "one"}])

    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "two"}])

    error = caught.value
    assert error.status_code == 429
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "project 'beta'" in error.body["error"]["message"]
    assert error.body["request_id"] == error.response.headers["x-tollhouse-request-id"]
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-limit-requests"] == "1"


TPM_RULES = """
rate_limits:
  projects:
    beta:
      tokens_per_minute: 1000
"""


def test_tpm_estimate_and_settle(gateways, upstream):
    gateway = gateways("tpm", TPM_RULES)
    marker = uuid.uuid4().hex
    results: dict[str, httpx2.Response] = {}

    def slow_call() -> None:
        results["slow"] = post(gateway, chat_body(f"{marker} a", max_tokens=600), key=BETA_KEY, headers={"x-fault": "slow:1"})

    first = threading.Thread(target=slow_call)
    first.start()
    for _ in range(300):
        if upstream_count(upstream, marker):
            break
        threading.Event().wait(0.01)
    # While the first call keeps its estimate (about 620 tokens) reserved, a second one does not fit.
    concurrent = post(gateway, chat_body(f"{marker} b", max_tokens=600), key=BETA_KEY)
    first.join(TIMEOUT)
    # The first call settled at its real usage (a few tokens), so the same call fits now.
    after = post(gateway, chat_body(f"{marker} c", max_tokens=600), key=BETA_KEY)
    too_large = post(gateway, chat_body(f"{marker} d", max_tokens=2000), key=BETA_KEY)

    assert results["slow"].status_code == 200
    assert concurrent.status_code == 429
    assert concurrent.headers["x-tollhouse-limit"] == "rate_limits.projects.beta.tokens_per_minute"
    assert concurrent.headers["x-ratelimit-limit-tokens"] == "1000"
    assert "tokens per minute" in concurrent.json()["error"]["message"]
    assert after.status_code == 200
    assert too_large.status_code == 429
    assert "a single call of about" in too_large.json()["error"]["message"]
    assert upstream_count(upstream, marker) == 2


CONCURRENCY_RULES = """
rate_limits:
  projects:
    alpha:
      max_concurrent: 2
      requests_per_minute: 100
  providers:
    anthropic:
      max_concurrent: 1
      max_queue: 1
      queue_timeout: 20
"""


def test_project_concurrency_limit(gateways, upstream):
    gateway = gateways("concurrency", CONCURRENCY_RULES)
    marker = uuid.uuid4().hex

    responses = post_concurrently(gateway, [chat_body(f"{marker} {i}") for i in range(5)], headers={"x-fault": "slow:1"})

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 200, 429, 429, 429]
    rejected = [r for r in responses if r.status_code == 429]
    assert {r.headers["x-tollhouse-limit"] for r in rejected} == {"rate_limits.projects.alpha.max_concurrent"}
    # Every rejection carries the project's per-minute limits as they stand: 2 of 100 requests used.
    assert {(r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) for r in rejected} == {
        ("100", "98")
    }
    assert {r.headers["x-ratelimit-reset-requests"] for r in rejected} == {"0s"}
    assert upstream_count(upstream, marker) == 2
    # The slots were released when the calls ended.
    assert post(gateway, chat_body(f"{marker} after")).status_code == 200


def test_provider_queue(gateways, upstream):
    gateway = gateways("concurrency", CONCURRENCY_RULES)
    marker = uuid.uuid4().hex
    bodies = [
        {"model": "claude-sonnet-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": f"{marker} {i}"}]}
        for i in range(3)
    ]

    responses = post_concurrently(gateway, bodies, key=BETA_KEY, url=MESSAGES_URL, headers={"x-fault": "slow:1"})

    statuses = sorted(response.status_code for response in responses)
    # One runs, one waits in the queue and runs after it, the third finds the queue full.
    assert statuses == [200, 200, 429]
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert rejected.headers["x-tollhouse-limit"] == "rate_limits.providers.anthropic.max_concurrent"
    assert rejected.headers["retry-after"] == "1"
    assert upstream_count(upstream, marker) == 2


COMBINED_RULES = """
rate_limits:
  projects:
    alpha:
      requests_per_minute: 2
cache:
  projects:
    alpha:
      enabled: true
"""


def test_cache_hits_consume_no_quota(gateways, upstream):
    gateway = gateways("combined", COMBINED_RULES)
    marker = uuid.uuid4().hex

    first = post(gateway, chat_body(f"{marker} same"))
    hits = [post(gateway, chat_body(f"{marker} same")) for _ in range(4)]
    other = post(gateway, chat_body(f"{marker} other"))
    over = post(gateway, chat_body(f"{marker} third"))

    assert first.headers["x-tollhouse-cache"] == "MISS"
    assert [(r.status_code, r.headers["x-tollhouse-cache"]) for r in hits] == [(200, "HIT")] * 4
    assert other.status_code == 200
    assert over.status_code == 429
    assert upstream_count(upstream, marker) == 2


def test_cache_disabled_project_header(gateways, upstream):
    gateway = gateways("combined", COMBINED_RULES)

    response = post(gateway, chat_body(uuid.uuid4().hex), key=BETA_KEY)

    assert response.status_code == 200
    assert response.headers["x-tollhouse-cache"] == "DISABLED"
    assert response.headers["x-portkey-cache-status"] == "DISABLED"
    assert json.loads(response.content)["object"] == "chat.completion"


def test_client_disconnect_releases_slots(gateways, upstream):
    gateway = gateways("concurrency", CONCURRENCY_RULES)
    marker = uuid.uuid4().hex

    def abandon(index: int) -> None:
        verify = ssl_context(gateway)
        with httpx2.Client(proxy=gateway.proxy_url, verify=verify, trust_env=False, timeout=0.5) as client:
            with pytest.raises(httpx2.TimeoutException):
                client.post(CHAT_URL, json=chat_body(f"{marker} {index}"), headers=request_headers(ALPHA_KEY, CHAT_URL, {"x-fault": "slow:3"}))

    threads = [threading.Thread(target=abandon, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)

    # Both slots were taken by calls whose clients have gone; the gateway releases them when it notices.
    statuses = []
    for _ in range(50):
        response = post(gateway, chat_body(f"{marker} after"))
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        threading.Event().wait(0.1)
    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {429}
