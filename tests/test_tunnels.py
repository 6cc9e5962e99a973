"""Traffic to hosts that are not providers': tunnelled, blocked, or asking for a project key."""

from __future__ import annotations

import socket

import pytest

from addons.testing.gateway_process import start_gateway
from conftest import ALPHA_KEY, GATEWAY_ENV, rules_text

TIMEOUT = 10.0


def connect_status(proxy_port: int, target: str, credentials: str | None = None) -> int:
    """Send a CONNECT for `target` through the proxy and return the status code of its answer."""
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if credentials:
        import base64

        head += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT) as sock:
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    return int(answer.split(b" ", 2)[1])


def plain_http_status(proxy_port: int, url: str) -> int:
    """Send a plain-HTTP proxy request (absolute URL) and return the status code of its answer."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def listener():
    """A plain TCP listener on 127.0.0.1 that a tunnel could reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def gateway_with(fake, tmp_path, tunnels: str):
    return start_gateway(tmp_path / "gateway", rules_text(fake.port, tunnels=tunnels), GATEWAY_ENV)


def test_default_blocks_loopback_and_metadata(fake, tmp_path, listener):
    gateway = gateway_with(fake, tmp_path, "")
    try:
        statuses = [
            connect_status(gateway.port, f"127.0.0.1:{listener}"),
            connect_status(gateway.port, f"localhost:{listener}"),
            connect_status(gateway.port, "169.254.169.254:80"),
            connect_status(gateway.port, "[::1]:80"),
            plain_http_status(gateway.port, f"http://127.0.0.1:{listener}/"),
        ]
    finally:
        gateway.stop()

    assert statuses == [403, 403, 403, 403, 403]
    assert "127.0.0.1 is in a blocked network" in gateway.stderr()


def test_project_key_required(fake, tmp_path, listener):
    gateway = gateway_with(fake, tmp_path, "tunnels:\n  require_project_key: true\n  blocked_networks: []\n")
    try:
        statuses = [
            connect_status(gateway.port, f"127.0.0.1:{listener}"),
            connect_status(gateway.port, f"127.0.0.1:{listener}", "alpha:wrong-key"),
            connect_status(gateway.port, f"127.0.0.1:{listener}", f"beta:{ALPHA_KEY}"),
            connect_status(gateway.port, f"127.0.0.1:{listener}", f"alpha:{ALPHA_KEY}"),
        ]
    finally:
        gateway.stop()

    assert statuses == [407, 407, 407, 200]


def test_tunnels_off(fake, tmp_path, listener):
    gateway = gateway_with(fake, tmp_path, "tunnels:\n  allow: false\n")
    try:
        status = connect_status(gateway.port, f"127.0.0.1:{listener}")
        provider_status = connect_status(gateway.port, "api.openai.com:443")
    finally:
        gateway.stop()

    assert status == 403
    # Provider hosts are intercepted whatever the tunnel rules say.
    assert provider_status == 200
