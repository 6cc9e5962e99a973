"""The gateway process over its life: reading the log while it runs, stopping, crashing, and the CLI.

Every gateway here is a real `tollhouse run` process in front of the fake upstream on a loopback port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from datetime import timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from conftest import (
    ALPHA_KEY,
    ANTHROPIC_REAL_KEY,
    BETA_KEY,
    GATEWAY_ENV,
    OPENAI_REAL_KEY,
    REPO,
    anthropic_client,
    openai_client,
    rules_text,
    use_gateway,
)
from addons.logstore import connect_readonly
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import start_gateway

MODEL = "tollhouse-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]
# Bound for CLI runs and helper processes, in seconds.
PROCESS_TIMEOUT = 60
# Many words, so that a slowed stream is still running when the test signals the gateway.
LONG_TEXT = " ".join(f"word{index}" for index in range(60))
PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)


def request_id(response) -> str:
    return response.headers["x-tollhouse-request-id"]


def call_openai(key: str = ALPHA_KEY, **headers: str) -> str:
    """Send one chat completion through the proxy from the environment and return its request id."""
    raw = openai_client(key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers=headers or None
    )
    assert raw.status_code == 200
    return request_id(raw)


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def stored_ids(database: Path) -> list[str]:
    with connect_readonly(database, timeout=10.0) as con:
        return [rid for (rid,) in con.execute("SELECT request_id FROM requests ORDER BY ts").fetchall()]


# -- reading the log while the gateway runs --------------------------------------------------------

# Opens the log read-only, prints the stored request ids, and keeps the file open until stdin has a line.
READER_SCRIPT = """
import json, sys
from addons.logstore import connect_readonly
con = connect_readonly(sys.argv[1], timeout=10.0)
ids = [rid for (rid,) in con.execute("SELECT request_id FROM requests").fetchall()]
print(json.dumps(ids), flush=True)
sys.stdin.readline()
con.close()
"""


def test_sql_readers_while_gateway_runs(proxy_env):
    earlier = [call_openai(), call_openai(BETA_KEY)]
    for rid in earlier:
        proxy_env.wait_row(rid)

    reader = subprocess.Popen(
        [sys.executable, "-c", READER_SCRIPT, str(proxy_env.database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen_by_other_process = json.loads(reader.stdout.readline() or "null")
        assert seen_by_other_process is not None, reader.stderr.read()
        # Calls go on while another process has the file open.
        during_other = [call_openai(), call_openai()]

        with connect_readonly(proxy_env.database, timeout=10.0) as con:
            seen_here = {rid for (rid,) in con.execute("SELECT request_id FROM requests").fetchall()}
            # ...and while this process has it open as well.
            during_both = [call_openai()]

        reader.stdin.write("done\n")
        reader.stdin.flush()
        assert reader.wait(timeout=PROCESS_TIMEOUT) == 0, reader.stderr.read()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(timeout=PROCESS_TIMEOUT)
        reader.stdin.close()
        reader.stdout.close()
        reader.stderr.close()

    assert set(earlier) <= set(seen_by_other_process)
    assert set(earlier) <= seen_here
    # Rows of the calls made while readers held the file land once they close it.
    for rid in during_other + during_both:
        row = proxy_env.wait_row(rid)
        assert row["status"] == 200
        assert row["project"] == "alpha"


# -- stopping and crashing -------------------------------------------------------------------------


def test_sigterm_finishes_stream(tmp_path, monkeypatch):
    fake = FakeUpstream(chunk_delay=0.03, expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY})
    fake.start_in_thread()
    gateway = None
    try:
        gateway = start_gateway(tmp_path / "gateway", rules_text(fake.port), GATEWAY_ENV)
        use_gateway(gateway, monkeypatch)
        stream = anthropic_client().messages.create(
            model=MODEL,
            max_tokens=500,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-text": urllib.parse.quote(LONG_TEXT)},
        )
        rid = request_id(stream.response)
        events = []
        for event in stream:
            events.append(event)
            if len(events) == 1:
                gateway.process.send_signal(signal.SIGTERM)

        exit_code = gateway.process.wait(timeout=PROCESS_TIMEOUT)
    finally:
        if gateway is not None and gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)
        fake.stop_thread()

    assert "waiting up to 20 s for 1 call(s) in flight" in gateway.stderr()
    assert [event.type for event in events][0] == "message_start"
    assert events[-1].type == "message_stop"
    text = "".join(event.delta.text for event in events if event.type == "content_block_delta")
    assert text == LONG_TEXT
    assert fake.sent[0].complete
    assert exit_code == 0

    output_tokens = next(event.usage.output_tokens for event in events if event.type == "message_delta")
    with connect_readonly(gateway.database, timeout=10.0) as con:
        cursor = con.execute("SELECT status, error, output_tokens, price_flag FROM requests WHERE request_id = ?", [rid])
        assert cursor.fetchall() == [(200, None, output_tokens, "override")]


def test_sigkill_keeps_flushed_rows(fake, tmp_path, monkeypatch):
    workdir = tmp_path / "gateway"
    rules = rules_text(fake.port)
    gateway = start_gateway(workdir, rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        rids = [call_openai() for _ in range(3)]
        rows = [gateway.wait_row(rid) for rid in rids]
    finally:
        exit_code = gateway.stop(signal.SIGKILL)
    assert exit_code == -signal.SIGKILL

    # This simulates a kill between the insert's commit and the spool's truncation. The stored rows are
    # then still in the spool, and the next start imports them again.
    spool = gateway.data_dir / "tollhouse.spool.jsonl"
    with spool.open("a", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps({"ts": row["ts"].isoformat(), "request_id": row["request_id"]}) + "\n")

    restarted = start_gateway(workdir, rules, GATEWAY_ENV)
    try:
        use_gateway(restarted, monkeypatch)
        after_restart = call_openai()
        restarted.wait_row(after_restart)
        ids = stored_ids(restarted.database)
        log = restarted.stderr()
    finally:
        restarted.stop()

    assert ids == rids + [after_restart]
    assert "imported 0 rows left by a previous run, 3 were already stored" in log
    assert spool.read_bytes() == b""


# -- the CLI ---------------------------------------------------------------------------------------


def test_ca_prints_cert_path(proxy_env):
    rules = proxy_env.data_dir.parent / "rules.yaml"

    result = run_cli("ca", "--rules", str(rules), cwd=proxy_env.data_dir.parent)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"CA certificate: {proxy_env.ca_cert}"
    assert f"NODE_EXTRA_CA_CERTS={proxy_env.ca_cert}" in result.stdout


def test_ca_bundle_works_for_client(proxy_env, tmp_path):
    rules = proxy_env.data_dir.parent / "rules.yaml"
    bundle = tmp_path / "bundle" / "ca-bundle.pem"

    result = run_cli("ca", "--rules", str(rules), "--bundle", str(bundle), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"SSL_CERT_FILE={bundle}" in result.stdout
    blocks = PEM_BLOCK.findall(bundle.read_bytes())
    assert len(blocks) > 1
    assert blocks[-1] == PEM_BLOCK.search(proxy_env.ca_cert.read_bytes()).group(0)

    # A client process that trusts only the bundle, as a container would get it.
    client_env = {name: value for name, value in os.environ.items() if not name.upper().endswith("_PROXY")}
    client_env.update(HTTPS_PROXY=proxy_env.proxy_url, SSL_CERT_FILE=str(bundle))
    script = (
        "import openai\n"
        f"client = openai.OpenAI(api_key={ALPHA_KEY!r}, max_retries=0, timeout=20.0)\n"
        f"raw = client.chat.completions.with_raw_response.create(model={MODEL!r}, messages={MESSAGES!r})\n"
        "print(raw.headers['x-tollhouse-request-id'])\n"
    )
    client = subprocess.run(
        [sys.executable, "-c", script], env=client_env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert client.returncode == 0, client.stderr
    assert proxy_env.wait_row(client.stdout.strip())["status"] == 200


def report_cells(output: str) -> list[list[str]]:
    """Split a costs report into the cells of each row, without the ruler line."""
    lines = [line for line in output.splitlines() if line and not set(line) <= {"-", " "}]
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


def test_costs_report_totals(fake, tmp_path, monkeypatch):
    workdir = tmp_path / "gateway"
    gateway = start_gateway(workdir, rules_text(fake.port), GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        openai_usage = json.dumps({"prompt_tokens": 1000, "completion_tokens": 500})
        rids = [
            call_openai(ALPHA_KEY, **{"x-fake-usage": openai_usage}),
            call_openai(ALPHA_KEY, **{"x-fake-usage": openai_usage}),
            call_openai(BETA_KEY, **{"x-fake-usage": openai_usage}),
        ]
        raw = anthropic_client().messages.with_raw_response.create(
            model=MODEL,
            max_tokens=50,
            messages=MESSAGES,
            extra_headers={"x-fake-usage": json.dumps({"input_tokens": 2000, "output_tokens": 100})},
        )
        rids.append(request_id(raw))
        rows = [gateway.wait_row(rid) for rid in rids]
        day = rows[0]["ts"].astimezone(timezone.utc).date()
        rules = str(workdir / "rules.yaml")

        alpha = run_cli("costs", "--rules", rules, "--since", day.isoformat(), "--project", "alpha", cwd=workdir)
        beta = run_cli("costs", "--rules", rules, "--project", "beta", cwd=workdir)
        later = run_cli("costs", "--rules", rules, "--since", (day + timedelta(days=1)).isoformat(), cwd=workdir)
    finally:
        gateway.stop()

    # Prices of the test model: 1.50 USD per million input tokens, 6.00 per million output tokens.
    # Each OpenAI call costs 1000 * 1.50 + 500 * 6.00 = 4500 micro-USD. The Anthropic call costs
    # 2000 * 1.50 + 100 * 6.00 = 3600 micro-USD.
    assert [row["cost_usd"] for row in rows] == [Decimal("0.0045")] * 3 + [Decimal("0.0036")]
    assert alpha.returncode == 0, alpha.stderr
    assert report_cells(alpha.stdout) == [
        ["day", "project", "model", "calls", "input tokens", "output tokens", "cost USD", "unknown cost"],
        [day.isoformat(), "alpha", MODEL, "3", "4,000", "1,100", "0.012600", "0"],
        ["total", "3", "4,000", "1,100", "0.012600", "0"],
    ]
    assert beta.returncode == 0, beta.stderr
    assert report_cells(beta.stdout)[1] == [day.isoformat(), "beta", MODEL, "1", "1,000", "500", "0.004500", "0"]
    assert later.returncode == 0, later.stderr
    assert later.stdout.strip() == "No calls in the request log match."


# -- invalid rules ---------------------------------------------------------------------------------

PLAINTEXT_KEY = "th-plaintext-key-in-rules-93b1"

INVALID_RULES = [
    (
        "plaintext-project-key",
        ("    key_env: TH_TEST_ALPHA_KEY\n", f"    key: {PLAINTEXT_KEY}\n"),
        ["projects.alpha.key", "plaintext key", "key_env", "key_sha256"],
    ),
    (
        "base-url-without-scheme",
        ("    kind: openai\n    base_url: http://127.0.0.1:", "    kind: openai\n    base_url: api.openai.com:"),
        ["providers.openai.base_url", "is not an http(s) URL", "'api.openai.com:", "Set it like https://api.openai.com"],
    ),
    (
        "unknown-provider-kind",
        ("    kind: anthropic\n", "    kind: gemini\n"),
        ["providers.anthropic.kind", "is not a supported API kind", "'gemini'", "Use one of: openai, anthropic"],
    ),
    (
        "unknown-top-level-setting",
        ("shutdown_grace: 20\n", "shutdown_grace: 20\nlisten_address: 127.0.0.1:9999\n"),
        ["listen_address", "is not a known setting", "'127.0.0.1:9999'", "Allowed here:", "listen"],
    ),
]


@pytest.mark.parametrize(("change", "expected"), [case[1:] for case in INVALID_RULES], ids=[c[0] for c in INVALID_RULES])
def test_invalid_rules_stop_start(fake, tmp_path, change, expected):
    old, new = change
    valid = rules_text(fake.port)
    assert old in valid
    rules = tmp_path / "rules.yaml"
    rules.write_text(valid.replace(old, new, 1), encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.upper().endswith("_PROXY")}
    env.update(GATEWAY_ENV)

    result = run_cli("run", "--rules", str(rules), cwd=tmp_path, env=env)

    assert result.returncode == 2
    assert "tollhouse listening" not in result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("tollhouse: invalid rules: ")
    for part in expected:
        assert part in message
    assert PLAINTEXT_KEY not in result.stderr
    assert not (tmp_path / "data" / "tollhouse.duckdb").exists()


# -- the plugin example in the docs ----------------------------------------------------------------


def docs_example() -> tuple[str, str, str]:
    """Return the python, yaml and sql code blocks of the team plugin example in docs/plugins.md."""
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = text.split("## A complete plugin: tag each call with a team", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"^```(python|yaml|sql)\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL))
    return blocks["python"], blocks["yaml"], blocks["sql"]


def test_docs_team_plugin_example(fake, tmp_path, monkeypatch):
    plugin_code, plugin_rules, team_query = docs_example()
    settings = yaml.safe_load(plugin_rules)
    [plugin_path] = settings["plugins"]
    default_team = settings["settings"]["team"]["default"]
    assert default_team != "unassigned"

    workdir = tmp_path / "gateway"
    (workdir / plugin_path).parent.mkdir(parents=True)
    (workdir / plugin_path).write_text(plugin_code, encoding="utf-8")
    gateway = start_gateway(workdir, rules_text(fake.port) + plugin_rules, GATEWAY_ENV)
    try:
        use_gateway(gateway, monkeypatch)
        before = len(fake.received)
        tagged = request_id(
            openai_client(default_headers={"x-team": "search"}).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES
            )
        )
        untagged = call_openai()
        rows = [gateway.wait_row(tagged), gateway.wait_row(untagged)]
        with connect_readonly(gateway.database, timeout=10.0) as con:
            teams = {team for team, _ in con.execute(team_query).fetchall()}
    finally:
        gateway.stop()

    assert [json.loads(row["tags"]) for row in rows] == [{"team": "search"}, {"team": default_team}]
    assert teams == {"search", default_team}
    received = fake.received[before:]
    assert len(received) == 2
    assert [request.header("x-team") for request in received] == [None, None]


def test_sigterm_past_grace_logs_cut_call(tmp_path, monkeypatch):
    fake = FakeUpstream(chunk_delay=0.5, expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY})
    fake.start_in_thread()
    gateway = None
    try:
        rules = rules_text(fake.port).replace("shutdown_grace: 20", "shutdown_grace: 1")
        gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
        use_gateway(gateway, monkeypatch)
        stream = anthropic_client().messages.create(
            model=MODEL,
            max_tokens=500,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-text": urllib.parse.quote(LONG_TEXT), "x-fake-usage": '{"input_tokens": 37}'},
        )
        rid = request_id(stream.response)
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(Exception):
            for _ in stream:
                pass
        exit_code = gateway.process.wait(timeout=PROCESS_TIMEOUT)
    finally:
        if gateway is not None and gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)
        fake.stop_thread()

    assert exit_code == 0
    assert "1 call(s) still in flight after 1 s" in gateway.stderr()
    with connect_readonly(gateway.database, timeout=10.0) as con:
        rows = con.execute(
            "SELECT status, error, input_tokens, cost_usd, price_flag FROM requests WHERE request_id = ?", [rid]
        ).fetchall()
    # Cut after message_start: priced on the usage seen so far, flagged partial.
    assert len(rows) == 1
    status, error, input_tokens, cost, flag = rows[0]
    assert (status, input_tokens, flag) == (200, 37, "partial")
    assert error == "the gateway stopped before the call ended"
    # 37 input tokens x $1.50 + the provisional output token of message_start x $6, per 1M.
    assert cost == Decimal("0.0000615")


def test_openai_stream_closed_after_done_is_complete(tmp_path, monkeypatch):
    # The upstream pauses between `data: [DONE]` and the end of its body; the OpenAI SDK closes the
    # connection as soon as it reads [DONE], which the gateway sees as an early disconnect.
    fake = FakeUpstream(chunk_delay=0.3, expected_keys={"openai": OPENAI_REAL_KEY, "anthropic": ANTHROPIC_REAL_KEY})
    fake.start_in_thread()
    gateway = None
    try:
        gateway = start_gateway(tmp_path / "gateway", rules_text(fake.port), GATEWAY_ENV)
        use_gateway(gateway, monkeypatch)
        with openai_client().chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        ) as response:
            rid = request_id(response)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        row = gateway.wait_row(rid)
    finally:
        if gateway is not None:
            gateway.stop()
        fake.stop_thread()

    assert text == "Hello from the fake upstream."
    assert (row["status"], row["error"], row["price_flag"]) == (200, None, "override")
    assert row["output_tokens"] > 0
