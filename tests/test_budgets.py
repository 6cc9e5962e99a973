"""Budgets per project: the rejection once spent, its formats, and the spend read back after a restart."""

from __future__ import annotations

import json
import ssl
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

import anthropic
import httpx2
import pytest

from addons.policy_rules import parse_budgets
from addons.rules import RulesError
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import GatewayProcess, start_gateway
from conftest import ALPHA_KEY, ANTHROPIC_REAL_KEY, BETA_KEY, GATEWAY_ENV, OPENAI_REAL_KEY, anthropic_client, rules_text, use_gateway
from plugins.budgets import _period_end, _periods

TIMEOUT = 20.0
MODEL = "tollhouse-test-model"

# With the rules' price override (1.50 and 6.00 USD per million), each call costs
# 1000 * 1.50 / 1e6 + 1000 * 6.00 / 1e6 = 0.0075 USD.
OPENAI_USAGE = {"x-fake-usage": json.dumps({"prompt_tokens": 1000, "completion_tokens": 1000})}
ANTHROPIC_USAGE = {"x-fake-usage": json.dumps({"input_tokens": 1000, "output_tokens": 1000})}
CALL_COST = Decimal("0.0075")

BUDGET_RULES = """
budgets:
  warn_at: 0.5
  projects:
    alpha:
      daily_usd: 0.01
    beta:
      monthly_usd: 0.005
"""


def test_period_boundaries():
    moment = datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc)

    periods = _periods(moment)

    assert periods == {"day": date(2026, 12, 31), "month": date(2026, 12, 1)}
    assert _period_end("day", periods["day"]) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert _period_end("month", periods["month"]) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert _period_end("month", date(2026, 2, 1)) == datetime(2026, 3, 1, tzinfo=timezone.utc)


def test_budget_rules_reject_zero():
    with pytest.raises(RulesError, match=r"budgets\.projects\.alpha\.daily_usd"):
        parse_budgets({"projects": {"alpha": {"daily_usd": 0}}}, {"alpha": None})


@pytest.fixture(scope="module")
def upstream():
    server = FakeUpstream(expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY}).start_in_thread()
    yield server
    server.stop_thread()


def post_chat(gateway: GatewayProcess, marker: str) -> httpx2.Response:
    verify = ssl.create_default_context(cafile=str(gateway.ca_cert))
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}]}
    with httpx2.Client(proxy=gateway.proxy_url, verify=verify, trust_env=False, timeout=TIMEOUT) as client:
        return client.post(
            "https://api.openai.com/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {ALPHA_KEY}", **OPENAI_USAGE},
        )


def test_daily_budget_rejects_then_survives_restart(upstream, tmp_path):
    workdir = tmp_path / "budget"
    gateway = start_gateway(workdir, rules_text(upstream.port, budgets=BUDGET_RULES), GATEWAY_ENV)
    marker = uuid.uuid4().hex
    try:
        first = post_chat(gateway, f"{marker} 1")
        second = post_chat(gateway, f"{marker} 2")
        third = post_chat(gateway, f"{marker} 3")
    finally:
        assert gateway.stop() == 0

    assert first.status_code == 200
    assert second.status_code == 200
    assert third.status_code == 429
    body = third.json()["error"]
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "insufficient_quota"
    assert "project 'alpha' has spent its daily budget of 0.01 USD (spent 0.015000 USD)" in body["message"]
    assert "budgets.projects.alpha.daily_usd" in body["message"]
    assert third.headers["x-should-retry"] == "false"
    assert third.headers["x-tollhouse-limit"] == "budgets.projects.alpha.daily_usd"
    assert 1 <= int(third.headers["retry-after"]) <= 86400
    assert third.headers["x-ratelimit-limit-usd-day"] == "0.01"
    assert third.headers["x-ratelimit-remaining-usd-day"] == "0"
    assert third.headers["x-ratelimit-reset-usd-day"] == third.headers["retry-after"] + "s"
    assert "budgets: project alpha has spent 0.007500 USD of its daily budget of 0.01 USD (75 %)" in gateway.stderr()

    rows = {row["request_id"]: row for row in gateway.rows()}
    assert rows[first.headers["x-tollhouse-request-id"]]["cost_usd"] == CALL_COST
    rejected = rows[third.headers["x-tollhouse-request-id"]]
    assert rejected["status"] == 429
    assert rejected["cost_usd"] == Decimal(0)
    assert rejected["price_flag"] == "not_billed"
    assert sum(1 for request in upstream.received if marker.encode() in request.body) == 2

    restarted = start_gateway(workdir, rules_text(upstream.port, budgets=BUDGET_RULES), GATEWAY_ENV)
    try:
        after_restart = post_chat(restarted, f"{marker} 4")
    finally:
        restarted.stop()

    assert after_restart.status_code == 429
    assert "spent 0.015000 USD" in after_restart.json()["error"]["message"]
    assert sum(1 for request in upstream.received if marker.encode() in request.body) == 2


def test_monthly_budget_anthropic_format(upstream, tmp_path, monkeypatch):
    gateway = start_gateway(tmp_path / "monthly", rules_text(upstream.port, budgets=BUDGET_RULES), GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        client = anthropic_client(BETA_KEY)
        messages = [{"role": "user", "content": "budget"}]
        client.messages.create(model=MODEL, max_tokens=20, messages=messages, extra_headers=ANTHROPIC_USAGE)

        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(model=MODEL, max_tokens=20, messages=messages, extra_headers=ANTHROPIC_USAGE)
    finally:
        gateway.stop()

    error = caught.value
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "project 'beta' has spent its monthly budget of 0.005 USD" in error.body["error"]["message"]
    assert error.response.headers["x-tollhouse-limit"] == "budgets.projects.beta.monthly_usd"
    assert error.response.headers["x-should-retry"] == "false"
