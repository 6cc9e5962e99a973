"""Response cache: sends a stored complete response to an identical request without calling upstream.

Turned on per project by the `cache:` section of the rules (`addons.policy_rules.parse_cache`). Only
POST calls to the generation and embedding endpoints are cached. The key (`addons.cache_store.cache_key`)
covers the project or its share group, the provider and upstream target, the path, the model, the JSON
body in canonical form and the request headers that change the response. Key order in the body does
not matter, and its `stream` flag keeps streams and whole responses apart.

A response is stored when the call ends with status 200, no error, the whole body, and the target it
was keyed for: a stream must reach its final event (`[DONE]`, `message_stop` or `response.completed`).
A hit sends the stored bytes whole with the stored headers: a stream arrives as one body in the same
event framing the client received the first time.

Request controls: `Cache-Control: no-cache` or `x-portkey-cache-force-refresh: true` skip the lookup
and store the new response (REFRESH); `Cache-Control: no-store` neither reads nor writes (DISABLED).
Responses carry `x-tollhouse-cache` and `x-portkey-cache-status` with HIT, MISS, REFRESH or DISABLED.

With `coalesce`, a request identical to one in flight waits for that call's response instead of going
upstream, for at most `coalesce_timeout` seconds; it goes upstream itself when no response was stored.

With `persist`, responses are also written to `cache.sqlite3` in the data directory by a worker thread,
and a memory miss looks there (off the event loop) before going upstream, so responses survive a restart.

A hit is logged with cost 0, price flag `cache_hit`, the original cost in `saved_usd` and no token
counts, because no tokens were billed for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING

from mitmproxy import http

from addons import hookimpl
from addons.cache_store import KEY_HEADERS, CachedResponse, DiskCache, MemoryCache, cache_key
from addons.call import Price

if TYPE_CHECKING:
    from addons.call import Call
    from addons.policy_rules import CacheRules, ProjectCache
    from addons.rules import Rules
    from addons.sse import SSEEvent

logger = logging.getLogger(__name__)

CACHEABLE_ENDPOINTS = {"chat.completions", "responses", "embeddings", "messages"}
STATUS_HEADERS = ("x-tollhouse-cache", "x-portkey-cache-status")
FORCE_REFRESH_HEADER = "x-portkey-cache-force-refresh"

# Response headers that are not stored: framing (set again for the stored body), hop-by-hop, cookies,
# and the gateway's per-call headers, which the gateway sets again on a hit (the `x-portkey-` prefix too).
_UNSTORED_HEADERS = {
    "content-length", "transfer-encoding", "content-encoding", "connection", "keep-alive", "date", "set-cookie",
    "x-tollhouse-request-id", *STATUS_HEADERS,
}
_UNSTORED_PREFIXES = ("x-portkey-", "x-tollhouse-")

# Final events of a complete stream: OpenAI Chat Completions, Anthropic Messages, OpenAI Responses.
_FINAL_EVENTS = {"message_stop", "response.completed"}

# Keys of `call.metadata`.
_KEY = "cache.key"
_LEADER = "cache.leader"
_CAPTURE = "cache.capture"
_CAPTURE_SIZE = "cache.capture_size"
_COMPLETE = "cache.complete"
_PENDING = "cache.pending"


class _State:
    def __init__(self) -> None:
        self.rules: CacheRules | None = None
        self.store = MemoryCache(max_entry_bytes=0)
        #: (namespace, key) -> future resolved when the call in flight for that key ends.
        self.in_flight: dict[tuple[str, str], asyncio.Future] = {}
        #: The persistent tier and the one thread that does its file I/O, when `persist` is on.
        self.disk: DiskCache | None = None
        self.disk_thread: concurrent.futures.ThreadPoolExecutor | None = None


_state = _State()


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    # A second call comes from a rules reload: release the calls waiting for an identical call (they
    # go upstream themselves) and close the previous disk tier after the work queued for it.
    for waiting in _state.in_flight.values():
        if not waiting.done():
            waiting.set_result(None)
    if _state.disk_thread is not None:
        _state.disk_thread.submit(_disk_call, _state.disk.close)
        _state.disk_thread.shutdown(wait=False)
    _state.rules = rules.cache
    _state.store = MemoryCache(max_entry_bytes=rules.cache.max_entry_bytes)
    _state.in_flight.clear()
    _state.disk = _state.disk_thread = None
    if rules.cache.persist and rules.cache.any_enabled:
        _state.disk = DiskCache(rules.data_dir / "cache.sqlite3", rules.cache.persist_max_bytes)
        _state.disk_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollhouse-cache")
        # Queued first, so every lookup and write runs after the file is open.
        _state.disk_thread.submit(_disk_call, _state.disk.open)
    if rules.cache.any_enabled:
        enabled = sorted(name for name, settings in rules.cache.projects.items() if settings.enabled)
        logger.info("response cache on for project(s) %s", ", ".join(enabled))


def _settings(call: Call) -> ProjectCache | None:
    if _state.rules is None or call.project is None:
        return None
    return _state.rules.projects.get(call.project.name)


def _target(call: Call, flow: http.HTTPFlow) -> tuple[str, str, str]:
    request = flow.request
    return (call.provider.name, f"{request.scheme}://{request.host}:{request.port}", request.path)


def _directives(flow: http.HTTPFlow) -> set[str]:
    values = flow.request.headers.get_all("cache-control")
    return {part.strip().lower() for value in values for part in value.split(",") if part.strip()}


@hookimpl
def tollhouse_request(call: Call, flow: http.HTTPFlow):
    if flow.response is not None or _state.rules is None or not _state.rules.any_enabled:
        return None
    settings = _settings(call)
    if settings is None or call.endpoint not in CACHEABLE_ENDPOINTS or call.request_json is None:
        return None
    if flow.request.method != "POST":
        return None

    force_refresh = flow.request.headers.pop(FORCE_REFRESH_HEADER, "").strip().lower() == "true"
    directives = _directives(flow)
    if not settings.enabled or "no-store" in directives:
        call.cache_status = "DISABLED"
        return None

    provider, target, path = _target(call, flow)
    key = cache_key(
        namespace=settings.namespace,
        provider=provider,
        # A routing config decides which targets may answer, so its identity is part of the key.
        target=target if call.route_key is None else f"{target} {call.route_key}",
        path=path,
        model=call.model,
        body=call.request_json,
        headers=[(name, flow.request.headers[name]) for name in KEY_HEADERS if name in flow.request.headers],
    )
    call.metadata[_KEY] = (settings.namespace, key, (provider, target, path))

    if force_refresh or "no-cache" in directives:
        call.cache_status = "REFRESH"
        _lead(call, settings)
        return None

    answer = _state.store.get(settings.namespace, key, settings.ttl)
    if answer is not None:
        _serve(call, flow, answer)
        return None

    if settings.coalesce and (settings.namespace, key) in _state.in_flight:
        return _wait_for_leader(call, flow, settings, key)
    call.cache_status = "MISS"
    _lead(call, settings)
    if _state.disk is not None:
        return _lookup_disk(call, flow, settings, key)
    return None


def _disk_call(method, *args):
    """Run a `DiskCache` method on the cache's thread; log and swallow its errors."""
    try:
        return method(*args)
    except Exception:
        logger.exception("response cache: %s failed on %s", method.__name__, _state.disk.path if _state.disk else "-")
        return None


async def _lookup_disk(call: Call, flow: http.HTTPFlow, settings: ProjectCache, key: str) -> None:
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(_state.disk_thread, _disk_call, _state.disk.get, settings.namespace, key, settings.ttl)
    if answer is None or flow.response is not None:
        return
    _state.store.put(settings.namespace, settings.max_bytes, key, answer)
    _serve(call, flow, answer)


def _lead(call: Call, settings: ProjectCache) -> None:
    """Make `call` the one that identical calls wait for, when coalescing is on and none is in flight."""
    if not settings.coalesce:
        return
    namespace, key, _ = call.metadata[_KEY]
    if (namespace, key) not in _state.in_flight:
        _state.in_flight[(namespace, key)] = asyncio.get_running_loop().create_future()
        call.metadata[_LEADER] = True


async def _wait_for_leader(call: Call, flow: http.HTTPFlow, settings: ProjectCache, key: str) -> None:
    namespace = settings.namespace
    deadline = time.monotonic() + _state.rules.coalesce_timeout
    while (leader := _state.in_flight.get((namespace, key))) is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logger.warning("call %s: gave up waiting for an identical call in flight after %.0f s", call.request_id, _state.rules.coalesce_timeout)
            break
        # wait() leaves the shared future alone when this call times out or is cancelled.
        await asyncio.wait({leader}, timeout=remaining)
        answer = _state.store.get(namespace, key, settings.ttl)
        if answer is not None:
            _serve(call, flow, answer)
            return
    # The call in flight stored nothing (an error, a cut stream) or took too long: go upstream.
    call.cache_status = "MISS"
    _lead(call, settings)


def _serve(call: Call, flow: http.HTTPFlow, answer: CachedResponse) -> None:
    headers = http.Headers([(name.encode(), value.encode()) for name, value in answer.headers])
    for name in STATUS_HEADERS:
        headers[name] = "HIT"
    headers["x-tollhouse-request-id"] = call.request_id
    flow.response = http.Response.make(answer.status, answer.body, headers)
    call.answered_by_gateway = True
    call.cache_status = "HIT"
    call.saved_usd = answer.cost_usd
    call.response_model = answer.response_model


@hookimpl
def tollhouse_response_headers(call: Call, flow: http.HTTPFlow) -> None:
    if call.cache_status is None:
        return
    for name in STATUS_HEADERS:
        flow.response.headers[name] = call.cache_status
    if _KEY in call.metadata and call.stream and _is_event_stream(flow.response):
        call.metadata[_CAPTURE] = []
        call.metadata[_CAPTURE_SIZE] = 0


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


def _is_final_event(event: SSEEvent) -> bool:
    if event.data == "[DONE]" or event.event in _FINAL_EVENTS:
        return True
    # Data-only framing: the type is only in the JSON.
    return '"type":"message_stop"' in event.data or '"type":"response.completed"' in event.data


@hookimpl(wrapper=True)
def tollhouse_sse_event(call: Call, event: SSEEvent):
    # A wrapper, so that it receives every other implementation's result and the final bytes of the event.
    results = yield
    parts = call.metadata.get(_CAPTURE)
    if parts is None:
        return results
    withheld = call.rewrite_stream and False in results
    if not withheld:
        parts.append(event.raw)
        size = call.metadata[_CAPTURE_SIZE] + len(event.raw)
        call.metadata[_CAPTURE_SIZE] = size
        if size > _state.store.max_entry_bytes:
            call.metadata[_CAPTURE] = None
    if _is_final_event(event):
        call.metadata[_COMPLETE] = True
    return results


@hookimpl(wrapper=True)
def tollhouse_response(call: Call, flow: http.HTTPFlow):
    # A wrapper, so that the answer is stored as the client gets it: after every other implementation,
    # the translation to the client's format included.
    result = yield
    _capture_answer(call, flow)
    return result


def _capture_answer(call: Call, flow: http.HTTPFlow) -> None:
    keyed = call.metadata.get(_KEY)
    response = flow.response
    if keyed is None or call.cache_status not in ("MISS", "REFRESH") or response is None:
        return
    if response.status_code != 200 or call.error is not None:
        return
    if call.route is None and _target(call, flow)[:2] != keyed[2][:2]:
        # Another plugin sent the call to another provider or origin, so the response does not belong
        # under this key. (The path may differ: translation changes it after the key was made.) A
        # routing config's fallback target answers the same request, so its answer is stored.
        return
    if call.stream != _is_event_stream(response):
        return
    if call.stream:
        parts = call.metadata.pop(_CAPTURE, None)
        if parts is None or not call.metadata.get(_COMPLETE):
            return
        body = b"".join(parts)
    else:
        body = response.content
        if body is None or len(body) > _state.store.max_entry_bytes:
            return
    headers = tuple(
        (name, value)
        for name, value in response.headers.items(multi=True)
        if name.lower() not in _UNSTORED_HEADERS and not name.lower().startswith(_UNSTORED_PREFIXES)
    )
    call.metadata[_PENDING] = (response.status_code, headers, body)


@hookimpl(tryfirst=True)
def tollhouse_price(call: Call) -> Price | None:
    if call.cache_status == "HIT":
        return Price(Decimal(0), "cache_hit")
    return None


@hookimpl
def tollhouse_call_end(call: Call) -> None:
    keyed = call.metadata.get(_KEY)
    if keyed is None:
        return
    namespace, key, _ = keyed
    try:
        _store(call, namespace, key)
    finally:
        if call.metadata.pop(_LEADER, False):
            waiting = _state.in_flight.pop((namespace, key), None)
            if waiting is not None and not waiting.done():
                waiting.set_result(None)


def _store(call: Call, namespace: str, key: str) -> None:
    pending = call.metadata.pop(_PENDING, None)
    settings = _settings(call)
    if pending is None or settings is None or call.error is not None or call.status != 200:
        return
    status, headers, body = pending
    answer = CachedResponse(
        status=status,
        headers=headers,
        body=body,
        stream=call.stream,
        response_model=call.response_model,
        cost_usd=call.price.cost_usd if call.price is not None else None,
        stored_at=_state.store.now(),
        ttl=settings.ttl,
    )
    if _state.disk is not None:
        _state.disk_thread.submit(_disk_call, _state.disk.put, namespace, key, answer)
    if not _state.store.put(namespace, settings.max_bytes, key, answer):
        logger.info("call %s: response of %d bytes not cached: larger than cache.max_entry_bytes or max_bytes", call.request_id, answer.size)
