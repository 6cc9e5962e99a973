"""The cost dashboard: `GET /dashboard` (an HTML page) and `GET /dashboard/data.json` on the admin listener.

The page is the package-data file `dashboard.html`. It loads nothing from other hosts: its inline script
fetches `data.json` from the same listener and draws the charts as SVG. The data comes from the request
log, opened read-only for one set of queries in a worker thread so that the gateway's event loop does
not wait for DuckDB.

Costs in `data.json` are exact decimal strings in US dollars, or null when no call in the group has a
known cost. Unknown costs are never counted as 0: each group also reports `unknown_cost_calls`.
"""

from __future__ import annotations

import os
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from addons.logstore import connect_readonly

PAGE_PATH = "/dashboard"
DATA_PATH = "/dashboard/data.json"
#: Days shown when the request has no `days` parameter.
DEFAULT_DAYS = 30
#: Maximum `days` parameter, about ten years.
MAX_DAYS = 3660
#: Rows in the table of the most expensive calls.
TOP_CALLS = 20

# Days are UTC days, as in addons.costs.
_PROJECT_DAY_SQL = """
    SELECT
        CAST(timezone('UTC', ts) AS DATE) AS day,
        project,
        count(*),
        sum(cost_usd),
        count(*) FILTER (WHERE cost_usd IS NULL)
    FROM requests
    WHERE ts >= $since
    GROUP BY ALL
    ORDER BY day, project NULLS FIRST
"""

_MODEL_SQL = """
    SELECT
        coalesce(response_model, model) AS model_name,
        count(*),
        sum(cost_usd),
        count(*) FILTER (WHERE cost_usd IS NULL),
        sum(saved_usd)
    FROM requests
    WHERE ts >= $since
    GROUP BY ALL
    ORDER BY sum(cost_usd) DESC NULLS LAST, model_name NULLS FIRST
"""

_SAVED_DAY_SQL = """
    SELECT CAST(timezone('UTC', ts) AS DATE) AS day, sum(saved_usd)
    FROM requests
    WHERE ts >= $since AND saved_usd IS NOT NULL
    GROUP BY ALL
    ORDER BY day
"""

# Calls without a known cost sort last, so they appear only when fewer than TOP_CALLS calls are priced.
_TOP_CALLS_SQL = f"""
    SELECT
        ts,
        request_id,
        project,
        coalesce(response_model, model),
        input_tokens,
        cache_read_tokens,
        cache_write_tokens,
        output_tokens,
        cost_usd,
        price_flag
    FROM requests
    WHERE ts >= $since
    ORDER BY cost_usd DESC NULLS LAST, ts DESC
    LIMIT {TOP_CALLS}
"""


def page_html() -> bytes:
    """Read the dashboard page from the package data."""
    return resources.files("addons").joinpath("dashboard.html").read_bytes()


def parse_days(query: str) -> int:
    """Parse the `days` parameter of a query string, DEFAULT_DAYS when absent.

    Raises ValueError with a message for the client when the value is not a whole number from 1 to MAX_DAYS.
    """
    values = parse_qs(query, keep_blank_values=True).get("days")
    if not values:
        return DEFAULT_DAYS
    text = values[-1]
    if not text.isdigit() or not 1 <= int(text) <= MAX_DAYS:
        raise ValueError(f"invalid days parameter {text!r}: expected a whole number from 1 to {MAX_DAYS}")
    return int(text)


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    # normalize() drops trailing zeros, and format "f" keeps it out of exponent notation.
    return format(value.normalize(), "f") if value else "0"


def _add(total: Decimal | None, value: Decimal | None) -> Decimal | None:
    if value is None:
        return total
    return value if total is None else total + value


def _prompt_tokens(*parts: int | None) -> int | None:
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


def dashboard_data(
    db_path: str | os.PathLike[str], days: int = DEFAULT_DAYS, today: date | None = None
) -> dict[str, Any]:
    """Query the request log for the calls of the last `days` UTC days, today included.

    Blocks on DuckDB, so call it from a worker thread. Raises FileNotFoundError or
    addons.logstore.DatabaseLockedError from connect_readonly.
    """
    today = today or datetime.now(timezone.utc).date()
    first_day = today - timedelta(days=days - 1)
    params = {"since": datetime.combine(first_day, time.min, tzinfo=timezone.utc)}
    con = connect_readonly(db_path)
    try:
        project_days = con.execute(_PROJECT_DAY_SQL, params).fetchall()
        models = con.execute(_MODEL_SQL, params).fetchall()
        saved_days = con.execute(_SAVED_DAY_SQL, params).fetchall()
        top_calls = con.execute(_TOP_CALLS_SQL, params).fetchall()
    finally:
        con.close()

    total_cost: Decimal | None = None
    total_saved = Decimal(0)
    for _, _, _, cost, _ in project_days:
        total_cost = _add(total_cost, cost)
    for _, _, _, _, saved in models:
        total_saved += saved or Decimal(0)

    return {
        "first_day": first_day.isoformat(),
        "last_day": today.isoformat(),
        "days": [(first_day + timedelta(days=offset)).isoformat() for offset in range(days)],
        "totals": {
            "calls": sum(row[2] for row in project_days),
            "cost_usd": _money(total_cost),
            "unknown_cost_calls": sum(row[4] for row in project_days),
            # Savings are 0, not unknown, when the response cache had no hit.
            "saved_usd": _money(total_saved),
        },
        "project_days": [
            {"day": day.isoformat(), "project": project, "calls": calls, "cost_usd": _money(cost),
             "unknown_cost_calls": unknown}
            for day, project, calls, cost, unknown in project_days
        ],
        "models": [
            {"model": model, "calls": calls, "cost_usd": _money(cost), "unknown_cost_calls": unknown,
             "saved_usd": _money(saved or Decimal(0))}
            for model, calls, cost, unknown, saved in models
        ],
        "saved_days": [{"day": day.isoformat(), "saved_usd": _money(saved)} for day, saved in saved_days],
        "top_calls": [
            {
                "ts": ts.astimezone(timezone.utc).isoformat(),
                "request_id": request_id,
                "project": project,
                "model": model,
                # The whole prompt, as in addons.costs: uncached input plus cache reads and writes.
                "input_tokens": _prompt_tokens(input_tokens, cache_read, cache_write),
                "output_tokens": output_tokens,
                "cost_usd": _money(cost),
                "price_flag": price_flag,
            }
            for ts, request_id, project, model, input_tokens, cache_read, cache_write, output_tokens, cost, price_flag
            in top_calls
        ],
    }
