"""A small pooled HTTP/1.1 client for the relay's upstream requests, built on h11.

The relay needs little of a general HTTP client. It sends one request at a time per connection, with a
body already in memory, and reads a streamed response body. It keeps keep-alive connections shared by
all calls, verifies TLS with the system's and certifi's roots, and reports failures in the classes the
fallback rules need. httpx did this at about 1 ms of CPU per request in the gateway (cProfile, see
docs/benchmarks.md). This client skips httpx's URL model, transports and auth layers, and h11 (a
mitmproxy dependency) parses the protocol.

Failures raise `UpstreamError` with `kind` "connect" (refused, DNS, TLS: nothing was sent) or
"protocol" (the connection broke or upstream sent invalid HTTP). A pooled connection whose server has
closed it is dropped before reuse. The request is never sent twice: a connection that breaks after the
request went out may have reached upstream, and the caller's retry rules decide what happens next.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import suppress

import h11

from addons.sse import make_decompressor

# Bytes read from the socket at a time.
_READ_SIZE = 64 * 1024
# Idle connections kept per origin, and how long one may stay idle, in seconds.
_MAX_IDLE_PER_ORIGIN = 64
_IDLE_EXPIRY = 60.0
# Largest response head accepted, like h11's default.
_MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    """A request that got no complete response; `kind` is "connect" or "protocol"."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class _Connection:
    __slots__ = ("reader", "writer", "h11", "origin", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: tuple[str, str, int]):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self.origin = origin
        self.idle_since = 0.0

    def close(self) -> None:
        with suppress(Exception):
            self.writer.close()


class UpstreamResponse:
    """A response whose head has arrived; iterate `chunks()` for the decoded body, then `aclose()`."""

    def __init__(self, client: UpstreamClient, connection: _Connection, response: h11.Response):
        self._client = client
        self._connection: _Connection | None = connection
        self.status = response.status_code
        self.reason = response.reason.decode("latin-1", errors="replace")
        self.headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers]
        encoding = self.header("content-encoding")
        try:
            self._decoder = make_decompressor(encoding)
        except ValueError as e:
            self.aclose_now()
            raise UpstreamError("protocol", str(e)) from e
        self._done = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body decoded from its content-encoding, in the pieces the network delivers."""
        connection = self._connection
        if connection is None:
            return
        while True:
            try:
                event = await self._client._next_event(connection)
            except (UpstreamError, asyncio.CancelledError):
                self.aclose_now()
                raise
            if isinstance(event, h11.Data):
                data = self._decoder.decompress(bytes(event.data)) if self._decoder else bytes(event.data)
                if data:
                    yield data
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                tail = self._decoder.flush() if self._decoder else b""
                if tail:
                    yield tail
                return
            else:
                self.aclose_now()
                raise UpstreamError("protocol", f"unexpected {type(event).__name__} in the response body")

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def aclose_now(self) -> None:
        """Give the connection back to the pool after a complete body, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._done:
            self._client._release(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        self.aclose_now()


class UpstreamClient:
    """Keep-alive connections per origin (scheme, host, port), shared by every call of the relay."""

    def __init__(self, connect_timeout: float, read_timeout: float):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._tls = ssl.create_default_context()
        with suppress(ImportError, OSError):
            import certifi

            self._tls.load_verify_locations(certifi.where())
        self._tls.set_alpn_protocols(["http/1.1"])

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def request(
        self, method: str, scheme: str, host: str, port: int, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send a request and return once the response head has arrived."""
        origin = (scheme, host, port)
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        request = h11.Request(
            method=method,
            target=target,
            headers=[("host", host_header), *headers, ("content-length", str(len(body)))],
        )
        connection = self._take_idle(origin) or await self._connect(origin)
        return await self._exchange(connection, request, body)

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            # The event loop has read a server's close while the connection sat idle, so a closed one
            # shows here, except for a close that arrives at this very moment.
            alive = not connection.reader.at_eof() and not connection.writer.transport.is_closing()
            if now - connection.idle_since < _IDLE_EXPIRY and alive:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        state = connection.h11
        if state.our_state is not h11.DONE or state.their_state is not h11.DONE:
            connection.close()
            return
        try:
            state.start_next_cycle()
        except h11.LocalProtocolError:
            connection.close()
            return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= _MAX_IDLE_PER_ORIGIN:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        tls = self._tls if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host.strip("[]"), port, ssl=tls, server_hostname=host.strip("[]") if tls else None, limit=_READ_SIZE
                )
        except TimeoutError as e:
            raise UpstreamError("connect", f"connecting to {host}:{port} timed out after {self.connect_timeout:g} s") from e
        except ssl.SSLError as e:
            raise UpstreamError("connect", f"TLS handshake with {host}:{port} failed: {e}") from e
        except OSError as e:
            raise UpstreamError("connect", f"connection to {host}:{port} failed: {e.strerror or e}") from e
        return _Connection(reader, writer, origin)

    async def _exchange(self, connection: _Connection, request: h11.Request, body: bytes) -> UpstreamResponse:
        try:
            return await self._send_and_read_head(connection, request, body)
        except asyncio.CancelledError:
            # The caller gave up (a timeout, a client that left): the connection is mid-exchange.
            connection.close()
            raise

    async def _send_and_read_head(self, connection: _Connection, request: h11.Request, body: bytes) -> UpstreamResponse:
        try:
            data = connection.h11.send(request) + connection.h11.send(h11.Data(data=body)) + connection.h11.send(h11.EndOfMessage())
            connection.writer.write(data)
            await connection.writer.drain()
        except (OSError, h11.LocalProtocolError) as e:
            connection.close()
            raise UpstreamError("protocol", f"sending the request failed: {e}") from e

        while True:
            try:
                event = await self._next_event(connection)
            except UpstreamError:
                connection.close()
                raise
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return UpstreamResponse(self, connection, event)
            connection.close()
            raise UpstreamError("protocol", f"unexpected {type(event).__name__} before the response head")

    async def _next_event(self, connection: _Connection):
        while True:
            try:
                event = connection.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise UpstreamError("protocol", f"invalid HTTP from upstream: {e}") from e
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamError("protocol", "upstream closed the connection before the response was complete")
                return event
            try:
                async with asyncio.timeout(self.read_timeout):
                    data = await connection.reader.read(_READ_SIZE)
            except TimeoutError as e:
                raise UpstreamError("protocol", f"upstream sent nothing for {self.read_timeout:g} s") from e
            except OSError as e:
                raise UpstreamError("protocol", f"reading from upstream failed: {e.strerror or e}") from e
            try:
                connection.h11.receive_data(data)
            except h11.RemoteProtocolError as e:
                raise UpstreamError("protocol", f"invalid HTTP from upstream: {e}") from e
            if not data:
                # End of stream: h11 reports it as an error unless the response was complete.
                try:
                    event = connection.h11.next_event()
                except h11.RemoteProtocolError as e:
                    raise UpstreamError("protocol", _closed_early_message(e)) from e
                if isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                    raise UpstreamError("protocol", "upstream closed the connection before the response was complete")
                return event


def _closed_early_message(error: h11.RemoteProtocolError) -> str:
    detail = str(error)
    if "peer closed connection" in detail:
        return f"upstream closed the connection before the response was complete ({detail})"
    return "upstream closed the connection before the response was complete"
