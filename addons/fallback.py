"""Walks a routing config for one call: fallbacks, load balancing, retries with backoff, circuit breakers.

`FallbackRun.run` tries leaf targets through a `send` coroutine (the relay's upstream request). It
returns the outcome that is sent to the client. That is the first success, or a failure that no
strategy acts on (a 400 goes back to the client at once), or the last failure when every target failed.

What moves a call on (to a retry, or to the next target of a fallback):
- a connection that was refused, reset, failed TLS or DNS, or gave no first byte in `request_timeout`;
- an error event in a stream before any content (Anthropic's `overloaded_error`);
- a 2xx body that is not a JSON object, or a stream that ends without content;
- an HTTP status in the strategy's `on_status_codes` (retry: `retry.on_status_codes`), by default 429
  and 5xx, 529 included.
A target is never left after the first byte of its body reached the client, because the relay decides
before it forwards anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from addons.route_rules import DEFAULT_FALLBACK_STATUSES, FallbackSettings, Target

if TYPE_CHECKING:
    from addons.breaker import CircuitBreakers
    from addons.call import Call
    from addons.rules import Provider

logger = logging.getLogger(__name__)

#: Outcome kinds. "ok" is a success; the others are failures.
OK = "ok"
HTTP_ERROR = "http_error"
EARLY_ERROR = "early_error"
CONNECT_ERROR = "connect_error"
TIMEOUT = "timeout"
#: A 2xx response without a usable body: not a JSON object, or a stream that ended without content.
INVALID_ANSWER = "invalid_answer"
REJECTED = "rejected"
SKIPPED = "skipped"

# Failures that do not depend on the request itself, so another try may succeed.
_TRANSIENT = {EARLY_ERROR, CONNECT_ERROR, TIMEOUT, INVALID_ANSWER}


@dataclass
class Attempt:
    """One try of one target, as stored in the `attempts` column."""

    #: The target's place in the config, Portkey style: "config.targets[1]".
    option: str
    provider: str
    model: str | None
    status: int | None = None
    error: str | None = None
    latency_ms: float | None = None
    #: False when no request went upstream: the circuit breaker was open, or a plugin set the attempt's response.
    sent: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "option": self.option,
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "latency_ms": round(self.latency_ms, 1) if self.latency_ms is not None else None,
            "sent": self.sent,
        }


@dataclass
class Outcome:
    """The result of one attempt; `payload` is the relay's response to forward when this outcome is final."""

    kind: str
    status: int | None = None
    error: str | None = None
    #: Seconds from upstream's `Retry-After` (or `retry-after-ms`) header, if it sent one.
    retry_after: float | None = None
    payload: Any = None
    #: The leaf that produced the outcome.
    target: Target | None = None
    #: Retries made on that leaf before this outcome.
    retries: int = 0

    @property
    def ok(self) -> bool:
        return self.kind == OK


def counts_against_target(outcome: Outcome) -> bool:
    """Tell whether a failure speaks against the target's health (for its circuit breaker)."""
    if outcome.kind in _TRANSIENT:
        return True
    return outcome.kind == HTTP_ERROR and outcome.status in DEFAULT_FALLBACK_STATUSES


def target_key(provider: Provider, model: str | None, scope: str = "") -> str:
    """Return the circuit breaker key of a target: its routing config's scope, provider name and model."""
    name = f"{provider.name}/{model or '*'}"
    return f"{scope} {name}" if scope else name


SendFunction = Callable[[Target, int], Awaitable[Outcome]]


class FallbackRun:
    """The walk of one call's routing config."""

    def __init__(
        self,
        call: Call,
        config: Target,
        default_provider: Provider,
        settings: FallbackSettings,
        breakers: CircuitBreakers,
        send: SendFunction,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        breaker_scope: str = "",
    ):
        self.call = call
        self.config = config
        self.default_provider = default_provider
        self.settings = settings
        self.breakers = breakers
        self.send = send
        self.rng = rng or random.Random()
        self.sleep = sleep
        #: Prefix of this call's breaker keys, so that one routing config's failures do not open the
        #: breakers of another's.
        self.breaker_scope = breaker_scope
        #: Every try in order, skipped targets included.
        self.attempts: list[Attempt] = []
        #: Retries made on the target that produced the final outcome, once `run` has returned.
        self.retries_of_last = 0
        # The attempt whose request is out: (leaf, provider name, model, monotonic start).
        self._in_flight: tuple[Target, str, str | None, float] | None = None

    async def run(self) -> Outcome:
        outcome = await self._node(self.config)
        self.retries_of_last = outcome.retries
        return outcome

    def attempts_so_far(self, reason: str) -> list[Attempt]:
        """Return the finished attempts, and the one in flight with `reason` as its error."""
        attempts = list(self.attempts)
        if self._in_flight is not None:
            leaf, provider, model, started = self._in_flight
            attempts.append(Attempt(leaf.option, provider, model, None, reason, (time.monotonic() - started) * 1000.0))
        return attempts

    def _model_of(self, leaf: Target) -> str | None:
        if leaf.model is not None:
            return leaf.model
        body = self.call.request_json or {}
        model = body.get("model")
        return model if isinstance(model, str) else None

    def _name(self, leaf: Target) -> str:
        provider = leaf.provider or self.default_provider
        return f"{provider.name}/{self._model_of(leaf) or '-'} ({leaf.option})"

    async def _node(self, node: Target) -> Outcome:
        if node.is_leaf:
            return await self._leaf(node)
        if node.mode == "single":
            return await self._node(node.targets[0])
        if node.mode == "loadbalance":
            return await self._node(self._pick_weighted(node.targets))

        statuses = node.on_status_codes or DEFAULT_FALLBACK_STATUSES
        outcome = Outcome(kind=SKIPPED, error="no target was tried")
        # The last failure with an upstream response. It explains more than a target that was skipped
        # or could not be prepared.
        answered: Outcome | None = None
        for index, child in enumerate(node.targets):
            outcome = await self._node(child)
            if outcome.ok or not self._moves_fallback_on(outcome, statuses):
                return outcome
            if outcome.kind in (HTTP_ERROR, EARLY_ERROR):
                answered = outcome
            if index + 1 < len(node.targets):
                following = node.targets[index + 1]
                logger.warning(
                    "call %s: falling back to %s after %s",
                    self.call.request_id,
                    following.option,
                    _describe(outcome),
                )
        if outcome.kind in (REJECTED, SKIPPED) and answered is not None:
            return answered
        return outcome

    @staticmethod
    def _moves_fallback_on(outcome: Outcome, statuses: frozenset[int]) -> bool:
        if outcome.kind in _TRANSIENT or outcome.kind in (REJECTED, SKIPPED):
            return True
        return outcome.kind == HTTP_ERROR and outcome.status in statuses

    def _pick_weighted(self, targets: tuple[Target, ...]) -> Target:
        """Choose a target with probability proportional to its weight, leaving out open breakers."""
        candidates = [t for t in targets if t.weight > 0 and not self._known_unavailable(t)]
        if not candidates:
            candidates = [t for t in targets if t.weight > 0]
        total = sum(t.weight for t in candidates)
        point = self.rng.uniform(0, total)
        for target in candidates:
            point -= target.weight
            if point <= 0:
                return target
        return candidates[-1]

    def _known_unavailable(self, target: Target) -> bool:
        if not target.is_leaf:
            return False
        provider = target.provider or self.default_provider
        key = target_key(provider, self._model_of(target), self.breaker_scope)
        return self.breakers.is_unavailable(key)

    async def _leaf(self, leaf: Target) -> Outcome:
        provider = leaf.provider or self.default_provider
        model = self._model_of(leaf)
        key = target_key(provider, model, self.breaker_scope)
        retries = leaf.retry.attempts if leaf.retry is not None else 0

        outcome = Outcome(kind=SKIPPED)
        for retry in range(retries + 1):
            if not self.breakers.acquire(key):
                if retry > 0:
                    # The breaker opened during this call's own retries, so the call keeps its last upstream response.
                    return outcome
                wait = self.breakers.retry_after(key)
                if self.breakers.probing(key) and wait == 0:
                    reason = "another call is probing it"
                else:
                    reason = f"next probe in {wait:.1f} s"
                outcome = Outcome(
                    kind=SKIPPED,
                    status=503,
                    error=f"circuit breaker open for {key}; {reason}",
                    retry_after=wait,
                    target=leaf,
                )
                self.attempts.append(
                    Attempt(leaf.option, provider.name, model, error=outcome.error, latency_ms=0.0, sent=False)
                )
                logger.warning("call %s: skipped %s: %s", self.call.request_id, self._name(leaf), outcome.error)
                return outcome

            started = time.monotonic()
            self._in_flight = (leaf, provider.name, model, started)
            try:
                outcome = await self.send(leaf, retry)
            except BaseException:
                self.breakers.release(key)
                raise
            finally:
                self._in_flight = None
            outcome.target = leaf
            outcome.retries = retry
            latency = (time.monotonic() - started) * 1000.0
            sent = outcome.kind != REJECTED
            # The model the attempt sent, which preparing it may have set (an Azure deployment's model).
            sent_model = self.call.model or model
            self.attempts.append(Attempt(leaf.option, provider.name, sent_model, outcome.status, outcome.error, latency, sent))

            if outcome.ok or (outcome.kind == HTTP_ERROR and not counts_against_target(outcome)):
                self.breakers.record_success(key)
            elif outcome.kind == REJECTED:
                self.breakers.release(key)
            else:
                self.breakers.record_failure(key)

            if outcome.ok or retry == retries or not self._retryable(leaf, outcome):
                return outcome
            delay = self._retry_delay(retry + 1, outcome, leaf)
            if delay is None:
                return outcome
            logger.warning(
                "call %s: retrying %s in %.2f s (retry %d of %d) after %s",
                self.call.request_id,
                self._name(leaf),
                delay,
                retry + 1,
                retries,
                _describe(outcome),
            )
            await self.sleep(delay)
        return outcome

    @staticmethod
    def _retryable(leaf: Target, outcome: Outcome) -> bool:
        if outcome.kind in _TRANSIENT:
            return True
        return outcome.kind == HTTP_ERROR and leaf.retry is not None and outcome.status in leaf.retry.on_status_codes

    def _retry_delay(self, retry_number: int, outcome: Outcome, leaf: Target) -> float | None:
        """Return the seconds before retry `retry_number` (1 for the first), or None to stop retrying.

        The delay is exponential backoff with jitter: a random value between half and all of
        `backoff_initial * 2 ** (retry_number - 1)`, capped at `backoff_max`. Upstream's `Retry-After`
        raises it; one above `retry_after_max` ends the retries, so that the call moves on instead.
        """
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** (retry_number - 1))
        delay = self.rng.uniform(ceiling / 2, ceiling)
        if outcome.retry_after is not None and leaf.retry is not None and leaf.retry.use_retry_after:
            if outcome.retry_after > self.settings.retry_after_max:
                logger.warning(
                    "call %s: not retrying %s: Retry-After of %.1f s exceeds fallbacks.retry_after_max (%.1f s)",
                    self.call.request_id,
                    self._name(leaf),
                    outcome.retry_after,
                    self.settings.retry_after_max,
                )
                return None
            delay = max(delay, outcome.retry_after)
        return delay


def _describe(outcome: Outcome) -> str:
    if outcome.kind == HTTP_ERROR:
        return f"status {outcome.status}: {outcome.error or ''}".rstrip(": ")
    return outcome.error or outcome.kind
