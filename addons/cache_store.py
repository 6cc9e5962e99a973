"""Storage of the response cache: cache keys, a memory store bounded in bytes with a TTL per entry, and
an optional persistent store in a SQLite file.

Entries are grouped by namespace (a project, or a group of projects that share a cache on purpose).
Each namespace has its own `cachetools.TLRUCache` whose size is counted in bytes, so one project
filling its cache never evicts another's entries.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from cachetools import TLRUCache

#: Time source of the memory store, in seconds. Tests replace it to move time without sleeping.
clock: Callable[[], float] = time.monotonic

#: Request headers that change the provider's response, so they are part of the key.
KEY_HEADERS = ("anthropic-version", "anthropic-beta", "openai-organization", "openai-project")

# Bytes counted for an entry beyond its body and headers: the object, its key and the cache's bookkeeping.
_ENTRY_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A complete successful response as the client received it, with its body decoded."""

    status: int
    #: Response headers without framing headers (content-length, transfer-encoding, content-encoding).
    headers: tuple[tuple[str, str], ...]
    body: bytes
    #: True for a server-sent-event stream; the body is then the events as the client received them.
    stream: bool
    response_model: str | None
    #: The cost of the original call in USD, or None when it was unknown.
    cost_usd: Decimal | None
    #: `clock()` when it was stored, and its lifetime in seconds.
    stored_at: float
    ttl: float

    @property
    def size(self) -> int:
        """Bytes counted against the namespace's bound."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers) + _ENTRY_OVERHEAD


def canonical_json(body: Any) -> str:
    """Serialise a JSON value with sorted keys and no whitespace, so that key order does not matter."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(
    *,
    namespace: str,
    provider: str,
    target: str,
    path: str,
    model: str | None,
    body: Any,
    headers: Iterable[tuple[str, str]],
) -> str:
    """Return the sha256 hex key of a request.

    `target` is the upstream scheme, host and port, and `headers` the values of `KEY_HEADERS` that the
    request carries. The stream flag is part of `body`, so streamed and non-streamed responses never mix.
    """
    material = {
        "namespace": namespace,
        "provider": provider,
        "target": target,
        "path": path,
        "model": model,
        "headers": sorted((name.lower(), value) for name, value in headers),
        "body": body,
    }
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


def _expires(_key: str, answer: CachedResponse, _now: float) -> float:
    return answer.stored_at + answer.ttl


def _size(answer: CachedResponse) -> int:
    return answer.size


class MemoryCache:
    """Responses in memory, one byte-bounded `TLRUCache` per namespace.

    The least recently used entries of a namespace are evicted when a new one would exceed its bound.
    Expired entries are dropped when the namespace is next read or written.
    """

    def __init__(self, max_entry_bytes: int, timer: Callable[[], float] | None = None):
        self.max_entry_bytes = max_entry_bytes
        # Looked up at each call, so that replacing the module's `clock` takes effect.
        self._timer = timer or (lambda: clock())
        self._namespaces: dict[str, TLRUCache] = {}

    def now(self) -> float:
        return self._timer()

    def get(self, namespace: str, key: str, max_age: float | None = None) -> CachedResponse | None:
        """Return the response for `key`, or None when there is none, it expired or it is older than `max_age` s."""
        cache = self._namespaces.get(namespace)
        if cache is None:
            return None
        answer = cache.get(key)
        if answer is None:
            return None
        if max_age is not None and self.now() - answer.stored_at >= max_age:
            return None
        return answer

    def put(self, namespace: str, max_bytes: int, key: str, answer: CachedResponse) -> bool:
        """Store `answer` and return True, or return False when it is larger than `max_entry_bytes` or the namespace's bound."""
        size = answer.size
        if size > self.max_entry_bytes or size > max_bytes:
            return False
        cache = self._namespaces.get(namespace)
        if cache is None:
            cache = TLRUCache(maxsize=max_bytes, ttu=_expires, timer=self._timer, getsizeof=_size)
            self._namespaces[namespace] = cache
        cache[key] = answer
        return True

    def bytes_used(self, namespace: str) -> int:
        cache = self._namespaces.get(namespace)
        return int(cache.currsize) if cache is not None else 0

    def __len__(self) -> int:
        return sum(len(cache) for cache in self._namespaces.values())


#: Wall-clock source of the persistent store, in seconds since the epoch, because its entries outlive
#: the process. Tests replace it to move time without sleeping.
wall_clock: Callable[[], float] = time.time

_DISK_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    stream INTEGER NOT NULL,
    response_model TEXT,
    cost_usd TEXT,
    PRIMARY KEY (namespace, key)
)
"""


class DiskCache:
    """The persistent tier: responses in a SQLite file that survive a restart, bounded in bytes.

    Every method does file I/O, so the gateway calls them from one worker thread, never on the event
    loop. Times in the file are wall-clock seconds (`wall_clock`). `get` and `put` convert them to and
    from the memory tier's `clock`, so an entry keeps its remaining lifetime across a restart. When the
    file grows over `max_bytes`, the oldest entries are deleted.
    """

    def __init__(self, path: Path, max_bytes: int, timer: Callable[[], float] | None = None):
        self.path = path
        self.max_bytes = max_bytes
        self._timer = timer or (lambda: clock())
        self._con: sqlite3.Connection | None = None
        self.total_bytes = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The connection is used by the one worker thread that calls every method after this one.
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute(_DISK_SCHEMA)
        self._con.execute("DELETE FROM responses WHERE expires_at <= ?", (wall_clock(),))
        self.total_bytes = self._con.execute("SELECT coalesce(sum(size), 0) FROM responses").fetchone()[0]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def get(self, namespace: str, key: str, max_age: float | None = None) -> CachedResponse | None:
        row = self._con.execute(
            "SELECT stored_at, expires_at, status, headers, body, stream, response_model, cost_usd "
            "FROM responses WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        if row is None:
            return None
        stored_at, expires_at, status, headers, body, stream, response_model, cost_usd = row
        now = wall_clock()
        if expires_at <= now:
            self._delete(namespace, key)
            return None
        age = now - stored_at
        if max_age is not None and age >= max_age:
            return None
        return CachedResponse(
            status=status,
            headers=tuple((name, value) for name, value in json.loads(headers)),
            body=bytes(body),
            stream=bool(stream),
            response_model=response_model,
            cost_usd=Decimal(cost_usd) if cost_usd is not None else None,
            stored_at=self._timer() - age,
            ttl=expires_at - stored_at,
        )

    def put(self, namespace: str, key: str, answer: CachedResponse) -> None:
        stored_at = wall_clock() - (self._timer() - answer.stored_at)
        size = answer.size
        if size > self.max_bytes:
            return
        self._delete(namespace, key)
        self._con.execute(
            "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                namespace, key, stored_at, stored_at + answer.ttl, size, answer.status,
                json.dumps(answer.headers), answer.body, int(answer.stream), answer.response_model,
                str(answer.cost_usd) if answer.cost_usd is not None else None,
            ),
        )
        self.total_bytes += size
        if self.total_bytes > self.max_bytes:
            self._evict()

    def _delete(self, namespace: str, key: str) -> None:
        row = self._con.execute("DELETE FROM responses WHERE namespace = ? AND key = ? RETURNING size", (namespace, key)).fetchone()
        if row is not None:
            self.total_bytes -= row[0]

    def _evict(self) -> None:
        self._con.execute("DELETE FROM responses WHERE expires_at <= ?", (wall_clock(),))
        self.total_bytes = self._con.execute("SELECT coalesce(sum(size), 0) FROM responses").fetchone()[0]
        rows = self._con.execute("SELECT namespace, key, size FROM responses ORDER BY stored_at").fetchall()
        for namespace, key, size in rows:
            if self.total_bytes <= self.max_bytes:
                break
            self._con.execute("DELETE FROM responses WHERE namespace = ? AND key = ?", (namespace, key))
            self.total_bytes -= size
