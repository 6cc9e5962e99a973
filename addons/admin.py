"""The admin listener: `GET /healthz` (JSON) and `GET /metrics` (Prometheus text format) on its own port.

It is a small HTTP/1.1 server on the gateway's event loop (`asyncio.start_server`), apart from
mitmproxy, so that monitoring does not pass through the proxy's hooks and is not counted as calls.
Each connection serves one request and is closed. The metrics come from `plugins.metrics.REGISTRY`;
rendering them is quick and does not block the loop for long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from plugins.metrics import REGISTRY

logger = logging.getLogger(__name__)

#: Seconds a client has to send its request line and headers before the connection is closed.
READ_TIMEOUT = 10.0
#: Largest request head (request line and headers) read, in bytes.
MAX_HEAD_BYTES = 16 * 1024

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class AdminServer:
    """Serves `/healthz` and `/metrics`; `health` returns the fields of the `/healthz` body."""

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]]):
        self.host = host
        self.port = port
        self.health = health
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address; the port is the real one when the rules gave port 0."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin listener is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, content_type, body = self._answer(head)
            reason = _REASONS.get(status, "")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode("ascii") + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            logger.exception("admin listener: failed to respond to a request")
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain; charset=utf-8", b"invalid HTTP request line\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/healthz", "/metrics"):
            return 404, "text/plain; charset=utf-8", b"not found: the admin listener serves /healthz and /metrics\n"
        if method != "GET":
            return 405, "text/plain; charset=utf-8", b"method not allowed: use GET\n"
        if target == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        body = {"status": "ok", "uptime_seconds": round(time.monotonic() - self.started, 3), **self.health()}
        return 200, "application/json", json.dumps(body).encode("utf-8") + b"\n"
