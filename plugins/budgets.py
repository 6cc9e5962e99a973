"""Spend budgets per project in USD per UTC day and UTC month, from the `budgets:` section of the rules.

Spend is the sum of `cost_usd` of the project's finished calls. At start, a background thread reads
the spend of the current day and month back from the request log. Calls of a budgeted project wait
for that read before they are checked. A warning is logged once per project and period when the
spend reaches `warn_at` of a budget. Once a budget is spent, calls are rejected with 429 in the
client's format (`x-should-retry: false`, `Retry-After` until the period ends) until the next UTC day
or month. A rejected call costs nothing and is logged.

NOTE: the check counts finished calls only, so calls already in flight when the budget runs out can
overshoot it by their cost. Rows that a killed gateway left in the log's spool file are imported
after the read-back, so their spend is not counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import http

from addons import hookimpl
from addons.logstore import connect_readonly
from plugins.rate_limits import reject

if TYPE_CHECKING:
    from addons.call import Call
    from addons.policy_rules import BudgetRules
    from addons.rules import Rules

logger = logging.getLogger(__name__)

#: Wall-clock source, UTC. Tests replace it to move across days without waiting.
now_utc: Callable[[], datetime] = lambda: datetime.now(timezone.utc)  # noqa: E731

#: Seconds a call waits for the spend read-back before it is checked without it.
READ_BACK_TIMEOUT = 30.0

_SPEND_SQL = """
    SELECT project,
           coalesce(sum(cost_usd) FILTER (WHERE ts >= $day_start), 0),
           coalesce(sum(cost_usd), 0)
    FROM requests
    WHERE ts >= $month_start AND ts < $started AND project IS NOT NULL AND cost_usd IS NOT NULL
    GROUP BY project
"""


class _State:
    def __init__(self) -> None:
        self.rules: BudgetRules | None = None
        #: (project, "day" or "month", period) -> USD spent.
        self.spend: dict[tuple[str, str, date], Decimal] = {}
        self.warned: set[tuple[str, str, date]] = set()
        self.read_back: concurrent.futures.Future | None = None
        self.merged = False


_state = _State()


def _periods(moment: datetime) -> dict[str, date]:
    day = moment.astimezone(timezone.utc).date()
    return {"day": day, "month": day.replace(day=1)}


def _period_end(kind: str, start: date) -> datetime:
    if kind == "day":
        end = start + timedelta(days=1)
    else:
        end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime(end.year, end.month, end.day, tzinfo=timezone.utc)


def read_spend(database: Path, started: datetime) -> dict[tuple[str, str, date], Decimal]:
    """Return the spend per project of the day and month of `started`, from log rows before `started`."""
    periods = _periods(started)
    try:
        con = connect_readonly(database, timeout=READ_BACK_TIMEOUT)
    except FileNotFoundError:
        return {}
    try:
        start_of = {kind: datetime(p.year, p.month, p.day, tzinfo=timezone.utc) for kind, p in periods.items()}
        rows = con.execute(
            _SPEND_SQL, {"day_start": start_of["day"], "month_start": start_of["month"], "started": started}
        ).fetchall()
    finally:
        con.close()
    spend = {}
    for project, day_usd, month_usd in rows:
        spend[(project, "day", periods["day"])] = Decimal(day_usd)
        spend[(project, "month", periods["month"])] = Decimal(month_usd)
    return spend


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    _state.rules = rules.budgets
    _state.spend.clear()
    _state.warned.clear()
    _state.merged = False
    _state.read_back = None
    if not rules.budgets.projects:
        return
    future: concurrent.futures.Future = concurrent.futures.Future()
    started = now_utc()
    database = rules.logging.database

    def run() -> None:
        try:
            future.set_result(read_spend(database, started))
        except Exception as e:
            future.set_exception(e)

    threading.Thread(target=run, name="tollhouse-budget-read", daemon=True).start()
    _state.read_back = future


@hookimpl
def tollhouse_request(call: Call, flow: http.HTTPFlow):
    if flow.response is not None or _state.rules is None or call.project is None:
        return None
    if call.project.name not in _state.rules.projects:
        return None
    return _check(call, flow)


async def _merge_read_back() -> None:
    future = _state.read_back
    if _state.merged or future is None:
        return
    try:
        spend = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), READ_BACK_TIMEOUT)
    except Exception as e:
        if not _state.merged:
            _state.merged = True
            logger.error("budgets: reading the spend so far from the request log failed (%s); counting from 0", e)
        return
    if _state.merged:
        return
    _state.merged = True
    for key, usd in spend.items():
        _state.spend[key] = _state.spend.get(key, Decimal(0)) + usd
    logger.info("budgets: read back the spend of %d project period(s) from the request log", len(spend))


async def _check(call: Call, flow: http.HTTPFlow) -> None:
    # Runs after the cache's awaitable, which may have set a cached response already.
    await _merge_read_back()
    if flow.response is not None:
        return
    project = call.project.name
    budget = _state.rules.projects[project]
    moment = now_utc()
    for kind, start in _periods(moment).items():
        limit = budget.daily_usd if kind == "day" else budget.monthly_usd
        if limit is None:
            continue
        spent = _state.spend.get((project, kind, start), Decimal(0))
        if spent < limit:
            continue
        ends = _period_end(kind, start)
        setting = f"budgets.projects.{project}.{'daily_usd' if kind == 'day' else 'monthly_usd'}"
        period = "daily" if kind == "day" else "monthly"
        reject(
            call, flow, 429,
            f"tollhouse: project {project!r} has spent its {period} budget of {limit} USD (spent {spent:.6f} USD); "
            f"calls are rejected until {ends:%Y-%m-%d %H:%M} UTC. Raise {setting} to allow more.",
            "insufficient_quota", (ends - moment).total_seconds(),
            {
                "x-should-retry": "false",
                "x-tollhouse-limit": setting,
                # The budget in the x-ratelimit-* form, in USD, next to any per-minute limits.
                f"x-ratelimit-limit-usd-{kind}": str(limit),
                f"x-ratelimit-remaining-usd-{kind}": "0",
                f"x-ratelimit-reset-usd-{kind}": f"{math.ceil((ends - moment).total_seconds())}s",
            },
        )
        return


@hookimpl
def tollhouse_call_end(call: Call) -> None:
    if _state.rules is None or call.project is None or call.price is None:
        return
    budget = _state.rules.projects.get(call.project.name)
    cost = call.price.cost_usd
    if budget is None or cost is None or cost <= 0:
        return
    project = call.project.name
    for kind, start in _periods(call.ts).items():
        key = (project, kind, start)
        spent = _state.spend.get(key, Decimal(0)) + cost
        _state.spend[key] = spent
        limit = budget.daily_usd if kind == "day" else budget.monthly_usd
        if limit is not None and spent >= limit * Decimal(str(_state.rules.warn_at)) and key not in _state.warned:
            _state.warned.add(key)
            logger.warning(
                "budgets: project %s has spent %.6f USD of its %s budget of %s USD (%.0f %%)",
                project, spent, "daily" if kind == "day" else "monthly", limit, spent / limit * 100,
            )
