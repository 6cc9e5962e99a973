"""The admin listener (`/metrics`, `/healthz`), SIGHUP reload of the rules, and JSON log lines.

The gateways here run on 127.0.0.1 ports of their own, in front of the session's fake upstream, so
their counters start at zero and contain only the calls made here.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from dataclasses import dataclass
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.rules import project_key_digest
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import GatewayProcess, start_gateway
from conftest import ALPHA_KEY, BETA_KEY, GATEWAY_ENV, rules_text

MODEL = "tollhouse-test-model"
GAMMA_KEY = "th-gamma-key-90c4be"
CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 500}
MESSAGES_USAGE = {"input_tokens": 100, "output_tokens": 50}
#: Seconds to wait for a log line the gateway writes after a signal.
LOG_TIMEOUT = 15.0

RATE_LIMITS = """
rate_limits:
  projects:
    beta:
      requests_per_minute: 1
"""


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> Answer:
    """Send one HTTP/1.1 request to 127.0.0.1:`port` (no proxy) and read the whole response."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20.0)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"content-type": "application/json", **(headers or {})} if payload else dict(headers or {})
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def chat_body(stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def chat(gateway: GatewayProcess, key: str, *, stream: bool = False) -> Answer:
    headers = {"authorization": f"Bearer {key}", "x-fake-usage": json.dumps(CHAT_USAGE)}
    return request(gateway.base_url_port, "POST", "/v1/chat/completions", chat_body(stream), headers)


def messages(gateway: GatewayProcess, key: str) -> Answer:
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "x-fake-usage": json.dumps(MESSAGES_USAGE)}
    return request(gateway.base_url_port, "POST", "/v1/messages", body, headers)


def admin_get(gateway: GatewayProcess, path: str) -> Answer:
    return request(gateway.admin_port, "GET", path)


def samples(gateway: GatewayProcess) -> dict[tuple[str, tuple], float]:
    """Return every sample of `/metrics`, keyed by sample name and sorted label pairs."""
    response = admin_get(gateway, "/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labels(**values: str) -> tuple:
    return tuple(sorted(values.items()))


def wait_for_log(gateway: GatewayProcess, text: str, timeout: float = LOG_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := gateway.stderr()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged after {timeout} s; gateway log:\n{log}")
        time.sleep(0.05)
    return log


def json_lines(gateway: GatewayProcess) -> list[dict]:
    return [json.loads(line) for line in gateway.stderr().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def traffic(fake: FakeUpstream, tmp_path_factory):
    """A gateway that logs JSON, after a known set of calls; yields it with the calls' request ids."""
    rules = rules_text(fake.port, rate_limits=RATE_LIMITS, log_format="log_format: json\n")
    gateway = start_gateway(tmp_path_factory.mktemp("admin"), rules, GATEWAY_ENV)
    try:
        responses = {
            "alpha_chat": chat(gateway, ALPHA_KEY),
            "alpha_chat_stream": chat(gateway, ALPHA_KEY, stream=True),
            "alpha_messages": messages(gateway, ALPHA_KEY),
            "unknown_key": chat(gateway, "th-not-a-project-key"),
            "beta_chat": chat(gateway, BETA_KEY),
            "beta_limited": chat(gateway, BETA_KEY),
        }
        statuses = {name: response.status_code for name, response in responses.items()}
        assert statuses == {
            "alpha_chat": 200, "alpha_chat_stream": 200, "alpha_messages": 200,
            "unknown_key": 401, "beta_chat": 200, "beta_limited": 429,
        }
        ids = {name: response.headers["x-tollhouse-request-id"] for name, response in responses.items()}
        # A row is queued in the same step that updates the metrics, so once every row is in the
        # database, every call is counted.
        for request_id in ids.values():
            gateway.wait_row(request_id)
        yield gateway, ids
    finally:
        gateway.stop()


def test_metrics_request_counters(traffic):
    gateway, _ = traffic
    found = samples(gateway)

    assert found[("tollhouse_requests_total", labels(project="alpha", provider="openai", model=MODEL, status="200"))] == 2
    assert found[("tollhouse_requests_total", labels(project="alpha", provider="anthropic", model=MODEL, status="200"))] == 1
    assert found[("tollhouse_requests_total", labels(project="beta", provider="openai", model=MODEL, status="200"))] == 1
    assert found[("tollhouse_requests_total", labels(project="beta", provider="openai", model=MODEL, status="429"))] == 1
    # The unknown key is rejected before the body is read, so the call has no model.
    assert found[("tollhouse_requests_total", labels(project="-", provider="openai", model="-", status="401"))] == 1
    total = sum(value for (name, _), value in found.items() if name == "tollhouse_requests_total")
    assert total == 6


def test_metrics_error_counters(traffic):
    gateway, _ = traffic
    found = samples(gateway)

    assert found[("tollhouse_errors_total", labels(project="-", provider="openai", model="-"))] == 1
    assert found[("tollhouse_errors_total", labels(project="beta", provider="openai", model=MODEL))] == 1
    assert ("tollhouse_errors_total", labels(project="alpha", provider="openai", model=MODEL)) not in found
    limit = "rate_limits.projects.beta.requests_per_minute"
    assert found[("tollhouse_limit_rejections_total", labels(project="beta", limit=limit))] == 1
    assert not [key for key in found if key[0] in ("tollhouse_fallbacks_total", "tollhouse_retries_total")]
    assert not [key for key in found if key[0] == "tollhouse_cache_hits_total"]


def test_metrics_tokens_and_cost(traffic):
    gateway, _ = traffic
    found = samples(gateway)
    alpha_openai = labels(project="alpha", provider="openai", model=MODEL)
    alpha_anthropic = labels(project="alpha", provider="anthropic", model=MODEL)
    beta_openai = labels(project="beta", provider="openai", model=MODEL)

    assert found[("tollhouse_input_tokens_total", alpha_openai)] == 2000
    assert found[("tollhouse_output_tokens_total", alpha_openai)] == 1000
    assert found[("tollhouse_input_tokens_total", alpha_anthropic)] == 100
    assert found[("tollhouse_output_tokens_total", alpha_anthropic)] == 50
    assert found[("tollhouse_input_tokens_total", beta_openai)] == 1000
    # Prices in the rules: $1.50 input and $6.00 output per million tokens.
    chat_cost = Decimal(1000) * Decimal("1.50") / 10**6 + Decimal(500) * Decimal("6.00") / 10**6
    messages_cost = Decimal(100) * Decimal("1.50") / 10**6 + Decimal(50) * Decimal("6.00") / 10**6
    assert found[("tollhouse_cost_usd_total", alpha_openai)] == pytest.approx(float(2 * chat_cost), rel=1e-9)
    assert found[("tollhouse_cost_usd_total", alpha_anthropic)] == pytest.approx(float(messages_cost), rel=1e-9)
    assert found[("tollhouse_cost_usd_total", beta_openai)] == pytest.approx(float(chat_cost), rel=1e-9)


def test_metrics_histogram_counts(traffic):
    gateway, _ = traffic
    found = samples(gateway)

    assert found[("tollhouse_request_duration_seconds_count", labels(provider="openai"))] == 5
    assert found[("tollhouse_request_duration_seconds_count", labels(provider="anthropic"))] == 1
    assert found[("tollhouse_request_duration_seconds_bucket", labels(provider="openai", le="+Inf"))] == 5
    # Only upstream responses have a time to first byte, so the 401 and the 429 are left out.
    assert found[("tollhouse_time_to_first_byte_seconds_count", labels(provider="openai"))] == 3
    assert found[("tollhouse_time_to_first_byte_seconds_count", labels(provider="anthropic"))] == 1


def test_healthz_reports_state(traffic):
    gateway, _ = traffic
    response = admin_get(gateway, "/healthz")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "ok"
    assert body["calls_in_flight"] == 0
    assert body["uptime_seconds"] >= 0
    assert body["log_writer"]["state"] == "running"
    assert body["log_writer"]["database_locked_seconds"] is None


def test_admin_unknown_path_404(traffic):
    gateway, _ = traffic
    assert admin_get(gateway, "/").status_code == 404
    assert request(gateway.admin_port, "POST", "/metrics").status_code == 405


def test_json_call_line_fields(traffic):
    gateway, ids = traffic
    lines = {line.get("request_id"): line for line in json_lines(gateway) if line.get("request_id")}

    line = lines[ids["alpha_chat"]]
    assert line["level"] == "INFO"
    assert line["logger"] == "addons.gateway"
    assert line["message"].startswith(ids["alpha_chat"])
    assert "T" in line["time"]
    assert (line["project"], line["provider"], line["model"], line["status"]) == ("alpha", "openai", MODEL, 200)
    assert (line["input_tokens"], line["output_tokens"]) == (1000, 500)
    assert Decimal(line["cost_usd"]) == Decimal("0.0045")
    assert line["latency_ms"] >= 0
    assert line["error"] is None


def test_json_rejections_log_warning(traffic):
    gateway, ids = traffic
    lines = json_lines(gateway)

    limited = [line for line in lines if ids["beta_limited"] in line["message"] and "rejected" in line["message"]]
    assert [line["level"] for line in limited] == ["WARNING"]
    assert "requests_per_minute" in limited[0]["message"]
    unknown = [line for line in lines if ids["unknown_key"] in line["message"] and "rejected" in line["message"]]
    assert [line["level"] for line in unknown] == ["WARNING"]


# -- SIGHUP reload -----------------------------------------------------------------------------------


def with_gamma(rules: str) -> str:
    """Add project gamma to the projects of a `rules_text` file."""
    beta = f"  beta:\n    key_sha256: {project_key_digest(BETA_KEY)}\n"
    assert beta in rules
    return rules.replace(beta, beta + f"  gamma:\n    key_sha256: {project_key_digest(GAMMA_KEY)}\n")


def test_sighup_reload_with_stream_in_flight(fake: FakeUpstream, tmp_path, monkeypatch):
    rules = rules_text(fake.port)
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    rules_path = tmp_path / "gateway" / "rules.yaml"
    try:
        assert chat(gateway, GAMMA_KEY).status_code == 401
        monkeypatch.setattr(fake, "chunk_delay", 0.2)
        connection = http.client.HTTPConnection("127.0.0.1", gateway.base_url_port, timeout=20.0)
        try:
            connection.request(
                "POST", "/v1/chat/completions", body=json.dumps(chat_body(True)).encode(),
                headers={"content-type": "application/json", "authorization": f"Bearer {ALPHA_KEY}"},
            )
            stream = connection.getresponse()
            stream_id = stream.getheader("x-tollhouse-request-id")
            received = [stream.readline()]
            assert admin_get(gateway, "/healthz").json()["calls_in_flight"] == 1

            # A valid reload adds gamma; the changed max_request_bytes waits for a restart.
            rules_path.write_text(with_gamma(rules) + "max_request_bytes: 1000000\n", encoding="utf-8")
            gateway.process.send_signal(signal.SIGHUP)
            log = wait_for_log(gateway, "reloaded the rules")
            received.append(stream.read())
        finally:
            connection.close()
        monkeypatch.setattr(fake, "chunk_delay", 0.0)

        assert stream.status == 200
        assert b"data: [DONE]" in b"".join(received)
        row = gateway.wait_row(stream_id)
        assert (row["status"], row["error"]) == (200, None)
        assert "take effect only after a restart: max_request_bytes" in log
        assert chat(gateway, GAMMA_KEY).status_code == 200

        # An invalid file leaves the reloaded rules in place and logs why.
        rules_path.write_text(rules + "max_request_bytes: -1\n", encoding="utf-8")
        gateway.process.send_signal(signal.SIGHUP)
        log = wait_for_log(gateway, "reload failed")
        assert "keeping the current rules" in log
        assert "max_request_bytes: is not a positive whole number (got -1)" in log
        assert chat(gateway, GAMMA_KEY).status_code == 200
        assert gateway.process.poll() is None
    finally:
        gateway.stop()


def test_sighup_rejects_new_intercepted_host(fake: FakeUpstream, tmp_path):
    rules = rules_text(fake.port)
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    rules_path = tmp_path / "gateway" / "rules.yaml"
    try:
        changed = rules.replace("    key_env: OPENAI_API_KEY\n", "    key_env: OPENAI_API_KEY\n    hosts: [api.example.test]\n", 1)
        assert changed != rules
        rules_path.write_text(with_gamma(changed), encoding="utf-8")
        gateway.process.send_signal(signal.SIGHUP)
        log = wait_for_log(gateway, "reload failed")

        assert "api.example.test" in log
        assert "Restart the gateway" in log
        assert chat(gateway, GAMMA_KEY).status_code == 401
        assert chat(gateway, ALPHA_KEY).status_code == 200
    finally:
        gateway.stop()


def test_plan_reload_keeps_restart_settings(tmp_path):
    from addons.reload import plan_reload
    from addons.rules import load_rules

    current_path = tmp_path / "current.yaml"
    current_path.write_text(rules_text(1234), encoding="utf-8")
    new_path = tmp_path / "new.yaml"
    new_text = rules_text(1234).replace("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:18080\n", 1)
    new_path.write_text(with_gamma(new_text) + "admin_listen: 127.0.0.1:19090\n", encoding="utf-8")
    current = load_rules(current_path)

    applied, pending = plan_reload(current, load_rules(new_path))

    assert pending == ["listen", "admin_listen"]
    assert (applied.listen_host, applied.listen_port) == (current.listen_host, current.listen_port)
    assert (applied.admin_listen_host, applied.admin_listen_port) == (current.admin_listen_host, current.admin_listen_port)
    assert sorted(applied.projects) == ["alpha", "beta", "gamma"]


def test_plan_reload_fallback_settings(tmp_path):
    from addons.reload import plan_reload
    from addons.rules import load_rules

    current_path = tmp_path / "current.yaml"
    current_path.write_text(rules_text(1234), encoding="utf-8")
    new_path = tmp_path / "new.yaml"
    new_path.write_text(rules_text(1234, fallbacks="fallbacks:\n  connect_timeout: 3\n  breaker_failures: 2\n"), encoding="utf-8")
    current = load_rules(current_path)

    applied, pending = plan_reload(current, load_rules(new_path))

    assert pending == ["fallbacks.connect_timeout"]
    assert applied.fallbacks.connect_timeout == 10.0
    assert applied.fallbacks.breaker_failures == 2


def test_run_options_override_rules(tmp_path):
    import argparse

    from addons.cli import _run_overrides
    from addons.rules import load_rules

    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(rules_text(1234), encoding="utf-8")
    args = argparse.Namespace(listen=None, base_url_listen=None, admin_listen="127.0.0.1:0", log_format="json")

    rules = _run_overrides(args)(load_rules(rules_path))

    assert rules.log_format == "json"
    assert (rules.admin_listen_host, rules.admin_listen_port) == ("127.0.0.1", 0)
