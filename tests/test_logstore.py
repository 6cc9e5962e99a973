"""Tests of the DuckDB request log against real database files, other processes included."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from addons.call import Call, Price, Usage
from addons.logstore import (
    COLUMN_NAMES,
    COLUMNS,
    DatabaseLockedError,
    LogStore,
    LogStoreError,
    _spool_line,
    connect_readonly,
    create_schema,
    row_for,
)

# Seconds to wait for another process or the writer thread, reached only when a test fails.
DEADLINE = 30.0


@dataclass
class Named:
    """A stand-in for rules.Project and rules.Provider, of which the log reads only `name`."""

    name: str


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "requests.duckdb"


@pytest.fixture
def store(db_path: Path):
    log_store = LogStore(db_path, flush_interval=0.05)
    log_store.start()
    yield log_store
    log_store.close()


def simple_row(request_id: str, **values) -> dict:
    row = dict.fromkeys(COLUMN_NAMES)
    row.update(ts=datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc), request_id=request_id, listener="proxy", tags={})
    row.update(values)
    return row


def fetch_rows(db_path: Path, where: str = "true") -> list[dict]:
    con = connect_readonly(db_path)
    try:
        cursor = con.execute(f"SELECT * FROM requests WHERE {where} ORDER BY request_id")
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    finally:
        con.close()


def count_rows(db_path: Path) -> int:
    con = connect_readonly(db_path)
    try:
        return con.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        con.close()


def spool_lines(db_path: Path) -> int:
    spool = db_path.with_name(db_path.stem + ".spool.jsonl")
    return spool.read_bytes().count(b"\n") if spool.exists() else 0


def wait_until(condition, description: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {description}")
        time.sleep(0.02)


def start_child(code: str) -> subprocess.Popen:
    """Run Python code in a child process that talks over stdin/stdout and exits on its own."""
    preamble = "import signal, sys\nsignal.alarm(60)\n"  # the child ends even if the test hangs
    return subprocess.Popen(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def start_reader_child(db_path: Path, read_only: bool = True) -> subprocess.Popen:
    """Start a process that opens the database, prints "ready" and keeps it open until its stdin closes."""
    child = start_child(
        f"""
        import duckdb
        con = duckdb.connect({str(db_path)!r}, read_only={read_only!r})
        print("ready", flush=True)
        sys.stdin.readline()
        con.close()
        """
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def stop_child(child: subprocess.Popen) -> None:
    child.stdin.close()
    assert child.wait(timeout=DEADLINE) == 0


# ---------------------------------------------------------------------------------------------------
# Rows and values


def test_row_for_has_exactly_the_columns():
    call = Call(request_id="r1", listener="proxy")

    assert list(row_for(call)) == COLUMN_NAMES


def test_columns_have_descriptions():
    for name, sql_type, description in COLUMNS:
        assert sql_type, name
        assert description.endswith("."), name


def test_call_round_trip_is_exact(store: LogStore, db_path: Path):
    started = 1000.0
    call = Call(
        request_id="req-1",
        listener="proxy",
        ts=datetime(2025, 3, 1, 23, 59, 58, 123456, tzinfo=timezone.utc),
        started=started,
        provider=Named("openai"),
        project=Named("team-a"),
        endpoint="chat.completions",
        method="POST",
        path="/v1/chat/completions?x=1",
        model="gpt-4o",
        stream=True,
        status=200,
        response_model="gpt-4o-2024-08-06",
        first_byte=started + 0.25,
        ended=started + 1.5,
        usage=Usage(
            input_tokens=1000,
            output_tokens=500,
            cache_read_tokens=200,
            cache_write_tokens=300,
            cache_write_1h_tokens=100,
            reasoning_tokens=50,
        ),
        price=Price(Decimal("0.0123456789"), "priced"),
        tags={"team": "search", "quote": 'a "b"'},
        request_body='{"messages": ["héllo 😀"]}',
        response_body="line1\nline2\u0000end",
    )

    store.put(row_for(call))
    assert store.flush()

    [row] = fetch_rows(db_path)
    assert row["ts"] == call.ts
    assert row["request_id"] == "req-1"
    assert row["listener"] == "proxy"
    assert row["project"] == "team-a"
    assert row["provider"] == "openai"
    assert row["endpoint"] == "chat.completions"
    assert row["method"] == "POST"
    assert row["path"] == "/v1/chat/completions?x=1"
    assert row["model"] == "gpt-4o"
    assert row["response_model"] == "gpt-4o-2024-08-06"
    assert row["stream"] is True
    assert row["status"] == 200
    assert row["error"] is None
    assert row["latency_ms"] == 1500.0
    assert row["ttfb_ms"] == 250.0
    assert row["input_tokens"] == 1000
    assert row["output_tokens"] == 500
    assert row["cache_read_tokens"] == 200
    assert row["cache_write_tokens"] == 300
    assert row["cache_write_1h_tokens"] == 100
    assert row["reasoning_tokens"] == 50
    assert row["cost_usd"] == Decimal("0.0123456789")
    assert row["price_flag"] == "priced"
    assert json.loads(row["tags"]) == {"team": "search", "quote": 'a "b"'}
    assert row["request_body"] == '{"messages": ["héllo 😀"]}'
    assert row["response_body"] == "line1\nline2\u0000end"


def test_unknown_usage_and_cost_are_null(store: LogStore, db_path: Path):
    rejected = Call(request_id="rejected", listener="proxy", status=403, error="unknown project")
    unpriced = Call(
        request_id="unpriced",
        listener="proxy",
        usage=Usage(input_tokens=10, output_tokens=2),
        price=Price(None, "unknown_model"),
    )

    store.put(row_for(rejected))
    store.put(row_for(unpriced))
    assert store.flush()

    rejected_row, unpriced_row = fetch_rows(db_path)
    assert rejected_row["request_id"] == "rejected"
    assert rejected_row["status"] == 403
    assert rejected_row["error"] == "unknown project"
    for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
        assert rejected_row[name] is None, name
    assert rejected_row["cost_usd"] is None
    assert rejected_row["price_flag"] is None
    assert rejected_row["latency_ms"] is None
    assert rejected_row["project"] is None
    assert unpriced_row["input_tokens"] == 10
    assert unpriced_row["cost_usd"] is None
    assert unpriced_row["price_flag"] == "unknown_model"


def test_zero_cost_is_not_null(store: LogStore, db_path: Path):
    store.put(simple_row("free", cost_usd=Decimal(0), price_flag="not_billed"))
    assert store.flush()

    [row] = fetch_rows(db_path)
    assert row["cost_usd"] == Decimal(0)
    assert row["cost_usd"] is not None


def test_invalid_values_stored_as_null(store: LogStore, db_path: Path, caplog):
    store.put(
        simple_row(
            "bad",
            status="200",
            stream=1,
            latency_ms=float("nan"),
            input_tokens=2**63,
            cost_usd=Decimal("123456789"),
            tags={"when": datetime.now()},
        )
    )
    with caplog.at_level(logging.ERROR, logger="addons.logstore"):
        assert store.flush()

    [row] = fetch_rows(db_path)
    for name in ("status", "stream", "latency_ms", "input_tokens", "cost_usd", "tags"):
        assert row[name] is None, name
    logged = caplog.text
    for name in ("status", "stream", "latency_ms", "input_tokens", "cost_usd", "tags"):
        assert f"column {name}" in logged


def test_cost_rounded_to_ten_places(store: LogStore, db_path: Path):
    store.put(simple_row("round", cost_usd=Decimal("0.00000000005")))
    store.put(simple_row("round2", cost_usd=Decimal("0.00000000015")))
    assert store.flush()

    first, second = fetch_rows(db_path)
    assert first["cost_usd"] == Decimal("0E-10")  # half-even: 0.5e-10 rounds to 0
    assert second["cost_usd"] == Decimal("2E-10")


def test_missing_ts_and_request_id_filled(store: LogStore, db_path: Path):
    row = simple_row("x")
    row["ts"] = None
    row["request_id"] = None

    store.put(row)
    assert store.flush()

    [stored] = fetch_rows(db_path)
    assert stored["request_id"].startswith("missing-")
    assert stored["ts"] is not None


def test_naive_ts_taken_as_utc(store: LogStore, db_path: Path):
    store.put(simple_row("naive", ts=datetime(2025, 1, 2, 3, 4, 5)))
    store.put(simple_row("offset", ts=datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))))
    assert store.flush()

    naive, offset = fetch_rows(db_path)
    assert naive["ts"] == datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert offset["ts"] == datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_lone_surrogate_replaced(store: LogStore, db_path: Path):
    store.put(simple_row("surrogate", response_body="ok\udcffend"))
    assert store.flush()

    [row] = fetch_rows(db_path)
    assert row["response_body"] == "ok?end"


def test_body_larger_than_default_json_limit(store: LogStore, db_path: Path):
    body = "x" * (17 * 1024 * 1024)

    store.put(simple_row("big", request_body=body))
    store.put(simple_row("small"))
    assert store.flush(timeout=60)

    con = connect_readonly(db_path)
    try:
        lengths = con.execute("SELECT request_id, length(request_body) FROM requests ORDER BY 1").fetchall()
    finally:
        con.close()
    assert lengths == [("big", len(body)), ("small", None)]


def test_duplicate_request_id_in_batch_stored_once(store: LogStore, db_path: Path):
    store.put(simple_row("same", status=200))
    store.put(simple_row("same", status=500, ts=datetime(2025, 3, 1, 13, 0, tzinfo=timezone.utc)))
    assert store.flush()

    [row] = fetch_rows(db_path)
    assert row["status"] == 200


# ---------------------------------------------------------------------------------------------------
# Writer thread


def test_put_from_many_threads(store: LogStore, db_path: Path):
    threads_count, rows_per_thread = 8, 500

    def produce(thread_index: int) -> None:
        for i in range(rows_per_thread):
            store.put(simple_row(f"t{thread_index}-{i}"))

    threads = [threading.Thread(target=produce, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.flush()

    con = connect_readonly(db_path)
    try:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT request_id) FROM requests").fetchone()
    finally:
        con.close()
    assert total == threads_count * rows_per_thread
    assert distinct == threads_count * rows_per_thread


def test_close_writes_every_row(db_path: Path):
    # An interval far longer than the test means only close() can have written the rows.
    log_store = LogStore(db_path, flush_interval=3600)
    log_store.start()
    for i in range(1000):
        log_store.put(simple_row(f"r{i:04}"))

    log_store.close()

    assert count_rows(db_path) == 1000
    assert spool_lines(db_path) == 0


def test_close_is_idempotent(db_path: Path):
    log_store = LogStore(db_path)
    log_store.start()
    log_store.put(simple_row("once"))

    log_store.close()
    log_store.close()

    assert count_rows(db_path) == 1


def test_put_after_close_dropped_and_logged(db_path: Path, caplog):
    log_store = LogStore(db_path)
    log_store.start()
    log_store.close()

    with caplog.at_level(logging.ERROR, logger="addons.logstore"):
        log_store.put(simple_row("late"))

    assert "late" in caplog.text
    assert count_rows(db_path) == 0


def test_flush_interval_must_be_positive(db_path: Path):
    with pytest.raises(ValueError, match="flush_interval"):
        LogStore(db_path, flush_interval=0)


# ---------------------------------------------------------------------------------------------------
# Readers and the lock


def test_reader_process_delays_rows_until_closed(store: LogStore, db_path: Path):
    store.put(simple_row("before"))
    assert store.flush()
    reader = start_reader_child(db_path)
    try:
        for i in range(100):
            store.put(simple_row(f"during-{i:03}"))

        assert not store.flush(timeout=0.5)
        wait_until(lambda: spool_lines(db_path) == 100, "100 rows in the spool")

        for i in range(100, 200):
            store.put(simple_row(f"during-{i:03}"))
        wait_until(lambda: spool_lines(db_path) == 200, "200 rows in the spool")
    finally:
        stop_child(reader)

    assert store.flush()
    assert count_rows(db_path) == 201
    assert spool_lines(db_path) == 0


def test_in_process_reader_delays_rows(store: LogStore, db_path: Path):
    store.put(simple_row("before"))
    assert store.flush()
    con = connect_readonly(db_path)
    try:
        store.put(simple_row("during"))
        assert not store.flush(timeout=0.3)
        assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
    finally:
        con.close()

    assert store.flush()
    assert count_rows(db_path) == 2


def test_close_while_locked_keeps_rows_in_spool(db_path: Path):
    log_store = LogStore(db_path, flush_interval=0.05)
    log_store.start()
    reader = start_reader_child(db_path)
    try:
        for i in range(50):
            log_store.put(simple_row(f"r{i:02}"))
        log_store.close(timeout=1.0)
        assert spool_lines(db_path) == 50
    finally:
        stop_child(reader)

    next_store = LogStore(db_path)
    next_store.start()
    try:
        assert spool_lines(db_path) == 0
        assert count_rows(db_path) == 50
    finally:
        next_store.close()


def test_start_with_locked_database_defers_schema(db_path: Path):
    seed = duckdb.connect(str(db_path))
    seed.close()
    reader = start_reader_child(db_path)
    log_store = LogStore(db_path, flush_interval=0.05)
    try:
        log_store.start()
        log_store.put(simple_row("queued"))
        assert not log_store.flush(timeout=0.3)
    finally:
        stop_child(reader)

    try:
        assert log_store.flush()
        assert count_rows(db_path) == 1
    finally:
        log_store.close()


def test_connect_readonly_times_out_naming_file(db_path: Path):
    seed = duckdb.connect(str(db_path))
    seed.close()
    writer = start_reader_child(db_path, read_only=False)
    try:
        with pytest.raises(DatabaseLockedError, match=str(db_path)):
            connect_readonly(db_path, timeout=0.2)
    finally:
        stop_child(writer)


def test_connect_readonly_missing_file(tmp_path: Path):
    missing = tmp_path / "absent.duckdb"

    with pytest.raises(FileNotFoundError, match="absent.duckdb"):
        connect_readonly(missing)
    assert not missing.exists()


def test_start_rejects_non_duckdb_file(db_path: Path):
    db_path.write_bytes(b"this is not a database file" * 1000)
    log_store = LogStore(db_path)

    with pytest.raises(LogStoreError, match=str(db_path)):
        log_store.start()


def test_second_store_on_same_file_rejected(store: LogStore, db_path: Path):
    second = LogStore(db_path)

    with pytest.raises(LogStoreError, match="another tollhouse process"):
        second.start()


# ---------------------------------------------------------------------------------------------------
# Crashes


WRITER_CHILD = """
import time
from datetime import datetime, timezone
from pathlib import Path
from addons.logstore import COLUMN_NAMES, LogStore

def row(request_id):
    values = dict.fromkeys(COLUMN_NAMES)
    values.update(ts=datetime.now(timezone.utc), request_id=request_id, listener="proxy", tags={{}})
    return values

store = LogStore(Path({db_path!r}), flush_interval={interval!r})
store.start()
for i in range(100):
    store.put(row(f"early-{{i:03}}"))
print("put", flush=True)
# Keep writing until killed. The alarm in the preamble ends the process if the test never kills it.
i = 0
while True:
    store.put(row(f"late-{{i:06}}"))
    i += 1
    time.sleep(0.001)
"""


def test_sigkill_keeps_rows_already_written(db_path: Path):
    child = start_child(WRITER_CHILD.format(db_path=str(db_path), interval=0.05))
    try:
        assert child.stdout.readline().strip() == "put"
        wait_until(
            lambda: db_path.exists() and len(fetch_rows(db_path, "request_id LIKE 'early-%'")) == 100,
            "the early rows in the database",
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=DEADLINE)

    log_store = LogStore(db_path)
    log_store.start()
    log_store.close()

    con = connect_readonly(db_path)
    try:
        early = con.execute("SELECT count(*) FROM requests WHERE request_id LIKE 'early-%'").fetchone()[0]
        total, distinct = con.execute("SELECT count(*), count(DISTINCT request_id) FROM requests").fetchone()
    finally:
        con.close()
    assert early == 100
    assert total == distinct


def test_spool_left_by_sigkill_is_imported(db_path: Path):
    # The reader keeps the child's writer out of the database, so the rows exist only in the spool.
    seed = duckdb.connect(str(db_path))
    create_schema(seed)
    seed.close()
    reader = connect_readonly(db_path)
    child = start_child(WRITER_CHILD.format(db_path=str(db_path), interval=0.05))
    try:
        assert child.stdout.readline().strip() == "put"
        wait_until(lambda: spool_lines(db_path) >= 100, "the early rows in the spool")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=DEADLINE)
        reader.close()
    spooled = spool_lines(db_path)

    log_store = LogStore(db_path)
    log_store.start()
    try:
        assert spool_lines(db_path) == 0
        early = fetch_rows(db_path, "request_id LIKE 'early-%'")
        assert len(early) == 100
        assert count_rows(db_path) == spooled
    finally:
        log_store.close()


def test_replayed_spool_not_duplicated(db_path: Path):
    rows = [simple_row(f"r{i}") for i in range(10)]
    log_store = LogStore(db_path)
    log_store.start()
    for row in rows:
        log_store.put(row)
    log_store.close()
    # A crash between commit and emptying the spool leaves rows that are already stored.
    spool = db_path.with_name("requests.spool.jsonl")
    spool.write_bytes(b"".join(_spool_line(row) for row in rows) + _spool_line(simple_row("new")))

    log_store = LogStore(db_path)
    log_store.start()
    log_store.close()

    assert count_rows(db_path) == 11


def test_partial_spool_line_dropped(db_path: Path, caplog):
    spool = db_path.with_name("requests.spool.jsonl")
    complete = _spool_line(simple_row("a")) + _spool_line(simple_row("b"))
    spool.write_bytes(complete + _spool_line(simple_row("c"))[:40])

    log_store = LogStore(db_path)
    with caplog.at_level(logging.WARNING, logger="addons.logstore"):
        log_store.start()
    log_store.close()

    assert [row["request_id"] for row in fetch_rows(db_path)] == ["a", "b"]
    assert "partial line" in caplog.text


def test_rejected_spool_set_aside(db_path: Path, caplog):
    spool = db_path.with_name("requests.spool.jsonl")
    spool.write_bytes(b'{"ts": "not a time", "request_id": "x"}\n')

    log_store = LogStore(db_path)
    with caplog.at_level(logging.ERROR, logger="addons.logstore"):
        log_store.start()
    log_store.put(simple_row("after"))
    assert log_store.flush()
    log_store.close()

    rejected = list(db_path.parent.glob("requests.spool.rejected-*.jsonl"))
    assert len(rejected) == 1
    assert rejected[0].read_bytes() == b'{"ts": "not a time", "request_id": "x"}\n'
    assert [row["request_id"] for row in fetch_rows(db_path)] == ["after"]
    assert "rejected" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Schema


def test_schema_upgrade_adds_missing_columns(db_path: Path):
    old_columns = [(name, sql_type) for name, sql_type, _ in COLUMNS if name not in ("cache_write_1h_tokens", "tags")]
    con = duckdb.connect(str(db_path))
    con.execute(f"CREATE TABLE requests ({', '.join(f'{name} {sql_type}' for name, sql_type in old_columns)})")
    con.execute(
        "INSERT INTO requests (ts, request_id, listener, input_tokens) "
        "VALUES ('2025-01-01 00:00:00+00', 'old', 'proxy', 7)"
    )
    con.close()

    log_store = LogStore(db_path)
    log_store.start()
    log_store.put(simple_row("new", input_tokens=5, cache_write_1h_tokens=3, tags={"team": "a"}))
    log_store.close()

    new, old = fetch_rows(db_path)
    assert old["request_id"] == "old"
    assert old["input_tokens"] == 7
    assert old["cache_write_1h_tokens"] is None
    assert old["tags"] is None
    assert new["input_tokens"] == 5
    assert new["cache_write_1h_tokens"] == 3
    assert json.loads(new["tags"]) == {"team": "a"}


def test_schema_without_request_id_rejected(db_path: Path):
    con = duckdb.connect(str(db_path))
    con.execute("CREATE TABLE requests (ts TIMESTAMPTZ, note VARCHAR)")
    con.close()

    with pytest.raises(LogStoreError, match="request_id"):
        LogStore(db_path).start()


def test_schema_has_column_comments(store: LogStore, db_path: Path):
    con = connect_readonly(db_path)
    try:
        comments = dict(
            con.execute("SELECT column_name, comment FROM duckdb_columns() WHERE table_name = 'requests'").fetchall()
        )
    finally:
        con.close()

    assert comments == {name: description for name, _, description in COLUMNS}


def test_table_recreated_when_dropped(store: LogStore, db_path: Path):
    store.put(simple_row("first"))
    assert store.flush()
    con = duckdb.connect(str(db_path))
    con.execute("DROP TABLE requests")
    con.close()

    store.put(simple_row("second"))
    assert store.flush()

    assert [row["request_id"] for row in fetch_rows(db_path)] == ["second"]
