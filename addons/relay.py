"""The loopback relay that lets a routed call fall back without losing its stream.

mitmproxy has no retries, cannot set an answer once its connection to upstream failed, and sends an
answer made by an addon in one piece. So a call with a routing config that needs more than one upstream
request (fallbacks, load balancing, retries, a first-byte timeout) is pointed at this relay instead:

1. The gateway registers a `RelayJob` under a random token and rewrites the flow to
   `http://127.0.0.1:<relay port>/...` with the token in `x-tollhouse-relay` and no body.
2. The relay receives that request from mitmproxy, walks the routing config (`addons.fallback`) and
   sends each attempt upstream with `addons.upstream_client`, whose pool keeps upstream connections
   alive across client connections.
3. An attempt counts as answered only once the relay has seen its status and, for a stream, its first
   content event. Nothing is forwarded before that, so a failed attempt costs latency only.
4. The winner's answer goes back to mitmproxy in the provider's own format, event by event, and the
   gateway's usual hooks price, translate and log it as for a direct call.

A stream that breaks after its first event was forwarded cannot move to another target. The relay then
ends it with an error event in the provider's format, which the translation plugin converts for the
client, and the row records the cut.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitmproxy import http

from addons.errors import error_message, error_response
from addons.fallback import (
    CONNECT_ERROR,
    EARLY_ERROR,
    HTTP_ERROR,
    INVALID_ANSWER,
    OK,
    REJECTED,
    SKIPPED,
    TIMEOUT,
    FallbackRun,
    Outcome,
)
from addons.sse import SSEEvent, SSEReader
from addons.upstream_client import UpstreamClient, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from addons.breaker import CircuitBreakers
    from addons.call import Call
    from addons.route_rules import FallbackSettings, Target
    from addons.rules import Provider

logger = logging.getLogger(__name__)

#: Request header with the token of a registered job.
TOKEN_HEADER = "x-tollhouse-relay"

# Headers that describe one connection or one framing and are never passed on.
_HOP_HEADERS = {
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host",
}
# Response headers dropped on the way back: the client decodes the body, so its coding and length change.
_DROPPED_RESPONSE_HEADERS = _HOP_HEADERS | {"content-encoding"}
# Bytes of a stream held back while waiting for its first content event. A stream that has sent this
# much without content or error is forwarded as it is.
_MAX_PEEK_BYTES = 256 * 1024
# Seconds an upstream read may stall before the relay gives up on it. It equals mitmproxy's default
# tcp_timeout, after which mitmproxy closes an idle client connection anyway.
_IDLE_READ_TIMEOUT = 600.0
# Largest request head that the relay reads from mitmproxy.
_MAX_HEAD_BYTES = 64 * 1024
# Messages of the error event that ends a forwarded stream early.
_CUT_MESSAGE = "The upstream stream ended before the response was complete."
_SHUTDOWN_MESSAGE = "The gateway is shutting down and ended the response early."

# Stream events that come before any content and do not decide an attempt. An Anthropic
# content_block_start carries no text yet; the Responses events announce an item before its deltas.
_PRELUDE_EVENTS = {
    "message_start", "ping", "content_block_start", "response.created", "response.in_progress",
    "response.output_item.added", "response.content_part.added",
}


@dataclass
class StreamAnswer:
    """A stream that passed its first content event; `events` are held back and not yet forwarded."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    events: list[bytes]
    reader: SSEReader
    chunks: AsyncIterator[bytes]
    response: UpstreamResponse
    api_format: str


@dataclass
class WholeAnswer:
    """A complete answer body: a JSON answer, an error, or a stream that ended early with an error event."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RelayJob:
    """A call waiting for the relay, with what the relay needs to try its targets."""

    call: Call
    config: Target
    default_provider: Provider
    #: Prepare the request for one target (`Gateway.prepare_attempt`); returns the attempt's flow.
    prepare: Callable[[Target], http.HTTPFlow]
    run: FallbackRun | None = None
    #: Why a forwarded stream ended early, or None.
    cut: str | None = None
    #: Prefix of the circuit breaker keys: the call's `route_key`.
    breaker_scope: str = ""
    #: The target whose attempt set the call's state last.
    prepared_target: Target | None = None
    #: True once the relay has begun to write the answer to mitmproxy.
    answer_started: bool = False


class Relay:
    """The relay server on a loopback port, and the client for upstream requests."""

    def __init__(self, settings: FallbackSettings, breakers: CircuitBreakers):
        self.settings = settings
        self.breakers = breakers
        self._jobs: dict[str, RelayJob] = {}
        self._server: asyncio.Server | None = None
        self._client: UpstreamClient | None = None
        self._connections: set[asyncio.Task] = set()
        self.port = 0

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        if self._server is not None:
            return
        # The client connects to the configured base URLs only, never through a proxy from the environment.
        self._client = UpstreamClient(self.settings.connect_timeout, _IDLE_READ_TIMEOUT)
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0, limit=_MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("relay for routed calls listening on 127.0.0.1:%d", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            self._server = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def configure(self, settings: FallbackSettings) -> None:
        """Use reloaded settings for calls that start from now on (the connect timeout stays)."""
        self.settings = settings

    def register(self, job: RelayJob) -> str:
        token = secrets.token_urlsafe(24)
        self._jobs[token] = job
        return token

    def discard(self, token: str) -> None:
        self._jobs.pop(token, None)

    # -- the loopback server ------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        prefix = b""
        try:
            while True:
                head = prefix + await reader.readuntil(b"\r\n\r\n")
                prefix = b""
                headers = _parse_head(head)
                length = headers.get("content-length", "0")
                if length.isdigit() and int(length) > 0:
                    await reader.readexactly(int(length))
                job = self._jobs.pop(headers.get(TOKEN_HEADER, ""), None)
                if job is None:
                    body = b"tollhouse relay: unknown or expired token\n"
                    writer.write(_head(404, "Not Found", [("content-type", "text/plain")], len(body)) + body)
                    await writer.drain()
                    break
                prefix = await self._respond_while_connected(job, reader, writer)
                if prefix is None:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            # mitmproxy closed the connection: the client went away, or the gateway is stopping.
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            # A bug in the relay: mitmproxy gets a closed connection and sends the client a 502.
            logger.exception("relay failed on a connection from mitmproxy")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _respond_while_connected(
        self, job: RelayJob, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """Answer `job`, and stop its attempts when mitmproxy closes the connection (the client left).

        Returns the bytes of the next request that arrived while watching, or None once the connection
        is closed.
        """
        respond = asyncio.ensure_future(self._respond(job, writer))
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({respond, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The relay is closing (the gateway stops). A stream ends with an error event; a call that
            # has no answer yet gets a 503 in its client's format.
            watch.cancel()
            respond.cancel()
            with suppress(asyncio.CancelledError):
                await respond
            if not job.answer_started:
                self._write_shutdown_answer(job, writer)
            raise
        if respond.done():
            if respond.exception() is not None:
                watch.cancel()
                respond.result()
            if not watch.done():
                # mitmproxy sends its next request only after this answer, so one byte may be waiting.
                try:
                    return await watch
                finally:
                    watch.cancel()
            return watch.result() or None
        # The connection ended while the call was still being tried: the client went away.
        respond.cancel()
        with suppress(asyncio.CancelledError):
            await respond
        finished = len(job.run.attempts) if job.run is not None else 0
        logger.info(
            "call %s: the client went away; stopped trying targets after %d finished attempt(s)",
            job.call.request_id,
            finished,
        )
        return None

    async def _respond(self, job: RelayJob, writer: asyncio.StreamWriter) -> None:
        call = job.call
        run = FallbackRun(
            call,
            job.config,
            job.default_provider,
            self.settings,
            self.breakers,
            lambda target, retry: self._attempt(job, target),
            breaker_scope=job.breaker_scope,
        )
        job.run = run
        try:
            outcome = await run.run()
        finally:
            call.attempts = [attempt.as_dict() for attempt in run.attempts]

        payload = outcome.payload
        if isinstance(payload, (StreamAnswer, WholeAnswer)) and outcome.target is not None:
            call.served_by = outcome.target.option
            if outcome.target is not job.prepared_target:
                # A later target could not be tried, and this earlier answer is sent: the call takes
                # that attempt's state again (provider, translation) so the answer is read correctly.
                job.prepare(outcome.target)
                job.prepared_target = outcome.target

        job.answer_started = True
        if isinstance(payload, StreamAnswer):
            await self._forward_stream(job, payload, writer)
            return
        if isinstance(payload, WholeAnswer):
            writer.write(_head(payload.status, payload.reason, payload.headers, len(payload.body)) + payload.body)
            await writer.drain()
            return

        # No upstream answer to forward: the gateway answers in the client's format.
        response = payload if isinstance(payload, http.Response) else self._gateway_error(call, outcome)
        call.answered_by_gateway = True
        if call.error is None or outcome.kind != REJECTED:
            call.error = outcome.error
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in _HOP_HEADERS]
        body = response.content or b""
        writer.write(_head(response.status_code, response.reason or "", headers, len(body)) + body)
        await writer.drain()

    @staticmethod
    def _write_shutdown_answer(job: RelayJob, writer: asyncio.StreamWriter) -> None:
        call = job.call
        message = "tollhouse: the gateway is shutting down and stopped trying targets for this call; retry it."
        response = error_response(call.client_format or "openai", 503, message, request_id=call.request_id)
        response.headers["retry-after"] = "5"
        call.answered_by_gateway = True
        call.error = "the gateway stopped before any target answered"
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in _HOP_HEADERS]
        body = response.content or b""
        writer.write(_head(503, response.reason or "Service Unavailable", headers, len(body)) + body)

    @staticmethod
    def _gateway_error(call: Call, outcome: Outcome) -> http.Response:
        if outcome.kind == TIMEOUT:
            status = 504
        elif outcome.kind == SKIPPED:
            status = 503
        else:
            status = 502
        message = f"tollhouse: every target failed; the last attempt failed with: {outcome.error}"
        response = error_response(call.client_format or "openai", status, message, request_id=call.request_id)
        if outcome.kind == SKIPPED and outcome.retry_after:
            response.headers["retry-after"] = str(max(1, round(outcome.retry_after)))
        return response

    # -- attempts -----------------------------------------------------------------------------------

    async def _attempt(self, job: RelayJob, target: Target) -> Outcome:
        flow = job.prepare(target)
        job.prepared_target = target
        if flow.response is not None:
            # A plugin answered this attempt itself, for example because the gateway has no key for the
            # target's provider or cannot translate the request to its format.
            status = flow.response.status_code
            return Outcome(REJECTED, status=status, error=job.call.error or f"rejected with {status}", payload=flow.response)
        return await self._send(flow.request, target.request_timeout, job.call.provider)

    async def _send(self, request: http.Request, timeout: float | None, provider: Provider) -> Outcome:
        assert self._client is not None
        api_format = provider.api_format
        where = f"provider {provider.name!r}"
        headers = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() not in _HOP_HEADERS]
        response: UpstreamResponse | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        try:
            # request_timeout covers the connection, the response head and the first body bytes, and
            # for a stream everything up to its first content event.
            async with asyncio.timeout_at(deadline):
                response = await self._client.request(
                    request.method, request.scheme, request.host, request.port, request.path, headers,
                    request.raw_content or b"",
                )
                chunks = response.chunks()
                first = await anext(chunks, b"")
            headers_out = [(k, v) for k, v in response.headers if k.lower() not in _DROPPED_RESPONSE_HEADERS]
            is_stream = (response.header("content-type") or "").startswith("text/event-stream")
            if response.status < 400 and is_stream:
                return await self._peek_stream(response, headers_out, chunks, first, api_format, deadline, timeout, where)

            # A JSON answer or an error is read whole, so that a body cut halfway can still fall back.
            parts = [first]
            async for part in chunks:
                parts.append(part)
            await response.aclose()
            body = b"".join(parts)
            answer = WholeAnswer(response.status, response.reason, headers_out, body)
            if 200 <= response.status < 300 and not _is_json_object(body):
                # Every answer of these APIs is a JSON object. An empty body, an HTML page, a cut JSON
                # document or a bare `null` is no answer.
                return Outcome(
                    INVALID_ANSWER,
                    error=f"{where} answered {response.status} with a body that is not a JSON object ({len(body)} bytes)",
                )
            if response.status >= 400:
                return Outcome(
                    HTTP_ERROR,
                    status=response.status,
                    error=error_message(body),
                    retry_after=_retry_after(response),
                    payload=answer,
                )
            return Outcome(OK, status=response.status, payload=answer)
        except TimeoutError:
            await _close(response)
            return Outcome(TIMEOUT, error=f"no first byte from {where} within {timeout:g} s (request_timeout)")
        except UpstreamError as e:
            await _close(response)
            return Outcome(CONNECT_ERROR, error=f"{where}: {e}")
        except asyncio.CancelledError:
            await _close(response)
            raise

    async def _peek_stream(
        self,
        response: UpstreamResponse,
        headers: list[tuple[str, str]],
        chunks: AsyncIterator[bytes],
        first: bytes,
        api_format: str,
        deadline: float | None,
        timeout: float | None,
        where: str,
    ) -> Outcome:
        """Hold a stream back until its first content event or an error event, and decide the attempt."""
        reader = SSEReader()
        held_events: list[bytes] = []
        held_size = 0
        chunk = first
        try:
            while True:
                for event in reader.feed(chunk) if chunk else reader.close():
                    held_events.append(event.raw)
                    held_size += len(event.raw)
                    verdict = _classify(event)
                    if verdict == "error":
                        await response.aclose()
                        answer = WholeAnswer(response.status, response.reason, headers, b"".join(held_events))
                        return Outcome(EARLY_ERROR, status=response.status, error=_event_error(event), payload=answer)
                    if verdict == "content":
                        answer = StreamAnswer(response.status, response.reason, headers, held_events, reader, chunks, response, api_format)
                        return Outcome(OK, status=response.status, payload=answer)
                if not chunk:
                    await _close(response)
                    return Outcome(INVALID_ANSWER, error=f"{where} ended its stream without any content")
                if held_size > _MAX_PEEK_BYTES:
                    # A lot of stream without content or error: forward it rather than hold it longer.
                    answer = StreamAnswer(response.status, response.reason, headers, held_events, reader, chunks, response, api_format)
                    return Outcome(OK, status=response.status, payload=answer)
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, b"")
        except TimeoutError:
            await _close(response)
            return Outcome(TIMEOUT, error=f"no content from {where} within {timeout:g} s (request_timeout)")
        except UpstreamError as e:
            await _close(response)
            return Outcome(CONNECT_ERROR, error=f"{where}: stream broke before its first content: {e}")
        except asyncio.CancelledError:
            await _close(response)
            raise

    async def _forward_stream(self, job: RelayJob, answer: StreamAnswer, writer: asyncio.StreamWriter) -> None:
        """Send the stream to mitmproxy event by event, and close it with an error event if upstream breaks."""
        headers = list(answer.headers) + [("transfer-encoding", "chunked")]
        writer.write(_status_line(answer.status, answer.reason, headers))
        try:
            for raw in answer.events:
                writer.write(_chunk(raw))
            await writer.drain()
            try:
                async for piece in answer.chunks:
                    events = answer.reader.feed(piece)
                    if events:
                        writer.write(_chunk(b"".join(event.raw for event in events)))
                        await writer.drain()
                rest = answer.reader.close()
                if rest:
                    writer.write(_chunk(b"".join(event.raw for event in rest)))
            except UpstreamError as e:
                job.cut = f"upstream stream broke after content was sent: {e}"
                logger.warning("call %s: %s", job.call.request_id, job.cut)
                writer.write(_chunk(_stream_error_event(answer.api_format, job.call.endpoint, _CUT_MESSAGE)))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except asyncio.CancelledError:
            job.cut = "the gateway stopped before the stream ended"
            event = _stream_error_event(answer.api_format, job.call.endpoint, _SHUTDOWN_MESSAGE)
            writer.write(_chunk(event) + b"0\r\n\r\n")
            raise
        finally:
            await answer.response.aclose()


def _classify(event: SSEEvent) -> str:
    """Return "wait", "content" or "error" for an event seen before any content was forwarded."""
    if not event.data:
        return "wait"
    if event.event in ("error", "response.failed") or event.data.startswith('{"error"'):
        return "error"
    if event.event in _PRELUDE_EVENTS or event.data == "[DONE]":
        # `[DONE]` only ends a Chat Completions stream: alone, it is a stream without content.
        return "wait"
    if event.event is None and _is_empty_chat_chunk(event.json):
        return "wait"
    return "content"


def _is_empty_chat_chunk(chunk) -> bool:
    """Tell whether a Chat Completions chunk carries nothing yet: only the role, or an empty content."""
    if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if choice.get("finish_reason") is not None or not isinstance(delta, dict):
        return False
    return not delta.get("content") and not delta.get("tool_calls") and not delta.get("refusal")


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _event_error(event: SSEEvent) -> str:
    payload = event.json
    if not isinstance(payload, dict):
        return "error event before any content"
    error = payload.get("error")
    if not isinstance(error, dict):
        # The Responses API puts code and message at the top of its `error` event, and the error of
        # `response.failed` under `response`.
        response = payload.get("response")
        nested = response.get("error") if isinstance(response, dict) else None
        error = nested if isinstance(nested, dict) else payload
    kind = error.get("type") if error.get("type") not in (None, "error") else error.get("code")
    return f"error event before any content: {kind}: {error.get('message')}"


def _stream_error_event(api_format: str, endpoint: str, message: str) -> bytes:
    """Return an error event in the provider's stream format, for a stream that ends early."""
    if api_format == "anthropic":
        data = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    if endpoint == "responses":
        data = {"type": "error", "code": "server_error", "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    data = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _retry_after(response: UpstreamResponse) -> float | None:
    """Return the wait that upstream asked for, in seconds: `retry-after-ms`, else `Retry-After`."""
    milliseconds = response.header("retry-after-ms")
    if milliseconds:
        with suppress(ValueError):
            return max(0.0, float(milliseconds) / 1000.0)
    value = response.header("retry-after")
    if not value:
        return None
    with suppress(ValueError):
        return max(0.0, float(value))
    with suppress(TypeError, ValueError):
        moment = email.utils.parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - time.time())
    return None


async def _close(response: UpstreamResponse | None) -> None:
    if response is not None:
        with suppress(Exception):
            await response.aclose()


def _parse_head(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _status_line(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or 'Status'}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")


def _head(status: int, reason: str, headers: list[tuple[str, str]], length: int) -> bytes:
    return _status_line(status, reason, [*headers, ("content-length", str(length))])


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


