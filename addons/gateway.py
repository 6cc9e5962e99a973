"""The mitmproxy addon: routes provider calls, drives the plugin hooks and logs one row per call.

mitmproxy calls the methods below by event name. For a call to a configured provider the order is:

1. `requestheaders`: route to the provider's `base_url` (before anything could connect to the host the
   client named), check the body size, identify the project (`tollhouse_authenticate`).
2. `request`: parse the JSON body, then `tollhouse_request` (key injection runs last).
3. `responseheaders`: `tollhouse_response_headers`; a server-sent-event stream gets a `StreamTap`,
   which passes every event to `tollhouse_sse_event` as it goes by.
4. `response` or `error`: `tollhouse_response`, `tollhouse_price`, `tollhouse_log_row`, then the row is
   queued for the DuckDB writer.

Traffic to other hosts is never intercepted (mitmproxy's `allow_hosts` turns it into a TLS tunnel).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable

import pluggy
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from addons.breaker import CircuitBreakers
from addons.call import Call, Price, endpoint_for
from addons.errors import error_message, error_response
from addons.hook_calls import ErrorHandler, HookImplementations
from addons.log_format import CALL_FIELDS
from addons.logstore import LogStore, row_for
from addons.relay import TOKEN_HEADER, Relay, RelayJob
from addons.route_rules import Target
from addons.routing import (
    BASE_URL_PLACEHOLDER,
    CONFIG_HEADER,
    METADATA_HEADER,
    TRACE_ID_HEADER,
    Route,
    RoutingError,
    azure_deployment,
    client_format_for,
    native_path,
    read_config,
    read_portkey_metadata,
    route_request,
    strip_portkey_headers,
    upstream_path,
)
from addons.rules import Provider, Rules, project_key_digest
from addons.secrets import Redactor
from addons.stream_tap import StreamTap

logger = logging.getLogger(__name__)

#: Key of the `Call` in `flow.metadata`.
CALL_KEY = "tollhouse.call"

#: Key of `flow.metadata` with the routing config from `x-portkey-config`: (config, route name, default provider).
CONFIG_KEY = "tollhouse.routing_config"
#: Key of `flow.metadata` with the `RelayJob` of a call that the relay handles.
RELAY_KEY = "tollhouse.relay_job"
#: Key of `flow.metadata` with the option name of the one config target a direct call was sent to.
TARGET_OPTION_KEY = "tollhouse.target_option"
#: Key of `call.metadata` with the trace id sent back in `x-portkey-trace-id` (base-URL listener only).
TRACE_ID_KEY = "routing.trace_id"

# Endpoints whose requests must carry a JSON object body.
_JSON_ENDPOINTS = {"chat.completions", "responses", "embeddings", "messages", "messages.count_tokens"}

# Part of mitmproxy 12.3's error message for a body over its `body_size_limit`.
_BODY_LIMIT_MESSAGE = "body_size_limit"


class Gateway:
    def __init__(self, rules: Rules, pm: pluggy.PluginManager, store: LogStore, redactor: Redactor):
        self.rules = rules
        self.pm = pm
        self.store = store
        self.redactor = redactor
        self._intercepted = rules.intercepted_hosts
        self._upstreams = rules.upstream_addresses
        # Proxy-URL credentials, keyed by client connection id; a CONNECT carries them once for all
        # the requests that follow on that connection.
        self._proxy_credentials: dict[str, tuple[str, str]] = {}
        # None only for unit tests of the connection hooks, which construct a Gateway without plugins.
        self._hooks = _ObservingHooks(pm) if pm is not None else None
        self.in_flight = 0
        # Calls between `requestheaders` and their row, by request id.
        self._active: dict[str, Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.breakers = CircuitBreakers(rules.fallbacks.breaker_failures, rules.fallbacks.breaker_cooldown)
        self.relay = Relay(rules.fallbacks, self.breakers)
        # Relay tokens of calls in flight, by request id.
        self._relay_tokens: dict[str, str] = {}

    async def running(self) -> None:
        await self.relay.start()

    def apply_rules(self, rules: Rules) -> None:
        """Use reloaded rules for calls that start from now on; they must intercept the same hosts."""
        if rules.intercepted_hosts != self._intercepted:
            raise ValueError("reloaded rules must intercept the same hosts; a restart is needed to change them")
        self.rules = rules
        self._upstreams = rules.upstream_addresses
        self.breakers.configure(rules.fallbacks.breaker_failures, rules.fallbacks.breaker_cooldown)
        self.relay.configure(rules.fallbacks)

    # -- connections ---------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        credentials = parse_basic_credentials(flow.request.headers.get("proxy-authorization"))
        if credentials:
            self._proxy_credentials[flow.client_conn.id] = credentials
        if flow.request.host.lower() not in self._intercepted:
            self._check_passthrough(flow, credentials)

    def _check_passthrough(self, flow: http.HTTPFlow, credentials: tuple[str, str] | None) -> None:
        """Reject with 403 or 407 traffic to a non-provider host that the tunnel rules forbid."""
        tunnels = self.rules.tunnels
        host = flow.request.host
        status, message = 0, ""
        if not tunnels.allow:
            status, message = 403, f"tollhouse: traffic to {host} is not allowed; this gateway only serves its providers"
        elif is_blocked_destination(host, tunnels.blocked_networks):
            status, message = 403, f"tollhouse: {host} is in a blocked network (tunnels.blocked_networks in the rules)"
        elif tunnels.require_project_key and not self._known_project(credentials):
            status, message = 407, "tollhouse: put your project in the proxy URL: http://PROJECT:KEY@host:port"
        if status:
            logger.warning("rejected %s to %s:%s: %s", flow.request.method, host, flow.request.port, message)
            flow.response = http.Response.make(status, message.encode() + b"\n", {"content-type": "text/plain"})
            if status == 407:
                flow.response.headers["proxy-authenticate"] = 'Basic realm="tollhouse"'

    def _known_project(self, credentials: tuple[str, str] | None) -> bool:
        if not credentials:
            return False
        project = self.rules.projects.get(credentials[0])
        return bool(project and project.key_sha256 and hmac.compare_digest(project.key_sha256, project_key_digest(credentials[1])))

    def client_disconnected(self, client: connection.Client) -> None:
        self._proxy_credentials.pop(client.id, None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Egress guard: a provider host is only contacted where the rules send calls.

        Calls are rerouted in `requestheaders`, before mitmproxy opens any upstream connection
        (`connection_strategy=lazy`). A connection to an intercepted host that is not a configured
        `base_url` means routing did not run; it is stopped here, before DNS resolution.
        """
        address = data.server.address
        if address is None:
            return
        host, port = address[0].lower(), address[1]
        if self.relay.started and (host, port) == self.relay.address:
            return
        if (host, port) == BASE_URL_PLACEHOLDER and (host, port) not in self._upstreams:
            data.server.error = f"tollhouse blocked a connection to {host}:{port}: a base-URL request was not routed"
            logger.error("egress guard blocked a connection to the base-URL listener's placeholder %s:%s", host, port)
            return
        if host in self._intercepted and (host, port) not in self._upstreams:
            data.server.error = f"tollhouse blocked a connection to {host}:{port}: not a configured provider base_url"
            logger.error("egress guard blocked a connection to %s:%s", host, port)

    # -- request -------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        request = flow.request
        route: Route | None = None
        routing_error: RoutingError | None = None
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            # The base-URL listener: the path and the Portkey headers choose the provider.
            listener = "base_url"
            client_format = client_format_for(request.path)
            try:
                route = route_request(self.rules, request.path, request.headers)
            except RoutingError as e:
                routing_error = e
            provider = route.provider if route else None
            endpoint = route.endpoint if route else "other"
        else:
            provider = self.rules.provider_for_host(request.pretty_host)
            if provider is None:
                if flow.request.scheme == "http" and not flow.client_conn.tls_established:
                    # A plain-HTTP proxy request to another host: the same rules as for tunnels.
                    self._check_passthrough(flow, parse_basic_credentials(request.headers.get("proxy-authorization")))
                return
            listener = "proxy"
            client_format = provider.api_format
            endpoint = endpoint_for(provider.kind, request.path)

        call = Call(
            request_id="th_" + secrets.token_hex(12),
            listener=listener,
            provider=provider,
            client_format=client_format,
            method=request.method,
            path=request.path,
            endpoint=endpoint,
        )
        flow.metadata[CALL_KEY] = call
        self._active[call.request_id] = call
        self.in_flight += 1
        self._idle.clear()

        # Route first: nothing below may leave the flow pointing at the host the client named. A
        # base-URL request that could not be routed gets a 400 response below and never connects.
        if provider is not None:
            request.scheme = provider.scheme
            request.host = provider.host
            request.port = provider.port
            request.headers["host"] = provider.host if provider.port in (80, 443) else f"{provider.host}:{provider.port}"
        if route is not None:
            request.path = route.path
            if route.config is not None:
                key = _route_key(route.route_name, request.headers.get(CONFIG_HEADER, ""))
                flow.metadata[CONFIG_KEY] = (route.config, route.route_name, route.default_provider, key)
        if listener == "base_url":
            call.metadata[TRACE_ID_KEY] = request.headers.get(TRACE_ID_HEADER, "").strip() or call.request_id

        call.proxy_credentials = self._proxy_credentials.get(flow.client_conn.id) or parse_basic_credentials(
            request.headers.pop("proxy-authorization", None)
        )

        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.rules.max_request_bytes:
            self._reject(call, flow, 413, self._too_large_message(int(length)))
            return

        try:
            project = self.pm.hook.tollhouse_authenticate(call=call, flow=flow)
        except Exception as e:
            self._plugin_failed(call, flow, "tollhouse_authenticate", e)
            return
        if project is None:
            self._reject_unauthenticated(call, flow)
            return
        call.project = project

        # The Portkey headers are read here, after the project key. Plugins may read others (such as
        # x-portkey-cache-force-refresh) in tollhouse_request; `request` removes them all before the
        # call goes upstream.
        trace_id = request.headers.get(TRACE_ID_HEADER, "").strip()
        if trace_id:
            call.tags["trace_id"] = trace_id
        try:
            call.tags.update(read_portkey_metadata(request.headers.get(METADATA_HEADER)))
        except RoutingError as e:
            routing_error = routing_error or e
        if listener == "proxy" and CONFIG_HEADER in request.headers:
            # The forward proxy honours a routing config in the header too. Its targets that name no
            # provider keep the provider of the host the client called.
            try:
                value = request.headers.get(CONFIG_HEADER)
                config, name = read_config(self.rules, value)
                if config is not None:
                    flow.metadata[CONFIG_KEY] = (config, name, provider, _route_key(name, value))
            except RoutingError as e:
                routing_error = routing_error or e
        if routing_error is not None:
            self._reject(call, flow, routing_error.status, str(routing_error))

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Plain function, not a coroutine: mitmproxy awaits what a hook returns, so only calls whose
        # plugins returned awaitables pay for a suspension.
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is None or flow.response is not None:
            return

        size = len(flow.request.raw_content or b"")
        if size > self.rules.max_request_bytes:
            self._reject(call, flow, 413, self._too_large_message(size))
            return

        if call.endpoint in _JSON_ENDPOINTS and flow.request.method == "POST":
            try:
                body = json.loads(flow.request.content or b"")
            except (ValueError, UnicodeDecodeError) as e:
                self._reject(call, flow, 400, f"request body is not valid JSON: {e}")
                return
            except RecursionError:
                self._reject(call, flow, 400, "request body is nested too deeply to parse")
                return
            if not isinstance(body, dict):
                self._reject(call, flow, 400, "request body must be a JSON object")
                return
            call.request_json = body
            model = body.get("model")
            call.model = model if isinstance(model, str) else None
            call.stream = body.get("stream") is True

        routing = self._routing_config(call, flow)
        if routing is not None and not routing[0].needs_relay:
            # One target and nothing to retry: mitmproxy sends the call there itself.
            self._apply_target(call, flow, routing[0].leaves()[0], routing[2])
            routing = None

        try:
            results = self.pm.hook.tollhouse_request(call=call, flow=flow)
        except Exception as e:
            self._plugin_failed(call, flow, "tollhouse_request", e)
            return None
        pending = [result for result in results if inspect.isawaitable(result)]
        if pending:
            return self._await_request_hooks(call, flow, pending, routing)
        return self._after_request_hooks(call, flow, routing)

    async def _await_request_hooks(
        self, call: Call, flow: http.HTTPFlow, pending: list[Awaitable], routing: tuple | None
    ) -> None:
        for awaitable in pending:
            try:
                await awaitable
            except Exception as e:
                self._plugin_failed(call, flow, "tollhouse_request", e)
                return
        after = self._after_request_hooks(call, flow, routing)
        if after is not None:
            await after

    def _after_request_hooks(self, call: Call, flow: http.HTTPFlow, routing: tuple | None) -> Awaitable[None] | None:
        strip_portkey_headers(flow.request.headers)
        if flow.response is not None:
            call.answered_by_gateway = True
            return None
        if routing is not None:
            if not self.relay.started:
                return self._start_relay_then_hand_over(call, flow, routing)
            self._hand_to_relay(call, flow, routing)
            return None
        try:
            self.pm.hook.tollhouse_upstream_request(call=call, flow=flow)
        except Exception as e:
            self._plugin_failed(call, flow, "tollhouse_upstream_request", e)
            return None
        if flow.response is not None:
            call.answered_by_gateway = True
        return None

    # -- routing configs -----------------------------------------------------------------------------

    def _routing_config(self, call: Call, flow: http.HTTPFlow) -> tuple[Target, str | None, Provider] | None:
        """Return (config, route name, default provider) of the call, from the header or a matching route."""
        routing = flow.metadata.pop(CONFIG_KEY, None)
        if routing is None and self.rules.routes and call.provider is not None:
            route = self.rules.route_for(call.provider.name, call.model, call.project.name if call.project else None)
            if route is not None:
                routing = (route.config, route.name, call.provider, f"route:{route.name}")
        if routing is None:
            return None
        config, name, default, key = routing
        call.route = name
        if key.startswith("config:"):
            # A config from the header is the project's own: its breakers and cache entries are too.
            key = f"config:{call.project.name if call.project else '-'}:{key.removeprefix('config:')}"
        call.route_key = key
        first = config.leaves()[0]
        if first.provider is not None and first.provider is not call.provider:
            # Policy plugins in tollhouse_request see the provider of the first target, and every
            # attempt starts from a request that points at that provider.
            self._point_at(flow.request, first.provider, call.path)
            call.provider = first.provider
        return config, name, default or call.provider

    def _apply_target(self, call: Call, flow: http.HTTPFlow, target: Target, default: Provider) -> None:
        """Point the flow at one target: its provider's origin and path, and its override_params."""
        provider = target.provider or default
        request = flow.request
        if provider is not call.provider or (request.host, request.port) != provider.address:
            self._point_at(request, provider, call.path)
        self._shape_body(call, request, target, call.provider, provider)
        call.provider = provider
        flow.metadata[TARGET_OPTION_KEY] = target.option

    @staticmethod
    def _shape_body(call: Call, request: http.Request, target: Target, source: Provider, provider: Provider) -> None:
        """Write the target's override_params into the body, and the model for a call that leaves Azure.

        Providers other than Azure have no deployments. An Azure client names a deployment in the path,
        and often as the body's `model`, and the rules' `deployments` map turns it into a model name (an
        unmapped name is passed on as it is). The body is serialised once, and only when it changed.
        """
        body = call.request_json
        if body is None:
            return
        changed = False
        if source.kind == "azure" and provider.kind != "azure":
            name = body.get("model") if isinstance(body.get("model"), str) else azure_deployment(call.path)
            if name and body.get("model") != source.deployments.get(name, name):
                body["model"] = source.deployments.get(name, name)
                changed = True
        if target.override_params:
            body.update(target.override_params)
            changed = True
        if not changed:
            return
        model = body.get("model")
        call.model = model if isinstance(model, str) else None
        call.stream = body.get("stream") is True
        request.content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @staticmethod
    def _point_at(request: http.Request, provider: Provider, client_path: str) -> None:
        request.scheme = provider.scheme
        request.host = provider.host
        request.port = provider.port
        request.headers["host"] = provider.host if provider.port in (80, 443) else f"{provider.host}:{provider.port}"
        request.path = upstream_path(provider, client_path, native_path(client_path))

    async def _start_relay_then_hand_over(self, call: Call, flow: http.HTTPFlow, routing: tuple) -> None:
        await self.relay.start()
        self._hand_to_relay(call, flow, routing)

    def _hand_to_relay(self, call: Call, flow: http.HTTPFlow, routing: tuple) -> None:
        """Register the call with the relay and point the flow at it, with only the job's token."""
        config, _, default = routing
        base = _AttemptBase(
            request=flow.request.copy(),
            provider=call.provider,
            endpoint=call.endpoint,
            model=call.model,
            stream=call.stream,
            request_json=call.request_json,
            rewrite_stream=call.rewrite_stream,
            metadata=dict(call.metadata),
        )
        job = RelayJob(
            call,
            config,
            default,
            prepare=lambda target: self.prepare_attempt(call, flow, base, target, default),
            breaker_scope=call.route_key or "",
        )
        token = self.relay.register(job)
        self._relay_tokens[call.request_id] = token
        flow.metadata[RELAY_KEY] = job

        host, port = self.relay.address
        request = flow.request
        request.scheme = "http"
        request.host = host
        request.port = port
        request.headers = http.Headers(host=f"{host}:{port}")
        request.headers[TOKEN_HEADER] = token
        request.content = b""

    def prepare_attempt(self, call: Call, flow: http.HTTPFlow, base: _AttemptBase, target: Target, default: Provider) -> http.HTTPFlow:
        """Return a new flow whose request is ready for `target`, and put the call in that attempt's state."""
        provider = target.provider or default
        call.provider = provider
        call.endpoint = base.endpoint
        call.model = base.model
        call.rewrite_stream = base.rewrite_stream
        call.metadata.clear()
        call.metadata.update(base.metadata)
        call.request_json = copy.deepcopy(base.request_json)
        call.stream = base.stream
        # A response that a plugin set for an earlier attempt (no key for its provider) does not end this one.
        call.answered_by_gateway = False
        call.error = None

        attempt = http.HTTPFlow(flow.client_conn, flow.server_conn)
        attempt.request = base.request.copy()
        attempt.metadata[CALL_KEY] = call
        if provider is not base.provider:
            self._point_at(attempt.request, provider, call.path)
        self._shape_body(call, attempt.request, target, base.provider, provider)
        try:
            self.pm.hook.tollhouse_upstream_request(call=call, flow=attempt)
        except Exception as e:
            self._plugin_failed(call, attempt, "tollhouse_upstream_request", e)
        return attempt

    # -- response ------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is None:
            return
        response = flow.response
        call.status = response.status_code
        response.headers["x-tollhouse-request-id"] = call.request_id
        job: RelayJob | None = flow.metadata.get(RELAY_KEY)
        option = flow.metadata.get(TARGET_OPTION_KEY)
        if job is not None:
            set_fallback_headers(call, job, response)
        elif option is not None and not call.answered_by_gateway:
            # A config with one target that mitmproxy called directly, and upstream sent the response.
            call.served_by = option
            response.headers["x-tollhouse-attempts"] = "1"
            response.headers["x-tollhouse-served-by"] = option
            response.headers["x-portkey-last-used-option-index"] = option
            response.headers["x-portkey-retry-attempt-count"] = "0"
        set_portkey_headers(call, response)
        if call.answered_by_gateway:
            return

        self._hooks.tollhouse_response_headers.call_each({"call": call, "flow": flow}, self._on_plugin_error(call, "tollhouse_response_headers"))

        if response.headers.get("content-type", "").startswith("text/event-stream"):
            encoding = response.headers.get("content-encoding")
            response.stream = StreamTap(call, self._hooks.tollhouse_sse_event, encoding, rewrite=call.rewrite_stream)
            if call.rewrite_stream:
                # Rewritten events are sent decompressed and their total length is not known ahead.
                response.headers.pop("content-encoding", None)
                response.headers.pop("content-length", None)
        else:
            call.first_byte = time.monotonic()

    def response(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.pop(CALL_KEY, None)
        if call is None:
            return
        response = flow.response
        call.status = response.status_code
        if call.first_byte is None:
            call.first_byte = time.monotonic()

        if response.status_code >= 400 and not response.stream:
            # Upstream error bodies may echo the real key; the client must not receive it.
            content = response.content or b""
            masked = self.redactor.mask_bytes(content)
            if masked is not content:
                response.content = masked
            if call.error is None:
                call.error = error_message(masked)

        if not call.answered_by_gateway:
            self._hooks.tollhouse_response.call_each({"call": call, "flow": flow}, self._on_plugin_error(call, "tollhouse_response"))
        job: RelayJob | None = flow.metadata.get(RELAY_KEY)
        if job is not None and job.cut is not None:
            call.error = job.cut
            if call.usage is not None:
                call.usage_complete = False
        self._finish(call)

    def error(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.pop(CALL_KEY, None)
        if call is None:
            return
        job: RelayJob | None = flow.metadata.get(RELAY_KEY)
        if job is not None and job.run is not None and call.attempts is None:
            # The client left while the relay was still trying targets: log the attempts made so far.
            attempts = job.run.attempts_so_far("not finished: the client went away")
            call.attempts = [attempt.as_dict() for attempt in attempts]
        message = flow.error.msg if flow.error else "unknown error"
        if flow.response is not None and call.stream_finished:
            # The stream's final event had been sent; the OpenAI SDK closes its connection right
            # after `data: [DONE]`, before upstream's end of body. The call is complete.
            call.status = flow.response.status_code
            self._finish(call)
            return
        if flow.response is not None and not flow.response.stream:
            # Upstream closed before the whole (buffered) answer arrived: mitmproxy answered 502.
            call.status = 502
            call.error = f"upstream closed the connection before the answer was complete: {message}"
        elif flow.response is not None:
            # The answer had started: the stream was cut by the client or by upstream.
            call.status = flow.response.status_code
            call.error = f"stream ended early: {message}"
            if call.usage is not None:
                call.usage_complete = False
        elif _BODY_LIMIT_MESSAGE in message:
            # mitmproxy cut off a body far over the limit while it arrived and answered 413 itself.
            call.status = 413
            call.error = f"request body too large: {message}"
        elif flow.request.timestamp_end is not None and flow.server_conn.timestamp_tcp_setup is None:
            # The whole request arrived but no upstream connection was made: mitmproxy answered 502.
            # (mitmproxy 12.3 keeps the connect error on a separate Server object, not on the flow.)
            call.status = 502
            call.error = f"upstream unreachable: {message}"
        else:
            call.error = f"call failed before an answer: {message}"
        # A failure on the upstream side is an error; a client that went away or sent too much is not.
        level = logging.ERROR if call.status == 502 else logging.WARNING
        logger.log(level, "call %s: %s", call.request_id, self.redactor.mask(call.error))
        self._finish(call)

    # -- helpers -------------------------------------------------------------------------------------

    def _finish(self, call: Call) -> None:
        self._active.pop(call.request_id, None)
        token = self._relay_tokens.pop(call.request_id, None)
        if token is not None:
            # The relay never received the call, for example because the client went away first.
            self.relay.discard(token)
        call.ended = time.monotonic()
        if call.error:
            call.error = self.redactor.mask(call.error)
        for attempt in call.attempts or ():
            # Upstream error messages may repeat the key that was sent, as OpenAI's 401 does.
            if attempt.get("error"):
                attempt["error"] = self.redactor.mask(attempt["error"])
        call.price = self._hooks.tollhouse_price.first_result({"call": call}, self._on_plugin_error(call, "tollhouse_price"))
        if call.price is None:
            call.price = Price(None, "missing_usage")

        row = row_for(call)
        self._hooks.tollhouse_log_row.call_each({"call": call, "row": row}, self._on_plugin_error(call, "tollhouse_log_row", row))
        self.store.put(row)
        log_call(call)
        self._hooks.tollhouse_call_end.call_each({"call": call}, self._on_plugin_error(call, "tollhouse_call_end"))

        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    def _on_plugin_error(self, call: Call, hook: str, row: dict | None = None) -> ErrorHandler:
        """Return a handler that logs a plugin's exception and records the first one in the row."""

        def record(plugin_name: str, e: Exception) -> None:
            logger.error("call %s: plugin %s failed in %s", call.request_id, plugin_name, hook, exc_info=e)
            message = self.redactor.mask(f"plugin {plugin_name} failed in {hook}: {type(e).__name__}: {e}")
            if call.error is None:
                call.error = message
            if row is not None and row.get("error") is None:
                row["error"] = message

        return record

    def _reject(self, call: Call, flow: http.HTTPFlow, status: int, message: str, code: str | None = None) -> None:
        call.answered_by_gateway = True
        call.error = message
        flow.response = error_response(call.client_format, status, message, code=code, request_id=call.request_id)
        set_portkey_headers(call, flow.response)
        if status < 500:
            # A 500 here is a failed plugin hook, which `_plugin_failed` has logged as an error.
            logger.warning("call %s rejected with %d: %s", call.request_id, status, self.redactor.mask(message))

    def _reject_unauthenticated(self, call: Call, flow: http.HTTPFlow) -> None:
        kind = call.client_format
        where = "x-api-key or Authorization: Bearer" if kind == "anthropic" else "Authorization: Bearer"
        env = "ANTHROPIC_API_KEY" if kind == "anthropic" else "OPENAI_API_KEY"
        if call.listener == "base_url":
            where += " or x-portkey-api-key"
        if call.proxy_credentials is not None or has_credential(flow.request.headers):
            message = (
                "tollhouse: unknown project key. Set the client's API key (for example "
                f"{env}) to the project key the gateway's operator gave you."
            )
            code = "invalid_api_key"
        else:
            message = (
                f"tollhouse: missing project key. Send it as {where} (for example set {env} to your project "
                "key) or in the proxy URL as http://PROJECT:KEY@host:port."
            )
            code = "missing_api_key"
        self._reject(call, flow, 401, message, code)

    def _too_large_message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the gateway's limit of {self.rules.max_request_bytes} bytes "
            "(max_request_bytes in the rules)"
        )

    def _plugin_failed(self, call: Call, flow: http.HTTPFlow, hook: str, e: Exception) -> None:
        logger.exception("call %s: plugin hook %s failed", call.request_id, hook)
        self._reject(call, flow, 500, self.redactor.mask(f"tollhouse plugin hook {hook} failed: {type(e).__name__}: {e}"))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; return False when `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def done(self) -> None:
        """Write a row for every call still in flight when mitmproxy shuts down."""
        if self._active:
            logger.warning("shutting down with %d call(s) still in flight; logging them as cut off", len(self._active))
        for call in list(self._active.values()):
            call.error = "the gateway stopped before the call ended"
            if call.usage is not None:
                call.usage_complete = False
            self._finish(call)


class _ObservingHooks:
    """The hooks that run once the answer has started, each called implementation by implementation."""

    def __init__(self, pm: pluggy.PluginManager):
        self.tollhouse_response_headers = HookImplementations(pm.hook.tollhouse_response_headers)
        self.tollhouse_sse_event = HookImplementations(pm.hook.tollhouse_sse_event)
        self.tollhouse_response = HookImplementations(pm.hook.tollhouse_response)
        self.tollhouse_price = HookImplementations(pm.hook.tollhouse_price)
        self.tollhouse_log_row = HookImplementations(pm.hook.tollhouse_log_row)
        self.tollhouse_call_end = HookImplementations(pm.hook.tollhouse_call_end)


class _AttemptBase:
    """The request and call state after `tollhouse_request`, from which every attempt starts."""

    __slots__ = ("request", "provider", "endpoint", "model", "stream", "request_json", "rewrite_stream", "metadata")

    def __init__(self, request, provider, endpoint, model, stream, request_json, rewrite_stream, metadata):
        self.request = request
        self.provider = provider
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.request_json = copy.deepcopy(request_json)
        self.rewrite_stream = rewrite_stream
        self.metadata = metadata


def _route_key(name: str | None, header_value: str) -> str:
    """Return the routing config's identity: its route name, or a digest of the JSON sent in the header."""
    if name is not None and name != CONFIG_HEADER:
        return f"route:{name}"
    return "config:" + hashlib.sha256(header_value.strip().encode()).hexdigest()[:16]


def set_fallback_headers(call: Call, job: RelayJob, response: http.Response) -> None:
    """Tell the client which target answered and after how many attempts."""
    run = job.run
    attempts = sum(1 for attempt in call.attempts or () if attempt.get("sent"))
    response.headers["x-tollhouse-attempts"] = str(attempts)
    if call.served_by is not None:
        response.headers["x-tollhouse-served-by"] = call.served_by
        response.headers["x-portkey-last-used-option-index"] = call.served_by
    response.headers["x-portkey-retry-attempt-count"] = str(run.retries_of_last if run is not None else 0)


def set_portkey_headers(call: Call, response: http.Response) -> None:
    """Add `x-portkey-provider` and `x-portkey-trace-id` to an answer of the base-URL listener."""
    trace_id = call.metadata.get(TRACE_ID_KEY)
    if trace_id is None:
        return
    response.headers["x-portkey-trace-id"] = trace_id
    if call.provider is not None:
        response.headers["x-portkey-provider"] = call.provider.name


def parse_basic_credentials(header: str | None) -> tuple[str, str] | None:
    """Return (user, password) from a `Basic` Proxy-Authorization header value, or None."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def is_blocked_destination(host: str, networks) -> bool:
    """Tell whether `host` is `localhost` or an IP address inside one of `networks`."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(address in network for network in networks)


def has_credential(headers) -> bool:
    """Tell whether the request carries a non-empty API key in `x-api-key` or `Authorization`."""
    if headers.get("x-api-key", "").strip():
        return True
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return bool(token.strip()) or (bool(scheme) and scheme.lower() != "bearer")


def log_call(call: Call) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    usage = call.usage
    tokens = f"{usage.total_input_tokens}/{usage.output_tokens}" if usage else "-"
    cost = call.price.cost_usd if call.price and call.price.cost_usd is not None else "unknown"
    # Structured fields for the JSON log format (`addons.log_format`); the text format ignores them.
    fields = {
        "request_id": call.request_id,
        "project": call.project.name if call.project else None,
        "provider": call.provider.name if call.provider else None,
        "model": call.response_model or call.model,
        "status": call.status,
        "input_tokens": usage.total_input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "cost_usd": str(call.price.cost_usd) if call.price and call.price.cost_usd is not None else None,
        "latency_ms": round(call.latency_ms, 1) if call.latency_ms is not None else None,
        "error": call.error,
    }
    logger.info(
        "%s project=%s provider=%s model=%s status=%s tokens=%s cost_usd=%s latency_ms=%.0f%s",
        call.request_id,
        call.project.name if call.project else "-",
        call.provider.name if call.provider else "-",
        call.response_model or call.model or "-",
        call.status if call.status is not None else "-",
        tokens,
        cost,
        call.latency_ms or 0.0,
        f" error={call.error!r}" if call.error else "",
        extra={CALL_FIELDS: fields},
    )
