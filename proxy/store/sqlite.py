"""The SQLite store: one writer thread fed by a bounded queue, reads on their own connections.

Datasette's pattern (`Database._execute_writes`): a single thread owns the only write connection,
so writes never contend with each other inside the process, and `submit` is just an append to a
deque under a lock held for microseconds. The writer takes everything queued, waiting up to
`flush_interval` for a batch to fill, and commits each `batch_size` chunk in one transaction. The
database is in WAL mode, so readers (a fresh connection per call) see committed data without
waiting for the writer, and the writer does not wait for them.

The store fails, traffic still flows: a failed batch (disk full, database locked by another
process beyond `busy_timeout`, read-only file) stays in memory and is retried with exponential
backoff, new records keep joining the backlog (the oldest are evicted beyond `queue_size`), and
writing resumes on its own when the database accepts writes again. Each burst of failures or drops
logs one warning. A record the database refuses outright (or that cannot be serialised) is counted
as rejected and skipped, so one bad record never blocks the rest.

Schema changes are numbered files in `migrations/` (`0001_init.sql`, ...), applied in order by
`migrate`, which records each in the `schema_migrations` table.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import orjson

from proxy.exchange import Exchange, plain
from proxy.store.base import StoreStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Record fields kept in real columns; the record is rebuilt from these plus the `data` JSON.
_FIELD_COLUMNS = ("id", "started_at", "method", "path", "session", "model", "stream", "status", "t_done_ms")
# Values `Exchange.to_dict` derives from other fields: stored as columns for filters and sorting,
# left out of `data` because they are recomputed from the record.
_DERIVED = ("prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms", "prompt_tps", "gen_tps")
_DATA_FIELDS = tuple(
    f.name for f in dataclasses.fields(Exchange)
    if f.name not in _FIELD_COLUMNS + _DERIVED + ("request_body", "response_body")
)  # fmt: skip
_COLUMNS = (
    "id", "started_at", "method", "path", "session", "model", "stream", "status", "error_kind",
    "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms", "t_done_ms", "prompt_tps", "gen_tps",
    "data", "request_body", "response_body",
    "conversation", "kind", "cached_expected", "lost_tokens", "lost_seconds", "top_cause",
)  # fmt: skip
# OR REPLACE: a retried batch that did commit after all, or a record submitted again, overwrites.
_INSERT = f"INSERT OR REPLACE INTO exchanges ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT_LIST = f"SELECT {', '.join(_FIELD_COLUMNS)}, data FROM exchanges"
_SELECT_ONE = f"SELECT {', '.join(_FIELD_COLUMNS)}, data, request_body, response_body FROM exchanges WHERE id = ?"

# Aggregates for /_kvlens/api/sessions and /_kvlens/api/stats (analysed chat/completion requests).
_SESSION_FIELDS = ("conversation", "requests", "side_requests", "first_started_at", "last_started_at", "models",
                   "prompt_tokens", "cached_tokens", "cached_expected", "lost_tokens", "lost_seconds", "errors")
_SESSIONS = """
SELECT conversation, COUNT(*), SUM(kind != 'main'), MIN(started_at), MAX(started_at), GROUP_CONCAT(DISTINCT model),
       SUM(prompt_tokens), SUM(cached_tokens), SUM(cached_expected), SUM(lost_tokens), ROUND(SUM(lost_seconds), 3),
       SUM(error_kind IS NOT NULL OR status >= 400)
FROM exchanges WHERE conversation IS NOT NULL
GROUP BY conversation ORDER BY MAX(started_at) DESC LIMIT ?
"""
_TOTAL_FIELDS = ("requests", "analysed", "conversations", "prompt_tokens", "cached_tokens", "cached_expected",
                 "lost_tokens", "lost_seconds", "errors")
_TOTALS = """
SELECT COUNT(*), COUNT(conversation), COUNT(DISTINCT conversation), SUM(prompt_tokens), SUM(cached_tokens),
       SUM(cached_expected), SUM(lost_tokens), ROUND(SUM(lost_seconds), 3),
       COALESCE(SUM(error_kind IS NOT NULL OR status >= 400), 0)
FROM exchanges
"""

# Errors that concern one row, not the database: the rest of the batch can still be written.
_ROW_ERRORS = (
    sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError,
    OverflowError, UnicodeEncodeError, ValueError, TypeError,
)  # fmt: skip

_MIGRATION_FILE = re.compile(r"^(\d+)_[A-Za-z0-9_.-]*\.sql$")
_REJECT_LOG_INTERVAL = 60.0


# Rows.


def exchange_row(x: Exchange) -> tuple[Any, ...]:
    """The `exchanges` row for a record, in `_COLUMNS` order.

    The `data` column holds the fields that have no column of their own. The writer thread builds it
    for every record while the event loop may be waiting for the GIL, so it is a shallow dict that
    orjson serialises as it is (nested dicts, lists and the error dataclass included), not a deep copy."""
    data = {name: getattr(x, name) for name in _DATA_FIELDS}
    return (
        x.id, x.started_at, x.method, x.path, x.session, x.model, int(bool(x.stream)), x.status,
        x.error.kind if x.error is not None else None,
        x.prompt_tokens, x.completion_tokens, x.cached_tokens, x.ttft_ms, x.t_done_ms, x.prompt_tps, x.gen_tps,
        _dumps(data), x.request_body, x.response_body,
        *_analysis_columns(x),
    )  # fmt: skip


def _analysis_columns(x: Exchange) -> tuple[Any, ...]:
    """Copies of the analysis' headline numbers (migration 0002), for filters and aggregates."""
    a = x.analysis or {}
    causes = a.get("causes") or []
    top = causes[0].get("code") if causes and isinstance(causes[0], dict) else None
    return (a.get("conversation"), a.get("kind"), a.get("cached_expected"), a.get("lost_tokens"),
            a.get("lost_seconds"), top)  # fmt: skip


def _exchange_from_row(row: tuple[Any, ...], with_bodies: bool) -> Exchange:
    n = len(_FIELD_COLUMNS)
    data = _loads(row[n])
    data.update(zip(_FIELD_COLUMNS, row[:n]))
    data["stream"] = bool(data["stream"])
    x = Exchange.from_dict(data)
    if with_bodies:
        x.request_body, x.response_body = row[n + 1], row[n + 2]
    return x


def _fetch_all(sql: str, params: Sequence[Any], conn: sqlite3.Connection) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _dumps(data: dict[str, Any]) -> str:
    try:
        return orjson.dumps(data).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits, lone surrogates, non-string keys and unknown
        # types; the stdlib encoder copes with the first three and turns the rest into their repr,
        # so a record with odd metadata is still stored.
        return json.dumps(plain(data), default=repr)


def _loads(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = json.loads(text)  # what the stdlib fallback in _dumps wrote (NaN, escaped surrogates)
    if not isinstance(value, dict):
        raise TypeError("exchanges.data is not a JSON object")
    return value


# Migrations.


def bundled_migrations(folder_name: str = "migrations") -> list[tuple[int, str, str]]:
    """(version, name, sql) for each `<folder_name>/NNNN_name.sql` shipped in the package, in order."""
    folder = importlib.resources.files("proxy.store").joinpath(folder_name)
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: sqlite3.Connection, migrations: Iterable[tuple[int, str, str]] | None = None) -> int:
    """Apply the migrations not yet recorded in `schema_migrations`, in order; return the version.

    Each migration runs in its own `BEGIN IMMEDIATE` transaction together with the row recording
    it, so a failed migration leaves nothing behind and two processes opening a new file at once
    do not both apply it. `conn` must be in autocommit mode (`isolation_level=None`).
    """
    pending = sorted(bundled_migrations() if migrations is None else migrations)
    versions = [version for version, _, _ in pending]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions: {versions}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for version, name, sql in pending:
        if version in applied:
            continue
        quoted = name.replace("'", "''")
        script = (
            f"BEGIN IMMEDIATE;\n{sql}\n;\n"
            "INSERT INTO schema_migrations (version, name, applied_at) "
            f"VALUES ({version}, '{quoted}', {time.time()!r});\n"
            "COMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Another process may have applied it between our check and our BEGIN.
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone() is None:
                raise
    current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
    known = max(versions, default=0)
    if current > known:
        raise RuntimeError(
            f"the database schema is at version {current}, newer than this kvlens knows ({known}); "
            "upgrade kvlens or use another database file"
        )
    return int(current)


# The store.


class SQLiteStore:
    """A `Store` in one SQLite file. See the module docstring for the threading and failure model.

    `busy_timeout` (seconds) bounds how long one write or read waits for a lock held by another
    process; `retry_initial` and `retry_max` bound the backoff between attempts while writes fail.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        queue_size: int = 10_000,
        *,
        busy_timeout: float = 5.0,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        if batch_size < 1 or queue_size < 1:
            raise ValueError("batch_size and queue_size must be at least 1")
        if flush_interval < 0 or busy_timeout < 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("invalid store timing settings")
        self.path = self._prepare_target(path)
        self.stats = StoreStats()
        self.schema_version = 0
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue_size = queue_size
        self._batch_target = min(batch_size, queue_size)
        self._busy_timeout = busy_timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max

        # Shared between submit/flush/close and the writer, guarded by _lock.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the writer
        self._done = threading.Condition(self._lock)  # wakes flush() callers
        self._queue: deque[tuple[int, Exchange]] = deque()
        self._submitted = 0  # sequence number of the last accepted record
        self._taken = 0  # sequence number of the last record the writer took from the queue
        self._resolved = 0  # every record up to this sequence number is written, rejected or dropped
        self._hurry = False  # flush() wants a write attempt now
        self._closing = False
        self._close_deadline = math.inf
        self._drop_burst = 0  # records dropped since the current burst of drops began
        self._backlog: deque[tuple[int, tuple[Any, ...]]] = deque()  # taken, not yet written

        # Writer thread only.
        self._conn: sqlite3.Connection | None = None
        self._failures_in_burst = 0
        self._retry_delay = 0.0
        self._retry_at = 0.0
        self._last_reject_log = -math.inf

        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvlens-store-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            self._thread.join()
            self._init_error.add_note(f"kvlens store: {self.path}")
            raise self._init_error

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # The database side, overridden by the PostgreSQL store (which keeps the writer machinery).

    def _prepare_target(self, path: Any) -> Any:
        """What `self.path` holds (logged in messages); creates the file's directory."""
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _migrate(self, conn: Any) -> int:
        return migrate(conn)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Writing, from any thread.

    def submit(self, exchange: Exchange) -> None:
        with self._lock:
            if self._closing or len(self._queue) >= self._queue_size:
                self.stats.dropped += 1
                self._drop_burst += 1
                first = self._drop_burst == 1
                reason = "the store is closed" if self._closing else f"the write queue is full ({self._queue_size})"
            else:
                self._submitted += 1
                self._queue.append((self._submitted, exchange))
                waiting = len(self._queue)
                # Wake the writer for the first record (it then lingers for a batch) and when a
                # batch is ready; waking it per record would only cost CPU on the event loop.
                if waiting == 1 or waiting == self._batch_target:
                    self._work.notify()
                return
        if first:
            logger.warning("kvlens store %s: dropping records, %s (one warning per burst)", self.path, reason)

    def flush(self, timeout: float = 5.0) -> bool:
        with self._lock:
            target = self._submitted
            if self._resolved >= target:
                return True
            self._hurry = True
            self._work.notify()
            return self._done.wait_for(lambda: self._resolved >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
                self._work.notify()
        # A write attempt that started just before the deadline may wait out busy_timeout.
        self._thread.join(timeout + self._busy_timeout + 1.0)
        if self._thread.is_alive():
            logger.warning("kvlens store %s: the writer did not stop within %.1f s", self.path, timeout)

    @property
    def pending(self) -> int:
        """Records accepted but not yet written (queued or waiting for a retry)."""
        with self._lock:
            return len(self._queue) + len(self._backlog)

    # Reading, blocking, on a fresh connection per call. The SQL differs between the backends only in
    # these (PostgresStore overrides them): the parameter placeholder and the aggregate queries.

    _P = "?"
    _SQL_SESSIONS = _SESSIONS
    _SQL_TOTALS = _TOTALS
    _SQL_TRUE = "1"
    _SQL_LOST_BY_CAUSE = ("SELECT top_cause, ROUND(SUM(lost_seconds), 3) FROM exchanges WHERE {where} AND top_cause "
                          "IS NOT NULL GROUP BY top_cause ORDER BY SUM(lost_seconds) DESC")

    def _full_row(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """A row with the bodies as the database driver returns them, made ready for `_exchange_from_row`."""
        return row

    def list_exchanges(
        self,
        limit: int = 50,
        session: str | None = None,
        model: str | None = None,
        before: float | None = None,
        conversation: str | None = None,
        cause: str | None = None,
    ) -> list[Exchange]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("session", session), ("model", model), ("conversation", conversation),
                              ("top_cause", cause)):  # fmt: skip
            if value is not None:
                clauses.append(f"{column} = {self._P}")
                params.append(value)
        if before is not None:
            clauses.append(f"started_at < {self._P}")
            params.append(before)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT_LIST}{where} ORDER BY started_at DESC, id DESC LIMIT {self._P}"
        rows = self._read(lambda conn: conn.execute(sql, [*params, limit]).fetchall())
        return [_exchange_from_row(row, with_bodies=False) for row in rows]

    def get_exchange(self, id: str) -> Exchange | None:
        row = self._read(lambda conn: conn.execute(_SELECT_ONE, (id,)).fetchone())
        return _exchange_from_row(row, with_bodies=True) if row is not None else None

    def iter_exchanges(
        self,
        session: str | None = None,
        since: float | None = None,
        until: float | None = None,
        batch_size: int = 500,
    ) -> Iterator[Exchange]:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        clauses: list[str] = []
        params: list[Any] = []
        p = self._P
        if session is not None:
            clauses.append(f"session = {p}")
            params.append(session)
        if since is not None:
            clauses.append(f"started_at >= {p}")
            params.append(since)
        if until is not None:
            clauses.append(f"started_at < {p}")
            params.append(until)
        base = f"SELECT {', '.join(_FIELD_COLUMNS)}, data, request_body, response_body FROM exchanges"
        after: tuple[float, str] | None = None
        while True:
            # Keyset paging on (started_at, id): each batch is its own short read, so the writer is
            # never held up by a long export and records written meanwhile do not shift the pages.
            where = list(clauses)
            args = list(params)
            if after is not None:
                where.append(f"(started_at > {p} OR (started_at = {p} AND id > {p}))")
                args += [after[0], after[0], after[1]]
            sql = f"{base}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY started_at, id LIMIT {p}"
            rows = self._read(functools.partial(_fetch_all, sql, (*args, batch_size)))
            for row in rows:
                yield _exchange_from_row(self._full_row(row), with_bodies=True)
            if len(rows) < batch_size:
                return
            after = (rows[-1][1], rows[-1][0])

    def count(self) -> int:
        return int(self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM exchanges").fetchone()[0]))

    def sessions(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._read(lambda conn: conn.execute(self._SQL_SESSIONS, (limit,)).fetchall())
        out = []
        for row in rows:
            item = dict(zip(_SESSION_FIELDS, row))
            prompt, cached = item["prompt_tokens"] or 0, item["cached_tokens"] or 0
            item["reuse"] = round(cached / prompt, 4) if prompt else None
            item["lost_seconds_by_cause"] = self._lost_by_cause(f"conversation = {self._P}", (item["conversation"],))
            out.append(item)
        return out

    def totals(self) -> dict[str, Any]:
        row = self._read(lambda conn: conn.execute(self._SQL_TOTALS).fetchone())
        totals = dict(zip(_TOTAL_FIELDS, row or ()))
        prompt, cached = totals["prompt_tokens"] or 0, totals["cached_tokens"] or 0
        totals["reuse"] = round(cached / prompt, 4) if prompt else None
        totals["lost_seconds_by_cause"] = self._lost_by_cause(self._SQL_TRUE, ())
        totals["requests_by_cause"] = dict(
            self._read(lambda conn: conn.execute(
                "SELECT top_cause, COUNT(*) FROM exchanges WHERE top_cause IS NOT NULL GROUP BY top_cause"
                " ORDER BY COUNT(*) DESC").fetchall())
        )
        return totals

    def _lost_by_cause(self, where: str, params: tuple[Any, ...]) -> dict[str, float]:
        sql = self._SQL_LOST_BY_CAUSE.format(where=where)
        return {cause: value or 0.0 for cause, value in self._read(lambda conn: conn.execute(sql, params).fetchall())}

    def find_ids(self, prefix: str, limit: int = 10) -> list[str]:
        # ids are hex, so a range scan on the primary key replaces LIKE (which would need escaping)
        p = self._P
        query = f"SELECT id FROM exchanges WHERE id >= {p} AND id < {p} ORDER BY started_at DESC LIMIT {p}"
        upper = prefix + "\U0010ffff"
        return [row[0] for row in self._read(lambda conn: conn.execute(query, (prefix, upper, limit)).fetchall())]

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA query_only = ON")
            return query(conn)
        finally:
            conn.close()

    # The writer thread.

    def _run(self) -> None:
        try:
            self._conn = self._connect()
            self.schema_version = self._migrate(self._conn)
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__ in the caller's thread
            self._init_error = exc
            self._close_connection()
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                if not self._step():
                    break
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the writer: count, back off, go on
                self._failed(exc)
                if self._closing and time.monotonic() >= self._close_deadline:
                    self._give_up()
                    break
        self._close_connection()
        with self._lock:
            self._resolved = self._submitted
            self._done.notify_all()

    def _step(self) -> bool:
        """One cycle: wait, take the queue, write. False once closing and everything is written."""
        with self._lock:
            self._wait()
            taken, self._queue = self._queue, deque()
            if taken:
                self._taken = taken[-1][0]
            self._hurry = False
            closing = self._closing
        self._absorb(taken)
        written_all = self._write_backlog()
        if closing:
            with self._lock:
                if written_all and not self._queue:
                    return False
            if not written_all and time.monotonic() >= self._close_deadline:
                self._give_up()
                return False
        return True

    def _wait(self) -> None:
        """With _lock held: back off while failing, then wait for a record and linger for a batch."""
        if self._failures_in_burst:
            while not self._hurry:
                until = min(self._retry_at, self._close_deadline) if self._closing else self._retry_at
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._work.wait(remaining)
            if self._backlog or self._queue or self._closing:
                return
        while not self._queue and not self._closing:
            self._work.wait()
        end = time.monotonic() + self._flush_interval
        while len(self._queue) < self._batch_target and not self._closing and not self._hurry:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._work.wait(remaining)

    def _absorb(self, taken: deque[tuple[int, Exchange]]) -> None:
        """Turn taken records into rows on the backlog, evicting the oldest beyond queue_size."""
        for seq, exchange in taken:
            try:
                row = exchange_row(exchange)
            except Exception as exc:  # noqa: BLE001 - any record the code cannot serialise is skipped
                self._rejected(1, f"{getattr(exchange, 'id', '?')}: {type(exc).__name__}: {exc}")
                continue
            self._backlog.append((seq, row))
        excess = len(self._backlog) - self._queue_size
        first = False
        with self._lock:
            for _ in range(max(excess, 0)):
                self._backlog.popleft()
            if excess > 0:
                self.stats.dropped += excess
                first = self._drop_burst == 0
                self._drop_burst += excess
        if first:
            logger.warning(
                "kvlens store %s: writes keep failing, dropping the oldest unwritten records "
                "(at most %d are kept; one warning per burst)",
                self.path,
                self._queue_size,
            )
        self._settle()

    def _write_backlog(self) -> bool:
        """Write the backlog in batch_size transactions; False if a write failed (batch kept)."""
        while self._backlog:
            chunk = list(itertools.islice(self._backlog, self._batch_size))
            try:
                rejected = self._write_batch([row for _, row in chunk])
            except Exception as exc:  # noqa: BLE001 - whatever failed, the batch is kept and retried
                self._failed(exc)
                return False
            with self._lock:
                for _ in chunk:
                    self._backlog.popleft()
                self.stats.written += len(chunk) - rejected
                self.stats.batches += 1
            if self._failures_in_burst:
                logger.info(
                    "kvlens store %s: writes resumed after %d failed attempts", self.path, self._failures_in_burst
                )
                self._failures_in_burst = 0
            self._settle()
        return True

    def _write_batch(self, rows: list[tuple[Any, ...]]) -> int:
        """Commit rows in one transaction; return how many the database refused."""
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        rejected = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
            except _ROW_ERRORS:
                # A row the database will never take: insert one by one (OR REPLACE makes the rows
                # already inserted harmless) and skip the refused ones; OperationalError still
                # fails the whole batch, to be retried.
                errors = []
                for row in rows:
                    try:
                        conn.execute(_INSERT, row)
                    except _ROW_ERRORS as exc:
                        errors.append(f"{row[0]}: {type(exc).__name__}: {exc}")
                rejected = len(errors)
                if errors:
                    self._rejected(rejected, errors[0])
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return rejected

    def _failed(self, exc: Exception) -> None:
        """Count a failed attempt, log once per burst, and schedule the retry."""
        error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.stats.write_failures += 1
            self.stats.last_error = error
        self._failures_in_burst += 1
        if self._failures_in_burst == 1:
            self._retry_delay = self._retry_initial
            logger.warning(
                "kvlens store %s: write failed (%s); keeping records in memory and retrying (one warning per burst)",
                self.path,
                error,
            )
        else:
            self._retry_delay = min(self._retry_delay * 2, self._retry_max)
        self._retry_at = time.monotonic() + self._retry_delay

    def _rejected(self, n: int, error: str) -> None:
        with self._lock:
            self.stats.rejected += n
            self.stats.last_error = f"rejected {error}"
        now = time.monotonic()
        if now - self._last_reject_log >= _REJECT_LOG_INTERVAL:
            self._last_reject_log = now
            logger.warning("kvlens store %s: record not stored, %s (rate-limited)", self.path, error)

    def _settle(self) -> None:
        """Publish progress to flush() callers; end a burst of drops once the writer caught up."""
        with self._lock:
            self._resolved = self._backlog[0][0] - 1 if self._backlog else self._taken
            self._done.notify_all()
            caught_up = self._drop_burst if not self._backlog and not self._queue else 0
            if caught_up:
                self._drop_burst = 0
        if caught_up:
            logger.info("kvlens store %s: caught up; %d records were dropped", self.path, caught_up)

    def _give_up(self) -> None:
        with self._lock:
            lost = len(self._backlog) + len(self._queue)
            self._backlog.clear()
            self._queue.clear()
            self.stats.dropped += lost
            error = self.stats.last_error
        logger.warning("kvlens store %s: closed with %d records unwritten (%s)", self.path, lost, error)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # e.g. a network filesystem: still works, but readers and the writer take turns.
                logger.warning("kvlens store %s: WAL mode unavailable (journal_mode=%s)", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _rollback(self) -> None:
        if self._conn is None:
            return
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._close_connection()  # reopened on the next attempt

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
