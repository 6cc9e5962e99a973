"""A plugin that raises after the answer has started is recorded; the built-ins still run."""

from __future__ import annotations

import pytest

from addons.testing.gateway_process import start_gateway
from conftest import GATEWAY_ENV, openai_client, rules_text, use_gateway

FAILING_PLUGIN = '''
from addons import hookimpl


@hookimpl
def tollhouse_sse_event(call, event):
    if call.tags.get("fail") == "sse":
        raise RuntimeError("sse boom")


@hookimpl
def tollhouse_request(call, flow):
    call.tags["fail"] = flow.request.headers.pop("x-fail", "")


@hookimpl
def tollhouse_response(call, flow):
    if call.tags.get("fail") == "response":
        raise RuntimeError("response boom")


@hookimpl(tryfirst=True)
def tollhouse_price(call):
    if call.tags.get("fail") == "price":
        raise RuntimeError("price boom")


@hookimpl
def tollhouse_log_row(call, row):
    if call.tags.get("fail") == "row":
        raise RuntimeError("row boom")
'''

MODEL = "tollhouse-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def failing_gateway(fake, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("failing")
    (workdir / "failing.py").write_text(FAILING_PLUGIN, encoding="utf-8")
    rules = rules_text(fake.port, plugin="plugins:\n  - failing.py\n")
    process = start_gateway(workdir, rules, GATEWAY_ENV)
    yield process
    process.stop()


def test_sse_failure_keeps_stream_and_price(failing_gateway, monkeypatch):
    use_gateway(failing_gateway, monkeypatch)

    with openai_client().chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-fail": "sse"}
    ) as response:
        body = b"".join(response.iter_bytes())
        rid = response.headers["x-tollhouse-request-id"]

    # The usage chunk the gateway asked for is still removed, and the call is still priced.
    assert b'"choices":[]' not in body
    assert b'"usage":null' not in body
    assert body.endswith(b"data: [DONE]\n\n")
    row = failing_gateway.wait_row(rid)
    assert row["price_flag"] == "override"
    assert row["cost_usd"] is not None
    plugin = failing_gateway.data_dir.parent / "failing.py"
    assert row["error"] == f"plugin {plugin} failed in tollhouse_sse_event: RuntimeError: sse boom"


@pytest.mark.parametrize(
    ("fail", "hook"),
    [("response", "tollhouse_response"), ("price", "tollhouse_price"), ("row", "tollhouse_log_row")],
)
def test_hook_failure_recorded_in_row(failing_gateway, monkeypatch, fail, hook):
    use_gateway(failing_gateway, monkeypatch)

    raw = openai_client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"x-fail": fail}
    )

    assert raw.status_code == 200
    row = failing_gateway.wait_row(raw.headers["x-tollhouse-request-id"])
    plugin = failing_gateway.data_dir.parent / "failing.py"
    assert row["error"] == f"plugin {plugin} failed in {hook}: RuntimeError: {fail} boom"
    # The built-in usage extraction and pricing ran regardless.
    assert row["input_tokens"] is not None
    assert row["price_flag"] == "override"


UPSTREAM_PLUGIN = '''
from addons import hookimpl


@hookimpl
def tollhouse_upstream_request(call, flow):
    if call.provider.name == "anthropic" and flow.request.headers.get("x-fail") == "upstream":
        raise RuntimeError("upstream boom")
'''

ROUTE = """
routes:
  claude-first:
    match: {provider: openai, model: gpt-4o}
    strategy: {mode: fallback}
    targets:
      - {provider: anthropic, model: claude-sonnet-4-20250514}
      - {provider: openai, model: gpt-4o}
"""


def test_upstream_hook_failure_moves_on(fake, tmp_path, monkeypatch):
    (tmp_path / "upstream_failing.py").write_text(UPSTREAM_PLUGIN, encoding="utf-8")
    rules = rules_text(fake.port, plugin="plugins:\n  - upstream_failing.py\n", routes=ROUTE)
    gateway = start_gateway(tmp_path, rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        raw = openai_client().chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-fail": "upstream"}
        )
        assert raw.parse().choices[0].message.role == "assistant"
        row = gateway.wait_row(raw.headers["x-tollhouse-request-id"])
    finally:
        gateway.stop()

    import json

    attempts = json.loads(row["attempts"])
    assert [(a["provider"], a["status"], a["sent"]) for a in attempts] == [("anthropic", 500, False), ("openai", 200, True)]
    assert attempts[0]["error"] == "tollhouse plugin hook tollhouse_upstream_request failed: RuntimeError: upstream boom"
    assert (row["status"], row["error"], row["attempt_count"]) == (200, None, 1)
