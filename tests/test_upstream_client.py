"""The relay's HTTP/1.1 client against small loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import gzip
import socket

import pytest

from addons.upstream_client import UpstreamClient, UpstreamError


class Server:
    """A loopback HTTP server that answers each request with `reply(index)` and counts connections."""

    def __init__(self, reply, close_after_reply: bool = False):
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
                    0,
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                for piece in self.reply(len(self.requests) - 1):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok_reply(index: int) -> list[bytes]:
    body = b'{"n": %d}' % index
    return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


async def get(client: UpstreamClient, port: int, path: str = "/v1/x", body: bytes = b"{}"):
    response = await client.request("POST", "http", "127.0.0.1", port, path, [("content-type", "application/json")], body)
    content = await response.read()
    await response.aclose()
    return response, content


def test_keep_alive_reuses_connection():
    async def scenario():
        async with Server(ok_reply) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            first = await get(client, server.port)
            second = await get(client, server.port)
            await client.aclose()
            return server, first, second

    server, (first, first_body), (second, second_body) = run(scenario())
    assert (first.status, first_body) == (200, b'{"n": 0}')
    assert (second.status, second_body) == (200, b'{"n": 1}')
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\ncontent-length: 2\r\n" in server.requests[0]
    assert server.requests[0].endswith(b"\r\n\r\n{}")


def test_idle_connection_closed_by_server_is_replaced():
    async def scenario():
        async with Server(ok_reply, close_after_reply=True) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            await get(client, server.port)
            # The server has closed the pooled connection; the client notices and reconnects.
            await asyncio.sleep(0.05)
            second = await get(client, server.port)
            await client.aclose()
            return server, second

    server, (second, body) = run(scenario())
    assert (second.status, body) == (200, b'{"n": 1}')
    assert server.connections == 2


def test_gzip_body_is_decoded():
    payload = b"data: {\"a\": 1}\n\n" * 50

    def reply(index: int) -> list[bytes]:
        compressed = gzip.compress(payload)
        head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
        half = len(compressed) // 2
        return [
            head,
            b"%x\r\n%s\r\n" % (half, compressed[:half]),
            b"%x\r\n%s\r\n" % (len(compressed) - half, compressed[half:]),
            b"0\r\n\r\n",
        ]

    async def scenario():
        async with Server(reply) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            response, body = await get(client, server.port)
            await client.aclose()
            return response, body

    response, body = run(scenario())
    assert body == payload
    assert response.header("content-encoding") == "gzip"


def test_refused_connection_is_connect_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]

        async def scenario():
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            await get(client, port)

        with pytest.raises(UpstreamError) as raised:
            run(scenario())
    assert raised.value.kind == "connect"
    assert str(raised.value).startswith(f"connection to 127.0.0.1:{port} failed: ")


def test_cut_body_is_protocol_error():
    def reply(index: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", b"only part"]

    async def scenario():
        async with Server(reply, close_after_reply=True) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            await get(client, server.port)

    with pytest.raises(UpstreamError) as raised:
        run(scenario())
    assert raised.value.kind == "protocol"
    assert "peer closed connection without sending complete message body" in str(raised.value)


def test_stream_pieces_arrive_before_end():
    # The server never ends the body, so only a client that yields pieces as they arrive gets here.
    def reply(index: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"]

    async def scenario():
        async with Server(reply) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            response = await client.request("POST", "http", "127.0.0.1", server.port, "/s", [], b"")
            chunks = response.chunks()
            first = await anext(chunks)
            await response.aclose()
            await client.aclose()
            return first

    assert run(scenario()) == b"first"


def test_silent_upstream_times_out():
    def reply(index: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]

    async def scenario():
        async with Server(reply) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=0.2)
            response = await client.request("POST", "http", "127.0.0.1", server.port, "/s", [], b"")
            await response.read()

    with pytest.raises(UpstreamError) as raised:
        run(scenario())
    assert raised.value.kind == "protocol"
    assert str(raised.value) == "upstream sent nothing for 0.2 s"


def test_request_is_never_sent_twice():
    # The server answers the first request of a connection, then reads the second and drops the
    # connection without a response: upstream may have acted on it, so the client must not resend it.
    def reply(index: int) -> list[bytes]:
        return ok_reply(index) if index == 0 else []

    async def scenario():
        async with Server(reply) as server:
            client = UpstreamClient(connect_timeout=5, read_timeout=5)
            await get(client, server.port)
            server.close_after_reply = True
            try:
                await get(client, server.port, body=b'{"second": true}')
                error = None
            except UpstreamError as e:
                error = e
            await client.aclose()
            return server, error

    server, error = run(scenario())
    assert error is not None
    assert error.kind == "protocol"
    assert str(error) == "upstream closed the connection before the response was complete"
    assert sum(1 for request in server.requests if request.endswith(b'{"second": true}')) == 1
    assert server.connections == 1
