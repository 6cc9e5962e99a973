"""Circuit breakers for upstream targets.

A target's breaker opens after `failures` consecutive failed attempts, and calls then skip the target
for `cooldown` seconds. After that one call may probe it: a success closes the breaker, a failure opens
it for another `cooldown`. Calls that arrive while the probe is in flight skip the target as before.
Only failures that would move a call to another target count (connection errors, timeouts, 429 and 5xx);
a 400 does not reflect the target's health.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    #: Clock value at which the breaker opened, or None while it is closed.
    opened_at: float | None = None
    probing: bool = False


class CircuitBreakers:
    """The breakers of all targets, keyed by a target name such as "anthropic/claude-sonnet-4-20250514"."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self._states: dict[str, _State] = {}

    def configure(self, failures: int, cooldown: float) -> None:
        """Use new thresholds from now on; open breakers stay open."""
        self.failures = failures
        self.cooldown = cooldown

    def acquire(self, key: str) -> bool:
        """Tell whether a call may try the target now; True for a probe marks the probe as in flight."""
        state = self._states.get(key)
        if state is None or state.opened_at is None:
            return True
        if self.clock() < state.opened_at + self.cooldown or state.probing:
            return False
        state.probing = True
        return True

    def is_unavailable(self, key: str) -> bool:
        """Tell whether `acquire` would refuse the target now, without starting a probe."""
        state = self._states.get(key)
        if state is None or state.opened_at is None:
            return False
        return state.probing or self.clock() < state.opened_at + self.cooldown

    def probing(self, key: str) -> bool:
        state = self._states.get(key)
        return state is not None and state.probing

    def retry_after(self, key: str) -> float:
        """Return the seconds until the target's open breaker lets a probe through (0 when it would now)."""
        state = self._states.get(key)
        if state is None or state.opened_at is None:
            return 0.0
        return max(0.0, state.opened_at + self.cooldown - self.clock())

    def record_success(self, key: str) -> None:
        self._states.pop(key, None)

    def record_failure(self, key: str) -> None:
        state = self._states.setdefault(key, _State())
        state.failures += 1
        if state.probing or state.failures >= self.failures:
            state.opened_at = self.clock()
        state.probing = False

    def release(self, key: str) -> None:
        """End a probe that finished without a verdict (the client went away), so another call may probe."""
        state = self._states.get(key)
        if state is not None:
            state.probing = False

    def is_open(self, key: str) -> bool:
        state = self._states.get(key)
        return state is not None and state.opened_at is not None
