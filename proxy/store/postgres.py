"""The PostgreSQL store: several kvlens replicas sharing one database.

Selected by a `postgresql://user:pass@host:port/db` target (`--db`, `[store] path`,
`KVLENS_STORE_PATH`). It is the SQLite store with another database underneath: the writer thread,
its bounded queue, the batching, the retry with backoff, the backlog that evicts the oldest records
during a long outage, `flush` and `close` are `SQLiteStore`'s own code, inherited unchanged, so both
backends fail and recover the same way. What differs is only the database side:

- the writer thread owns one connection (reopened after a failure) and commits each batch in one
  transaction; a row PostgreSQL refuses is retried alone inside a savepoint, so one bad record
  never blocks the rest, as on SQLite;
- reads come from a small `psycopg_pool.ConnectionPool` (checked on checkout, so a restarted server
  costs one failed read at most), since API calls run concurrently in threads;
- `lock_timeout` plays SQLite's `busy_timeout`: a write that waits longer for a lock fails and is
  retried later;
- the schema is the same table, columns and indexes, from `migrations_pg/` (PostgreSQL's types for
  SQLite's: DOUBLE PRECISION for REAL, BIGINT for INTEGER, BYTEA for BLOB), applied under an
  advisory lock so replicas starting together migrate once;
- the aggregates are the SQLite queries in PostgreSQL's dialect, with the same results (SUM of a
  boolean is a SUM of its 0/1 cast, NULLs sort last as in SQLite, ids compare bytewise).

Text columns cannot hold NUL characters in PostgreSQL; a NUL in one (say, a model name) is stored
as U+FFFD rather than losing the record. The JSON and the bodies keep everything.

The driver is psycopg 3 (`pip install 'kvlens[postgres]'`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from proxy.exchange import Exchange
from proxy.store import sqlite as sqlite_store
from proxy.store.sqlite import (
    _COLUMNS,
    _FIELD_COLUMNS,
    SQLiteStore,
    _exchange_from_row,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the PostgreSQL store needs psycopg 3 and psycopg-pool: pip install 'kvlens[postgres]'"
    ) from exc

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Any 64-bit constant, the same in every replica: serialises their migrations.
_MIGRATION_LOCK = 0x6B766C656E73  # "kvlens"

_UPSERT = (
    f"INSERT INTO exchanges ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS if c != 'id')}"
)
_SELECT_ONE = f"SELECT {', '.join(_FIELD_COLUMNS)}, data, request_body, response_body FROM exchanges WHERE id = %s"

# SQLite's SUM over INTEGER is a 64-bit integer; PostgreSQL's SUM over BIGINT is NUMERIC (a Decimal
# in Python), hence the casts back. ROUND(x, 3) exists for NUMERIC only.
_SESSIONS = """
SELECT conversation, COUNT(*), SUM((kind <> 'main')::int), MIN(started_at), MAX(started_at),
       STRING_AGG(DISTINCT model, ',' ORDER BY model),
       SUM(prompt_tokens)::bigint, SUM(cached_tokens)::bigint, SUM(cached_expected)::bigint, SUM(lost_tokens)::bigint,
       ROUND(SUM(lost_seconds)::numeric, 3)::float8,
       SUM((error_kind IS NOT NULL OR status >= 400)::int)
FROM exchanges WHERE conversation IS NOT NULL
GROUP BY conversation ORDER BY MAX(started_at) DESC LIMIT %s
"""
_TOTALS = """
SELECT COUNT(*), COUNT(conversation), COUNT(DISTINCT conversation), SUM(prompt_tokens)::bigint,
       SUM(cached_tokens)::bigint, SUM(cached_expected)::bigint, SUM(lost_tokens)::bigint,
       ROUND(SUM(lost_seconds)::numeric, 3)::float8,
       COALESCE(SUM((error_kind IS NOT NULL OR status >= 400)::int), 0)
FROM exchanges
"""

# Errors that concern one row, not the database (the same families as SQLite's _ROW_ERRORS):
# constraint violations, values the column types refuse, values Python cannot adapt.
_ROW_ERRORS = (
    pg_errors.IntegrityError, pg_errors.DataError, OverflowError, UnicodeEncodeError, ValueError, TypeError,
)  # fmt: skip


def redact_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host", "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


def bundled_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for each `migrations_pg/NNNN_name.sql` shipped in the package, in order."""
    return sqlite_store.bundled_migrations("migrations_pg")


def migrate(conn: psycopg.Connection[Any], migrations: Iterable[tuple[int, str, str]] | None = None) -> int:
    """Apply the migrations not yet recorded in `schema_migrations`, in order; return the version.

    Everything runs in one transaction holding an advisory lock, so replicas starting at the same
    time apply each migration once and a failed migration leaves nothing behind (PostgreSQL's DDL is
    transactional). `conn` must be in autocommit mode.
    """
    pending = sorted(bundled_migrations() if migrations is None else migrations)
    versions = [version for version, _, _ in pending]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions: {versions}")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in pending:
            if version in applied:
                continue
            conn.execute(sql.encode())  # several statements: no parameters, simple query protocol
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (version, name, time.time()),
            )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    current = int(row[0]) if row else 0
    known = max(versions, default=0)
    if current > known:
        raise RuntimeError(
            f"the database schema is at version {current}, newer than this kvlens knows ({known}); "
            "upgrade kvlens or use another database"
        )
    return current


def _pg_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The SQLite row with NUL characters in text columns replaced (PostgreSQL's text refuses them)."""
    if any(isinstance(v, str) and "\x00" in v for v in row):
        return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)
    return row


class PostgresStore(SQLiteStore):
    """A `Store` in a PostgreSQL database. See the module docstring.

    `url` is a libpq connection URI (`postgresql://user:pass@host:port/dbname?sslmode=...`).
    `pool_size` bounds the read connections (the writer has one of its own); `connect_timeout`
    bounds connecting and waiting for a pooled connection. The other options are `SQLiteStore`'s;
    `busy_timeout` becomes the writer's `lock_timeout`.
    """

    def __init__(
        self,
        url: str,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        queue_size: int = 10_000,
        *,
        busy_timeout: float = 5.0,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        if pool_size < 1 or connect_timeout <= 0:
            raise ValueError("pool_size must be at least 1 and connect_timeout positive")
        url = _libpq_url(url)
        params = conninfo_to_dict(url)  # raises ProgrammingError on a malformed URL
        extra: dict[str, Any] = {"connect_timeout": max(2, round(connect_timeout))}
        if "application_name" not in params:
            extra["application_name"] = "kvlens"
        self._conninfo = make_conninfo(url, **extra)
        self._connect_timeout = connect_timeout
        self._closed = False
        self._pool = ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=pool_size,
            open=False,
            check=ConnectionPool.check_connection,
            name="kvlens-store-read",
            timeout=connect_timeout,
        )
        super().__init__(
            url,
            batch_size,
            flush_interval,
            queue_size,
            busy_timeout=busy_timeout,
            retry_initial=retry_initial,
            retry_max=retry_max,
        )
        # The writer connected and migrated: the database is there; fill the pool in the background.
        self._pool.open(wait=False)

    def __repr__(self) -> str:
        return f"PostgresStore({self.path!r})"

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        if not self._closed:
            self._closed = True
            self._pool.close()

    # Reading, blocking, on pooled connections: SQLiteStore's queries in PostgreSQL's dialect.

    _P = "%s"
    _SQL_SESSIONS = _SESSIONS
    _SQL_TOTALS = _TOTALS
    _SQL_TRUE = "TRUE"
    _SQL_LOST_BY_CAUSE = ("SELECT top_cause, ROUND(SUM(lost_seconds)::numeric, 3)::float8 FROM exchanges WHERE {where}"
                          " AND top_cause IS NOT NULL GROUP BY top_cause ORDER BY SUM(lost_seconds) DESC NULLS LAST")

    def _full_row(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        return _bodies(row)

    def get_exchange(self, id: str) -> Exchange | None:
        if "\x00" in id:
            return None
        row = self._read(lambda conn: conn.execute(_SELECT_ONE, (id,)).fetchone())
        return _exchange_from_row(_bodies(row), with_bodies=True) if row is not None else None

    def count(self) -> int:
        return int(self._read(lambda conn: _one(conn.execute("SELECT COUNT(*) FROM exchanges").fetchone())))

    def find_ids(self, prefix: str, limit: int = 10) -> list[str]:
        if "\x00" in prefix:
            return []
        return super().find_ids(prefix, limit)  # id is COLLATE "C": the same bytewise range scan as SQLite's

    def _read(self, query: Callable[[Any], T]) -> T:
        if self._closed:  # after close(), as SQLite does, still answer (on a connection of its own)
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                return query(conn)
        with self._pool.connection(timeout=self._connect_timeout) as conn:
            return query(conn)

    # The writer thread's database side.

    def _prepare_target(self, path: Any) -> Any:
        return redact_url(str(path))

    def _migrate(self, conn: Any) -> int:
        return migrate(conn)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            # SQLite's busy_timeout: how long one write waits for a lock before failing (0 would
            # mean "forever" to PostgreSQL, so the shortest wait stands in for "do not wait").
            lock_ms = max(1, round(self._busy_timeout * 1000))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{lock_ms}ms",))
        except BaseException:
            conn.close()
            raise
        return conn

    def _write_batch(self, rows: list[tuple[Any, ...]]) -> int:
        """Commit rows in one transaction; return how many the database refused."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        conn = self._conn
        rows = [_pg_row(row) for row in rows]
        rejected = 0
        try:
            with conn.transaction():
                try:
                    with conn.transaction(), conn.cursor() as cur:  # a savepoint
                        cur.executemany(_UPSERT, rows)
                except _ROW_ERRORS:
                    # A row the database will never take: insert one by one, each in its own
                    # savepoint, and skip the refused ones; any other error fails the whole batch,
                    # to be retried.
                    errors = []
                    for row in rows:
                        try:
                            with conn.transaction():
                                conn.execute(_UPSERT, row)
                        except _ROW_ERRORS as exc:
                            errors.append(f"{row[0]}: {type(exc).__name__}: {_primary(exc)}")
                    rejected = len(errors)
                    if errors:
                        self._rejected(rejected, errors[0])
        except BaseException:
            self._rollback()
            raise
        return rejected

    def _rollback(self) -> None:
        # conn.transaction() has rolled back already; a connection left broken is dropped, to be
        # reopened on the next attempt.
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self._close_connection()

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None


def _libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style `postgresql+psycopg://` and `postgres://` URLs too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    return f"postgresql://{rest}" if scheme.lower().startswith(("postgresql", "postgres")) else url


def _bodies(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """BYTEA comes back as bytes (or memoryview with some loaders): make the bodies bytes."""
    *head, req, resp = row
    return (*head, bytes(req) if isinstance(req, memoryview) else req,
            bytes(resp) if isinstance(resp, memoryview) else resp)  # fmt: skip


def _primary(exc: BaseException) -> str:
    """An error's first line: PostgreSQL's DETAIL would copy the refused row (and its bodies) into the log."""
    diag = getattr(exc, "diag", None)
    message = getattr(diag, "message_primary", None) if diag is not None else None
    return message or (str(exc).splitlines() or [""])[0]


def _one(row: tuple[Any, ...] | None) -> Any:
    return row[0] if row else 0
