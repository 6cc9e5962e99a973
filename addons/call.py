"""The record of one client call as it moves through the gateway.

A `Call` is created when the request headers arrive and becomes one row of the `requests` table when
the call ends, whether it was answered, rejected or failed. Plugins read and fill it through the hooks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from addons.rules import Project, Provider

# Endpoint names stored in the `endpoint` column, keyed by (API kind, request path).
ENDPOINTS = {
    ("openai", "/v1/chat/completions"): "chat.completions",
    ("openai", "/v1/responses"): "responses",
    ("openai", "/v1/embeddings"): "embeddings",
    ("anthropic", "/v1/messages"): "messages",
    ("anthropic", "/v1/messages/count_tokens"): "messages.count_tokens",
}


# Wire format of the provider kinds that speak another kind's API.
_KIND_FORMATS = {"azure": "openai", "openai-compatible": "openai"}
_AZURE_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/[^/]+(/.*)$")


def endpoint_for(kind: str, path: str) -> str:
    """Return the endpoint name for a request path, or "other" for paths the gateway does not price.

    Paths under a base-URL prefix (`/openai/v1/chat/completions`) and Azure deployment paths
    (`/openai/deployments/{deployment}/chat/completions`) count as their `/v1/...` path.
    """
    bare = path.split("?", 1)[0].rstrip("/")
    deployment = _AZURE_DEPLOYMENT_PATH.match(bare)
    if deployment:
        bare = "/v1" + deployment.group(1)
    elif not bare.startswith("/v1/") and "/v1/" in bare:
        bare = bare[bare.index("/v1/"):]
    return ENDPOINTS.get((_KIND_FORMATS.get(kind, kind), bare), "other")


@dataclass(slots=True)
class Usage:
    """Token counts of one call, normalised so that each token is priced exactly once.

    The three input fields are disjoint: `input_tokens` excludes cache reads and cache writes (OpenAI's
    `prompt_tokens` includes cached tokens and is reduced accordingly; Anthropic's `input_tokens` already
    excludes them). `output_tokens` is every billed output token, reasoning included; `reasoning_tokens`
    is the part of `output_tokens` spent on reasoning and is never priced a second time.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    #: All cache writes, whatever their lifetime.
    cache_write_tokens: int = 0
    #: The part of `cache_write_tokens` written with a one-hour lifetime (priced higher by Anthropic).
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


@dataclass(frozen=True, slots=True)
class Price:
    """The cost of a call and how it was reached.

    `cost_usd` is None when the cost is unknown; it is never 0 for an unknown price. `flag` is stored in
    the `price_flag` column; see `PRICE_FLAGS`.
    """

    cost_usd: Decimal | None
    flag: str


#: Values of the `price_flag` column.
PRICE_FLAGS = {
    "priced": "cost from the offline price database",
    "override": "cost from a price override in the rules",
    "partial": "the call ended early; cost of the usage seen before the end",
    "unknown_model": "usage known, but no price for the model: cost is NULL",
    "missing_usage": "the answer carried no usage: cost is NULL",
    "not_billed": "the call failed or was rejected before the provider billed anything: cost is 0",
    "cache_hit": "answered from the gateway's response cache: cost is 0, saved_usd has the original cost",
}


@dataclass(eq=False)
class Call:
    """One client call: request facts, the answer's facts, usage and cost."""

    request_id: str
    #: The listener that received the call: "proxy" (forward proxy) or "base_url" (base-URL listener).
    listener: str
    #: Wall-clock start, UTC.
    ts: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    #: Monotonic start, seconds; latency and time to first byte are measured from here.
    started: float = field(default_factory=time.monotonic)

    provider: Provider | None = None
    #: "openai" or "anthropic": the wire format the client speaks. It differs from
    #: `provider.api_format` when the gateway translates between the two.
    client_format: str | None = None
    project: Project | None = None
    endpoint: str = "other"
    method: str = ""
    path: str = ""
    #: The model the client requested, from the request body.
    model: str | None = None
    stream: bool = False
    #: The parsed JSON request body, or None for bodies that are not JSON objects.
    request_json: dict[str, Any] | None = None
    #: Credentials the client sent in its proxy URL (`http://PROJECT:KEY@host:port`), if any.
    proxy_credentials: tuple[str, str] | None = None

    #: True when the gateway or a plugin answered without contacting upstream (a rejection, a cache hit).
    answered_by_gateway: bool = False
    status: int | None = None
    #: Why the call failed or was rejected, in words safe to store (secrets removed).
    error: str | None = None
    response_model: str | None = None
    #: Monotonic time of the first response body byte from upstream.
    first_byte: float | None = None
    ended: float | None = None

    usage: Usage | None = None
    #: False when the call ended before the final usage report (a cut stream).
    usage_complete: bool = True
    #: True once a streamed answer's final event went by (`[DONE]`, `message_stop`, a terminal
    #: Responses event); a connection closed after it does not make the call incomplete.
    stream_finished: bool = False
    price: Price | None = None
    #: The response cache's decision: "HIT", "MISS", "REFRESH", "DISABLED", or None when not consulted.
    cache_status: str | None = None
    #: For a cache hit, the cost of the original answer in USD, which this call did not pay again.
    saved_usd: Decimal | None = None

    #: When True, the streamed answer is re-assembled event by event, so that `tollhouse_sse_event`
    #: implementations can withhold or rewrite events. A compressed stream is then sent decompressed.
    rewrite_stream: bool = False
    #: Name of the routing config that routed the call ("x-portkey-config" for one sent in the header).
    route: str | None = None
    #: Identity of the routing config, for the response cache and the circuit breakers: "route:NAME" for
    #: a route of the rules, "config:PROJECT:DIGEST" for a JSON config sent in the header.
    route_key: str | None = None
    #: Portkey's name of the config target whose response the client got, such as "config.targets[1]".
    served_by: str | None = None
    #: Upstream attempts of a call with fallbacks or retries, as `addons.fallback.Attempt.as_dict()`.
    attempts: list[dict[str, Any]] | None = None
    #: Free-form labels stored as JSON in the `tags` column (for example a team name).
    tags: dict[str, str] = field(default_factory=dict)
    #: Request and response bodies, kept only when the rules enable body logging (secrets masked).
    request_body: str | None = None
    response_body: str | None = None
    #: Scratch space for plugins; keys should be prefixed with the plugin's name.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        if self.ended is None:
            return None
        return (self.ended - self.started) * 1000.0

    @property
    def ttfb_ms(self) -> float | None:
        if self.first_byte is None:
            return None
        return (self.first_byte - self.started) * 1000.0
