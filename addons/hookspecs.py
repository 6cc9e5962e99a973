"""The tollhouse plugin API.

Every hook is listed here in the order in which the gateway calls it during one client call. Built-in
features are plugins too (`plugins/`), registered the same way as third-party ones, so each of them can
be read as an example.

A plugin is a module or object with functions marked ``@addons.hookimpl``. It is loaded from the
``plugins:`` list of the rules file (a module name or a path to a ``.py`` file) or from the entry-point
group ``tollhouse`` of an installed package. Implementations may accept any subset of a hook's
arguments, by name.

Hooks run on mitmproxy's event loop: they must not block. An exception in `tollhouse_configure` stops
startup. One in `tollhouse_authenticate` or `tollhouse_request` fails only the call it was raised for:
the client gets a 500 error in its provider's format, and the row records the error. One in
`tollhouse_upstream_request` fails the attempt in the same way, and a call with a routing config moves
on to its next target. From
`tollhouse_response_headers` on, the answer has started, so the gateway calls each implementation on
its own (`addons.hook_calls`): an exception is logged and recorded in the row, and the other plugins
still run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mitmproxy import http

    from addons.call import Call, Price
    from addons.rules import Project, Rules
    from addons.sse import SSEEvent

hookspec = pluggy.HookspecMarker("tollhouse")


# -- startup ---------------------------------------------------------------------------------------


@hookspec(historic=True)
def tollhouse_configure(rules: Rules) -> None:
    """Receive the validated rules once, before the gateway starts listening.

    Read plugin settings from ``rules.plugin_settings`` (the ``settings:`` mapping of the rules file)
    here and keep them. A plugin registered later still receives this call.

    :param rules: the validated rules file.
    :raises addons.rules.RulesError: to stop startup with a message naming the setting and the fix.
    """


# -- request ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tollhouse_authenticate(call: Call, flow: http.HTTPFlow) -> Project | None:
    """Identify the project that sent a call, from the request headers.

    Runs when the request headers have arrived and the request has been routed to its provider
    (``call.provider`` is set), before the body is read. The first non-None result wins. When every
    implementation returns None, the gateway answers 401 in the provider's error format and nothing is
    sent upstream. A base-URL request whose routing failed still comes here with ``call.provider``
    None, so that an unknown client gets the 401 before the 400 that names the configured providers.

    :param call: the call; ``call.proxy_credentials`` holds credentials from the proxy URL, if any.
    :param flow: the mitmproxy flow; only the request headers are present.
    :return: the project, or None when this plugin does not recognise the credentials.
    """


@hookspec
def tollhouse_request(call: Call, flow: http.HTTPFlow) -> None:
    """Decide about the client's call, once, before any upstream request: admit, reject or answer it.

    Runs once the whole request body has arrived and ``call.model``, ``call.stream`` and
    ``call.request_json`` are set. ``call.provider`` is the provider of the call's first target. The
    built-in cache, rate limits and budgets run here. Implementations may change ``flow.request``
    (headers, body), and every upstream attempt starts from the changed request. Setting
    ``flow.response`` answers the call without contacting upstream; later implementations still run
    and should check ``flow.response`` first. Changes that depend on the provider belong in
    `tollhouse_upstream_request`.

    An implementation may return an awaitable (for example by being ``async def``) to wait without
    blocking, for a concurrency slot or for an identical call in flight. The gateway awaits the returned
    awaitables in order, after every implementation has returned and before the request goes
    upstream; setting ``flow.response`` there still answers the call locally.

    :param call: the call.
    :param flow: the mitmproxy flow with the complete request.
    """


@hookspec
def tollhouse_upstream_request(call: Call, flow: http.HTTPFlow) -> None:
    """Shape the request for the provider in ``call.provider``: format, body members, credentials.

    Runs after `tollhouse_request`, once for every upstream attempt. A call without a routing config
    has one attempt on ``flow`` itself. A call with fallbacks or retries gets a new flow for each
    attempt, with a copy of the request as `tollhouse_request` left it. Before each attempt the gateway
    resets ``call.endpoint``, ``call.model``, ``call.request_json``, ``call.rewrite_stream`` and
    ``call.metadata`` to their values after `tollhouse_request`, so state set here belongs to one
    attempt. The call keeps the state of the attempt whose response the client gets. The built-in translation runs first
    and the key injection last, so credential headers added earlier are replaced.

    Setting ``flow.response`` ends this attempt without contacting upstream: the call answers with it,
    or moves on to its next target when its routing config has one.

    :param call: the call, with ``call.provider`` set to this attempt's provider.
    :param flow: the flow whose request goes upstream.
    """


# -- response --------------------------------------------------------------------------------------


@hookspec
def tollhouse_response_headers(call: Call, flow: http.HTTPFlow) -> None:
    """Inspect or change the upstream response headers before they are sent to the client.

    Runs for every upstream response, streamed or not. ``call.status`` is set; the body has not
    arrived yet.
    """


@hookspec
def tollhouse_sse_event(call: Call, event: SSEEvent) -> bool | None:
    """Observe one complete server-sent event of a streamed answer.

    Runs for every event, in order, as it arrives, before it reaches the client (events split across
    network reads are joined first). Keep implementations cheap: this runs once per event.

    When ``call.rewrite_stream`` is True, returning False withholds the event from the client and an
    implementation may replace ``event.raw`` with other bytes; when it is False the client receives
    upstream's bytes unchanged and the return value is ignored.

    :return: False to withhold the event; None or True to keep it.
    """


@hookspec
def tollhouse_response(call: Call, flow: http.HTTPFlow) -> None:
    """Read the complete answer: extract usage and the response model.

    Runs for upstream answers once the whole answer has arrived. For a non-streamed answer this is
    before the client receives it: ``flow.response.content`` holds the decoded body, and an
    implementation may still change ``flow.response``. A streamed answer has already been sent and
    its body, which passed through `tollhouse_sse_event`, is not kept. Implementations set
    ``call.usage`` and ``call.response_model``.
    """


# -- accounting ------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tollhouse_price(call: Call) -> Price | None:
    """Price a finished call.

    Runs for every call, rejected and failed ones included, after `tollhouse_response`. The first
    non-None result wins; the built-in pricing plugin runs last, so a plugin can override prices for
    some calls and return None for the rest.

    :return: the price, or None to leave the decision to the next implementation.
    """


@hookspec
def tollhouse_log_row(call: Call, row: dict) -> None:
    """Change the row that will be written to the ``requests`` table for this call.

    Runs last for every call. ``row`` maps column names to values; implementations may change values
    but not add columns (put extra labels into ``call.tags`` before this hook, or into ``row["tags"]``,
    a dict stored as JSON). The row is written after this hook, off the event loop.
    """


@hookspec
def tollhouse_call_end(call: Call) -> None:
    """Release what a plugin keeps for a call: a concurrency slot, a token reservation, waiting calls.

    Runs once for every routed call when it ends, after `tollhouse_log_row`: answered, rejected, failed,
    or cut off by the client or by upstream. ``call.price`` and ``call.usage`` are final. Calls still in
    flight when the gateway shuts down get neither a row nor this call. An exception is logged.
    """
