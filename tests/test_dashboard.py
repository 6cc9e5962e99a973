"""The cost dashboard on the admin listener: `data.json` numbers, and the page rendered in headless Chromium.

The gateway runs on 127.0.0.1 in front of the pytest session's fake upstream. Chromium loads only the admin
listener's page, with its background services (updates, sync, component downloads) turned off so that it
opens no connection to another host.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import timezone
from decimal import Decimal
from pathlib import Path

import pytest

from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import start_gateway
from conftest import ALPHA_KEY, BETA_KEY, GATEWAY_ENV, rules_text
from test_admin import MODEL, admin_get, chat, chat_body, messages, request

CHROMIUM = "/usr/bin/chromium"
#: A model with no price in the rules or in genai-prices, so its calls have an unknown cost.
UNPRICED_MODEL = "tollhouse-unpriced-model"
#: Seconds Chromium may take to load and render the page before the test fails.
CHROMIUM_TIMEOUT = 60.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--window-size=1280,900",
    "--enable-logging=stderr",
    "--v=0",
]
# Prices in the rules: $1.50 input and $6.00 output per million tokens.
CHAT_COST = Decimal("0.0045")  # 1000 input and 500 output tokens
MESSAGES_COST = Decimal("0.00045")  # 100 input and 50 output tokens

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} not found: install the Debian package chromium to run the dashboard's browser test",
)


def unpriced_chat(port: int, key: str):
    body = dict(chat_body(False), model=UNPRICED_MODEL)
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    headers = {"authorization": f"Bearer {key}", "x-fake-usage": json.dumps(usage)}
    return request(port, "POST", "/v1/chat/completions", body, headers)


@pytest.fixture(scope="module")
def traffic(fake: FakeUpstream, tmp_path_factory):
    """A gateway after five known calls: alpha 2 chats and 1 message, beta 1 chat and 1 unpriced chat."""
    gateway = start_gateway(tmp_path_factory.mktemp("dashboard"), rules_text(fake.port), GATEWAY_ENV)
    try:
        responses = [
            chat(gateway, ALPHA_KEY),
            chat(gateway, ALPHA_KEY),
            messages(gateway, ALPHA_KEY),
            chat(gateway, BETA_KEY),
            unpriced_chat(gateway.base_url_port, BETA_KEY),
        ]
        assert [response.status_code for response in responses] == [200] * 5
        rows = [gateway.wait_row(response.headers["x-tollhouse-request-id"]) for response in responses]
        yield gateway, rows
    finally:
        gateway.stop()


def utc_day(row: dict) -> str:
    return row["ts"].astimezone(timezone.utc).date().isoformat()


def test_data_json_totals(traffic):
    gateway, rows = traffic
    response = admin_get(gateway, "/dashboard/data.json")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert len(data["days"]) == 30
    assert data["last_day"] == data["days"][-1]
    assert rows[-1]["price_flag"] == "unknown_model"
    assert Decimal(data["totals"]["cost_usd"]) == 3 * CHAT_COST + MESSAGES_COST
    assert data["totals"]["calls"] == 5
    assert data["totals"]["unknown_cost_calls"] == 1
    assert data["totals"]["saved_usd"] == "0"


def test_data_json_project_days(traffic):
    gateway, rows = traffic
    data = admin_get(gateway, "/dashboard/data.json?days=7").json()

    assert len(data["days"]) == 7
    # The calls may straddle midnight UTC, so the expected groups come from the rows' own days.
    expected: dict[tuple[str, str], list] = {}
    costs = [CHAT_COST, CHAT_COST, MESSAGES_COST, CHAT_COST, None]
    for row, cost in zip(rows, costs, strict=True):
        group = expected.setdefault((utc_day(row), row["project"]), [0, None, 0])
        group[0] += 1
        if cost is None:
            group[2] += 1
        else:
            group[1] = (group[1] or Decimal(0)) + cost
    found = {
        (item["day"], item["project"]): [
            item["calls"],
            Decimal(item["cost_usd"]) if item["cost_usd"] is not None else None,
            item["unknown_cost_calls"],
        ]
        for item in data["project_days"]
    }
    assert found == expected


def test_data_json_models_and_calls(traffic):
    gateway, rows = traffic
    data = admin_get(gateway, "/dashboard/data.json").json()

    models = {item["model"]: item for item in data["models"]}
    assert set(models) == {MODEL, UNPRICED_MODEL}
    assert Decimal(models[MODEL]["cost_usd"]) == 3 * CHAT_COST + MESSAGES_COST
    assert models[MODEL]["calls"] == 4
    assert models[UNPRICED_MODEL]["cost_usd"] is None
    assert models[UNPRICED_MODEL]["unknown_cost_calls"] == 1
    assert models[UNPRICED_MODEL]["saved_usd"] == "0"

    top = data["top_calls"]
    assert [Decimal(call["cost_usd"]) for call in top[:4]] == [CHAT_COST, CHAT_COST, CHAT_COST, MESSAGES_COST]
    assert top[4]["cost_usd"] is None
    assert (top[4]["project"], top[4]["model"]) == ("beta", UNPRICED_MODEL)
    assert (top[4]["input_tokens"], top[4]["output_tokens"]) == (10, 5)
    assert (top[3]["project"], top[3]["input_tokens"], top[3]["output_tokens"]) == ("alpha", 100, 50)
    assert {call["request_id"] for call in top} == {row["request_id"] for row in rows}


def test_data_json_rejects_invalid_days(traffic):
    gateway, _ = traffic
    for query in ("days=0", "days=abc", "days=-3", "days=100000"):
        response = admin_get(gateway, f"/dashboard/data.json?{query}")
        assert response.status_code == 400, query
        assert "invalid days parameter" in response.text


def test_dashboard_page_is_self_contained(traffic):
    gateway, _ = traffic
    response = admin_get(gateway, "/dashboard")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    # No script, style or image from another host: every URL in the page is a same-origin path.
    assert re.findall(r"""(?:src|href)\s*=""", response.text) == []
    assert re.findall(r"https?://", response.text) == ["http://"]  # the SVG namespace, which is not fetched
    assert "/dashboard/data.json" in response.text


def run_chromium(tmp_path: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False)


def console_messages(stderr: str) -> list[str]:
    """Return Chromium's log lines for the page's console messages and uncaught exceptions.

    Chromium 150 logs every console message as `INFO:CONSOLE:<line>`, console.error included, so the
    level does not tell errors apart. The page writes to the console only when it fails, so any such
    line is a failure.
    """
    return [line for line in stderr.splitlines() if "Uncaught" in line or re.search(r"CONSOLE[:(]", line)]


@needs_chromium
def test_dashboard_renders_in_chromium(traffic, tmp_path):
    gateway, rows = traffic
    url = f"http://127.0.0.1:{gateway.admin_port}/dashboard"

    result = run_chromium(tmp_path, url, "--dump-dom", "--virtual-time-budget=5000")
    assert result.returncode == 0, result.stderr
    dom = result.stdout
    assert console_messages(result.stderr) == []
    assert '<body data-state="ready"' in dom, dom[-2000:]

    project_bars = re.findall(r'<rect class="bar project-bar"[^>]*data-project="([^"]+)" data-day="([^"]+)"', dom)
    expected_bars = {(row["project"], utc_day(row)) for row in rows[:4]}
    assert set(project_bars) == expected_bars
    assert len(project_bars) == len(expected_bars)
    model_bars = re.findall(r'<rect class="bar model-bar"[^>]*data-model="([^"]+)" data-cost="([^"]+)"', dom)
    assert dict(model_bars) == {MODEL: "0.01395", UNPRICED_MODEL: "unknown"}
    assert 'id="total-cost">0.013950<' in dom
    assert 'id="unknown-calls">1<' in dom
    assert 'id="total-saved">0.000000<' in dom
    assert "No cache hits: 0 USD saved" in dom
    table_rows = re.findall(r'<tr data-request-id="[^"]+">(.*?)</tr>', dom)
    assert len(table_rows) == 5
    assert '<td class="number unknown">unknown</td>' in table_rows[-1]


@needs_chromium
def test_dashboard_screenshot_png(traffic, tmp_path):
    gateway, _ = traffic
    url = f"http://127.0.0.1:{gateway.admin_port}/dashboard"
    screenshot = tmp_path / "dashboard.png"

    result = run_chromium(tmp_path, url, f"--screenshot={screenshot}", "--virtual-time-budget=5000")
    assert result.returncode == 0, result.stderr
    assert console_messages(result.stderr) == []
    assert screenshot.exists(), result.stderr
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    # A blank 1280x900 page is about 5 KB as PNG (Chromium 150), and the charts and text add tens of KB.
    assert len(data) > 20_000
