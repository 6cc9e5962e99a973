"""The costs report: spend per day, project and model, read from the request log.

The report opens the log read-only for one query, so it can run while the gateway writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from decimal import Decimal

from addons.logstore import connect_readonly

# Days are UTC days, whatever the reading session's TimeZone setting is.
_SPEND_SQL = """
    SELECT
        CAST(timezone('UTC', ts) AS DATE) AS day,
        project,
        coalesce(response_model, model) AS model,
        count(*) AS calls,
        coalesce(sum(coalesce(input_tokens, 0) + coalesce(cache_read_tokens, 0) + coalesce(cache_write_tokens, 0)), 0),
        coalesce(sum(output_tokens), 0),
        sum(cost_usd),
        count(*) FILTER (WHERE cost_usd IS NULL),
        sum(saved_usd)
    FROM requests
    WHERE ($since IS NULL OR ts >= $since)
      AND ($project IS NULL OR project = $project)
    GROUP BY ALL
    ORDER BY day, project NULLS FIRST, model NULLS FIRST
"""


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Spend of one project on one model during one UTC day."""

    day: date
    #: NULL for calls that matched no project (for example calls rejected before routing).
    project: str | None
    #: The model named in the response, else the model requested. None when neither is known.
    model: str | None
    calls: int
    #: The whole prompt: uncached input plus cache reads plus cache writes. Calls without usage add 0.
    input_tokens: int
    #: Output tokens, reasoning included. Calls without usage add 0.
    output_tokens: int
    #: Sum of the known costs in US dollars, or None when no call in the group has a known cost.
    cost_usd: Decimal | None
    #: Calls whose cost is unknown (NULL), which are left out of cost_usd.
    unknown_cost_calls: int
    #: Cost in US dollars that cache hits did not pay again, or None when the group had no hit.
    saved_usd: Decimal | None = None


def spend_report(
    db_path: str | os.PathLike[str], since: date | None = None, project: str | None = None
) -> list[SpendRow]:
    """Sum calls, tokens and cost per UTC day, project and model, oldest day first.

    `since` keeps calls that started on or after that UTC day, and `project` keeps one project's calls.
    Raises FileNotFoundError or addons.logstore.DatabaseLockedError from connect_readonly.
    """
    since_ts = datetime.combine(since, time.min, tzinfo=timezone.utc) if since is not None else None
    con = connect_readonly(db_path)
    try:
        result = con.execute(_SPEND_SQL, {"since": since_ts, "project": project}).fetchall()
    finally:
        con.close()
    return [SpendRow(*row) for row in result]


def _format_cost(cost: Decimal | None) -> str:
    return "unknown" if cost is None else f"{cost:,.6f}"


def format_report(rows: list[SpendRow]) -> str:
    """Render the report as an aligned text table with a total line.

    Unknown costs are never shown as 0: a group whose costs are all unknown shows "unknown", and the
    "unknown cost" column counts the calls left out of each cost.
    """
    if not rows:
        return "No calls in the request log match."

    # The savings column appears only when the response cache saved something.
    show_saved = any(row.saved_usd for row in rows)
    header = ("day", "project", "model", "calls", "input tokens", "output tokens", "cost USD", "unknown cost")
    if show_saved:
        header += ("saved USD",)
    table = [header]
    for row in rows:
        saved = (_format_cost(row.saved_usd or Decimal(0)),) if show_saved else ()
        table.append(
            (
                row.day.isoformat(),
                row.project if row.project is not None else "(none)",
                row.model if row.model is not None else "(unknown)",
                f"{row.calls:,}",
                f"{row.input_tokens:,}",
                f"{row.output_tokens:,}",
                _format_cost(row.cost_usd),
                f"{row.unknown_cost_calls:,}",
                *saved,
            )
        )

    known_costs = [row.cost_usd for row in rows if row.cost_usd is not None]
    total_cost = sum(known_costs, Decimal(0)) if known_costs else None
    table.append(
        (
            "total",
            "",
            "",
            f"{sum(row.calls for row in rows):,}",
            f"{sum(row.input_tokens for row in rows):,}",
            f"{sum(row.output_tokens for row in rows):,}",
            _format_cost(total_cost),
            f"{sum(row.unknown_cost_calls for row in rows):,}",
            *((_format_cost(sum((row.saved_usd or Decimal(0) for row in rows), Decimal(0))),) if show_saved else ()),
        )
    )

    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    # Text columns are left-aligned, numbers right-aligned.
    text_columns = 3
    lines = []
    for index, line in enumerate(table):
        if index == len(table) - 1:
            lines.append("  ".join("-" * width for width in widths))
        cells = [
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
