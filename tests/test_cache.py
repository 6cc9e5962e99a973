"""The response cache: keys, storage bounds, controls, coalescing, stream replay and accounting.

The gateway tests run their own gateway processes in front of their own fake upstream, so that counting
the requests that reached upstream is exact.
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import httpx2
import pytest
from mitmproxy import http

from addons import cache_store
from addons.cache_store import CachedResponse, DiskCache, MemoryCache, cache_key
from addons.policy_rules import parse_cache
from addons.rules import RulesError
from addons.testing.fake_upstream import DEFAULT_TEXT, FakeUpstream
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

CACHE_RULES = """
cache:
  ttl: 600
  coalesce: true
  projects:
    alpha:
      enabled: true
    beta:
      enabled: true
"""

SHARED_CACHE_RULES = """
cache:
  enabled: true
  projects:
    alpha:
      share_group: team
    beta:
      share_group: team
"""

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
TIMEOUT = 20.0


# --- unit level: keys and the memory store -------------------------------------------------------


KEY_ARGS = {
    "namespace": "project:alpha",
    "provider": "openai",
    "target": "https://api.openai.com:443",
    "path": CHAT_PATH,
    "model": "gpt-4o",
    "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    "headers": [("anthropic-version", "2023-06-01")],
}


@pytest.mark.parametrize(
    "component, value",
    [
        ("namespace", "project:beta"),
        ("provider", "azure"),
        ("target", "https://eu.api.openai.com:443"),
        ("path", "/v1/responses"),
        ("model", "gpt-4o-mini"),
        ("body", {**KEY_ARGS["body"], "temperature": 0}),
        ("body", {**KEY_ARGS["body"], "stream": True}),
        ("headers", [("anthropic-version", "2024-01-01")]),
        ("headers", [("anthropic-version", "2023-06-01"), ("anthropic-beta", "x")]),
        ("headers", [("anthropic-version", "2023-06-01"), ("openai-organization", "org-1")]),
        ("headers", [("anthropic-version", "2023-06-01"), ("openai-project", "proj-1")]),
    ],
)
def test_cache_key_component_changes_key(component, value):
    assert cache_key(**{**KEY_ARGS, component: value}) != cache_key(**KEY_ARGS)


def test_cache_key_ignores_json_key_order():
    reordered = {"stream": False, "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o"}

    assert cache_key(**{**KEY_ARGS, "body": reordered}) == cache_key(**KEY_ARGS)


def test_cache_key_header_name_case():
    assert cache_key(**{**KEY_ARGS, "headers": [("Anthropic-Version", "2023-06-01")]}) == cache_key(**KEY_ARGS)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(body: bytes, stored_at: float, ttl: float = 60.0) -> CachedResponse:
    return CachedResponse(200, (("content-type", "application/json"),), body, False, "m", Decimal("0.5"), stored_at, ttl)


def test_memory_cache_ttl_expires():
    clock = FakeClock()
    store = MemoryCache(max_entry_bytes=10_000, timer=clock)
    store.put("ns", 100_000, "k", answer(b"x", clock.now, ttl=60.0))

    clock.now += 59.9
    assert store.get("ns", "k") is not None
    clock.now += 0.1
    assert store.get("ns", "k") is None


def test_memory_cache_reader_ttl_shorter():
    clock = FakeClock()
    store = MemoryCache(max_entry_bytes=10_000, timer=clock)
    store.put("ns", 100_000, "k", answer(b"x", clock.now, ttl=60.0))

    clock.now += 30.0
    assert store.get("ns", "k", max_age=31.0) is not None
    assert store.get("ns", "k", max_age=30.0) is None


def test_memory_cache_module_clock_injectable(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(cache_store, "clock", clock)
    store = MemoryCache(max_entry_bytes=10_000)
    store.put("ns", 100_000, "k", answer(b"x", clock.now, ttl=10.0))

    clock.now += 10.0
    assert store.get("ns", "k") is None


def test_memory_cache_byte_bound_evicts_lru():
    clock = FakeClock()
    store = MemoryCache(max_entry_bytes=10_000, timer=clock)
    one = answer(b"a" * 1000, clock.now)
    bound = one.size * 2

    store.put("ns", bound, "a", one)
    store.put("ns", bound, "b", answer(b"b" * 1000, clock.now))
    assert store.get("ns", "a") is not None  # now the most recently used
    store.put("ns", bound, "c", answer(b"c" * 1000, clock.now))

    assert store.get("ns", "a") is not None
    assert store.get("ns", "b") is None
    assert store.get("ns", "c") is not None
    assert store.bytes_used("ns") == bound


def test_memory_cache_rejects_oversized_entry():
    clock = FakeClock()
    store = MemoryCache(max_entry_bytes=2000, timer=clock)

    assert store.put("ns", 100_000, "big", answer(b"x" * 2000, clock.now)) is False
    assert store.get("ns", "big") is None
    assert store.put("ns", 100, "small", answer(b"x", clock.now)) is False


def test_memory_cache_namespaces_bounded_apart():
    clock = FakeClock()
    store = MemoryCache(max_entry_bytes=10_000, timer=clock)
    entry = answer(b"x" * 1000, clock.now)

    store.put("alpha", entry.size, "a", entry)
    store.put("beta", entry.size, "b", entry)

    assert store.get("alpha", "a") is not None
    assert store.get("beta", "b") is not None


# --- gateway level ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    server = FakeUpstream(expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}).start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture(scope="module")
def cache_gateway(upstream, tmp_path_factory):
    process = start_gateway(tmp_path_factory.mktemp("cache"), rules_text(upstream.port, cache=CACHE_RULES), GATEWAY_ENV)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shared_gateway(upstream, tmp_path_factory):
    rules = rules_text(upstream.port, cache=SHARED_CACHE_RULES)
    process = start_gateway(tmp_path_factory.mktemp("cache-shared"), rules, GATEWAY_ENV)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def no_upstream_errors(upstream):
    before = len(upstream.errors)
    yield
    assert upstream.errors[before:] == []


def http_client(gateway: GatewayProcess) -> httpx2.Client:
    verify = ssl.create_default_context(cafile=str(gateway.ca_cert))
    return httpx2.Client(proxy=gateway.proxy_url, verify=verify, trust_env=False, timeout=TIMEOUT)


def chat_body(marker: str, **extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": f"cache test {marker}"}], **extra}


def post(
    gateway: GatewayProcess, body: dict | bytes, *, key: str = ALPHA_KEY, path: str = CHAT_PATH,
    host: str = "api.openai.com", headers: dict | None = None,
) -> httpx2.Response:
    """POST through the gateway and return the response with its body read."""
    all_headers = {"authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}
    if host == "api.anthropic.com":
        all_headers.setdefault("anthropic-version", "2023-06-01")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with http_client(gateway) as client:
        return client.post(f"https://{host}{path}", content=content, headers=all_headers)


def upstream_count(upstream: FakeUpstream, marker: str) -> int:
    return sum(1 for request in upstream.received if marker.encode() in request.body)


def status_of(response: httpx2.Response) -> str | None:
    return response.headers.get("x-tollhouse-cache")


def test_second_call_hits(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    first = post(cache_gateway, chat_body(marker))
    second = post(cache_gateway, chat_body(marker))

    assert first.status_code == 200
    assert second.status_code == 200
    assert status_of(first) == "MISS"
    assert status_of(second) == "HIT"
    assert second.headers["x-portkey-cache-status"] == "HIT"
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert upstream_count(upstream, marker) == 1


def test_hit_row_accounting(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    usage = {"x-fake-usage": json.dumps({"prompt_tokens": 1000, "completion_tokens": 100})}
    body = {**chat_body(marker), "model": "tollhouse-test-model"}
    first = post(cache_gateway, body, headers=usage)
    second = post(cache_gateway, body, headers=usage)

    first_row = cache_gateway.wait_row(first.headers["x-tollhouse-request-id"])
    hit_row = cache_gateway.wait_row(second.headers["x-tollhouse-request-id"])
    # 1000 * 1.50 / 1e6 + 100 * 6.00 / 1e6
    assert first_row["cost_usd"] == Decimal("0.0021")
    assert first_row["cache_status"] == "MISS"
    assert first_row["saved_usd"] is None
    assert hit_row["cache_status"] == "HIT"
    assert hit_row["cost_usd"] == Decimal(0)
    assert hit_row["price_flag"] == "cache_hit"
    assert hit_row["saved_usd"] == Decimal("0.0021")
    assert hit_row["input_tokens"] is None
    assert hit_row["output_tokens"] is None
    assert hit_row["status"] == 200
    assert hit_row["response_model"] == first_row["response_model"]


def test_reordered_json_keys_hit(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    first = post(cache_gateway, b'{"model":"gpt-4o","messages":[{"role":"user","content":"k %s"}]}' % marker.encode())
    second = post(cache_gateway, b'{ "messages": [{"content": "k %s", "role": "user"}], "model": "gpt-4o" }' % marker.encode())

    assert status_of(first) == "MISS"
    assert status_of(second) == "HIT"
    assert upstream_count(upstream, marker) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"body": {"temperature": 0.5}},
        {"body": {"model": "gpt-4o-mini"}},
        {"path": "/v1/chat/completions?api-version=1"},
        {"headers": {"OpenAI-Organization": "org-other"}},
        {"headers": {"OpenAI-Project": "proj-other"}},
        {"headers": {"anthropic-beta": "some-beta"}},
        {"key": BETA_KEY},
    ],
    ids=["body", "model", "path", "organization", "openai-project", "anthropic-beta", "project"],
)
def test_changed_component_misses(cache_gateway, upstream, change):
    marker = uuid.uuid4().hex
    base = chat_body(marker)
    post(cache_gateway, base)

    changed = post(
        cache_gateway,
        {**base, **change.get("body", {})},
        key=change.get("key", ALPHA_KEY),
        path=change.get("path", CHAT_PATH),
        headers=change.get("headers"),
    )

    assert changed.status_code == 200
    assert status_of(changed) == "MISS"
    assert upstream_count(upstream, marker) == 2


def test_anthropic_version_in_key(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": marker}]}
    host = "api.anthropic.com"
    first = post(cache_gateway, body, path=MESSAGES_PATH, host=host)
    other_version = post(cache_gateway, body, path=MESSAGES_PATH, host=host, headers={"anthropic-version": "2024-01-01"})
    same = post(cache_gateway, body, path=MESSAGES_PATH, host=host)

    assert status_of(first) == "MISS"
    assert status_of(other_version) == "MISS"
    assert status_of(same) == "HIT"
    assert upstream_count(upstream, marker) == 2


def test_stream_and_json_never_mix(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    whole = post(cache_gateway, chat_body(marker))
    streamed = post(cache_gateway, chat_body(marker, stream=True))
    streamed_again = post(cache_gateway, chat_body(marker, stream=True))
    whole_again = post(cache_gateway, chat_body(marker))

    assert status_of(streamed) == "MISS"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert status_of(streamed_again) == "HIT"
    assert streamed_again.headers["content-type"].startswith("text/event-stream")
    assert status_of(whole_again) == "HIT"
    assert whole_again.headers["content-type"] == "application/json"
    assert whole_again.content == whole.content
    assert upstream_count(upstream, marker) == 2


def test_projects_isolated(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    alpha = post(cache_gateway, chat_body(marker))
    beta = post(cache_gateway, chat_body(marker), key=BETA_KEY)
    beta_again = post(cache_gateway, chat_body(marker), key=BETA_KEY)

    assert status_of(alpha) == "MISS"
    assert status_of(beta) == "MISS"
    assert status_of(beta_again) == "HIT"
    assert upstream_count(upstream, marker) == 2


def test_share_group_shares_entries(shared_gateway, upstream):
    marker = uuid.uuid4().hex
    alpha = post(shared_gateway, chat_body(marker))
    beta = post(shared_gateway, chat_body(marker), key=BETA_KEY)

    assert status_of(alpha) == "MISS"
    assert status_of(beta) == "HIT"
    assert beta.content == alpha.content
    assert upstream_count(upstream, marker) == 1


@pytest.mark.parametrize(
    "fault, stream",
    [
        ("status:500", False),
        ("status:500", True),
        ("status:429", False),
        ("cut", False),
        ("cut", True),
        ("midstream-error", True),
    ],
)
def test_failed_answer_not_cached(cache_gateway, upstream, fault, stream):
    marker = uuid.uuid4().hex
    body = chat_body(marker, stream=True) if stream else chat_body(marker)
    try:
        post(cache_gateway, body, headers={"x-fault": fault})
    except httpx2.HTTPError:
        pass  # a cut response may end the connection early

    after = post(cache_gateway, body)

    assert after.status_code == 200
    assert status_of(after) == "MISS"
    assert upstream_count(upstream, marker) == 2


def test_openai_stream_replay_parsed_by_sdk(cache_gateway, upstream, monkeypatch):
    use_gateway(cache_gateway, monkeypatch)
    marker = uuid.uuid4().hex
    client = openai_client()
    messages = [{"role": "user", "content": marker}]

    def read() -> tuple[str, str | None]:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        return text, raw.headers.get("x-tollhouse-cache")

    assert read() == (DEFAULT_TEXT, "MISS")
    assert read() == (DEFAULT_TEXT, "HIT")
    assert upstream_count(upstream, marker) == 1


def test_anthropic_stream_replay_parsed_by_sdk(cache_gateway, upstream, monkeypatch):
    use_gateway(cache_gateway, monkeypatch)
    marker = uuid.uuid4().hex
    client = anthropic_client()
    messages = [{"role": "user", "content": marker}]

    def read() -> tuple[str, str | None]:
        raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=50, messages=messages, stream=True)
        text = "".join(
            event.delta.text for event in raw.parse() if event.type == "content_block_delta" and event.delta.type == "text_delta"
        )
        return text, raw.headers.get("x-tollhouse-cache")

    assert read() == (DEFAULT_TEXT, "MISS")
    assert read() == (DEFAULT_TEXT, "HIT")
    assert upstream_count(upstream, marker) == 1


@pytest.mark.parametrize("host, path", [("api.openai.com", CHAT_PATH), ("api.anthropic.com", MESSAGES_PATH)])
def test_stream_replay_byte_equal(cache_gateway, upstream, host, path):
    marker = uuid.uuid4().hex
    body = {"model": "gpt-4o", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": marker}]}
    first = post(cache_gateway, body, host=host, path=path)
    second = post(cache_gateway, body, host=host, path=path)

    assert status_of(second) == "HIT"
    assert second.content == first.content
    assert second.content.count(b"\n\n") == first.content.count(b"\n\n")
    assert upstream_count(upstream, marker) == 1


def test_openai_stream_with_usage_requested_replayed(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    body = chat_body(marker, stream=True, stream_options={"include_usage": True})
    first = post(cache_gateway, body)
    second = post(cache_gateway, body)

    assert b'"usage":{' in first.content
    assert second.content == first.content


def test_no_cache_refreshes(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    post(cache_gateway, chat_body(marker), headers={"x-fake-text": "old"})
    refreshed = post(cache_gateway, chat_body(marker), headers={"cache-control": "no-cache", "x-fake-text": "new"})
    after = post(cache_gateway, chat_body(marker))

    assert status_of(refreshed) == "REFRESH"
    assert refreshed.headers["x-portkey-cache-status"] == "REFRESH"
    assert status_of(after) == "HIT"
    assert after.json()["choices"][0]["message"]["content"] == "new"
    assert upstream_count(upstream, marker) == 2


def test_force_refresh_header_refreshes(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    post(cache_gateway, chat_body(marker), headers={"x-fake-text": "old"})
    refreshed = post(cache_gateway, chat_body(marker), headers={"x-portkey-cache-force-refresh": "true", "x-fake-text": "new"})
    after = post(cache_gateway, chat_body(marker))

    assert status_of(refreshed) == "REFRESH"
    assert after.json()["choices"][0]["message"]["content"] == "new"
    assert upstream_count(upstream, marker) == 2
    last = [request for request in upstream.received if marker.encode() in request.body][-1]
    assert last.header("x-portkey-cache-force-refresh") is None


def test_no_store_bypasses(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    bypassed = post(cache_gateway, chat_body(marker), headers={"cache-control": "no-store"})
    after = post(cache_gateway, chat_body(marker))

    assert status_of(bypassed) == "DISABLED"
    assert bypassed.headers["x-portkey-cache-status"] == "DISABLED"
    assert status_of(after) == "MISS"
    assert upstream_count(upstream, marker) == 2


def test_no_store_skips_stored_answer(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    post(cache_gateway, chat_body(marker))
    bypassed = post(cache_gateway, chat_body(marker), headers={"cache-control": "no-store"})

    assert status_of(bypassed) == "DISABLED"
    assert upstream_count(upstream, marker) == 2


def test_identical_calls_in_flight_coalesce(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    results: list[httpx2.Response] = []

    def call() -> None:
        results.append(post(cache_gateway, chat_body(marker), headers={"x-fault": "slow:1"}))

    first = threading.Thread(target=call)
    first.start()
    # Wait until the first call has reached upstream, then send the identical one.
    for _ in range(200):
        if upstream_count(upstream, marker):
            break
        threading.Event().wait(0.01)
    assert upstream_count(upstream, marker) == 1
    call()
    first.join(TIMEOUT)

    assert sorted(status_of(response) for response in results) == ["HIT", "MISS"]
    assert results[0].content == results[1].content
    assert upstream_count(upstream, marker) == 1


def test_coalesced_call_goes_upstream_after_failure(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    results: list[httpx2.Response] = []

    def call(headers: dict) -> None:
        results.append(post(cache_gateway, chat_body(marker), headers=headers))

    first = threading.Thread(target=call, args=({"x-fault": "slow:1,status:500"},))
    first.start()
    for _ in range(200):
        if upstream_count(upstream, marker):
            break
        threading.Event().wait(0.01)
    call({})
    first.join(TIMEOUT)

    assert sorted(response.status_code for response in results) == [200, 500]
    assert upstream_count(upstream, marker) == 2


# --- the persistent tier ---------------------------------------------------------------------------


def test_disk_cache_survives_reopen(tmp_path, monkeypatch):
    wall = FakeClock()
    monkeypatch.setattr(cache_store, "wall_clock", wall)
    memory_clock = FakeClock()
    disk = DiskCache(tmp_path / "cache.sqlite3", max_bytes=100_000, timer=memory_clock)
    disk.open()
    disk.put("ns", "k", answer(b"body", memory_clock.now, ttl=60.0))
    disk.close()

    wall.now += 30.0
    reopened = DiskCache(tmp_path / "cache.sqlite3", max_bytes=100_000, timer=lambda: 5.0)
    reopened.open()
    found = reopened.get("ns", "k")

    assert found is not None
    assert found.body == b"body"
    assert found.cost_usd == Decimal("0.5")
    assert found.headers == (("content-type", "application/json"),)
    # 30 s of its 60 s lifetime are left, in the new process's clock.
    assert found.stored_at == pytest.approx(5.0 - 30.0)
    assert found.ttl == pytest.approx(60.0)
    assert reopened.get("ns", "k", max_age=30.0) is None
    wall.now += 30.0
    assert reopened.get("ns", "k") is None
    reopened.close()


def test_disk_cache_byte_bound_deletes_oldest(tmp_path, monkeypatch):
    wall = FakeClock()
    monkeypatch.setattr(cache_store, "wall_clock", wall)
    entry = answer(b"x" * 1000, 0.0)
    disk = DiskCache(tmp_path / "cache.sqlite3", max_bytes=entry.size * 2, timer=lambda: 0.0)
    disk.open()

    for key in ("a", "b", "c"):
        disk.put("ns", key, entry)
        wall.now += 1.0

    assert disk.get("ns", "a") is None
    assert disk.get("ns", "b") is not None
    assert disk.get("ns", "c") is not None
    assert disk.total_bytes == entry.size * 2
    disk.close()


def test_persisted_answer_hits_after_restart(upstream, tmp_path):
    rules = rules_text(upstream.port, cache="""
    cache:
      enabled: true
      persist: true
    """)
    marker = uuid.uuid4().hex
    first_gateway = start_gateway(tmp_path / "persist", rules, GATEWAY_ENV)
    try:
        first = post(first_gateway, chat_body(marker, stream=True))
    finally:
        first_gateway.stop()
    second_gateway = start_gateway(tmp_path / "persist", rules, GATEWAY_ENV)
    try:
        second = post(second_gateway, chat_body(marker, stream=True))
        row = second_gateway.wait_row(second.headers["x-tollhouse-request-id"])
    finally:
        second_gateway.stop()

    assert status_of(first) == "MISS"
    assert status_of(second) == "HIT"
    assert second.content == first.content
    assert row["cache_status"] == "HIT"
    assert upstream_count(upstream, marker) == 1


# --- the cache section of the rules ----------------------------------------------------------------


def test_cache_rules_project_overrides():
    rules = parse_cache(
        {"ttl": 100, "projects": {"alpha": {"enabled": True, "ttl": 5}, "beta": {"enabled": True, "share_group": "team"}}},
        {"alpha": None, "beta": None, "gamma": None},
    )

    assert rules.projects["alpha"].enabled is True
    assert rules.projects["alpha"].ttl == 5.0
    assert rules.projects["alpha"].namespace == "project:alpha"
    assert rules.projects["beta"].ttl == 100.0
    assert rules.projects["beta"].namespace == "group:team"
    assert rules.projects["gamma"].enabled is False
    assert rules.any_enabled is True


@pytest.mark.parametrize(
    "section, key",
    [
        ({"projects": {"delta": {"enabled": True}}}, "cache.projects.delta"),
        ({"projects": {"alpha": {"share_group": "team", "max_bytes": 10}}}, "cache.projects.alpha.max_bytes"),
        ({"ttl": 0}, "cache.ttl"),
        ({"enabled": "yes"}, "cache.enabled"),
        ({"persistent": True}, "cache.persistent"),
    ],
)
def test_cache_rules_invalid(section, key):
    with pytest.raises(RulesError) as caught:
        parse_cache(section, {"alpha": None})

    assert caught.value.key == key


def test_base_url_listener_hit(cache_gateway, upstream):
    marker = uuid.uuid4().hex
    url = f"http://127.0.0.1:{cache_gateway.base_url_port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {ALPHA_KEY}", "x-portkey-trace-id": f"trace-{marker}"}

    with httpx2.Client(trust_env=False, timeout=TIMEOUT) as client:
        first = client.post(url, json=chat_body(marker), headers=headers)
        second = client.post(url, json=chat_body(marker), headers={**headers, "x-portkey-trace-id": "trace-2"})

    assert status_of(first) == "MISS"
    assert status_of(second) == "HIT"
    assert second.content == first.content
    assert second.headers["x-portkey-trace-id"] == "trace-2"
    assert upstream_count(upstream, marker) == 1


def test_response_from_other_target_not_stored():
    from mitmproxy.test import tflow

    from addons.call import Call
    from addons.rules import parse_rules
    from plugins import cache as cache_plugin

    rules = parse_rules(
        {
            "providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"}},
            "projects": {"alpha": {"key_sha256": "0" * 64}},
            "cache": {"enabled": True, "coalesce": False},
        },
        base_dir=Path("."),
    )
    cache_plugin.tollhouse_configure(rules)
    body = chat_body("other target")
    call = Call(
        request_id="th_test", listener="proxy", provider=rules.providers["openai"], project=rules.projects["alpha"],
        endpoint="chat.completions", request_json=body, method="POST", status=200,
    )

    def run(call: Call, target_host: str) -> None:
        flow = tflow.tflow()
        flow.request.method = "POST"
        flow.request.content = json.dumps(body).encode()
        cache_plugin.tollhouse_request(call=call, flow=flow)
        flow.request.host = target_host
        flow.response = tflow.tresp(content=b'{"ok": true}', headers=http.Headers(content_type="application/json"))
        # tollhouse_response is a wrapper: run it around an empty set of other implementations.
        wrapper = cache_plugin.tollhouse_response(call=call, flow=flow)
        next(wrapper)
        with pytest.raises(StopIteration):
            wrapper.send(None)
        cache_plugin.tollhouse_call_end(call=call)

    run(call, "fallback.example")
    assert call.cache_status == "MISS"
    assert len(cache_plugin._state.store) == 0

    same_target = Call(
        request_id="th_test2", listener="proxy", provider=rules.providers["openai"], project=rules.projects["alpha"],
        endpoint="chat.completions", request_json=body, method="POST", status=200,
    )
    run(same_target, "address")
    assert len(cache_plugin._state.store) == 1
