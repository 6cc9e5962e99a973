"""The request log: one row of the DuckDB table `requests` per client call.

Every call the gateway receives becomes a row, including rejected and failed calls. The columns and their
units are listed in `COLUMNS`.

How rows reach the database
---------------------------
`LogStore.put` is called on the event loop and only appends the row to an in-memory queue. A writer
thread owns all database access. Every `flush_interval` seconds it appends the queued rows to a spool
file beside the database (``<database name without suffix>.spool.jsonl``, JSON lines, fsync'd), then
opens the database read-write, inserts the whole spool in one statement, commits, closes the database
and empties the spool. The write lock is therefore held only while one batch is inserted. The insert
skips rows whose `request_id` is already stored, so replaying a spool after a crash between commit and
truncation does not duplicate rows.

`request_id` is unique but deliberately not a PRIMARY KEY. With a primary key, insert and checkpoint
time grew with the table: a 500-row flush held the lock for about 140 ms at 1 million rows and 400 ms at
5 million (DuckDB 2.0.1, 2-vCPU AMD EPYC VM). The writer instead compares each batch with the stored rows
at or after the batch's earliest `ts`, and a flush of 500 rows without bodies held the lock for about
30 ms at any of those sizes.

A SIGKILL of the gateway loses the rows queued since the last spool write: at most one flush interval
plus the duration of one write. `LogStore.close` writes every queued row to the database, or leaves it in
the spool for the next start when a reader keeps the database locked past the close timeout.

Reading the log while the gateway runs
--------------------------------------
DuckDB lets one process open a database file read-write, or many processes open it read-only, never
both at once. Readers therefore follow this contract: open read-only, keep sessions short; rows written
while you hold the file wait in the spool and land when you close it.

- DuckDB CLI: ``duckdb -readonly requests.duckdb``
- Python: ``connect_readonly(path)`` from this module, or ``duckdb.connect(path, read_only=True)``

Opening fails for tens of milliseconds while the writer inserts a batch. `connect_readonly` retries until
its timeout, and other clients may simply retry. A client that opens the file read-write (the CLI without
``-readonly``) stops the gateway from writing for as long as that session stays open.
"""

from __future__ import annotations

import atexit

# NOTE: POSIX only (fcntl.flock and os.pread), like the gateway's signal handling.
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import duckdb

from addons.call import Call

logger = logging.getLogger(__name__)

TABLE = "requests"
ID_COLUMN = "request_id"

_TOKENS_NOTE = "NULL when the response reported no usage."

#: The columns of the `requests` table, in order: (name, DuckDB type, description).
COLUMNS: list[tuple[str, str, str]] = [
    ("ts", "TIMESTAMPTZ", "When the request headers arrived (call start), UTC. Never NULL."),
    ("request_id", "VARCHAR", "Unique id of the call. Never NULL."),
    ("listener", "VARCHAR", 'Listener that received the call: "proxy" (forward proxy) or "base_url" (base-URL listener).'),
    ("project", "VARCHAR", "Project name from the rules. NULL when the call matched no project."),
    ("provider", "VARCHAR", "Provider name from the rules. NULL when no provider matched."),
    ("endpoint", "VARCHAR", 'Endpoint name such as "chat.completions" or "messages", or "other" for paths that are not priced.'),
    ("method", "VARCHAR", "HTTP request method."),
    ("path", "VARCHAR", "Request path, query string included."),
    (
        "model",
        "VARCHAR",
        "Model of the request sent upstream: the client's, or the one set by override_params or by the "
        "target that answered.",
    ),
    ("response_model", "VARCHAR", "Model named in the provider's response."),
    ("stream", "BOOLEAN", "True when the client requested a streamed response."),
    ("status", "INTEGER", "HTTP status sent to the client. NULL when no response was sent."),
    ("error", "VARCHAR", "Why the call failed or was rejected, secrets removed. NULL for successful calls."),
    ("latency_ms", "DOUBLE", "Milliseconds from call start to the end of the response."),
    ("ttfb_ms", "DOUBLE", "Milliseconds from call start to the first response body byte from upstream."),
    (
        "input_tokens",
        "BIGINT",
        "Input tokens billed at the base input price, excluding cache reads and cache writes, so that "
        "input_tokens + cache_read_tokens + cache_write_tokens is the whole prompt. " + _TOKENS_NOTE,
    ),
    ("output_tokens", "BIGINT", "All billed output tokens, reasoning tokens included. " + _TOKENS_NOTE),
    ("cache_read_tokens", "BIGINT", "Input tokens read from the prompt cache. " + _TOKENS_NOTE),
    ("cache_write_tokens", "BIGINT", "Input tokens written to the prompt cache, any lifetime. " + _TOKENS_NOTE),
    (
        "cache_write_1h_tokens",
        "BIGINT",
        "The part of cache_write_tokens written with a one-hour lifetime. " + _TOKENS_NOTE,
    ),
    (
        "reasoning_tokens",
        "BIGINT",
        "The part of output_tokens spent on reasoning, which is priced as output and not again. " + _TOKENS_NOTE,
    ),
    (
        "cost_usd",
        "DECIMAL(18,10)",
        "Cost in US dollars. NULL when the cost is unknown (see price_flag), never 0 for an unknown price.",
    ),
    (
        "price_flag",
        "VARCHAR",
        "How the cost was reached: priced, override, partial, unknown_model, missing_usage, not_billed or cache_hit.",
    ),
    ("tags", "JSON", "Free-form labels as a JSON object of strings."),
    ("request_body", "VARCHAR", "Request body with secrets masked. NULL unless body logging is enabled."),
    ("response_body", "VARCHAR", "Response body with secrets masked. NULL unless body logging is enabled."),
    (
        "cache_status",
        "VARCHAR",
        "Response cache decision: HIT, MISS, REFRESH or DISABLED. NULL when the cache was not consulted.",
    ),
    (
        "saved_usd",
        "DECIMAL(18,10)",
        "For a cache hit (cost_usd 0), the cost in US dollars of the original answer. NULL otherwise.",
    ),
    ("route", "VARCHAR", 'Routing config of the call: a route name, "x-portkey-config" for a header config, or NULL.'),
    (
        "served_by",
        "VARCHAR",
        'Config target that answered, Portkey style ("config.targets[1]"). NULL for calls without a config.',
    ),
    (
        "attempt_count",
        "INTEGER",
        "Upstream requests made for the call: 1 without retries or fallbacks, 0 when none was sent.",
    ),
    (
        "attempts",
        "JSON",
        "Attempts of a call with fallbacks or retries, in order: option, provider, model, status, error and "
        "latency_ms of each, and sent: false where no request went upstream (an open circuit breaker). NULL otherwise.",
    ),
]

COLUMN_NAMES = [name for name, _, _ in COLUMNS]

# NOT NULL in new tables, and _spool_line fills them when a row lacks them.
_REQUIRED_COLUMNS = ("ts", ID_COLUMN)

# read_json's default. A larger limit makes DuckDB read the file with fewer threads, so it is raised
# only when a spooled line is longer.
_DEFAULT_MAX_OBJECT_SIZE = 16 * 1024 * 1024

# cost_usd is DECIMAL(18,10): 10 fractional digits and values below 10**8.
_COST_QUANTUM = Decimal("1E-10")
_COST_LIMIT = Decimal(10) ** 8

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)

# Seconds between repeated log lines about the same ongoing condition (a reader holding the lock).
_LOG_REPEAT_INTERVAL = 60.0


class LogStoreError(RuntimeError):
    """An error opening or writing the request log."""


class DatabaseLockedError(LogStoreError, TimeoutError):
    """A timeout waiting for another connection to release the database lock."""


# ---------------------------------------------------------------------------------------------------
# Schema


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the `requests` table, or add the columns an older file lacks, and set column comments.

    Added columns are NULL in existing rows. Raises LogStoreError when the existing table lacks
    request_id or ts, which the writer needs to skip duplicates.
    """
    definitions = []
    for name, sql_type, _ in COLUMNS:
        suffix = " NOT NULL" if name in _REQUIRED_COLUMNS else ""
        definitions.append(f"{_quote(name)} {sql_type}{suffix}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(definitions)})")

    existing = {
        name: data_type
        for name, data_type in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = current_schema() AND table_name = ?",
            [TABLE],
        ).fetchall()
    }
    missing_required = [name for name in _REQUIRED_COLUMNS if name not in existing]
    if missing_required:
        raise LogStoreError(
            f"table {TABLE} has no {' or '.join(missing_required)} column and cannot be upgraded. "
            f"Rename the table or use a new database file."
        )

    # duckdb_columns() spells types canonically (TIMESTAMPTZ is "TIMESTAMP WITH TIME ZONE").
    casts = ", ".join(f"typeof(CAST(NULL AS {sql_type}))" for _, sql_type, _ in COLUMNS)
    canonical_types = con.execute(f"SELECT {casts}").fetchone()
    for (name, sql_type, _), canonical_type in zip(COLUMNS, canonical_types, strict=True):
        if name not in existing:
            logger.info("adding column %s %s to table %s", name, sql_type, TABLE)
            con.execute(f"ALTER TABLE {TABLE} ADD COLUMN {_quote(name)} {sql_type}")
        elif existing[name] != canonical_type:
            logger.warning("column %s.%s has type %s, expected %s", TABLE, name, existing[name], sql_type)

    for name, _, description in COLUMNS:
        con.execute(f"COMMENT ON COLUMN {TABLE}.{_quote(name)} IS {_sql_string(description)}")


def row_for(call: Call) -> dict[str, Any]:
    """Build the `requests` row of a finished call, with exactly the keys of COLUMN_NAMES."""
    usage = call.usage
    price = call.price
    return {
        "ts": call.ts,
        "request_id": call.request_id,
        "listener": call.listener,
        "project": call.project.name if call.project is not None else None,
        "provider": call.provider.name if call.provider is not None else None,
        "endpoint": call.endpoint,
        "method": call.method,
        "path": call.path,
        "model": call.model,
        "response_model": call.response_model,
        "stream": call.stream,
        "status": call.status,
        "error": call.error,
        "latency_ms": call.latency_ms,
        "ttfb_ms": call.ttfb_ms,
        "input_tokens": usage.input_tokens if usage is not None else None,
        "output_tokens": usage.output_tokens if usage is not None else None,
        "cache_read_tokens": usage.cache_read_tokens if usage is not None else None,
        "cache_write_tokens": usage.cache_write_tokens if usage is not None else None,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens if usage is not None else None,
        "reasoning_tokens": usage.reasoning_tokens if usage is not None else None,
        "cost_usd": price.cost_usd if price is not None else None,
        "price_flag": price.flag if price is not None else None,
        "tags": dict(call.tags),
        "request_body": call.request_body,
        "response_body": call.response_body,
        "cache_status": call.cache_status,
        "saved_usd": call.saved_usd,
        "route": call.route,
        "served_by": call.served_by,
        "attempt_count": _attempt_count(call),
        "attempts": call.attempts,
    }


def _attempt_count(call: Call) -> int:
    if call.attempts is not None:
        return sum(1 for attempt in call.attempts if attempt.get("sent"))
    return 0 if call.answered_by_gateway or call.provider is None else 1


# ---------------------------------------------------------------------------------------------------
# Row serialisation for the spool


def _to_timestamp(value: Any) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"expected datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        # A naive timestamp is taken to be UTC, the zone Call.ts uses.
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def _to_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return value


def _integer_converter(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected int, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{value} is outside [{low}, {high}]")
        return value

    return convert


def _to_double(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{value} is not finite")
    return float(value)


def _to_decimal_text(value: Any) -> str:
    # Sent as a string because a JSON number would pass through a binary float.
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise TypeError(f"expected Decimal, got {type(value).__name__}")
    try:
        quantized = Decimal(value).quantize(_COST_QUANTUM, rounding=ROUND_HALF_EVEN)
    except InvalidOperation as exc:
        raise ValueError(f"{value} cannot be stored as DECIMAL(18,10)") from exc
    if not abs(quantized) < _COST_LIMIT:
        raise ValueError(f"{value} is outside DECIMAL(18,10)")
    return format(quantized, "f")


def _to_json_value(value: Any) -> Any:
    # Serialised here once so that an unserialisable value is caught per column, not per line.
    json.dumps(value, ensure_ascii=False, allow_nan=False)
    return value


def _converter_for(sql_type: str) -> Callable[[Any], Any]:
    converters: dict[str, Callable[[Any], Any]] = {
        "TIMESTAMPTZ": _to_timestamp,
        "VARCHAR": _to_text,
        "BOOLEAN": _to_bool,
        "INTEGER": _integer_converter(*_INT32),
        "BIGINT": _integer_converter(*_INT64),
        "DOUBLE": _to_double,
        "DECIMAL(18,10)": _to_decimal_text,
        "JSON": _to_json_value,
    }
    return converters[sql_type]


_CONVERTERS = [(name, _converter_for(sql_type)) for name, sql_type, _ in COLUMNS]


def _spool_line(row: dict[str, Any]) -> bytes:
    """Encode a row as one spool line.

    A value that does not fit its column is stored as NULL and logged, so that one bad value never
    keeps a call out of the log. Keys outside COLUMNS are ignored and missing keys become NULL, except
    that a missing or invalid ts becomes the current time and a missing request_id a new unique id.
    """
    record = {}
    for name, convert in _CONVERTERS:
        value = row.get(name)
        if value is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError) as exc:
                logger.error(
                    "request %s: invalid value for column %s, stored as NULL: %s", row.get(ID_COLUMN), name, exc
                )
                value = None
        record[name] = value

    if not record[ID_COLUMN]:
        record[ID_COLUMN] = f"missing-{uuid.uuid4().hex}"
        logger.error("row without request_id stored as %s", record[ID_COLUMN])
    if record["ts"] is None:
        record["ts"] = datetime.now(timezone.utc).isoformat()
        logger.error("request %s: row without ts stored with the current time", record[ID_COLUMN])
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # Lone surrogates (from bodies decoded with surrogateescape) are not valid UTF-8 and would make
    # read_json reject the whole spool, so they become "?".
    return text.encode("utf-8", errors="replace") + b"\n"


# ---------------------------------------------------------------------------------------------------
# Opening the database


def _is_lock_error(exc: duckdb.Error) -> bool:
    """Return whether opening failed only because another connection has the database open."""
    message = str(exc)
    if isinstance(exc, duckdb.IOException) and "Could not set lock" in message:
        return True
    # Inside one process DuckDB shares one instance per file, and refuses a read-only connection while a
    # read-write one is open (and the reverse) with this error, before touching the file lock.
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in message


def connect_readonly(path: str | os.PathLike[str], timeout: float = 5.0) -> duckdb.DuckDBPyConnection:
    """Open the request log read-only, retrying while the gateway's writer has the lock.

    Close the connection soon: rows wait in the writer's spool while it is open. Raises
    FileNotFoundError for a missing file and DatabaseLockedError when the lock stays taken for
    `timeout` seconds.
    """
    db_path = Path(path).expanduser().resolve()
    if not db_path.exists():
        raise FileNotFoundError(f"request log {db_path} not found. Start the gateway once to create it.")

    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(db_path), read_only=True)
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                logger.error("cannot open request log %s read-only: %s", db_path, exc)
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseLockedError(
                    f"timed out after {timeout:g} s waiting to open {db_path} read-only: another process "
                    f"has it open read-write ({exc}). Close that session, or open it with `duckdb -readonly`."
                ) from exc
            logger.debug("request log %s is locked, retrying: %s", db_path, exc)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.2)


# ---------------------------------------------------------------------------------------------------
# The spool


class _Spool:
    """The JSON-lines file where rows wait until they are in the database.

    Only the writer thread uses it after start(). An exclusive flock on the file for the store's
    lifetime keeps a second gateway from emptying rows that the first has not imported.
    """

    def __init__(self, path: Path, db_path: Path):
        self.path = path
        self.db_path = db_path
        self.fd: int | None = None
        #: Lines in the file, and the longest line's length in bytes (for read_json's object size limit).
        self.lines = 0
        self.longest_line = 0

    def open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise LogStoreError(f"cannot open the request log spool {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise LogStoreError(
                f"another tollhouse process is writing the request log {self.db_path} (it has {self.path} locked). "
                f"Stop it or configure a different log path."
            ) from exc
        self.fd = fd
        self._repair()

    def _repair(self) -> None:
        """Drop a partial last line left by a crash mid-write, and count the lines a previous run left."""
        size = self.size()
        end_of_last_line = 0
        line_length = 0
        offset = 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            start = 0
            while (newline := chunk.find(b"\n", start)) != -1:
                line_length += newline + 1 - start
                self.longest_line = max(self.longest_line, line_length)
                self.lines += 1
                line_length = 0
                start = newline + 1
                end_of_last_line = offset + start
            line_length += len(chunk) - start
            offset += len(chunk)

        if end_of_last_line < size:
            logger.warning(
                "request log spool %s ends with a partial line (%d bytes) from an interrupted write, dropping it",
                self.path,
                size - end_of_last_line,
            )
            os.ftruncate(self.fd, end_of_last_line)
        if self.lines:
            logger.info("request log spool %s contains %d rows from a previous run", self.path, self.lines)

    def append(self, lines: list[bytes]) -> None:
        """Append whole lines and fsync. On OSError the file is truncated back to its previous length."""
        size_before = self.size()
        try:
            view = memoryview(b"".join(lines))
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, size_before)
            except OSError as truncate_exc:
                logger.error("cannot truncate the spool %s after a failed write: %s", self.path, truncate_exc)
            raise
        self.lines += len(lines)
        self.longest_line = max(self.longest_line, max(len(line) for line in lines))

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    def truncate(self) -> None:
        # No fsync: if the truncation is lost, the rows are replayed and skipped as duplicates.
        os.ftruncate(self.fd, 0)
        self.lines = 0
        self.longest_line = 0

    def set_aside(self) -> Path:
        """Copy the rows to a new `.rejected-<time>.jsonl` file beside the spool, empty it, return the copy."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        rejected = self.path.with_name(f"{self.db_path.stem}.spool.rejected-{stamp}.jsonl")
        with open(rejected, "wb") as out:
            offset = 0
            while chunk := os.pread(self.fd, 1 << 20, offset):
                out.write(chunk)
                offset += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        self.truncate()
        return rejected

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def _spool_path_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.stem + ".spool.jsonl")


# ---------------------------------------------------------------------------------------------------
# The writer


def _build_insert_sql() -> str:
    """Build the statement that inserts a spool's rows, skipping request_ids already stored.

    A duplicate comes from replaying a spool that was committed but not yet emptied, so it carries the
    same ts as the stored row. Comparing only with rows at or after the batch's earliest ts lets DuckDB
    skip older row groups by their min/max statistics. Within the batch the earliest row of each
    request_id is kept. Parameters: the spool path, then read_json's maximum_object_size in bytes.
    """
    column_list = ", ".join(_quote(name) for name in COLUMN_NAMES)
    types = ", ".join(f"{_sql_string(name)}: {_sql_string(sql_type)}" for name, sql_type, _ in COLUMNS)
    return f"""
        INSERT INTO {TABLE} ({column_list})
        WITH batch AS (
            SELECT {column_list}
            FROM read_json(?, columns = {{{types}}}, format = 'newline_delimited', maximum_object_size = ?)
            QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY ts) = 1
        )
        SELECT {column_list} FROM batch
        WHERE NOT EXISTS (
            SELECT 1 FROM {TABLE} AS stored
            WHERE stored.request_id = batch.request_id
              AND stored.ts >= (SELECT min(ts) FROM batch)
        )
    """


_INSERT_SQL = _build_insert_sql()

# Errors about the spool's content: retrying cannot succeed, so the spool is set aside.
_DATA_ERRORS = (
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.ConstraintException,
    duckdb.OutOfRangeException,
)


@dataclass(eq=False)
class _FlushRequest:
    """A marker in the queue: set once every row queued before it is in the database."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = True


class LogStore:
    """A writer of request rows to a DuckDB file from a background thread, as the module docstring describes."""

    def __init__(self, path: Path, flush_interval: float = 0.5):
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be positive seconds, got {flush_interval!r}")
        self.path = Path(path).expanduser().resolve()
        self.spool_path = _spool_path_for(self.path)
        self.flush_interval = flush_interval

        # deque.append and popleft are atomic, so put() needs no lock.
        self._queue: deque[dict[str, Any] | _FlushRequest] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_deadline = math.inf
        self._dropped_after_close = 0

        # Used only by the writer thread once it runs.
        self._spool = _Spool(self.spool_path, self.path)
        self._unwritten: list[bytes] = []
        self._waiting: list[_FlushRequest] = []
        self._schema_ready = False
        self._replaying = False
        self._lock_since: float | None = None
        self._lock_last_logged = 0.0
        # Message template -> (monotonic time last logged, repeats not logged since).
        self._error_log_state: dict[str, tuple[float, int]] = {}

    # -- public API ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the spool, import rows a crash left there, create the schema and start the writer.

        Raises LogStoreError naming the file when the spool or database cannot be opened. A database
        locked by a reader is not an error: the schema and leftover rows are written once it is free.
        """
        if self._thread is not None or self._closed:
            raise LogStoreError(f"request log {self.path} was already started")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogStoreError(f"cannot create the directory of request log {self.path}: {exc}") from exc
        self._spool.open()
        self._replaying = self._spool.lines > 0

        try:
            self._import_spool()
        except LogStoreError:
            self._spool.close()
            raise
        except duckdb.Error as exc:
            self._spool.close()
            raise LogStoreError(
                f"cannot open request log {self.path} read-write: {exc}. Check that it is a DuckDB file "
                f"this DuckDB version ({duckdb.__version__}) can write, or configure another path."
            ) from exc

        self._thread = threading.Thread(target=self._run, name="tollhouse-logstore", daemon=True)
        self._thread.start()
        # The writer thread is a daemon so that a missed close() cannot hang interpreter exit, and this
        # hook then still writes the queued rows.
        atexit.register(self.close)
        logger.info("request log started: %s (spool %s)", self.path, self.spool_path)

    def put(self, row: dict[str, Any]) -> None:
        """Queue a row for writing without blocking. The caller must not change the row afterwards.

        A row put after close() cannot be written, so it is dropped and logged. close() must not run
        while another thread is inside put(), or that row may be lost without a log line.
        """
        if self._closed:
            self._dropped_after_close += 1
            logger.error(
                "request log %s is closed; row of request %s dropped (%d so far)",
                self.path,
                row.get(ID_COLUMN),
                self._dropped_after_close,
            )
            return
        self._queue.append(row)

    def writer_state(self) -> dict[str, Any]:
        """Return the writer's state for health checks, read without locks (the values may be a moment old).

        `state` is "running", "stopped" (closed, or the thread died) or "not_started".
        `database_locked_seconds` is how long another process has held the database, or None.
        """
        if self._thread is None:
            state = "not_started"
        elif self._thread.is_alive() and not self._closed:
            state = "running"
        else:
            state = "stopped"
        lock_since = self._lock_since
        return {
            "state": state,
            "queued_rows": sum(1 for item in list(self._queue) if isinstance(item, dict)),
            "database_locked_seconds": round(time.monotonic() - lock_since, 3) if lock_since is not None else None,
        }

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row put so far is in the database. Return False on timeout or failure."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue and not self._unwritten and self._spool.size() == 0
        request = _FlushRequest()
        self._queue.append(request)
        self._wake.set()
        return request.done.wait(timeout) and request.ok

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued row and stop the writer. Calling it again does nothing.

        Rows that cannot reach the database within `timeout` seconds, because a reader has it open,
        stay in the spool, which the next start() imports.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        thread = self._thread
        if thread is None:
            if self._queue:
                logger.error("request log %s closed before start(); %d rows dropped", self.path, len(self._queue))
            return

        # Leave the writer a margin to close the spool before join() gives up.
        self._close_deadline = time.monotonic() + max(timeout - 0.5, 0.0)
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            logger.error("request log writer for %s did not stop within %g s", self.path, timeout)
        else:
            logger.info("request log closed: %s", self.path)

    # -- writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                done = self._write_pending()
            except Exception:
                # A bug here must not end the thread and silently stop logging.
                logger.exception("request log writer failed for %s, retrying", self.path)
                done = False
            if stopping and (done or time.monotonic() >= self._close_deadline):
                break
        self._finish()

    def _write_pending(self) -> bool:
        """Spool the queued rows and import the spool. Return True when nothing is left waiting."""
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _FlushRequest):
                self._waiting.append(item)
            else:
                try:
                    self._unwritten.append(_spool_line(item))
                except Exception:
                    # _spool_line handles bad values, so this is a row that is not a dict at all.
                    logger.exception("request log %s: a row could not be encoded and was dropped", self.path)

        if self._unwritten:
            try:
                self._spool.append(self._unwritten)
            except OSError as exc:
                self._log_error_rate_limited(
                    "writing %d rows to the spool %s failed, will retry: %s", len(self._unwritten), self.spool_path, exc
                )
                return False
            self._unwritten.clear()

        try:
            imported = self._import_spool()
        except (duckdb.Error, LogStoreError, OSError) as exc:
            self._log_error_rate_limited("writing request log %s failed, will retry: %s", self.path, exc)
            imported = False
        if imported:
            for request in self._waiting:
                request.done.set()
            self._waiting.clear()
        return imported

    def _finish(self) -> None:
        if self._unwritten:
            logger.error(
                "request log %s: %d rows could not be written to the spool %s and are lost",
                self.path,
                len(self._unwritten),
                self.spool_path,
            )
        if self._spool.lines:
            logger.warning(
                "request log %s is locked or failing, so %d rows stay in %s and are imported at the next start",
                self.path,
                self._spool.lines,
                self.spool_path,
            )
        for request in self._waiting:
            request.ok = False
            request.done.set()
        self._spool.close()

    # -- database ------------------------------------------------------------------------------------

    def _import_spool(self) -> bool:
        """Insert the spool's rows and empty it. Return False when another connection has the database open.

        Other DuckDB errors are raised, except errors about the spool's content, which set it aside.
        """
        if self._spool.lines == 0 and self._schema_ready:
            return True
        # A new connection each time, not ATTACH from a long-lived in-memory database, which would save
        # about 15 ms per flush: under ATTACH, a failed duckdb.connect of the same file elsewhere in this
        # process closed a descriptor of it and so dropped the writer's POSIX lock (DuckDB 2.0.1).
        try:
            con = duckdb.connect(str(self.path))
        except duckdb.Error as exc:
            if _is_lock_error(exc):
                self._note_locked(exc)
                return False
            raise
        try:
            if not self._schema_ready:
                create_schema(con)
                self._schema_ready = True
            inserted = self._insert_spool(con)
        except _DATA_ERRORS as exc:
            self._set_spool_aside(exc)
            return True
        finally:
            con.close()

        self._note_imported(self._spool.lines, inserted)
        self._spool.truncate()
        return True

    def _insert_spool(self, con: duckdb.DuckDBPyConnection) -> int:
        if self._spool.lines == 0:
            return 0
        parameters = [str(self.spool_path), max(_DEFAULT_MAX_OBJECT_SIZE, self._spool.longest_line + 1)]
        try:
            result = con.execute(_INSERT_SQL, parameters).fetchone()
        except duckdb.CatalogException:
            # The table vanished while the gateway ran, for example because the file was replaced.
            logger.warning("table %s missing in %s, creating it again", TABLE, self.path)
            create_schema(con)
            result = con.execute(_INSERT_SQL, parameters).fetchone()
        return result[0] if result else 0

    def _set_spool_aside(self, exc: duckdb.Error) -> None:
        rejected = self._spool.set_aside()
        logger.error(
            "DuckDB rejected the rows in the spool %s (%s); they were moved to %s. Fix the rows and append "
            "them to the spool while the gateway is stopped, or delete the file.",
            self.spool_path,
            exc,
            rejected,
        )
        for request in self._waiting:
            request.ok = False

    # -- logging -------------------------------------------------------------------------------------

    def _note_imported(self, lines: int, inserted: int) -> None:
        skipped = lines - inserted
        if self._replaying:
            logger.info(
                "request log %s: imported %d rows left by a previous run, %d were already stored",
                self.path,
                inserted,
                skipped,
            )
            self._replaying = False
        elif skipped:
            logger.warning("request log %s: %d rows skipped because their request_id is already stored", self.path, skipped)

        if self._lock_since is not None:
            logger.info(
                "request log %s is writable again after %.1f s, %d rows imported",
                self.path,
                time.monotonic() - self._lock_since,
                inserted,
            )
            self._lock_since = None

    def _note_locked(self, exc: duckdb.Error) -> None:
        now = time.monotonic()
        if self._lock_since is None:
            self._lock_since = now
            self._lock_last_logged = now
            logger.info(
                "request log %s is locked by another connection, rows wait in %s: %s", self.path, self.spool_path, exc
            )
        elif now - self._lock_last_logged >= _LOG_REPEAT_INTERVAL:
            self._lock_last_logged = now
            logger.warning(
                "request log %s has been locked for %.0f s, %d rows wait in %s. "
                "Close read-write sessions and keep read-only ones short.",
                self.path,
                now - self._lock_since,
                self._spool.lines,
                self.spool_path,
            )

    def _log_error_rate_limited(self, message: str, *args: Any) -> None:
        """Log an error at most once per _LOG_REPEAT_INTERVAL for each message template, with a repeat count."""
        now = time.monotonic()
        last_logged, repeats = self._error_log_state.get(message, (-math.inf, 0))
        if now - last_logged < _LOG_REPEAT_INTERVAL:
            self._error_log_state[message] = (last_logged, repeats + 1)
            return
        self._error_log_state[message] = (now, 0)
        if repeats:
            logger.error(message + " (%d similar errors since the last report)", *args, repeats)
        else:
            logger.error(message, *args)
