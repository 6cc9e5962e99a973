"""Prometheus metrics of every finished call, served by the admin listener's `/metrics` (`addons.admin`).

The metrics live in their own `CollectorRegistry` (`REGISTRY`), not in prometheus-client's global one,
so that a plugin or library using the global registry cannot mix its series into the gateway's.
Counters are updated in `tollhouse_call_end`, when `call.usage` and `call.price` are final; calls in
flight when the gateway stops are not counted.

Label values: `project`, `provider` and `model` are "-" when unknown (an unauthenticated call, a
request without a model). `model` is the model named in the provider's response, else the requested one.
NOTE: `model` comes from client requests, so each new model name a client sends adds series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

from addons import hookimpl

if TYPE_CHECKING:
    from addons.call import Call

#: Key of `call.metadata` with the setting whose rate limit or budget rejected the call, set by
#: `plugins.rate_limits.reject`.
LIMIT_KEY = "rate_limits.rejected_by"

#: Bucket bounds of the latency histograms, in seconds: LLM calls take from tens of milliseconds
#: (cache hits, rejections) to minutes (long streamed answers).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_CALL_LABELS = ("project", "provider", "model")

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "tollhouse_requests", "Calls that ended, by HTTP status (\"none\" when no answer arrived).",
    _CALL_LABELS + ("status",), registry=REGISTRY,
)
ERRORS = Counter(
    "tollhouse_errors", "Calls that ended with an error: status 400 or above, or no answer.",
    _CALL_LABELS, registry=REGISTRY,
)
INPUT_TOKENS = Counter(
    "tollhouse_input_tokens", "Input tokens, cache reads and writes included.", _CALL_LABELS, registry=REGISTRY,
)
OUTPUT_TOKENS = Counter(
    "tollhouse_output_tokens", "Output tokens, reasoning included.", _CALL_LABELS, registry=REGISTRY,
)
COST = Counter(
    "tollhouse_cost_usd", "Cost of calls in USD; calls with an unknown cost add nothing.", _CALL_LABELS, registry=REGISTRY,
)
LATENCY = Histogram(
    "tollhouse_request_duration_seconds", "Time from the request headers to the end of the call.",
    ("provider",), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
TIME_TO_FIRST_BYTE = Histogram(
    "tollhouse_time_to_first_byte_seconds",
    "Time from the request headers to the first response body byte from upstream; calls the gateway answered itself are left out.",
    ("provider",), buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
CACHE_HITS = Counter(
    "tollhouse_cache_hits", "Calls answered from the gateway's response cache.", _CALL_LABELS, registry=REGISTRY,
)
LIMIT_REJECTIONS = Counter(
    "tollhouse_limit_rejections", "Calls rejected with 429 by a rate limit or a budget, by the setting that rejected them.",
    ("project", "limit"), registry=REGISTRY,
)
FALLBACKS = Counter(
    "tollhouse_fallbacks",
    "Moves of calls from one target of their routing config to another (fallbacks), one per move.",
    ("project",), registry=REGISTRY,
)
RETRIES = Counter(
    "tollhouse_retries", "Upstream requests repeated on the same target after a failure.", ("project",), registry=REGISTRY,
)


@hookimpl
def tollhouse_call_end(call: Call) -> None:
    project = call.project.name if call.project else "-"
    provider = call.provider.name if call.provider else "-"
    labels = (project, provider, call.response_model or call.model or "-")

    REQUESTS.labels(*labels, str(call.status) if call.status is not None else "none").inc()
    if call.status is None or call.status >= 400:
        ERRORS.labels(*labels).inc()
    if call.usage is not None:
        INPUT_TOKENS.labels(*labels).inc(call.usage.total_input_tokens)
        OUTPUT_TOKENS.labels(*labels).inc(call.usage.output_tokens)
    if call.price is not None and call.price.cost_usd is not None:
        COST.labels(*labels).inc(float(call.price.cost_usd))
    if call.cache_status == "HIT":
        CACHE_HITS.labels(*labels).inc()
    limit = call.metadata.get(LIMIT_KEY)
    if limit is not None:
        LIMIT_REJECTIONS.labels(project, limit).inc()

    if call.attempts:
        options = [attempt["option"] for attempt in call.attempts]
        moves = sum(1 for before, after in zip(options, options[1:]) if before != after)
        if moves:
            FALLBACKS.labels(project).inc(moves)
        retries = len(options) - 1 - moves
        if retries:
            RETRIES.labels(project).inc(retries)

    if call.latency_ms is not None:
        LATENCY.labels(provider).observe(call.latency_ms / 1000.0)
    if call.ttfb_ms is not None and not call.answered_by_gateway:
        TIME_TO_FIRST_BYTE.labels(provider).observe(call.ttfb_ms / 1000.0)
