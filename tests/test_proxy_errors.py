"""Failures at the proxy: bad request bodies, upstream errors, broken streams, egress and tunnels.

Every call goes through a real `tollhouse run` process to the fake upstream on a loopback port. The
tunnel test runs its own TLS server on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
from decimal import Decimal
from pathlib import Path

import anthropic
import duckdb
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons.engine import BODY_SIZE_SLACK
from addons.gateway import Gateway
from addons.rules import parse_rules
from addons.testing.gateway_process import start_gateway
from conftest import ALPHA_KEY, GATEWAY_ENV, anthropic_client, openai_client, rules_text, use_gateway

MODEL = "tollhouse-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]
OPENAI_URL = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
# Prices of MODEL in the test rules, USD per million tokens.
INPUT_PRICE = Decimal("1.50")
OUTPUT_PRICE = Decimal("6.00")
# A small request limit for the oversized-body tests, in bytes.
SMALL_LIMIT = 4096
# Bounds for the socket-level clients below, in seconds.
SOCKET_TIMEOUT = 20.0
# Many words, so that a slowed stream is still running when the test acts on it.
LONG_TEXT = " ".join(f"word{index}" for index in range(90))

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding"}


def request_id(response) -> str:
    return response.headers["x-tollhouse-request-id"]


def closed_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_post(url: str, content, headers: dict[str, str]) -> httpx2.Response:
    """POST through the proxy from the environment, outside the SDKs, so that any body can be sent."""
    with httpx2.Client(timeout=20.0) as client:
        return client.post(url, content=content, headers=headers)


def wait_rows(gateway, where: str, params: tuple, timeout: float = 15.0) -> list[dict]:
    """Return the rows matching `where` once there are any, or [] after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = gateway.rows(where, params)
        except duckdb.Error:
            rows = []
        if rows:
            return rows
        time.sleep(0.1)
    return []


def provider_request(provider: str) -> tuple[str, dict[str, str], dict]:
    """Return the URL, headers and a valid JSON payload of a call to `provider` as project alpha."""
    if provider == "anthropic":
        headers = {"x-api-key": ALPHA_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
        return ANTHROPIC_URL, headers, {"model": MODEL, "max_tokens": 50, "messages": MESSAGES}
    headers = {"authorization": f"Bearer {ALPHA_KEY}", "content-type": "application/json"}
    return OPENAI_URL, headers, {"model": MODEL, "messages": MESSAGES}


def assert_error_format(provider: str, body: dict, anthropic_type: str | None = None) -> str:
    """Check that `body` is an error in the provider's own layout and return its message."""
    if provider == "anthropic":
        assert set(body) == {"type", "error", "request_id"}
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == anthropic_type
    else:
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE) / Decimal(1_000_000)


# -- request bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"model": "tollhouse-test-model", ', "not valid JSON"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b'["a", "list"]', "must be a JSON object"),
        (b'"a string"', "must be a JSON object"),
    ],
    ids=["truncated", "not-utf8", "array", "string"],
)
def test_bad_json_body_rejected(fake, proxy_env, provider, content, expected):
    url, headers, _ = provider_request(provider)
    before = len(fake.received)

    response = raw_post(url, content, headers)

    assert response.status_code == 400
    body = response.json()
    message = assert_error_format(provider, body, "invalid_request_error")
    assert expected in message
    if provider == "anthropic":
        assert body["request_id"] == request_id(response)
    assert len(fake.received) == before
    row = proxy_env.wait_row(request_id(response))
    assert row["status"] == 400
    assert row["project"] == "alpha"
    assert expected in row["error"]
    assert row["cost_usd"] == Decimal(0)
    assert row["price_flag"] == "not_billed"


@pytest.fixture(scope="module")
def small_gateway(fake, tmp_path_factory):
    rules = rules_text(fake.port, limit=f"max_request_bytes: {SMALL_LIMIT}\n")
    process = start_gateway(tmp_path_factory.mktemp("small"), rules, GATEWAY_ENV)
    yield process
    process.stop()


def test_oversized_body_openai(fake, small_gateway, monkeypatch):
    use_gateway(small_gateway, monkeypatch)
    before = len(fake.received)

    with pytest.raises(openai.APIStatusError) as caught:
        openai_client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 10_000}])

    response = caught.value.response
    assert response.status_code == 413
    message = assert_error_format("openai", response.json())
    assert str(SMALL_LIMIT) in message
    assert "max_request_bytes" in message
    assert len(fake.received) == before
    row = small_gateway.wait_row(request_id(response))
    assert row["status"] == 413
    assert row["price_flag"] == "not_billed"


def test_oversized_body_anthropic(fake, small_gateway, monkeypatch):
    use_gateway(small_gateway, monkeypatch)
    before = len(fake.received)

    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        anthropic_client().messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x" * 10_000}]
        )

    response = caught.value.response
    message = assert_error_format("anthropic", response.json(), "request_too_large")
    assert str(SMALL_LIMIT) in message
    assert len(fake.received) == before
    row = small_gateway.wait_row(request_id(response))
    assert row["status"] == 413
    assert row["price_flag"] == "not_billed"


def test_oversized_chunked_body(fake, small_gateway, monkeypatch):
    use_gateway(small_gateway, monkeypatch)
    url, headers, payload = provider_request("openai")
    payload["messages"] = [{"role": "user", "content": "x" * 10_000}]
    encoded = json.dumps(payload).encode()
    before = len(fake.received)

    # A generator body has no known length, so the client sends it chunked without Content-Length.
    pieces = (encoded[i : i + 1000] for i in range(0, len(encoded), 1000))
    response = raw_post(url + "?case=chunked", pieces, headers)

    assert response.status_code == 413
    # mitmproxy enforces the limit on a chunked body and responds with one body that parses as an error
    # in both providers' formats, because it does not know the provider there.
    assert isinstance(response.json()["error"]["message"], str)
    assert len(fake.received) == before
    rows = wait_rows(small_gateway, "path = ?", ("/v1/chat/completions?case=chunked",))
    assert len(rows) == 1
    assert rows[0]["status"] == 413
    assert rows[0]["project"] == "alpha"
    assert "too large" in rows[0]["error"] or "exceeds" in rows[0]["error"]
    assert not rows[0]["error"].startswith("stream ended early")
    assert rows[0]["price_flag"] == "not_billed"


def test_body_over_hard_limit_cut_off(fake, small_gateway, monkeypatch):
    use_gateway(small_gateway, monkeypatch)
    url, headers, payload = provider_request("anthropic")
    # Past max_request_bytes plus the 16 MiB slack, mitmproxy stops reading and answers 413 itself.
    payload["messages"] = [{"role": "user", "content": "x" * (SMALL_LIMIT + BODY_SIZE_SLACK)}]
    encoded = json.dumps(payload).encode()
    before = len(fake.received)

    pieces = (encoded[i : i + 65536] for i in range(0, len(encoded), 65536))
    response = raw_post(url + "?case=hard-limit", pieces, headers)

    assert response.status_code == 413
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "request_too_large"
    assert len(fake.received) == before
    rows = wait_rows(small_gateway, "path = ?", ("/v1/messages?case=hard-limit",))
    assert [(r["status"], r["project"], r["price_flag"]) for r in rows] == [(413, "alpha", "not_billed")]
    assert rows[0]["error"].startswith("request body too large")


# -- upstream error statuses -----------------------------------------------------------------------


ERROR_CASES = [
    ("openai", 429, openai.RateLimitError),
    ("openai", 500, openai.InternalServerError),
    ("openai", 529, openai.InternalServerError),
    ("anthropic", 429, anthropic.RateLimitError),
    ("anthropic", 500, anthropic.InternalServerError),
    ("anthropic", 529, anthropic.OverloadedError),
]


@pytest.mark.parametrize(("provider", "status", "error_class"), ERROR_CASES)
def test_upstream_error_passed_through(fake, proxy_env, provider, status, error_class):
    before = len(fake.received)
    fault = {"x-fault": f"status:{status}"}

    with pytest.raises(error_class) as caught:
        if provider == "anthropic":
            anthropic_client().messages.create(model=MODEL, max_tokens=50, messages=MESSAGES, extra_headers=fault)
        else:
            openai_client().chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=fault)

    assert len(fake.received) == before + 1
    sent = fake.sent[before]
    response = caught.value.response
    assert response.status_code == status
    assert response.content == sent.body
    for name, value in sent.headers:
        if name.lower() not in HOP_BY_HOP:
            assert response.headers.get_list(name) == [value], f"header {name}"
    if status == 429 or (provider == "anthropic" and status == 529):
        assert response.headers["retry-after"] == "1"
    upstream_message = json.loads(sent.body)["error"]["message"]
    row = proxy_env.wait_row(request_id(response))
    assert row["status"] == status
    assert row["error"] == upstream_message
    assert row["cost_usd"] == Decimal(0)
    assert row["price_flag"] == "not_billed"


@pytest.fixture(scope="module")
def unreachable_gateway(tmp_path_factory):
    rules = rules_text(closed_port())
    process = start_gateway(tmp_path_factory.mktemp("unreachable"), rules, GATEWAY_ENV)
    yield process
    process.stop()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_upstream_unreachable_502(unreachable_gateway, monkeypatch, provider):
    use_gateway(unreachable_gateway, monkeypatch)
    error_class = anthropic.InternalServerError if provider == "anthropic" else openai.InternalServerError

    with pytest.raises(error_class) as caught:
        if provider == "anthropic":
            anthropic_client().messages.create(model=MODEL, max_tokens=50, messages=MESSAGES)
        else:
            openai_client().chat.completions.create(model=MODEL, messages=MESSAGES)

    error = caught.value
    assert error.status_code == 502
    # The SDK parsed the JSON body: OpenAI's keeps the inner `error` object, Anthropic's the whole body.
    assert isinstance(error.body, dict)
    message = error.response.json()["error"]["message"]
    assert "Connect call failed" in message
    assert message in str(error)
    # mitmproxy's 502 carries no request id, and this gateway logs one call per provider.
    rows = wait_rows(unreachable_gateway, "provider = ?", (provider,))
    assert len(rows) == 1
    assert rows[0]["status"] == 502
    assert rows[0]["error"].startswith("upstream unreachable")
    assert rows[0]["project"] == "alpha"
    assert rows[0]["price_flag"] == "not_billed"


# -- egress guard ----------------------------------------------------------------------------------


def open_tunnel(proxy_port: int, host: str, port: int) -> socket.socket:
    """Open a CONNECT tunnel through the proxy and return the socket after its 200 response."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=SOCKET_TIMEOUT)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1] == b"200", status_line
    return sock


def read_http_response(tls: ssl.SSLSocket) -> bytes:
    """Read one HTTP/1.1 response that ends with the connection or within its Content-Length."""
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator:
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                None,
            )
            if length is not None and len(body) >= length:
                return data
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return data
        if not chunk:
            return data
        data += chunk


class TrapServer:
    """A loopback TCP listener that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_egress_guard_blocks_unrouted_host(fake, tmp_path):
    trap = TrapServer()
    # `localhost` is intercepted for openai, so the proxy decrypts a tunnel to it. Calls are routed by
    # the Host header, so a request that names another host is not routed to the fake.
    rules = rules_text(fake.port).replace(
        "    key_env: OPENAI_API_KEY\n",
        "    key_env: OPENAI_API_KEY\n    hosts: [api.openai.com, localhost]\n",
        1,
    )
    assert "hosts: [api.openai.com, localhost]" in rules
    gateway = start_gateway(tmp_path / "gateway", rules, GATEWAY_ENV)
    try:
        before = len(fake.received)
        context = ssl.create_default_context(cafile=str(gateway.ca_cert))
        sock = open_tunnel(gateway.port, "localhost", trap.port)
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: elsewhere.test\r\n"
                + f"Authorization: Bearer {ALPHA_KEY}\r\nContent-Type: application/json\r\n".encode()
                + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            answer = read_http_response(tls)
    finally:
        gateway.stop()
        trap.close()

    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert f"blocked a connection to localhost:{trap.port}" in body["error"]["message"]
    assert trap.accepted == 0
    assert len(fake.received) == before
    assert f"egress guard blocked a connection to localhost:{trap.port}" in gateway.stderr()


def egress_gateway(fake_port: int) -> Gateway:
    raw = {
        "providers": {
            "openai": {"kind": "openai", "base_url": f"http://127.0.0.1:{fake_port}", "key_env": "OPENAI_API_KEY"},
            "anthropic": {"kind": "anthropic", "base_url": "https://api.anthropic.com", "key_env": "ANTHROPIC_API_KEY"},
        },
        "projects": {"alpha": {"key_env": "TH_TEST_ALPHA_KEY"}},
    }
    rules = parse_rules(raw, base_dir=Path("/nonexistent"))
    return Gateway(rules, pm=None, store=None, redactor=None)


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        (("api.openai.com", 443), True),
        (("API.OPENAI.COM", 443), True),
        (("api.openai.com", 8443), True),
        (("127.0.0.1", 18080), False),
        (("api.anthropic.com", 443), False),
        (("example.com", 443), False),
    ],
    ids=["provider-host", "upper-case", "other-port", "configured-upstream", "configured-base-url", "other-host"],
)
def test_server_connect_guard(address, blocked):
    gateway = egress_gateway(18080)
    server = connection.Server(address=address)
    data = server_hooks.ServerConnectionHookData(server=server, client=tflow.tclient_conn())

    gateway.server_connect(data)

    if blocked:
        assert server.error is not None
        assert f"{address[0].lower()}:{address[1]}" in server.error
    else:
        assert server.error is None


# -- tunnels for other hosts -----------------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key, and return both paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class TlsServer:
    """A loopback TLS server that responds to each connection's first request with a fixed body."""

    BODY = b"served by the tunnel test server"

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(SOCKET_TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    self.requests.append(request)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        + f"Content-Length: {len(self.BODY)}\r\nConnection: close\r\n\r\n".encode()
                        + self.BODY
                    )
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_other_host_tunnelled_untouched(proxy_env, tmp_path):
    cert_path, key_path = self_signed_cert(tmp_path)
    server = TlsServer(cert_path, key_path)
    try:
        # The client trusts only the server's own certificate, not the gateway's CA.
        context = ssl.create_default_context(cafile=str(cert_path))
        sock = open_tunnel(proxy_env.port, "127.0.0.1", server.port)
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            peer = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET /tunnel-check HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = read_http_response(tls)
    finally:
        server.close()

    own = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert peer == own
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(TlsServer.BODY)
    assert b"x-tollhouse-request-id" not in answer.lower()
    assert len(server.requests) == 1
    assert server.requests[0].startswith(b"GET /tunnel-check HTTP/1.1\r\n")

    # Rows are written in call order, so once a later call's row is stored, a row of the tunnel would be too.
    marker = openai_client().chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    proxy_env.wait_row(request_id(marker))
    assert proxy_env.rows("path LIKE '%tunnel-check%'") == []


# -- broken streams --------------------------------------------------------------------------------


def stream_headers(**extra: str) -> dict[str, str]:
    headers = {"x-fake-text": urllib.parse.quote(LONG_TEXT), "x-fake-usage": json.dumps({"input_tokens": 37})}
    headers.update(extra)
    return headers


def test_client_disconnect_mid_stream(fake, proxy_env, monkeypatch):
    monkeypatch.setattr(fake, "chunk_delay", 0.05)
    before = len(fake.received)

    stream = anthropic_client().messages.create(
        model=MODEL, max_tokens=500, messages=MESSAGES, stream=True, extra_headers=stream_headers()
    )
    rid = request_id(stream.response)
    first = next(iter(stream))
    stream.close()

    assert first.type == "message_start"
    assert len(fake.received) == before + 1
    row = proxy_env.wait_row(rid)
    assert row["status"] == 200
    assert row["error"].startswith("stream ended early")
    assert row["input_tokens"] == 37
    assert row["output_tokens"] == 1
    assert row["price_flag"] == "partial"
    assert row["cost_usd"] == cost(37, 1)
    assert not fake.sent[before].complete


def test_upstream_cut_mid_stream(fake, proxy_env):
    before = len(fake.received)

    stream = anthropic_client().messages.create(
        model=MODEL, max_tokens=500, messages=MESSAGES, stream=True, extra_headers=stream_headers(**{"x-fault": "cut"})
    )
    rid = request_id(stream.response)
    events = []
    # The client must notice that the stream broke off, not see a clean end.
    with pytest.raises(anthropic.APIConnectionError):
        for event in stream:
            events.append(event)

    assert events[0].type == "message_start"
    assert "message_stop" not in [event.type for event in events]
    assert not fake.sent[before].complete
    row = proxy_env.wait_row(rid)
    assert row["status"] == 200
    assert row["error"].startswith("stream ended early")
    assert row["input_tokens"] == 37
    assert row["price_flag"] == "partial"
    assert row["cost_usd"] == cost(37, 1)


def test_upstream_cut_json_answer(fake, proxy_env):
    before = len(fake.received)

    with pytest.raises(openai.APIStatusError) as caught:
        openai_client().chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-fault": "cut"}, extra_query={"case": "cut-json"}
        )

    # mitmproxy answers 502 itself when upstream closes before the whole buffered answer arrived.
    assert caught.value.response.status_code == 502
    assert not fake.sent[before].complete
    rows = wait_rows(proxy_env, "path = ?", ("/v1/chat/completions?case=cut-json",))
    assert [(r["status"], r["price_flag"]) for r in rows] == [(502, "not_billed")]
    assert rows[0]["error"].startswith("upstream closed the connection before the answer was complete")


def test_anthropic_midstream_error_event(fake, proxy_env):
    stream = anthropic_client().messages.create(
        model=MODEL,
        max_tokens=500,
        messages=MESSAGES,
        stream=True,
        extra_headers=stream_headers(**{"x-fault": "midstream-error"}),
    )
    rid = request_id(stream.response)
    with pytest.raises(anthropic.APIStatusError) as caught:
        for _ in stream:
            pass

    assert caught.value.body["error"]["type"] == "overloaded_error"
    row = proxy_env.wait_row(rid)
    assert row["status"] == 200
    assert row["error"] is not None
    assert "Overloaded" in row["error"]
    assert row["input_tokens"] == 37
    assert row["price_flag"] == "partial"


def test_openai_midstream_error_event(fake, proxy_env):
    stream = openai_client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers=stream_headers(**{"x-fault": "midstream-error"}),
    )
    rid = request_id(stream.response)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass

    assert "The server had an error" in str(caught.value)
    row = proxy_env.wait_row(rid)
    assert row["status"] == 200
    assert row["error"] is not None
    assert "The server had an error" in row["error"]
