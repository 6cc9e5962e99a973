"""Built-in pricing: the cost of a call from its usage, price overrides and genai-prices.

The decision, in order:

1. `/v1/messages/count_tokens` is free: cost 0, "not_billed".
2. No usage: cost 0 and "not_billed" when upstream sent no response or an error status,
   or for a GET/HEAD request to an unpriced endpoint (listing models and reading stored objects
   create no tokens). Otherwise the cost is unknown: None, "missing_usage".
3. A price override from the rules, looked up by `call.response_model` and then by `call.model`:
   "override".
4. genai-prices 0.2.3 (offline data bundled with the package), looked up by the same two names with
   the provider's `price_provider` as provider id: "priced", or None and "unknown_model" when
   neither name is known or the provider has no `price_provider`. The id is the kind for openai,
   anthropic and azure. For an openai-compatible provider it is `price_provider` from the rules, or
   else the genai-prices provider whose API URL pattern matches the base URL. For Azure, deployment
   names are first mapped to models through the provider's `deployments`.

A priced or overridden cost of a call whose usage is incomplete (`call.usage_complete` is False) is
flagged "partial" instead.

Usage plugins may put a genai-prices `price_context` mapping (for example ``{"service_tier": "flex"}``)
into ``call.metadata["pricing.context"]`` to select a price variant.

In genai-prices 0.2.3 only a started `genai_prices.UpdatePrices` fetches prices over the network, and
tollhouse never starts one. Importing the package and calling `calc_price` read the bundled data only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

import genai_prices
from genai_prices.data_snapshot import get_snapshot

from addons import hookimpl
from addons.call import Price

if TYPE_CHECKING:
    from addons.call import Call, Usage
    from addons.rules import PriceOverride, Rules

#: Key of `call.metadata` containing the genai-prices `price_context` mapping for this call.
PRICE_CONTEXT_KEY = "pricing.context"

_TOKENS_PER_RATE = Decimal(1_000_000)
_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/([^/]+)/")
_NOT_BILLED = Price(Decimal(0), "not_billed")


@dataclass(slots=True)
class _State:
    overrides: dict[str, PriceOverride]
    #: genai-prices provider id of each openai-compatible provider without `price_provider`, found
    #: by matching its base URL against the providers' API URL patterns in the bundled data.
    inferred_providers: dict[str, str] = field(default_factory=dict)


_state = _State(overrides={})


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    _state.overrides = dict(rules.prices)
    # Load the bundled price data now, so the first priced call does not pay for it on the event loop.
    snapshot = get_snapshot()
    _state.inferred_providers = {}
    for provider in getattr(rules, "providers", {}).values():
        if provider.kind != "openai-compatible" or provider.price_provider is not None:
            continue
        base_url = f"{provider.scheme}://{provider.host}{provider.base_path}"
        for known in snapshot.providers:
            if known.api_pattern and re.match(known.api_pattern, base_url):
                _state.inferred_providers[provider.name] = known.id
                break


def override_cost(usage: Usage, rates: PriceOverride) -> Decimal:
    """Return the cost in USD of `usage` at the override `rates`.

    A missing cache-read or cache-write rate is the input rate; a missing one-hour write rate is the
    cache-write rate, so one-hour writes never cost less than five-minute writes.
    """
    # `is None`, not truthiness: a rate of 0 is a valid price.
    cache_read_rate = rates.input if rates.cache_read is None else rates.cache_read
    cache_write_rate = rates.input if rates.cache_write is None else rates.cache_write
    write_1h_rate = cache_write_rate if rates.cache_write_1h is None else rates.cache_write_1h

    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    write_5m = usage.cache_write_tokens - write_1h
    total = (
        usage.input_tokens * rates.input
        + usage.cache_read_tokens * cache_read_rate
        + write_5m * cache_write_rate
        + write_1h * write_1h_rate
        + usage.output_tokens * rates.output
    )
    return total / _TOKENS_PER_RATE


def genai_prices_cost(call: Call, usage: Usage) -> Decimal | None:
    """Return the genai-prices cost in USD of `usage`, or None when no model name of the call is known."""
    priced_usage = genai_prices.Usage(
        # genai-prices takes the total input and treats the cache counts as parts of it.
        input_tokens=usage.total_input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=min(usage.cache_write_1h_tokens, usage.cache_write_tokens),
        # Reasoning tokens are part of output_tokens, so passing them too would price them twice.
        output_tokens=usage.output_tokens,
    )
    context = call.metadata.get(PRICE_CONTEXT_KEY)
    provider_id = getattr(call.provider, "price_provider", call.provider.kind) if call.provider is not None else None
    if call.provider is not None and provider_id is None:
        provider_id = _state.inferred_providers.get(call.provider.name)
    if call.provider is not None and provider_id is None:
        # genai-prices would guess a provider from the model name alone, which prices a model served
        # by an unknown OpenAI-compatible server at some other provider's rates.
        return None
    context = context if isinstance(context, dict) else None
    for model_ref in _model_names(call):
        try:
            provider, model = get_snapshot().find_provider_model(model_ref, None, provider_id, None)
        except LookupError:
            continue
        flat = flat_cost(model, usage, call, context)
        if flat is not None:
            return flat
        calculation = model.calc_price(
            priced_usage,
            provider,
            # Prices as of the call, so that re-pricing old rows gives the prices of their day.
            genai_request_timestamp=call.ts,
            price_context=context,
        )
        return calculation.total_price
    return None


def flat_cost(model, usage: Usage, call: Call, context: dict | None) -> Decimal | None:
    """Return the cost of `usage` for a model with flat per-token prices, or None to use genai-prices.

    genai-prices' general calculation costs about 100 us a call on a 2-core EPYC VM, most of the
    gateway's own time per request. Flat prices (no tiers) need only one multiplication per token
    kind, which gives the same Decimal. Tiered prices, a token kind the model has no price for, and
    price contexts (service tiers) go through genai-prices.
    """
    if context:
        return None
    prices = model.get_prices(call.ts)
    total = Decimal(0)
    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    counts = (
        (usage.input_tokens, "input_mtok"),
        (usage.cache_read_tokens, "cache_read_mtok"),
        (usage.cache_write_tokens - write_1h, "cache_write_mtok"),
        (write_1h, "cache_write_1h_mtok"),
        (usage.output_tokens, "output_mtok"),
    )
    for count, name in counts:
        if not count:
            continue
        rate = getattr(prices, name, None)
        if type(rate) is not Decimal:
            return None
        total += count * rate
    return total / _TOKENS_PER_RATE


def _model_names(call: Call) -> list[str]:
    candidates = [call.response_model]
    deployments = getattr(call.provider, "deployments", None) or {}
    if deployments:
        # Azure: the deployment in the path (classic form) or the body's model (v1 form) names a
        # deployment, which the rules map to the model it serves.
        deployment = _AZURE_DEPLOYMENT.match(call.path.split("?", 1)[0])
        if deployment:
            candidates.append(deployments.get(deployment.group(1)))
        candidates.append(deployments.get(call.model or ""))
    candidates.append(call.model)
    names: list[str] = []
    for name in candidates:
        if name and name not in names:
            names.append(name)
    return names


def _find_override(call: Call) -> PriceOverride | None:
    for name in _model_names(call):
        rates = _state.overrides.get(name)
        if rates is not None:
            return rates
    return None


def price_call(call: Call) -> Price:
    """Price a finished call by the rules in the module documentation."""
    if call.endpoint == "messages.count_tokens":
        return _NOT_BILLED

    usage = call.usage
    if usage is None:
        if call.status is None or not 200 <= call.status < 300:
            return _NOT_BILLED
        if call.endpoint == "other" and call.method.upper() in ("GET", "HEAD"):
            return _NOT_BILLED
        return Price(None, "missing_usage")

    rates = _find_override(call)
    if rates is not None:
        cost = override_cost(usage, rates)
        flag = "override"
    else:
        priced = genai_prices_cost(call, usage)
        if priced is None:
            return Price(None, "unknown_model")
        cost = priced
        flag = "priced"

    if not call.usage_complete:
        flag = "partial"
    return Price(cost, flag)


@hookimpl(trylast=True)
def tollhouse_price(call: Call) -> Price:
    return price_call(call)
