"""The walk of a routing config (`FallbackRun`) and the circuit breakers, without any network.

`send` is scripted: each target's option name maps to the outcomes it returns in order. `sleep` records
the backoff delays instead of waiting, the RNG is seeded, and the breakers read a fake clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from addons.breaker import CircuitBreakers
from addons.call import Call
from addons.fallback import (
    CONNECT_ERROR,
    EARLY_ERROR,
    HTTP_ERROR,
    OK,
    REJECTED,
    SKIPPED,
    TIMEOUT,
    Attempt,
    FallbackRun,
    Outcome,
    counts_against_target,
    target_key,
)
from addons.route_rules import FallbackSettings, Target, parse_config
from addons.rules import parse_rules

CLAUDE = "claude-sonnet-4-20250514"
GPT = "gpt-4o"
MINI = "gpt-4o-mini"

FIRST = "config.targets[0]"
SECOND = "config.targets[1]"
THIRD = "config.targets[2]"

CLAUDE_KEY = f"anthropic/{CLAUDE}"
GPT_KEY = f"openai/{GPT}"

PROVIDERS = parse_rules(
    {
        "providers": {
            "openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"},
            "anthropic": {"kind": "anthropic", "base_url": "https://api.anthropic.com", "key_env": "ANTHROPIC_API_KEY"},
        },
        "projects": {"alpha": {"key_env": "TH_WALK_TEST_ALPHA_KEY"}},
    },
    base_dir=Path("/nonexistent/rules-dir"),
).providers

# Cooldowns and clock values are binary fractions, so that remaining times compare exactly.
SETTINGS = FallbackSettings(
    backoff_initial=0.5, backoff_max=3.0, retry_after_max=5.0, breaker_failures=3, breaker_cooldown=30.0
)
SEED = 20240611


class FakeClock:
    """A fake clock that returns the last item of `readings`, which `advance` appends to."""

    def __init__(self, start: float = 100.0):
        self.readings = [start]

    def __call__(self) -> float:
        return self.readings[-1]

    def advance(self, seconds: float) -> None:
        self.readings.append(self.readings[-1] + seconds)


class ScriptedSend:
    """An upstream stand-in that returns the next scripted outcome of the requested target."""

    def __init__(self, script: dict[str, list[Outcome]]):
        self.script = {option: list(outcomes) for option, outcomes in script.items()}
        #: (option, retry number) of every call, in order.
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, target: Target, retry: int) -> Outcome:
        self.calls.append((target.option, retry))
        queue = self.script.get(target.option)
        assert queue, f"unscripted send to {target.option} (retry {retry})"
        # A copy, because FallbackRun sets `target` on the outcome it gets.
        return dataclasses.replace(queue.pop(0))


class RecordedSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@dataclasses.dataclass
class Walk:
    run: FallbackRun
    outcome: Outcome
    send: ScriptedSend
    sleep: RecordedSleep


def ok(name: str = "answer") -> Outcome:
    return Outcome(kind=OK, status=200, payload=name)


def http(status: int, retry_after: float | None = None) -> Outcome:
    return Outcome(kind=HTTP_ERROR, status=status, error=f"upstream status {status}", retry_after=retry_after)


def failure(kind: str) -> Outcome:
    return Outcome(kind=kind, error=f"{kind} from the script")


def make_call(model: str | None = CLAUDE) -> Call:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]} if model else {"messages": []}
    return Call(request_id="req-walk-1", listener="base_url", request_json=body)


def make_breakers(clock: FakeClock | None = None, settings: FallbackSettings = SETTINGS) -> CircuitBreakers:
    return CircuitBreakers(settings.breaker_failures, settings.breaker_cooldown, clock=clock or FakeClock())


def fallback(*targets: dict, **strategy) -> dict:
    return {"strategy": {"mode": "fallback", **strategy}, "targets": list(targets)}


def claude(**members) -> dict:
    return {"provider": "anthropic", "model": CLAUDE, **members}


def gpt(**members) -> dict:
    return {"provider": "openai", "model": GPT, **members}


def mini(**members) -> dict:
    return {"provider": "openai", "model": MINI, **members}


def make_run(
    spec: dict,
    send: ScriptedSend,
    *,
    settings: FallbackSettings = SETTINGS,
    breakers: CircuitBreakers | None = None,
    rng: random.Random | None = None,
    sleep: RecordedSleep | None = None,
    call: Call | None = None,
) -> FallbackRun:
    return FallbackRun(
        call or make_call(),
        parse_config(spec, PROVIDERS),
        PROVIDERS["anthropic"],
        settings,
        breakers if breakers is not None else make_breakers(settings=settings),
        send,
        rng=rng or random.Random(SEED),
        sleep=sleep or RecordedSleep(),
    )


def walk(spec: dict, script: dict[str, list[Outcome]], **options) -> Walk:
    send = ScriptedSend(script)
    sleep = RecordedSleep()
    run = make_run(spec, send, sleep=sleep, **options)
    outcome = asyncio.run(run.run())
    return Walk(run, outcome, send, sleep)


def expected_delays(ceilings: list[float], seed: int = SEED) -> list[float]:
    """Replay the jitter that a run seeded with `seed` draws, when it draws nothing else."""
    rng = random.Random(seed)
    return [rng.uniform(ceiling / 2, ceiling) for ceiling in ceilings]


# -- fallback order ---------------------------------------------------------------------------------


def test_first_ok_stops_fallback():
    result = walk(fallback(claude(), gpt(), mini()), {FIRST: [http(500)], SECOND: [ok("from-gpt")]})

    assert result.outcome.kind == OK
    assert result.outcome.payload == "from-gpt"
    assert result.outcome.target.option == SECOND
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]
    assert result.sleep.delays == []
    assert result.run.retries_of_last == 0


def test_first_target_ok():
    result = walk(fallback(claude(), gpt()), {FIRST: [ok("from-claude")]})

    assert result.outcome.payload == "from-claude"
    assert result.send.calls == [(FIRST, 0)]
    assert [attempt.option for attempt in result.run.attempts] == [FIRST]


def test_attempts_record_each_try():
    result = walk(fallback(claude(), gpt(), mini()), {FIRST: [http(529)], SECOND: [failure(TIMEOUT)], THIRD: [ok()]})

    attempts = result.run.attempts
    assert [a.option for a in attempts] == [FIRST, SECOND, THIRD]
    assert [a.provider for a in attempts] == ["anthropic", "openai", "openai"]
    assert [a.model for a in attempts] == [CLAUDE, GPT, MINI]
    assert [a.status for a in attempts] == [529, None, 200]
    assert [a.error for a in attempts] == ["upstream status 529", "timeout from the script", None]
    assert [a.sent for a in attempts] == [True, True, True]
    assert all(a.latency_ms is not None for a in attempts)
    assert set(attempts[0].as_dict()) == {"option", "provider", "model", "status", "error", "latency_ms", "sent"}


def test_all_targets_fail_returns_last():
    result = walk(fallback(claude(), gpt()), {FIRST: [http(500)], SECOND: [http(503)]})

    assert result.outcome.kind == HTTP_ERROR
    assert result.outcome.status == 503
    assert result.outcome.target.option == SECOND
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]


def test_400_stops_fallback():
    result = walk(fallback(claude(), gpt()), {FIRST: [http(400)], SECOND: [ok()]})

    assert result.outcome.kind == HTTP_ERROR
    assert result.outcome.status == 400
    assert result.outcome.error == "upstream status 400"
    assert result.outcome.target.option == FIRST
    assert result.send.calls == [(FIRST, 0)]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_stop_fallback(status):
    result = walk(fallback(claude(), gpt()), {FIRST: [http(status)], SECOND: [ok()]})

    assert result.outcome.status == status
    assert result.send.calls == [(FIRST, 0)]


@pytest.mark.parametrize("status", [429, 500, 501, 502, 503, 504, 529, 599])
def test_default_statuses_move_on(status):
    result = walk(fallback(claude(), gpt()), {FIRST: [http(status)], SECOND: [ok("second")]})

    assert result.outcome.payload == "second"
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]


def test_strategy_codes_stop_429():
    result = walk(fallback(claude(), gpt(), on_status_codes=[503]), {FIRST: [http(429)], SECOND: [ok()]})

    assert result.outcome.status == 429
    assert result.outcome.target.option == FIRST
    assert result.send.calls == [(FIRST, 0)]


def test_strategy_codes_move_on_503():
    result = walk(fallback(claude(), gpt(), on_status_codes=[503]), {FIRST: [http(503)], SECOND: [ok("second")]})

    assert result.outcome.payload == "second"
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]


def test_strategy_codes_can_add_400():
    result = walk(fallback(claude(), gpt(), on_status_codes=[400]), {FIRST: [http(400)], SECOND: [ok("second")]})

    assert result.outcome.payload == "second"


@pytest.mark.parametrize("kind", [CONNECT_ERROR, TIMEOUT, EARLY_ERROR, REJECTED])
def test_failure_kinds_move_on(kind):
    result = walk(fallback(claude(), gpt()), {FIRST: [failure(kind)], SECOND: [ok("second")]})

    assert result.outcome.payload == "second"
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]


@pytest.mark.parametrize("kind", [CONNECT_ERROR, TIMEOUT, EARLY_ERROR, REJECTED])
def test_failure_kinds_ignore_status_codes(kind):
    # on_status_codes filters HTTP statuses only, so a failure without a status still moves on.
    result = walk(fallback(claude(), gpt(), on_status_codes=[503]), {FIRST: [failure(kind)], SECOND: [ok("second")]})

    assert result.outcome.payload == "second"


def test_rejected_attempt_not_sent():
    result = walk(fallback(claude(), gpt()), {FIRST: [failure(REJECTED)], SECOND: [ok()]})

    assert [a.sent for a in result.run.attempts] == [False, True]


def test_default_provider_and_body_model():
    # A leaf without provider or model takes the call's default provider and the request's model.
    result = walk(fallback({}, {"provider": "openai"}), {FIRST: [http(500)], SECOND: [ok()]}, call=make_call("claude-haiku-4-5"))

    assert [(a.provider, a.model) for a in result.run.attempts] == [
        ("anthropic", "claude-haiku-4-5"),
        ("openai", "claude-haiku-4-5"),
    ]


def test_no_model_anywhere():
    result = walk(fallback({}), {FIRST: [ok()]}, call=make_call(None))

    assert result.run.attempts[0].model is None


# -- strategies -------------------------------------------------------------------------------------


def test_single_uses_first_target():
    spec = {"strategy": {"mode": "single"}, "targets": [claude(), gpt()]}
    result = walk(spec, {FIRST: [http(500)], SECOND: [ok()]})

    assert result.outcome.status == 500
    assert result.send.calls == [(FIRST, 0)]


def test_loadbalance_weights_three_to_one():
    spec = {"strategy": {"mode": "loadbalance"}, "targets": [claude(weight=3), gpt(weight=1), mini(weight=0)]}
    picks = 4000
    send = ScriptedSend({FIRST: [ok()] * picks, SECOND: [ok()] * picks, THIRD: [ok()] * picks})
    rng = random.Random(SEED)

    async def pick_all() -> None:
        for _ in range(picks):
            await make_run(spec, send, rng=rng).run()

    asyncio.run(pick_all())

    counts = {option: sum(1 for called, _ in send.calls if called == option) for option in (FIRST, SECOND, THIRD)}
    # The first target's count is binomial(4000, 0.75): mean 3000, standard deviation sqrt(750) = 27.4.
    # 110 is four standard deviations, so the check holds for nearly every seed, not only this one.
    assert abs(counts[FIRST] - 3000) <= 110
    assert counts[FIRST] + counts[SECOND] == picks
    assert counts[THIRD] == 0


def test_loadbalance_does_not_fall_back():
    spec = {"strategy": {"mode": "loadbalance"}, "targets": [claude(weight=1), gpt(weight=0)]}
    result = walk(spec, {FIRST: [http(503)], SECOND: [ok()]})

    assert result.outcome.status == 503
    assert result.send.calls == [(FIRST, 0)]


def test_fallback_into_loadbalance():
    inner = {"strategy": {"mode": "loadbalance"}, "targets": [gpt(weight=1), mini(weight=0)]}
    result = walk(fallback(claude(), inner), {FIRST: [http(529)], "config.targets[1].targets[0]": [ok("inner")]})

    assert result.outcome.payload == "inner"
    assert result.outcome.target.option == "config.targets[1].targets[0]"
    assert [(a.option, a.provider, a.model) for a in result.run.attempts] == [
        (FIRST, "anthropic", CLAUDE),
        ("config.targets[1].targets[0]", "openai", GPT),
    ]


def test_loadbalance_then_fallback():
    inner = {"strategy": {"mode": "loadbalance"}, "targets": [claude(weight=0), gpt(weight=2)]}
    result = walk(fallback(inner, mini()), {"config.targets[0].targets[1]": [http(500)], SECOND: [ok("last")]})

    assert result.outcome.payload == "last"
    assert result.send.calls == [("config.targets[0].targets[1]", 0), (SECOND, 0)]


def test_inner_strategy_codes_apply():
    # The inner fallback moves on only on 503, so its 429 ends the inner walk, but the outer
    # fallback moves on because 429 is in its default statuses.
    inner = fallback(claude(), gpt(), on_status_codes=[503])
    result = walk(fallback(inner, mini()), {"config.targets[0].targets[0]": [http(429)], SECOND: [ok("outer")]})

    assert result.outcome.payload == "outer"
    assert result.send.calls == [("config.targets[0].targets[0]", 0), (SECOND, 0)]


# -- retries ----------------------------------------------------------------------------------------


def test_retry_attempts_count():
    result = walk(
        fallback(claude(retry={"attempts": 2}), gpt()),
        {FIRST: [http(500), http(500), http(500)], SECOND: [ok("second")]},
    )

    assert result.send.calls == [(FIRST, 0), (FIRST, 1), (FIRST, 2), (SECOND, 0)]
    assert len(result.sleep.delays) == 2
    assert result.outcome.payload == "second"
    assert result.run.retries_of_last == 0


def test_retry_until_success():
    result = walk(claude(retry={"attempts": 3}), {"config": [http(503), http(429), ok("third")]})

    assert result.outcome.payload == "third"
    assert result.send.calls == [("config", 0), ("config", 1), ("config", 2)]
    assert result.run.retries_of_last == 2
    assert [a.status for a in result.run.attempts] == [503, 429, 200]


def test_retries_of_last_on_second():
    result = walk(
        fallback(claude(retry={"attempts": 1}), gpt(retry={"attempts": 2})),
        {FIRST: [http(500), http(500)], SECOND: [http(502), ok("second")]},
    )

    assert result.outcome.payload == "second"
    assert result.run.retries_of_last == 1


def test_retry_only_listed_statuses():
    result = walk(
        fallback(claude(retry={"attempts": 3, "on_status_codes": [503]}), gpt()),
        {FIRST: [http(500)], SECOND: [ok("second")]},
    )

    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]
    assert result.sleep.delays == []


def test_retry_listed_status_retried():
    result = walk(
        fallback(claude(retry={"attempts": 3, "on_status_codes": [503]}), gpt()),
        {FIRST: [http(503), ok("first")]},
    )

    assert result.outcome.payload == "first"
    assert result.send.calls == [(FIRST, 0), (FIRST, 1)]


def test_default_retry_skips_501():
    # 501 is not in the default retry statuses, but as a 5xx it still moves the fallback on.
    result = walk(fallback(claude(retry={"attempts": 2}), gpt()), {FIRST: [http(501)], SECOND: [ok("second")]})

    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]


def test_400_never_retried():
    result = walk(fallback(claude(retry={"attempts": 2}), gpt()), {FIRST: [http(400)], SECOND: [ok()]})

    assert result.outcome.status == 400
    assert result.send.calls == [(FIRST, 0)]
    assert result.sleep.delays == []


@pytest.mark.parametrize("kind", [CONNECT_ERROR, TIMEOUT, EARLY_ERROR])
def test_transient_kinds_retried(kind):
    result = walk(claude(retry={"attempts": 1, "on_status_codes": [503]}), {"config": [failure(kind), ok()]})

    assert result.outcome.kind == OK
    assert result.send.calls == [("config", 0), ("config", 1)]


def test_rejected_not_retried():
    result = walk(claude(retry={"attempts": 2}), {"config": [failure(REJECTED)]})

    assert result.outcome.kind == REJECTED
    assert result.send.calls == [("config", 0)]


def test_no_retry_without_retry_member():
    result = walk(claude(), {"config": [http(503)]})

    assert result.outcome.status == 503
    assert result.send.calls == [("config", 0)]


def test_backoff_delays_in_range():
    # A breaker threshold above the failure count, so that the breaker does not cut the retries short.
    settings = dataclasses.replace(SETTINGS, breaker_failures=10)
    result = walk(claude(retry={"attempts": 5}), {"config": [http(500)] * 5 + [ok()]}, settings=settings)

    # backoff_initial 0.5 doubles per retry and is capped at backoff_max 3.0.
    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0]
    assert len(result.sleep.delays) == 5
    for delay, ceiling in zip(result.sleep.delays, ceilings):
        assert ceiling / 2 <= delay <= ceiling
    assert result.sleep.delays == expected_delays(ceilings)
    assert result.run.retries_of_last == 5


def test_backoff_zero_initial():
    settings = dataclasses.replace(SETTINGS, backoff_initial=0.0)
    result = walk(claude(retry={"attempts": 2}), {"config": [http(500), http(500), ok()]}, settings=settings)

    assert result.sleep.delays == [0.0, 0.0]


def test_retry_after_raises_delay():
    result = walk(claude(retry={"attempts": 1}), {"config": [http(429, retry_after=2.0), ok()]})

    assert result.sleep.delays == [2.0]


def test_short_retry_after_keeps_jitter():
    result = walk(claude(retry={"attempts": 1}), {"config": [http(429, retry_after=0.1), ok()]})

    assert result.sleep.delays == expected_delays([0.5])
    assert result.sleep.delays[0] > 0.1


def test_retry_after_at_max_waits():
    result = walk(claude(retry={"attempts": 1}), {"config": [http(429, retry_after=5.0), ok()]})

    assert result.sleep.delays == [5.0]
    assert result.outcome.kind == OK


def test_retry_after_above_max_moves_on():
    result = walk(
        fallback(claude(retry={"attempts": 3}), gpt()),
        {FIRST: [http(429, retry_after=5.5)], SECOND: [ok("second")]},
    )

    assert result.sleep.delays == []
    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]
    assert result.outcome.payload == "second"


def test_retry_after_above_max_last():
    result = walk(claude(retry={"attempts": 3}), {"config": [http(503, retry_after=60.0)]})

    assert result.outcome.status == 503
    assert result.outcome.retry_after == 60.0
    assert result.sleep.delays == []
    assert result.run.retries_of_last == 0


def test_retry_after_header_ignored():
    result = walk(
        claude(retry={"attempts": 1, "use_retry_after_header": False}),
        {"config": [http(429, retry_after=60.0), ok()]},
    )

    assert result.sleep.delays == expected_delays([0.5])
    assert result.outcome.kind == OK


# -- circuit breakers -------------------------------------------------------------------------------


def test_breaker_opens_after_failures():
    clock = FakeClock()
    breakers = make_breakers(clock)

    breakers.record_failure(CLAUDE_KEY)
    breakers.record_failure(CLAUDE_KEY)
    assert breakers.is_open(CLAUDE_KEY) is False
    assert breakers.acquire(CLAUDE_KEY) is True

    breakers.record_failure(CLAUDE_KEY)
    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is False
    assert breakers.retry_after(CLAUDE_KEY) == 30.0
    assert breakers.is_open(GPT_KEY) is False


def test_breaker_success_resets_count():
    breakers = make_breakers()

    breakers.record_failure(CLAUDE_KEY)
    breakers.record_failure(CLAUDE_KEY)
    breakers.record_success(CLAUDE_KEY)
    breakers.record_failure(CLAUDE_KEY)
    breakers.record_failure(CLAUDE_KEY)

    assert breakers.is_open(CLAUDE_KEY) is False
    breakers.record_failure(CLAUDE_KEY)
    assert breakers.is_open(CLAUDE_KEY) is True


def test_breaker_retry_after_counts_down():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)

    clock.advance(10.25)
    assert breakers.retry_after(CLAUDE_KEY) == 19.75
    assert breakers.acquire(CLAUDE_KEY) is False
    clock.advance(19.75)
    assert breakers.retry_after(CLAUDE_KEY) == 0.0
    clock.advance(5.0)
    assert breakers.retry_after(CLAUDE_KEY) == 0.0


def test_breaker_one_probe_after_cooldown():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)

    clock.advance(30.0)
    assert breakers.acquire(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is False
    assert breakers.is_open(CLAUDE_KEY) is True


def test_failed_probe_reopens_full_cooldown():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)
    clock.advance(45.0)
    assert breakers.acquire(CLAUDE_KEY) is True

    breakers.record_failure(CLAUDE_KEY)

    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.retry_after(CLAUDE_KEY) == 30.0
    assert breakers.acquire(CLAUDE_KEY) is False
    clock.advance(29.5)
    assert breakers.acquire(CLAUDE_KEY) is False
    clock.advance(0.5)
    assert breakers.acquire(CLAUDE_KEY) is True


def test_successful_probe_closes():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)
    clock.advance(30.0)
    assert breakers.acquire(CLAUDE_KEY) is True

    breakers.record_success(CLAUDE_KEY)

    assert breakers.is_open(CLAUDE_KEY) is False
    assert breakers.retry_after(CLAUDE_KEY) == 0.0
    assert breakers.acquire(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is True
    # The count starts again from zero: two failures leave it closed.
    breakers.record_failure(CLAUDE_KEY)
    breakers.record_failure(CLAUDE_KEY)
    assert breakers.is_open(CLAUDE_KEY) is False


def test_release_frees_probe():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)
    clock.advance(30.0)
    assert breakers.acquire(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is False

    breakers.release(CLAUDE_KEY)

    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is True


def test_release_unknown_key():
    breakers = make_breakers()

    breakers.release(CLAUDE_KEY)

    assert breakers.is_open(CLAUDE_KEY) is False
    assert breakers.acquire(CLAUDE_KEY) is True


def test_configure_keeps_open_breaker():
    clock = FakeClock()
    breakers = make_breakers(clock)
    for _ in range(3):
        breakers.record_failure(CLAUDE_KEY)

    breakers.configure(failures=1, cooldown=4.0)

    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.retry_after(CLAUDE_KEY) == 4.0
    breakers.record_failure(GPT_KEY)
    assert breakers.is_open(GPT_KEY) is True


def test_target_key_names():
    assert target_key(PROVIDERS["anthropic"], CLAUDE) == CLAUDE_KEY
    assert target_key(PROVIDERS["openai"], None) == "openai/*"


@pytest.mark.parametrize(
    ("outcome", "counts"),
    [
        (http(400), False),
        (http(404), False),
        (http(429), True),
        (http(500), True),
        (http(529), True),
        (failure(CONNECT_ERROR), True),
        (failure(TIMEOUT), True),
        (failure(EARLY_ERROR), True),
        (failure(REJECTED), False),
        (failure(SKIPPED), False),
        (ok(), False),
    ],
)
def test_counts_against_target(outcome, counts):
    assert counts_against_target(outcome) is counts


# -- circuit breakers in the walk -------------------------------------------------------------------


def test_walk_400_does_not_count():
    breakers = make_breakers(settings=dataclasses.replace(SETTINGS, breaker_failures=2))

    for status in (500, 400, 500):
        walk(claude(), {"config": [http(status)]}, breakers=breakers)
        assert breakers.is_open(CLAUDE_KEY) is False

    walk(claude(), {"config": [http(500)]}, breakers=breakers)
    assert breakers.is_open(CLAUDE_KEY) is True


def test_walk_success_resets_count():
    breakers = make_breakers(settings=dataclasses.replace(SETTINGS, breaker_failures=2))

    walk(claude(), {"config": [failure(CONNECT_ERROR)]}, breakers=breakers)
    walk(claude(), {"config": [ok()]}, breakers=breakers)
    walk(claude(), {"config": [failure(TIMEOUT)]}, breakers=breakers)

    assert breakers.is_open(CLAUDE_KEY) is False


def test_walk_rejected_does_not_count():
    breakers = make_breakers(settings=dataclasses.replace(SETTINGS, breaker_failures=1))

    walk(claude(), {"config": [failure(REJECTED)]}, breakers=breakers)

    assert breakers.is_open(CLAUDE_KEY) is False


def open_breaker(breakers: CircuitBreakers, key: str) -> None:
    for _ in range(breakers.failures):
        breakers.record_failure(key)


def test_walk_skips_open_target():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(10.0)

    result = walk(claude(), {}, breakers=breakers)

    assert result.send.calls == []
    assert result.outcome.kind == SKIPPED
    assert result.outcome.status == 503
    assert result.outcome.retry_after == 20.0
    assert result.outcome.error == f"circuit breaker open for {CLAUDE_KEY}; next probe in 20.0 s"
    assert result.outcome.target.option == "config"
    assert result.run.attempts == [
        Attempt(
            option="config",
            provider="anthropic",
            model=CLAUDE,
            status=None,
            error=f"circuit breaker open for {CLAUDE_KEY}; next probe in 20.0 s",
            latency_ms=0.0,
            sent=False,
        )
    ]


def test_walk_open_first_goes_second():
    breakers = make_breakers()
    open_breaker(breakers, CLAUDE_KEY)

    result = walk(fallback(claude(), gpt()), {SECOND: [ok("second")]}, breakers=breakers)

    assert result.send.calls == [(SECOND, 0)]
    assert result.outcome.payload == "second"
    assert [(a.option, a.sent) for a in result.run.attempts] == [(FIRST, False), (SECOND, True)]
    assert result.run.retries_of_last == 0


def test_walk_all_open_returns_skipped():
    breakers = make_breakers()
    open_breaker(breakers, CLAUDE_KEY)
    open_breaker(breakers, GPT_KEY)

    result = walk(fallback(claude(), gpt()), {}, breakers=breakers)

    assert result.outcome.kind == SKIPPED
    assert result.outcome.target.option == SECOND
    assert result.send.calls == []


def test_walk_probe_success_closes():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(30.0)

    result = walk(fallback(claude(), gpt()), {FIRST: [ok("probe")]}, breakers=breakers)

    assert result.outcome.payload == "probe"
    assert breakers.is_open(CLAUDE_KEY) is False


def test_walk_probe_failure_reopens():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(31.0)

    result = walk(fallback(claude(), gpt()), {FIRST: [http(503)], SECOND: [ok("second")]}, breakers=breakers)

    assert result.send.calls == [(FIRST, 0), (SECOND, 0)]
    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.retry_after(CLAUDE_KEY) == 30.0


def test_walk_concurrent_probe_skipped():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(30.0)
    inner_outcomes: list[Outcome] = []

    async def probe_send(target: Target, retry: int) -> Outcome:
        # While this probe is in flight, a second call walks the same target.
        second = make_run(claude(), ScriptedSend({}), breakers=breakers)
        inner_outcomes.append(await second.run())
        return ok("probe")

    run = FallbackRun(
        make_call(), parse_config(claude(), PROVIDERS), PROVIDERS["anthropic"], SETTINGS, breakers, probe_send,
        rng=random.Random(SEED), sleep=RecordedSleep(),
    )
    outcome = asyncio.run(run.run())

    assert outcome.payload == "probe"
    assert [o.kind for o in inner_outcomes] == [SKIPPED]
    assert inner_outcomes[0].retry_after == 0.0
    assert breakers.is_open(CLAUDE_KEY) is False


class ClientGone(Exception):
    pass


def test_send_error_releases_probe():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(30.0)

    async def raising_send(target: Target, retry: int) -> Outcome:
        raise ClientGone

    run = make_run(claude(), raising_send, breakers=breakers)
    with pytest.raises(ClientGone):
        asyncio.run(run.run())

    assert breakers.is_open(CLAUDE_KEY) is True
    assert breakers.acquire(CLAUDE_KEY) is True


def test_loadbalance_avoids_open_target():
    breakers = make_breakers()
    open_breaker(breakers, CLAUDE_KEY)
    spec = {"strategy": {"mode": "loadbalance"}, "targets": [claude(weight=1000), gpt(weight=1)]}
    send = ScriptedSend({SECOND: [ok()] * 50})
    rng = random.Random(SEED)

    async def pick_many() -> None:
        for _ in range(50):
            await make_run(spec, send, breakers=breakers, rng=rng).run()

    asyncio.run(pick_many())

    assert send.calls == [(SECOND, 0)] * 50


def test_breaker_opens_during_retries():
    # The third failure opens the breaker, so the next retry does not go out, and the call keeps the
    # upstream's last real answer (the 500) rather than a breaker skip.
    breakers = make_breakers()
    result = walk(claude(retry={"attempts": 4}), {"config": [http(500)] * 3}, breakers=breakers)

    assert result.send.calls == [("config", 0), ("config", 1), ("config", 2)]
    assert len(result.sleep.delays) == 3
    assert result.outcome.kind == HTTP_ERROR
    assert result.outcome.status == 500
    assert [a.sent for a in result.run.attempts] == [True, True, True]


def test_retries_of_last_after_skip():
    breakers = make_breakers()
    open_breaker(breakers, GPT_KEY)

    result = walk(
        fallback(claude(retry={"attempts": 1}), gpt()),
        {FIRST: [http(500), http(500)]},
        breakers=breakers,
    )

    # The second target was skipped, so the first target's own last answer (after its one retry) is
    # the one sent to the client, with that target's retry count.
    assert result.outcome.kind == HTTP_ERROR
    assert result.outcome.status == 500
    assert result.outcome.target.option == FIRST
    assert result.run.retries_of_last == 1
    assert [a.sent for a in result.run.attempts] == [True, True, False]


def test_loadbalance_during_probe():
    clock = FakeClock()
    breakers = make_breakers(clock)
    open_breaker(breakers, CLAUDE_KEY)
    clock.advance(30.0)
    # Another call's probe is now in flight.
    assert breakers.acquire(CLAUDE_KEY) is True
    spec = {"strategy": {"mode": "loadbalance"}, "targets": [claude(weight=1000), gpt(weight=1)]}

    result = walk(spec, {SECOND: [ok("second")]}, breakers=breakers)

    assert result.send.calls == [(SECOND, 0)]
    assert result.outcome.payload == "second"
