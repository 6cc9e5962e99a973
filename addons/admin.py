"""The admin listener: `GET /healthz` (JSON), `GET /metrics` (Prometheus text format) and the cost
dashboard (`GET /dashboard`, `addons.dashboard`) on its own port.

It is a small HTTP/1.1 server on the gateway's event loop (`asyncio.start_server`), apart from
mitmproxy, so that monitoring does not pass through the proxy's hooks and is not counted as calls.
Each connection serves one request and is closed. The metrics come from `plugins.metrics.REGISTRY`;
rendering them is quick and does not block the loop for long. The dashboard's DuckDB queries run in a
worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import duckdb
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from addons import dashboard
from addons.logstore import DatabaseLockedError
from plugins.metrics import REGISTRY

logger = logging.getLogger(__name__)

#: Seconds a client has to send its request line and headers before the connection is closed.
READ_TIMEOUT = 10.0
#: Largest request head (request line and headers) read, in bytes.
MAX_HEAD_BYTES = 16 * 1024

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_PATHS = ("/healthz", "/metrics", dashboard.PAGE_PATH, dashboard.DATA_PATH)
# The page may run only its own inline script and fetch only from this listener.
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
    ),
    "cache-control": "no-store",
}


class AdminServer:
    """The HTTP server for `/healthz`, `/metrics` and the dashboard.

    `health` returns the fields of the `/healthz` body. `database` is the request log that the dashboard
    reads, and without it `/dashboard/data.json` returns 503.
    """

    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], dict[str, Any]],
        database: str | os.PathLike[str] | None = None,
    ):
        self.host = host
        self.port = port
        self.health = health
        self.database = database
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
            status, content_type, body, headers = await self._respond(head)
            reason = _REASONS.get(status, "")
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                f"{extra}connection: close\r\n\r\n".encode("ascii") + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            logger.exception("admin listener: failed to respond to a request")
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """Return the status, content type, body and extra headers of the response to a request head."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, _TEXT, b"invalid HTTP request line\n", {}
        method = parts[0]
        target, _, query = parts[1].partition("?")
        if target not in _PATHS:
            message = f"not found: the admin listener serves {', '.join(_PATHS)}\n"
            return 404, _TEXT, message.encode("utf-8"), {}
        if method != "GET":
            return 405, _TEXT, b"method not allowed: use GET\n", {}
        if target == dashboard.PAGE_PATH:
            return 200, "text/html; charset=utf-8", dashboard.page_html(), _PAGE_HEADERS
        if target == dashboard.DATA_PATH:
            return await self._dashboard_data(query)
        return (*self._answer(target), {})

    async def _dashboard_data(self, query: str) -> tuple[int, str, bytes, dict[str, str]]:
        no_store = {"cache-control": "no-store"}
        try:
            days = dashboard.parse_days(query)
        except ValueError as exc:
            return 400, _TEXT, f"{exc}\n".encode("utf-8"), {}
        if self.database is None:
            return 503, _TEXT, b"the dashboard has no request log to read\n", no_store
        try:
            # DuckDB blocks while it opens the file and runs the queries, so they run in a worker thread.
            data = await asyncio.to_thread(dashboard.dashboard_data, self.database, days)
        except (FileNotFoundError, DatabaseLockedError) as exc:
            logger.warning("dashboard: cannot read the request log: %s", exc)
            return 503, _TEXT, f"cannot read the request log: {exc}\n".encode("utf-8"), no_store
        except duckdb.Error as exc:
            logger.error("dashboard: query of the request log %s failed: %s", self.database, exc)
            return 500, _TEXT, f"query of the request log failed: {exc}\n".encode("utf-8"), no_store
        return 200, "application/json", json.dumps(data).encode("utf-8") + b"\n", no_store

    def _answer(self, target: str) -> tuple[int, str, bytes]:
        if target == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        body = {"status": "ok", "uptime_seconds": round(time.monotonic() - self.started, 3), **self.health()}
        return 200, "application/json", json.dumps(body).encode("utf-8") + b"\n"
