"""Rate limits per project and a concurrency cap per provider, from the `rate_limits:` section of the rules.

Per project, over a sliding window of 60 seconds: requests per minute, and tokens per minute. A call's
tokens are estimated before it goes upstream (a quarter of the request body's bytes for the input,
plus its `max_tokens`, `max_completion_tokens` or `max_output_tokens`, else `default_max_tokens`) and
replaced by the real usage when it ends. Also per project: calls in flight at once.

Per provider: calls in flight at once across all projects, protecting the shared upstream quota.
Calls over the cap wait in a first-in, first-out queue of `max_queue` places for `queue_timeout`
seconds. A full queue or a timed-out wait is rejected with 429, like every other rejection.

A call over a project limit is rejected with 429 in the client's provider format, with `Retry-After`,
`x-ratelimit-*` headers and a message naming the limit and the project. A rejected call consumes no
quota, and it is logged like every call. The checks run in the awaited part of `tollhouse_request`,
after the response cache and the budgets, so a cache hit or a budget rejection consumes no quota.
Slots and token reservations are released in `tollhouse_call_end`, which runs at every end of a call.
The event loop runs one check at a time, so a limit of N admits exactly N calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmproxy import http

from addons import hookimpl
from addons.errors import error_response

if TYPE_CHECKING:
    from addons.call import Call
    from addons.policy_rules import ProjectLimits, ProviderLimits, RateLimitRules
    from addons.rules import Rules

logger = logging.getLogger(__name__)

#: Time source of the windows, in seconds. Tests replace it to move time without sleeping.
clock: Callable[[], float] = time.monotonic

WINDOW_SECONDS = 60.0
#: Bytes of request body counted as one input token in the estimate.
BYTES_PER_TOKEN = 4

_ADMITTED = "rate_limits.admitted"
_SLOT = "rate_limits.provider_slot"
_OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class SlidingWindow:
    """Amounts recorded in the last `WINDOW_SECONDS` seconds, with a running total."""

    def __init__(self) -> None:
        #: [time, amount, in_window] entries, oldest first; an amount may be changed after it was recorded.
        self.entries: deque[list] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_SECONDS:
            entry = self.entries.popleft()
            entry[2] = False
            self.total -= entry[1]

    def add(self, now: float, amount: int) -> list:
        entry = [now, amount, True]
        self.entries.append(entry)
        self.total += amount
        return entry

    def settle(self, entry: list, amount: int) -> None:
        """Change a recorded amount, if the entry is still in the window."""
        if entry[2]:
            self.total += amount - entry[1]
        entry[1] = amount

    def seconds_until_room(self, now: float, limit: int, amount: int) -> float:
        """Return the seconds until `amount` more fits under `limit`, as the oldest entries expire."""
        excess = self.total + amount - limit
        for entry_time, entry_amount, _ in self.entries:
            excess -= entry_amount
            if excess <= 0:
                return max(entry_time + WINDOW_SECONDS - now, 0.0)
        return WINDOW_SECONDS


class ProjectState:
    def __init__(self) -> None:
        self.requests = SlidingWindow()
        self.tokens = SlidingWindow()
        self.active = 0


class ProviderGate:
    """A concurrency cap with a bounded first-in, first-out queue of waiting calls."""

    def __init__(self, limits: ProviderLimits) -> None:
        self.limits = limits
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> bool:
        """Take a slot, waiting in the queue if needed; return False when the queue is full or the wait timed out."""
        if self.active < self.limits.max_concurrent and not self.waiters:
            self.active += 1
            return True
        if len(self.waiters) >= self.limits.max_queue:
            return False
        granted = asyncio.get_running_loop().create_future()
        self.waiters.append(granted)
        try:
            await asyncio.wait({granted}, timeout=self.limits.queue_timeout)
        except asyncio.CancelledError:
            self._leave(granted)
            raise
        if granted.done():
            return True
        self._leave(granted)
        return False

    def _leave(self, granted: asyncio.Future) -> None:
        if granted.done():
            # The slot was handed over just as the waiter left: pass it on.
            self.release()
            return
        granted.cancel()
        try:
            self.waiters.remove(granted)
        except ValueError:
            pass

    def release(self) -> None:
        """Hand the slot to the first waiter, or free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class _State:
    def __init__(self) -> None:
        self.rules: RateLimitRules | None = None
        self.projects: dict[str, ProjectState] = {}
        self.providers: dict[str, ProviderGate] = {}


_state = _State()


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    _state.rules = rules.rate_limits
    _state.projects = {name: ProjectState() for name in rules.rate_limits.projects}
    _state.providers = {name: ProviderGate(limits) for name, limits in rules.rate_limits.providers.items()}


def estimate_tokens(call: Call, body_bytes: int, default_max_tokens: int) -> int:
    """Estimate the tokens of a call before it runs: input from the body size, output from its limit."""
    input_estimate = math.ceil(body_bytes / BYTES_PER_TOKEN)
    if call.endpoint in ("embeddings", "messages.count_tokens"):
        return input_estimate
    body = call.request_json or {}
    for name in _OUTPUT_LIMIT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return input_estimate + value
    return input_estimate + default_max_tokens


def api_format(call: Call) -> str:
    """Return the error format the client expects: "openai" or "anthropic"."""
    client_format = getattr(call, "client_format", None)
    if client_format:
        return client_format
    return getattr(call.provider, "api_format", call.provider.kind)


def reject(
    call: Call, flow: http.HTTPFlow, status: int, message: str, code: str, retry_after: float, headers: dict[str, str]
) -> None:
    """Reject the call with an error response in the client's format, with `Retry-After` in whole seconds."""
    call.answered_by_gateway = True
    call.error = message
    all_headers = {"retry-after": str(max(1, math.ceil(retry_after))), **project_limit_headers(call), **headers}
    flow.response = error_response(api_format(call), status, message, code=code, request_id=call.request_id, headers=all_headers)
    if "x-tollhouse-limit" in headers:
        # Read by the metrics plugin (`plugins.metrics.LIMIT_KEY`) to count rejections by setting.
        call.metadata["rate_limits.rejected_by"] = headers["x-tollhouse-limit"]
    logger.warning("call %s rejected: %s", call.request_id, message)


def project_limit_headers(call: Call) -> dict[str, str]:
    """Return the `x-ratelimit-*` headers of the project's per-minute limits, as they stand now.

    Every rejection carries them, whichever limit or budget caused it; a project without per-minute
    limits gets none.
    """
    if _state.rules is None or call.project is None:
        return {}
    limits = _state.rules.projects.get(call.project.name)
    if limits is None:
        return {}
    state = _state.projects.get(call.project.name)
    if state is None:
        return {}
    now = clock()
    headers = {}
    for kind, limit, window in (
        ("requests", limits.requests_per_minute, state.requests),
        ("tokens", limits.tokens_per_minute, state.tokens),
    ):
        if limit is None:
            continue
        window.expire(now)
        wait = window.seconds_until_room(now, limit, 1) if window.total >= limit else 0.0
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - window.total))
        headers[f"x-ratelimit-reset-{kind}"] = f"{math.ceil(wait)}s"
    return headers


@hookimpl
def tollhouse_request(call: Call, flow: http.HTTPFlow):
    if flow.response is not None or _state.rules is None or call.project is None or call.provider is None:
        return None
    limits = _state.rules.projects.get(call.project.name)
    gate = _state.providers.get(call.provider.name)
    if limits is None and gate is None:
        return None
    return _admit(call, flow, limits, gate)


async def _admit(call: Call, flow: http.HTTPFlow, limits: ProjectLimits | None, gate: ProviderGate | None) -> None:
    # Runs after the awaitables of the cache and the budgets, which may have set a response already.
    if flow.response is not None:
        return
    if limits is not None and not _admit_project(call, flow, limits):
        return
    if gate is None:
        return
    if await gate.acquire():
        call.metadata[_SLOT] = gate
        return
    _release_project(call, refund=True)
    provider = call.provider.name
    reject(
        call, flow, 429,
        f"tollhouse: provider {provider!r} is at its limit of {gate.limits.max_concurrent} concurrent calls and "
        f"{gate.limits.max_queue} waiting calls (rate_limits.providers.{provider}); retry shortly.",
        "rate_limit_exceeded", 1.0, {"x-tollhouse-limit": f"rate_limits.providers.{provider}.max_concurrent"},
    )


def _admit_project(call: Call, flow: http.HTTPFlow, limits: ProjectLimits) -> bool:
    project = call.project.name
    state = _state.projects[project]
    now = clock()
    setting = f"rate_limits.projects.{project}"

    if limits.max_concurrent is not None and state.active >= limits.max_concurrent:
        reject(
            call, flow, 429,
            f"tollhouse: project {project!r} has {state.active} calls in flight, its limit of concurrent calls "
            f"({setting}.max_concurrent = {limits.max_concurrent}); retry when one has finished.",
            "rate_limit_exceeded", 1.0, {"x-tollhouse-limit": f"{setting}.max_concurrent"},
        )
        return False

    if limits.requests_per_minute is not None:
        state.requests.expire(now)
        if state.requests.total + 1 > limits.requests_per_minute:
            wait = state.requests.seconds_until_room(now, limits.requests_per_minute, 1)
            reject(
                call, flow, 429,
                f"tollhouse: project {project!r} reached its limit of {limits.requests_per_minute} requests per "
                f"minute ({setting}.requests_per_minute); retry after {math.ceil(wait)} s.",
                "rate_limit_exceeded", wait,
                {
                    "x-ratelimit-limit-requests": str(limits.requests_per_minute),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{max(1, math.ceil(wait))}s",
                    "x-tollhouse-limit": f"{setting}.requests_per_minute",
                },
            )
            return False

    estimate = 0
    if limits.tokens_per_minute is not None:
        estimate = estimate_tokens(call, len(flow.request.raw_content or b""), _state.rules.default_max_tokens)
        state.tokens.expire(now)
        if state.tokens.total + estimate > limits.tokens_per_minute:
            if estimate > limits.tokens_per_minute:
                wait = WINDOW_SECONDS
                reason = f"a single call of about {estimate} tokens exceeds"
            else:
                wait = state.tokens.seconds_until_room(now, limits.tokens_per_minute, estimate)
                reason = f"about {estimate} more tokens would exceed"
            reject(
                call, flow, 429,
                f"tollhouse: project {project!r}: {reason} its limit of {limits.tokens_per_minute} tokens per minute "
                f"({setting}.tokens_per_minute); retry after {math.ceil(wait)} s or lower max_tokens.",
                "rate_limit_exceeded", wait,
                {
                    "x-ratelimit-limit-tokens": str(limits.tokens_per_minute),
                    "x-ratelimit-remaining-tokens": str(max(0, limits.tokens_per_minute - state.tokens.total)),
                    "x-ratelimit-reset-tokens": f"{max(1, math.ceil(wait))}s",
                    "x-tollhouse-limit": f"{setting}.tokens_per_minute",
                },
            )
            return False

    request_entry = state.requests.add(now, 1) if limits.requests_per_minute is not None else None
    token_entry = state.tokens.add(now, estimate) if limits.tokens_per_minute is not None else None
    state.active += 1
    call.metadata[_ADMITTED] = (state, request_entry, token_entry)
    return True


def _release_project(call: Call, refund: bool) -> None:
    admitted = call.metadata.pop(_ADMITTED, None)
    if admitted is None:
        return
    state, request_entry, token_entry = admitted
    state.active -= 1
    if refund:
        if request_entry is not None:
            state.requests.settle(request_entry, 0)
        if token_entry is not None:
            state.tokens.settle(token_entry, 0)
        return
    if token_entry is not None:
        if call.usage is not None:
            state.tokens.settle(token_entry, call.usage.total_input_tokens + call.usage.output_tokens)
        elif call.status is None or call.status >= 400:
            # No response, or an error response without usage: upstream billed no tokens.
            state.tokens.settle(token_entry, 0)


@hookimpl
def tollhouse_call_end(call: Call) -> None:
    _release_project(call, refund=False)
    gate = call.metadata.pop(_SLOT, None)
    if gate is not None:
        gate.release()
