"""Tests of the costs report against a real request log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from addons.call import Call, Price, Usage
from addons.costs import SpendRow, format_report, spend_report
from addons.logstore import LogStore, row_for


@dataclass
class Named:
    """A stand-in for rules.Project, of which the log reads only `name`."""

    name: str


def utc(day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=timezone.utc)


def make_call(
    request_id: str,
    ts: datetime,
    project: str | None,
    model: str | None,
    cost: str | None,
    usage: Usage | None = None,
    response_model: str | None = None,
    flag: str = "priced",
) -> Call:
    return Call(
        request_id=request_id,
        listener="proxy",
        ts=ts,
        project=Named(project) if project is not None else None,
        model=model,
        response_model=response_model,
        usage=usage,
        price=Price(Decimal(cost) if cost is not None else None, flag),
    )


CALLS = [
    # Day 1, team-a: the response's model wins over the requested one.
    make_call("a1", utc(1, 9), "team-a", "gpt-4o", "0.0100000001", Usage(100, 10, 20, 30), "gpt-4o-2024-08-06"),
    make_call("a2", utc(1, 23, 59), "team-a", "gpt-4o", "0.0200000002", Usage(200, 20), "gpt-4o-2024-08-06"),
    # A call without usage or cost: counted, adds no tokens, cost unknown.
    make_call("a3", utc(1, 10), "team-a", "gpt-4o", None, None, "gpt-4o-2024-08-06", "missing_usage"),
    # Day 1, team-b: no response model, so the requested model is used.
    make_call("b1", utc(1, 11), "team-b", "claude-sonnet-4", None, Usage(50, 5), None, "unknown_model"),
    # 00:30 at UTC+2 is still day 1 in UTC.
    make_call(
        "b2",
        datetime(2025, 3, 2, 0, 30, tzinfo=timezone(timedelta(hours=2))),
        "team-b",
        "claude-sonnet-4",
        "0.5",
        Usage(1, 1),
    ),
    # Day 2: a rejected call without project or model, and one of team-a.
    make_call("r1", utc(2, 0), None, None, "0", None, None, "not_billed"),
    make_call("a4", utc(2, 8), "team-a", "gpt-4o", "1.25", Usage(1000, 100, 0, 0), "gpt-4o-2024-08-06"),
]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("costs") / "requests.duckdb"
    store = LogStore(path)
    store.start()
    for call in CALLS:
        store.put(row_for(call))
    store.close()
    return path


def test_report_groups_by_day_project_model(db_path: Path):
    rows = spend_report(db_path)

    assert rows == [
        SpendRow(date(2025, 3, 1), "team-a", "gpt-4o-2024-08-06", 3, 100 + 20 + 30 + 200, 30, Decimal("0.0300000003"), 1),
        SpendRow(date(2025, 3, 1), "team-b", "claude-sonnet-4", 2, 51, 6, Decimal("0.5"), 1),
        SpendRow(date(2025, 3, 2), None, None, 1, 0, 0, Decimal("0"), 0),
        SpendRow(date(2025, 3, 2), "team-a", "gpt-4o-2024-08-06", 1, 1000, 100, Decimal("1.25"), 0),
    ]


def test_report_all_unknown_cost_is_none(tmp_path: Path):
    path = tmp_path / "requests.duckdb"
    store = LogStore(path)
    store.start()
    store.put(row_for(make_call("u1", utc(5), "team-c", "m", None, Usage(1, 1), None, "unknown_model")))
    store.put(row_for(make_call("u2", utc(5), "team-c", "m", None, None, None, "missing_usage")))
    store.close()

    [row] = spend_report(path)

    assert row.cost_usd is None
    assert row.unknown_cost_calls == 2
    assert row.calls == 2


def test_report_since_filter(db_path: Path):
    rows = spend_report(db_path, since=date(2025, 3, 2))

    assert [(row.day, row.project) for row in rows] == [(date(2025, 3, 2), None), (date(2025, 3, 2), "team-a")]


def test_report_project_filter(db_path: Path):
    rows = spend_report(db_path, project="team-b")

    assert [(row.day, row.project, row.calls) for row in rows] == [(date(2025, 3, 1), "team-b", 2)]


def test_report_since_and_project(db_path: Path):
    rows = spend_report(db_path, since=date(2025, 3, 2), project="team-a")

    assert [(row.day, row.cost_usd) for row in rows] == [(date(2025, 3, 2), Decimal("1.25"))]


def test_report_since_after_last_call(db_path: Path):
    assert spend_report(db_path, since=date(2025, 3, 3)) == []


def test_report_while_store_writes(tmp_path: Path):
    path = tmp_path / "requests.duckdb"
    store = LogStore(path, flush_interval=0.05)
    store.start()
    try:
        store.put(row_for(make_call("w1", utc(7), "team-a", "m", "0.1", Usage(1, 1))))
        assert store.flush()
        first = spend_report(path)
        store.put(row_for(make_call("w2", utc(7), "team-a", "m", "0.2", Usage(1, 1))))
        assert store.flush()
        second = spend_report(path)
    finally:
        store.close()

    assert [row.cost_usd for row in first] == [Decimal("0.1")]
    assert [row.cost_usd for row in second] == [Decimal("0.3")]


def test_format_report_table(db_path: Path):
    text = format_report(spend_report(db_path))

    assert text.splitlines() == [
        "day         project  model              calls  input tokens  output tokens  cost USD  unknown cost",
        "2025-03-01  team-a   gpt-4o-2024-08-06      3           350             30  0.030000             1",
        "2025-03-01  team-b   claude-sonnet-4        2            51              6  0.500000             1",
        "2025-03-02  (none)   (unknown)              1             0              0  0.000000             0",
        "2025-03-02  team-a   gpt-4o-2024-08-06      1         1,000            100  1.250000             0",
        "----------  -------  -----------------  -----  ------------  -------------  --------  ------------",
        "total                                       7         1,401            136  1.780000             2",
    ]


def test_format_report_unknown_cost_not_zero():
    rows = [SpendRow(date(2025, 3, 5), "team-c", "m", 2, 1, 1, None, 2)]

    lines = format_report(rows).splitlines()

    assert lines[1].split()[-2:] == ["unknown", "2"]
    assert lines[-1].split()[-2:] == ["unknown", "2"]


def test_format_report_empty():
    assert format_report([]) == "No calls in the request log match."


def test_format_report_saved_column():
    rows = [
        SpendRow(date(2025, 3, 5), "team-c", "m", 3, 10, 10, Decimal("0.5"), 0, Decimal("1.25")),
        SpendRow(date(2025, 3, 6), "team-c", "m", 1, 10, 10, Decimal("0.5"), 0, None),
    ]

    lines = format_report(rows).splitlines()

    assert lines[0].split()[-2:] == ["saved", "USD"]
    assert lines[1].split()[-1] == "1.250000"
    assert lines[2].split()[-1] == "0.000000"
    assert lines[-1].split()[-1] == "1.250000"


def test_spend_report_sums_saved(tmp_path: Path):
    db_path = tmp_path / "saved.duckdb"
    hit = make_call("hit", utc(7), "team-a", "gpt-4o", "0", flag="cache_hit")
    hit.cache_status = "HIT"
    hit.saved_usd = Decimal("0.0021")
    store = LogStore(db_path, flush_interval=0.05)
    store.start()
    store.put(row_for(hit))
    store.put(row_for(make_call("miss", utc(7, 13), "team-a", "gpt-4o", "0.0021")))
    store.close()

    [row] = spend_report(db_path)

    assert row.calls == 2
    assert row.cost_usd == Decimal("0.0021")
    assert row.saved_usd == Decimal("0.0021")
