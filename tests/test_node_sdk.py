"""End-to-end tests with the Vercel AI SDK for Node.js (`ai` with `@ai-sdk/anthropic` and `@ai-sdk/openai`).

Each test runs one program from tests/node, which builds a provider with `baseURL` pointed at a server,
makes one AI SDK call and prints one JSON line. The test checks what the SDK parsed (text, tool calls,
finish reason, usage as the SDK maps it), what the fake upstream received, and, through the gateway, the
DuckDB row of every model call. Each scenario runs against two targets:

- `gateway`: tollhouse's base-URL listener, called with a project key, in front of the fake upstream.
- `fake`: the fake upstream itself, called with the provider key, which checks that the fake speaks the
  protocol the SDK expects.

The packages come from tests/node/package-lock.json, which scripts/setup.sh installs with `npm ci`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from addons.testing.fake_upstream import DEFAULT_TEXT, FakeUpstream, ReceivedRequest
from addons.testing.gateway_process import GatewayProcess, start_gateway
from conftest import ALPHA_KEY, ANTHROPIC_REAL_KEY, GATEWAY_ENV, OPENAI_REAL_KEY, rules_text

NODE_DIR = Path(__file__).resolve().parent / "node"
MIN_NODE_MAJOR = 20
#: Milliseconds after which a program aborts its AI SDK call (AbortSignal.timeout).
SCENARIO_TIMEOUT_MS = 20_000
#: Seconds after which the test kills a program that did not exit, a little above its own abort timeout.
PROCESS_TIMEOUT = 40.0

REQUEST_ID_HEADER = "x-tollhouse-request-id"
#: Request header with a value unique to one program run, to find its requests in the shared fake's records.
CASE_HEADER = "x-test-case"
#: Environment variables that could send the programs' requests through a proxy.
PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")

TOOL_NAME = "get_weather"
#: The fake upstream fills each property of a tool's JSON Schema with an example value: the first enum
#: member, or "example" for a string. tool_call.mjs declares `city` as a string and `unit` as an enum.
TOOL_INPUT = {"city": "example", "unit": "celsius"}
#: What the tool's `execute` in tool_call.mjs returns for TOOL_INPUT.
TOOL_OUTPUT = {"city": "example", "unit": "celsius", "temperature": 21}


# --- providers: the call each one makes and what it must produce -----------------------------------


@dataclass(frozen=True)
class Api:
    """One provider API as the AI SDK calls it, with steered usage and the results it must map to.

    Costs are written out from the per-million-token prices of genai-prices 0.2.3, as in
    tests/test_proxy_endpoints.py, so a wrong token count changes the Decimal.
    """

    #: The program's `--provider` value.
    name: str
    provider: str
    endpoint: str
    path: str
    model: str
    response_model: str
    upstream_key: str
    #: Usage in the provider's own field names, sent as `x-fake-usage` in the text scenarios.
    usage: dict[str, Any]
    #: The usage object that the SDK reports for `usage`, after JSON.stringify drops undefined fields.
    sdk_usage: dict[str, Any]
    #: The token columns of the row for `usage`.
    tokens: dict[str, int]
    cost_usd: Decimal
    #: Usage for each step of the tool scenarios, kept free of reasoning so the reply has no reasoning item.
    tool_usage: dict[str, Any]
    tool_sdk_usage: dict[str, Any]
    tool_tokens: dict[str, int]
    tool_cost_usd: Decimal
    #: Prefix of the tool call ids that the fake generates.
    tool_call_prefix: str


ANTHROPIC = Api(
    name="anthropic",
    provider="anthropic",
    endpoint="messages",
    path="/v1/messages",
    model="claude-sonnet-4-5",
    response_model="claude-sonnet-4-5-20250929",
    upstream_key=ANTHROPIC_REAL_KEY,
    usage={
        "input_tokens": 500,
        "cache_read_input_tokens": 200,
        "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
        "output_tokens": 500,
    },
    # The SDK counts cache reads and writes into inputTokens, and maps no output token details.
    sdk_usage={
        "inputTokens": 1000,
        "inputTokenDetails": {"noCacheTokens": 500, "cacheReadTokens": 200, "cacheWriteTokens": 300},
        "outputTokens": 500,
        "outputTokenDetails": {},
        "totalTokens": 1500,
        "cachedInputTokens": 200,
    },
    tokens={
        "input_tokens": 500,
        "cache_read_tokens": 200,
        "cache_write_tokens": 300,
        "cache_write_1h_tokens": 100,
        "output_tokens": 500,
    },
    # 500 x $3.00 + 200 x $0.30 (read) + 200 x $3.75 (5m write) + 100 x $6.00 (1h write) + 500 x $15.00 per 1M
    cost_usd=Decimal("0.01041"),
    tool_usage={"input_tokens": 300, "output_tokens": 20},
    tool_sdk_usage={
        "inputTokens": 300,
        "inputTokenDetails": {"noCacheTokens": 300, "cacheReadTokens": 0, "cacheWriteTokens": 0},
        "outputTokens": 20,
        "outputTokenDetails": {},
        "totalTokens": 320,
        "cachedInputTokens": 0,
    },
    tool_tokens={"input_tokens": 300, "output_tokens": 20},
    # 300 x $3.00 + 20 x $15.00 per 1M
    tool_cost_usd=Decimal("0.0012"),
    tool_call_prefix="toolu_",
)

OPENAI_CHAT = Api(
    name="openai-chat",
    provider="openai",
    endpoint="chat.completions",
    path="/v1/chat/completions",
    model="gpt-4o-mini",
    response_model="gpt-4o-mini-2024-07-18",
    upstream_key=OPENAI_REAL_KEY,
    usage={"prompt_tokens": 1000, "completion_tokens": 500},
    sdk_usage={
        "inputTokens": 1000,
        "inputTokenDetails": {"noCacheTokens": 1000, "cacheReadTokens": 0},
        "outputTokens": 500,
        "outputTokenDetails": {"textTokens": 500, "reasoningTokens": 0},
        "totalTokens": 1500,
        "reasoningTokens": 0,
        "cachedInputTokens": 0,
    },
    tokens={"input_tokens": 1000, "output_tokens": 500},
    # 1000 x $0.15 + 500 x $0.60 per 1M
    cost_usd=Decimal("0.00045"),
    tool_usage={"prompt_tokens": 300, "completion_tokens": 20},
    tool_sdk_usage={
        "inputTokens": 300,
        "inputTokenDetails": {"noCacheTokens": 300, "cacheReadTokens": 0},
        "outputTokens": 20,
        "outputTokenDetails": {"textTokens": 20, "reasoningTokens": 0},
        "totalTokens": 320,
        "reasoningTokens": 0,
        "cachedInputTokens": 0,
    },
    tool_tokens={"input_tokens": 300, "output_tokens": 20},
    # 300 x $0.15 + 20 x $0.60 per 1M
    tool_cost_usd=Decimal("0.000057"),
    tool_call_prefix="call_",
)

OPENAI_RESPONSES = Api(
    name="openai-responses",
    provider="openai",
    endpoint="responses",
    path="/v1/responses",
    model="gpt-5",
    response_model="gpt-5-2025-08-07",
    upstream_key=OPENAI_REAL_KEY,
    usage={
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 400},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 100},
    },
    # The SDK reports the 100 reasoning tokens inside outputTokens, and textTokens as the rest.
    sdk_usage={
        "inputTokens": 1000,
        "inputTokenDetails": {"noCacheTokens": 600, "cacheReadTokens": 400},
        "outputTokens": 300,
        "outputTokenDetails": {"textTokens": 200, "reasoningTokens": 100},
        "totalTokens": 1300,
        "reasoningTokens": 100,
        "cachedInputTokens": 400,
    },
    tokens={"input_tokens": 600, "cache_read_tokens": 400, "output_tokens": 300, "reasoning_tokens": 100},
    # 600 x $1.25 + 400 x $0.125 + 300 x $10.00 per 1M
    cost_usd=Decimal("0.0038"),
    tool_usage={"input_tokens": 300, "output_tokens": 20},
    tool_sdk_usage={
        "inputTokens": 300,
        "inputTokenDetails": {"noCacheTokens": 300, "cacheReadTokens": 0},
        "outputTokens": 20,
        "outputTokenDetails": {"textTokens": 20, "reasoningTokens": 0},
        "totalTokens": 320,
        "reasoningTokens": 0,
        "cachedInputTokens": 0,
    },
    tool_tokens={"input_tokens": 300, "output_tokens": 20},
    # 300 x $1.25 + 20 x $10.00 per 1M
    tool_cost_usd=Decimal("0.000575"),
    tool_call_prefix="call_",
)

APIS = [ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES]
API_IDS = [api.name for api in APIS]

#: The finish reason that the provider reports for a plain text reply, as the SDK passes it on in
#: `rawFinishReason`. @ai-sdk/openai 3.0.141 sets none for a completed Responses reply.
RAW_STOP = {"anthropic": "end_turn", "openai-chat": "stop", "openai-responses": None}
RAW_TOOL_CALLS = {"anthropic": "tool_use", "openai-chat": "tool_calls", "openai-responses": None}


# --- targets: where the programs send their requests -----------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server for the programs' base URL, and the gateway behind it if there is one."""

    name: str
    base_url: str
    gateway: GatewayProcess | None

    def api_key(self, api: Api) -> str:
        return ALPHA_KEY if self.gateway is not None else api.upstream_key


@pytest.fixture(scope="module")
def node() -> str:
    """Return the path of a Node.js that can run tests/node, or skip (fail when CI is set) without one."""
    executable = shutil.which("node")
    if executable is None:
        pytest.skip(f"node is not on PATH. Install Node.js {MIN_NODE_MAJOR} or later to run the AI SDK tests.")
    version = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = version.removeprefix("v").split(".")[0]
    if not major.isdigit() or int(major) < MIN_NODE_MAJOR:
        pytest.skip(f"node {version!r} is too old. The AI SDK tests need Node.js {MIN_NODE_MAJOR} or later.")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").is_file():
        reason = (
            f"{NODE_DIR / 'node_modules'} is missing. Run `npm ci --no-audit --no-fund` in {NODE_DIR}, "
            "or scripts/test, which runs it when npm is on PATH."
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="module")
def base_url_gateway(fake: FakeUpstream, tmp_path_factory) -> GatewayProcess:
    """Start a gateway in front of the shared fake. `rules_text` puts its base-URL listener on a free loopback port."""
    if not hasattr(GatewayProcess, "base_url_port"):
        pytest.skip("gateway has no base-URL listener")
    process = start_gateway(tmp_path_factory.mktemp("node-gateway"), rules_text(fake.port), GATEWAY_ENV)
    if process.base_url_port is None:
        process.stop()
        pytest.fail(f"the gateway did not report a base-URL listener:\n{process.stderr()}")
    yield process
    try:
        process.stop()
    except subprocess.TimeoutExpired:
        # A gateway that hangs on SIGTERM fails the teardown, but must not outlive the test run.
        process.process.kill()
        raise


@pytest.fixture(params=["gateway", "fake"])
def target(request, fake: FakeUpstream) -> Target:
    if request.param == "fake":
        return Target("fake", f"{fake.base_url}/v1", None)
    gateway = request.getfixturevalue("base_url_gateway")
    return Target("gateway", f"{gateway.base_url}/v1", gateway)


# --- helpers ---------------------------------------------------------------------------------------


def run_node(
    node: str, program: str, target: Target, api: Api, headers: dict[str, str], *args: str, api_key: str | None = None
) -> subprocess.CompletedProcess:
    """Run `tests/node/<program>` against `target` with the target's key for `api`, or `api_key`."""
    env = {name: value for name, value in os.environ.items() if name not in PROXY_ENV}
    # The key goes in the environment rather than argv, as a project would pass it.
    env["TOLLHOUSE_API_KEY"] = api_key if api_key is not None else target.api_key(api)
    command = [
        node,
        str(NODE_DIR / program),
        "--provider",
        api.name,
        "--base-url",
        target.base_url,
        "--model",
        api.model,
        "--timeout-ms",
        str(SCENARIO_TIMEOUT_MS),
        *args,
    ]
    for name, value in headers.items():
        command += ["--header", f"{name}={value}"]

    return subprocess.run(command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)


def run_scenario(
    node: str, program: str, target: Target, api: Api, headers: dict[str, str], *args: str
) -> dict[str, Any]:
    """Run `tests/node/<program>` against `target`, check that it succeeded, and return the JSON object it printed."""
    completed = run_node(node, program, target, api, headers, *args)
    gateway_log = target.gateway.stderr() if target.gateway is not None else ""
    assert completed.returncode == 0, (
        f"{program} exited with status {completed.returncode}\nstderr:\n{completed.stderr}\ngateway log:\n{gateway_log}"
    )
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, f"{program} printed {len(lines)} lines instead of one JSON line:\n{completed.stdout}"
    return json.loads(lines[0])


def steering_headers(usage: dict[str, Any]) -> dict[str, str]:
    """Return request headers that set the fake's usage, plus a unique `x-test-case` value."""
    return {CASE_HEADER: uuid.uuid4().hex, "x-fake-usage": json.dumps(usage)}


def upstream_requests(upstream: FakeUpstream, headers: dict[str, str]) -> list[ReceivedRequest]:
    """Return the requests the fake received with the `x-test-case` value of `headers`, in arrival order."""
    case = headers[CASE_HEADER]
    return [request for request in list(upstream.received) if request.header(CASE_HEADER) == case]


def assert_upstream_request(request: ReceivedRequest, api: Api, *, stream: bool) -> None:
    """Check the path, provider key and body of one request as the fake upstream received it."""
    assert request.method == "POST"
    assert request.path == api.path
    if api.provider == "anthropic":
        assert request.header("x-api-key") == api.upstream_key
    else:
        assert request.header("authorization") == f"Bearer {api.upstream_key}"
    assert request.json["model"] == api.model
    assert bool(request.json.get("stream")) is stream


def request_id(response: dict[str, Any]) -> str:
    headers = response["headers"]
    assert REQUEST_ID_HEADER in headers, f"the SDK saw no {REQUEST_ID_HEADER} header, only {sorted(headers)}"
    return headers[REQUEST_ID_HEADER]


def assert_row(row: dict[str, Any], expected: dict[str, Any]) -> None:
    """Assert each expected column of a DuckDB row, naming the column on failure."""
    for column, value in expected.items():
        assert row[column] == value, f"column {column}: expected {value!r}, got {row[column]!r}"


def expected_row(api: Api, tokens: dict[str, int], cost_usd: Decimal, *, stream: bool) -> dict[str, Any]:
    columns = {
        "project": "alpha",
        "provider": api.provider,
        "endpoint": api.endpoint,
        "model": api.model,
        "response_model": api.response_model,
        "stream": stream,
        "status": 200,
        "error": None,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "reasoning_tokens": 0,
        "cost_usd": cost_usd,
        "price_flag": "priced",
    }
    columns.update(tokens)
    return columns


def tool_names(body: dict[str, Any]) -> list[str]:
    """Return the names of the tools offered in a request body. Chat Completions nests them in `function`."""
    return [tool["function"]["name"] if "function" in tool else tool["name"] for tool in body["tools"]]


def tool_result_ids(api: Api, body: dict[str, Any]) -> list[str]:
    """Return the tool call ids of the tool results in a request body, in the provider's own layout."""
    if api.name == "anthropic":
        return [
            block["tool_use_id"]
            for message in body["messages"]
            if isinstance(message.get("content"), list)
            for block in message["content"]
            if block.get("type") == "tool_result"
        ]
    if api.name == "openai-chat":
        return [message["tool_call_id"] for message in body["messages"] if message.get("role") == "tool"]
    return [item["call_id"] for item in body["input"] if item.get("type") == "function_call_output"]


# --- scenarios -------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
@pytest.mark.parametrize("program", ["generate_text.mjs", "stream_text.mjs"])
def test_text_reply(node, fake, target, api, program):
    stream = program == "stream_text.mjs"
    headers = steering_headers(api.usage)

    result = run_scenario(node, program, target, api, headers)

    assert result["text"] == DEFAULT_TEXT
    assert result["finishReason"] == "stop"
    assert result["rawFinishReason"] == RAW_STOP[api.name]
    assert result["toolCalls"] == []
    assert result["usage"] == api.sdk_usage
    assert result["response"]["modelId"] == api.response_model
    if stream:
        # The fake streams the text in several deltas, and the SDK must see more than one of them.
        assert len(result["textDeltas"]) > 1
        assert "".join(result["textDeltas"]) == DEFAULT_TEXT

    requests = upstream_requests(fake, headers)
    assert len(requests) == 1
    assert_upstream_request(requests[0], api, stream=stream)

    if target.gateway is not None:
        row = target.gateway.wait_row(request_id(result["response"]))
        assert_row(row, expected_row(api, api.tokens, api.cost_usd, stream=stream))


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
def test_tool_call_round_trip(node, fake, target, api, stream):
    headers = steering_headers(api.tool_usage)
    args = ["--prompt", "What is the weather in Paris?"] + (["--stream"] if stream else [])

    result = run_scenario(node, "tool_call.mjs", target, api, headers, *args)

    assert len(result["steps"]) == 2
    call_step, answer_step = result["steps"]

    assert call_step["finishReason"] == "tool-calls"
    assert call_step["rawFinishReason"] == RAW_TOOL_CALLS[api.name]
    assert call_step["text"] == ""
    assert len(call_step["toolCalls"]) == 1
    tool_call = call_step["toolCalls"][0]
    assert tool_call["toolName"] == TOOL_NAME
    assert tool_call["input"] == TOOL_INPUT
    assert "invalid" not in tool_call
    assert tool_call["toolCallId"].startswith(api.tool_call_prefix)
    assert call_step["toolResults"] == [
        {"toolCallId": tool_call["toolCallId"], "toolName": TOOL_NAME, "input": TOOL_INPUT, "output": TOOL_OUTPUT}
    ]

    assert answer_step["finishReason"] == "stop"
    assert answer_step["rawFinishReason"] == RAW_STOP[api.name]
    assert answer_step["toolCalls"] == []
    assert answer_step["text"] == DEFAULT_TEXT
    assert result["text"] == DEFAULT_TEXT

    for step in result["steps"]:
        assert step["usage"] == api.tool_sdk_usage
        assert step["response"]["modelId"] == api.response_model
    assert result["totalUsage"]["inputTokens"] == 2 * api.tool_sdk_usage["inputTokens"]
    assert result["totalUsage"]["outputTokens"] == 2 * api.tool_sdk_usage["outputTokens"]
    assert result["totalUsage"]["totalTokens"] == 2 * api.tool_sdk_usage["totalTokens"]

    # The second request carries the tool result for the call that the first response made.
    requests = upstream_requests(fake, headers)
    assert len(requests) == 2
    for request in requests:
        assert_upstream_request(request, api, stream=stream)
    assert tool_names(requests[0].json) == [TOOL_NAME]
    assert tool_result_ids(api, requests[0].json) == []
    assert tool_result_ids(api, requests[1].json) == [tool_call["toolCallId"]]

    if target.gateway is not None:
        ids = [request_id(step["response"]) for step in result["steps"]]
        assert ids[0] != ids[1]
        for rid in ids:
            row = target.gateway.wait_row(rid)
            assert_row(row, expected_row(api, api.tool_tokens, api.tool_cost_usd, stream=stream))


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_unknown_project_key_rejected(node, fake, base_url_gateway, api):
    target = Target("gateway", f"{base_url_gateway.base_url}/v1", base_url_gateway)
    headers = steering_headers(api.usage)

    completed = run_node(node, "generate_text.mjs", target, api, headers, api_key="th-unknown-key")

    # lib.mjs exits with status 1 and writes the SDK's APICallError as JSON after "scenario failed: ".
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout == ""
    prefix = "scenario failed: "
    assert completed.stderr.startswith(prefix), completed.stderr
    error = json.loads(completed.stderr.removeprefix(prefix))
    assert error["name"] == "AI_APICallError"
    assert error["statusCode"] == 401
    assert "unknown project key" in error["message"]
    assert error["url"] == f"{target.base_url}{api.path.removeprefix('/v1')}"
    assert upstream_requests(fake, headers) == []

    row = base_url_gateway.wait_row(error["responseHeaders"][REQUEST_ID_HEADER])
    assert row["status"] == 401
    assert row["project"] is None
