"""Tests for `plugins.pricing`: exact costs in USD as Decimal, price flags and the offline guarantee."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest
from mitmproxy.test import tflow

import addons.hookspecs
from addons.call import Call, Price, Usage, endpoint_for
from addons.rules import PriceOverride
from plugins import pricing, stream_usage, usage_anthropic, usage_openai

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recorded"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Prices may change by date in genai-prices' data, so every call is priced as of one fixed day.
CALL_DAY = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def make_pm(prices: dict[str, PriceOverride] | None = None) -> pluggy.PluginManager:
    manager = pluggy.PluginManager("tollhouse")
    manager.add_hookspecs(addons.hookspecs)
    for plugin in (stream_usage, usage_openai, usage_anthropic, pricing):
        manager.register(plugin)
    manager.hook.tollhouse_configure.call_historic(kwargs={"rules": SimpleNamespace(prices=prices or {})})
    return manager


@pytest.fixture
def pm() -> pluggy.PluginManager:
    return make_pm()


def make_call(
    kind: str,
    model: str | None,
    usage: Usage | None,
    *,
    path: str | None = None,
    status: int | None = 200,
    response_model: str | None = None,
) -> Call:
    call = Call(request_id="t", listener="proxy", ts=CALL_DAY)
    call.provider = SimpleNamespace(kind=kind, name=kind)  # type: ignore[assignment]
    call.path = path or ("/v1/messages" if kind == "anthropic" else "/v1/chat/completions")
    call.endpoint = endpoint_for(kind, call.path)
    call.method = "POST"
    call.model = model
    call.response_model = response_model
    call.status = status
    call.usage = usage
    return call


def price(pm: pluggy.PluginManager, call: Call) -> Price:
    return pm.hook.tollhouse_price(call=call)


# -- genai-prices ----------------------------------------------------------------------------------


def test_anthropic_cache_reads_and_both_write_lifetimes(pm: pluggy.PluginManager) -> None:
    usage = Usage(input_tokens=100, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=1000,
                  cache_write_1h_tokens=600)
    call = make_call("anthropic", "claude-sonnet-4-20250514", usage)

    # 100 x $3 + 2000 x $0.30 + 400 x $3.75 (5m writes) + 600 x $6 (1h writes) + 500 x $15, per 1M.
    assert price(pm, call) == Price(Decimal("0.0135"), "priced")


def test_anthropic_writes_without_1h_split(pm: pluggy.PluginManager) -> None:
    usage = Usage(input_tokens=100, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=1000)
    call = make_call("anthropic", "claude-sonnet-4-20250514", usage)

    # All 1000 writes at the 5-minute rate of $3.75.
    assert price(pm, call) == Price(Decimal("0.01215"), "priced")


def test_anthropic_long_context_tier(pm: pluggy.PluginManager) -> None:
    usage = Usage(input_tokens=50_000, output_tokens=1000, cache_read_tokens=100_000, cache_write_tokens=100_000,
                  cache_write_1h_tokens=50_000)
    call = make_call("anthropic", "claude-sonnet-4-5", usage, response_model="claude-sonnet-4-5-20250929")

    # 250k input > 200k, so every token uses the long-context rates:
    # 50k x $6 + 100k x $0.60 + 50k x $7.50 + 50k x $12 + 1k x $22.50, per 1M.
    assert price(pm, call) == Price(Decimal("1.3575"), "priced")


def test_openai_cached_tokens(pm: pluggy.PluginManager) -> None:
    usage = Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=2000)
    call = make_call("openai", "gpt-4o", usage, response_model="gpt-4o-2024-08-06")

    # 1000 x $2.50 + 2000 x $1.25 + 500 x $10, per 1M.
    assert price(pm, call) == Price(Decimal("0.01"), "priced")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # 2000 x $2 + 1000 x $8 per 1M. The 800 reasoning tokens are inside the 1000 output tokens.
        ("o3", Decimal("0.012")),
        # 2000 x $1.25 + 1000 x $10 per 1M.
        ("gpt-5", Decimal("0.0125")),
    ],
)
def test_reasoning_not_priced_twice(pm: pluggy.PluginManager, model: str, expected: Decimal) -> None:
    usage = Usage(input_tokens=2000, output_tokens=1000, reasoning_tokens=800)
    call = make_call("openai", model, usage)

    assert price(pm, call) == Price(expected, "priced")


def test_embeddings_input_only(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "text-embedding-3-small", Usage(input_tokens=7), path="/v1/embeddings")

    # 7 x $0.02 per 1M.
    assert price(pm, call) == Price(Decimal("0.00000014"), "priced")


def test_openai_cache_writes_without_write_rate(pm: pluggy.PluginManager) -> None:
    usage = Usage(input_tokens=1000, cache_write_tokens=1000)
    call = make_call("openai", "gpt-4o", usage)

    # gpt-4o has no cache-write rate in genai-prices, so writes cost the input rate: 2000 x $2.50 per 1M.
    assert price(pm, call) == Price(Decimal("0.005"), "priced")


@pytest.mark.parametrize(
    ("tier", "expected"),
    [("flex", Decimal("5")), ("priority", Decimal("17.5")), ("default", Decimal("10")), ("auto", Decimal("10"))],
)
def test_openai_service_tier(pm: pluggy.PluginManager, tier: str, expected: Decimal) -> None:
    call = make_call("openai", "o3", Usage(input_tokens=1_000_000, output_tokens=1_000_000))
    call.metadata["pricing.context"] = {"service_tier": tier}

    assert price(pm, call) == Price(expected, "priced")


def test_falls_back_to_requested_model(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "gpt-4o", Usage(input_tokens=1000), response_model="my-deployment-name")

    assert price(pm, call) == Price(Decimal("0.0025"), "priced")


def test_unknown_model(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "no-such-model", Usage(input_tokens=1000), response_model="no-such-model-2026")

    assert price(pm, call) == Price(None, "unknown_model")


def test_unknown_provider_kind(pm: pluggy.PluginManager) -> None:
    call = make_call("no-such-provider", "gpt-4o", Usage(input_tokens=1000))

    assert price(pm, call) == Price(None, "unknown_model")


def test_incomplete_usage_is_partial(pm: pluggy.PluginManager) -> None:
    call = make_call("anthropic", "claude-haiku-4-5", Usage(input_tokens=10, output_tokens=2))
    call.usage_complete = False

    # 10 x $1 + 2 x $5 per 1M.
    assert price(pm, call) == Price(Decimal("0.00002"), "partial")


def test_incomplete_usage_unknown_model(pm: pluggy.PluginManager) -> None:
    call = make_call("anthropic", "claude-unknown", Usage(input_tokens=10))
    call.usage_complete = False

    assert price(pm, call) == Price(None, "unknown_model")


# -- no usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [None, 400, 401, 429, 500, 529])
def test_no_usage_and_no_success_not_billed(pm: pluggy.PluginManager, status: int | None) -> None:
    call = make_call("openai", "gpt-4o", None, status=status)

    assert price(pm, call) == Price(Decimal(0), "not_billed")


def test_no_usage_on_success_is_missing(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "gpt-4o", None, status=200)

    assert price(pm, call) == Price(None, "missing_usage")


def test_count_tokens_not_billed(pm: pluggy.PluginManager) -> None:
    call = make_call("anthropic", "claude-sonnet-4-0", Usage(input_tokens=1234), path="/v1/messages/count_tokens")

    assert price(pm, call) == Price(Decimal(0), "not_billed")


def test_get_on_unpriced_endpoint_not_billed(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", None, None, path="/v1/models")
    call.method = "GET"

    assert price(pm, call) == Price(Decimal(0), "not_billed")


def test_post_on_unpriced_endpoint_missing_usage(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "gpt-image-1", None, path="/v1/images/generations")

    assert price(pm, call) == Price(None, "missing_usage")


def test_error_status_with_usage_is_priced(pm: pluggy.PluginManager) -> None:
    call = make_call("openai", "gpt-4o", Usage(input_tokens=1000), status=500)

    assert price(pm, call) == Price(Decimal("0.0025"), "priced")


# -- overrides -------------------------------------------------------------------------------------


def test_override_by_response_model_first() -> None:
    pm = make_pm({
        "gpt-4o-2024-08-06": PriceOverride(input=Decimal("1"), output=Decimal("2")),
        "gpt-4o": PriceOverride(input=Decimal("100"), output=Decimal("200")),
    })
    call = make_call("openai", "gpt-4o", Usage(input_tokens=1000, output_tokens=500),
                     response_model="gpt-4o-2024-08-06")

    # 1000 x $1 + 500 x $2 per 1M.
    assert price(pm, call) == Price(Decimal("0.002"), "override")


def test_override_by_requested_model() -> None:
    pm = make_pm({"house-model": PriceOverride(input=Decimal("0.5"), output=Decimal("1.5"))})
    call = make_call("openai", "house-model", Usage(input_tokens=2000, output_tokens=1000),
                     response_model="house-model-v3")

    # 2000 x $0.50 + 1000 x $1.50 per 1M.
    assert price(pm, call) == Price(Decimal("0.0025"), "override")


def test_override_all_cache_rates() -> None:
    rates = PriceOverride(input=Decimal("3"), output=Decimal("15"), cache_read=Decimal("0.3"),
                          cache_write=Decimal("3.75"), cache_write_1h=Decimal("6"))
    pm = make_pm({"claude-custom": rates})
    usage = Usage(input_tokens=100, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=1000,
                  cache_write_1h_tokens=600)

    assert price(pm, make_call("anthropic", "claude-custom", usage)) == Price(Decimal("0.0135"), "override")


def test_override_missing_cache_rates_use_input() -> None:
    pm = make_pm({"m": PriceOverride(input=Decimal("2"), output=Decimal("4"))})
    usage = Usage(input_tokens=100, output_tokens=10, cache_read_tokens=200, cache_write_tokens=300,
                  cache_write_1h_tokens=100)

    # (100 + 200 + 300) x $2 + 10 x $4 per 1M.
    assert price(pm, make_call("anthropic", "m", usage)) == Price(Decimal("0.00124"), "override")


def test_override_missing_1h_rate_uses_cache_write() -> None:
    pm = make_pm({"m": PriceOverride(input=Decimal("2"), output=Decimal("4"), cache_write=Decimal("2.5"))})
    usage = Usage(input_tokens=100, output_tokens=10, cache_write_tokens=300, cache_write_1h_tokens=100)

    # 100 x $2 + 300 x $2.50 (both write lifetimes) + 10 x $4 per 1M.
    assert price(pm, make_call("anthropic", "m", usage)) == Price(Decimal("0.00099"), "override")


def test_override_zero_rates_are_kept() -> None:
    pm = make_pm({"m": PriceOverride(input=Decimal("2"), output=Decimal("4"), cache_read=Decimal("0"),
                                      cache_write=Decimal("0"), cache_write_1h=Decimal("0"))})
    usage = Usage(input_tokens=100, output_tokens=10, cache_read_tokens=200, cache_write_tokens=300,
                  cache_write_1h_tokens=100)

    # 100 x $2 + 10 x $4 per 1M, because every cache token is free.
    assert price(pm, make_call("anthropic", "m", usage)) == Price(Decimal("0.00024"), "override")


def test_override_partial() -> None:
    pm = make_pm({"m": PriceOverride(input=Decimal("1"), output=Decimal("1"))})
    call = make_call("anthropic", "m", Usage(input_tokens=10, output_tokens=5))
    call.usage_complete = False

    assert price(pm, call) == Price(Decimal("0.000015"), "partial")


def test_override_beats_genai_prices() -> None:
    pm = make_pm({"gpt-4o": PriceOverride(input=Decimal("1"), output=Decimal("1"))})
    call = make_call("openai", "gpt-4o", Usage(input_tokens=1_000_000))

    assert price(pm, call) == Price(Decimal("1"), "override")


def test_plugin_price_wins_over_builtin() -> None:
    pm = make_pm()

    class FreeForTests:
        @addons.hookimpl
        def tollhouse_price(self, call: Call) -> Price | None:
            return Price(Decimal(0), "not_billed") if call.model == "free" else None

    pm.register(FreeForTests())

    assert price(pm, make_call("openai", "free", Usage(input_tokens=5))) == Price(Decimal(0), "not_billed")
    assert price(pm, make_call("openai", "gpt-4o", Usage(input_tokens=1000))) == Price(Decimal("0.0025"), "priced")


# -- end to end with recorded responses ------------------------------------------------------------


def load_fixture(name: str) -> dict[str, Any]:
    path = RECORDED / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"recorded provider traffic not found at {RECORDED} (it is not part of the repository)")
    return json.loads(path.read_text(encoding="utf-8"))


RECORDED_COSTS = [
    # 3 x $3 + 1111 x $0.30 + 418 x $3.75 + 33 x $15 per 1M.
    ("anthropic-messages-cache-read-write", Decimal("0.0024048")),
    # 120 x $2 + 1024 x $0.50 + 2 x $8 per 1M.
    ("openai-chat-cached", Decimal("0.000768")),
    # 208 x $0.05 + 138 x $0.40 per 1M. 128 of the 138 output tokens are reasoning.
    ("openai-chat-reasoning", Decimal("0.0000656")),
    # 7 x $0.02 per 1M.
    ("openai-embeddings", Decimal("0.00000014")),
]


@pytest.mark.parametrize(("name", "expected"), RECORDED_COSTS, ids=[c[0] for c in RECORDED_COSTS])
def test_recorded_answer_cost(pm: pluggy.PluginManager, name: str, expected: Decimal) -> None:
    fixture = load_fixture(name)
    request = fixture["request"]
    call = make_call(fixture["provider"], request["body"].get("model"), None, path=request["path"])
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "application/json"
    flow.response.content = fixture["response"]["body"].encode()

    pm.hook.tollhouse_response(call=call, flow=flow)

    assert price(pm, call) == Price(expected, "priced")


# -- offline ---------------------------------------------------------------------------------------


NO_NETWORK_SCRIPT = """
import socket, sys, threading

def reject_connection(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")

socket.socket.connect = reject_connection
socket.socket.connect_ex = reject_connection
socket.create_connection = reject_connection
socket.getaddrinfo = reject_connection

from decimal import Decimal
from types import SimpleNamespace
import genai_prices.data_snapshot
import genai_prices.update_prices
from addons.call import Call, Usage
from plugins import pricing

pricing.tollhouse_configure(SimpleNamespace(prices={}))
call = Call(request_id="t", listener="proxy")
call.provider = SimpleNamespace(kind="openai", name="openai")
call.endpoint = "chat.completions"
call.status = 200
call.model = "gpt-4o"
call.usage = Usage(input_tokens=1000)
result = pricing.price_call(call)
assert result.cost_usd == Decimal("0.0025"), result
assert genai_prices.data_snapshot._custom_snapshot is None
assert genai_prices.update_prices._shared_updater.thread is None
assert [t.name for t in threading.enumerate()] == ["MainThread"], threading.enumerate()
print("offline ok")
"""


def test_pricing_never_touches_network() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_SCRIPT],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "offline ok"


@pytest.mark.parametrize(
    ("provider_id", "model_ref"),
    [
        ("openai", "gpt-4o-mini-2024-07-18"),
        ("openai", "gpt-4o"),
        ("openai", "o3"),
        ("openai", "text-embedding-3-small"),
        ("anthropic", "claude-sonnet-4-20250514"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-opus-4-1"),
    ],
)
def test_flat_cost_equals_genai_prices(provider_id, model_ref) -> None:
    from datetime import datetime, timezone

    import genai_prices
    from genai_prices.data_snapshot import get_snapshot

    from plugins.pricing import flat_cost

    provider, model = get_snapshot().find_provider_model(model_ref, None, provider_id, None)
    call = make_call(provider_id, model_ref, Usage())
    call.ts = datetime(2026, 12, 1, tzinfo=timezone.utc)
    usages = [
        Usage(input_tokens=1234, output_tokens=567),
        Usage(input_tokens=10, output_tokens=3, cache_read_tokens=4096),
        Usage(input_tokens=7, output_tokens=900, reasoning_tokens=800),
    ]
    if model_ref.startswith("text-embedding"):
        # Embedding models have an input price only; other token kinds fall back to genai-prices.
        usages = [Usage(input_tokens=1234)]
    if provider_id == "anthropic":
        usages.append(Usage(input_tokens=50, output_tokens=20, cache_read_tokens=300, cache_write_tokens=700, cache_write_1h_tokens=200))

    for usage in usages:
        expected = model.calc_price(
            genai_prices.Usage(
                input_tokens=usage.total_input_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                cache_write_1h_tokens=usage.cache_write_1h_tokens,
                output_tokens=usage.output_tokens,
            ),
            provider,
            genai_request_timestamp=call.ts,
        ).total_price
        fast = flat_cost(model, usage, call, None)
        assert fast == expected, (model_ref, usage)


def test_flat_cost_declines_tiered_prices() -> None:
    from genai_prices.data_snapshot import get_snapshot

    from plugins.pricing import flat_cost

    _, model = get_snapshot().find_provider_model("claude-sonnet-4-5-20250929", None, "anthropic", None)
    call = make_call("anthropic", "claude-sonnet-4-5-20250929", Usage())

    assert flat_cost(model, Usage(input_tokens=10, output_tokens=5), call, None) is None
