"""What only the PostgreSQL store has to prove; the shared store suite (tests/test_store.py) runs on it too.

Against a real server (tests/postgres.py; skipped, saying why, only when no PostgreSQL can run):
the schema is SQLite's, the aggregates give SQLite's answers, replicas starting together migrate
once, a dropped connection or a database refusing connections is retried without losing records,
passwords stay out of logs, and every method that reads the database is PostgreSQL's own (so a read
method added to SQLiteStore cannot silently run SQLite's SQL here).
"""

from __future__ import annotations

import inspect
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.exchange import Exchange
from proxy.store import SQLiteStore, Store, open_store
from tests.test_store import FAST, make_exchange, wait_until

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")
from proxy.store.postgres import PostgresStore  # noqa: E402

SQLITE_ONLY = {"submit", "flush", "close", "pending"}  # the writer machinery PostgresStore inherits


@pytest.fixture
def stores() -> Iterator[list[Any]]:
    opened: list[Any] = []
    yield opened
    for store in opened:
        store.close(timeout=2.0)


def pg(url: str) -> Any:
    return psycopg.connect(url, autocommit=True)


def analysed(
    n: int, conversation: str, kind: str = "main", cause: str | None = "append_only", **extra: Any
) -> Exchange:
    x = make_exchange(n, **extra)
    x.analysis = {
        "conversation": conversation,
        "kind": kind,
        "cached_expected": 800 + n,
        "lost_tokens": 10 * n,
        "lost_seconds": 0.1234567 * n,
        "causes": [{"code": cause}] if cause else [],
    }
    return x


# Reads written once for both backends: they build their SQL from the dialect hooks below.
SHARED_READS = {"list_exchanges", "iter_exchanges", "sessions", "totals", "_lost_by_cause"}
DIALECT = ("_P", "_SQL_SESSIONS", "_SQL_TOTALS", "_SQL_TRUE", "_SQL_LOST_BY_CAUSE", "_full_row")


def test_every_database_method_is_postgres_own() -> None:
    for name, member in inspect.getmembers(SQLiteStore):
        if name.startswith("__") or name in SQLITE_ONLY or name in SHARED_READS or not callable(member):
            continue
        if name.startswith("_") and name not in {"_read", "_connect", "_write_batch", "_rollback",
                                                 "_close_connection", "_migrate", "_prepare_target"}:  # fmt: skip
            continue  # writer machinery: queue, backoff, drops
        assert name in PostgresStore.__dict__, f"SQLiteStore.{name} reads or writes SQLite: PostgresStore needs its own"
    for name in ("get_exchange", "count", "find_ids", *DIALECT):
        assert name in PostgresStore.__dict__, f"PostgresStore must define {name}"


def test_schema_matches_sqlite(postgres_url: str, tmp_path: Path, stores: list[Any]) -> None:
    stores += [open_store(postgres_url), open_store(tmp_path / "k.sqlite3")]
    with pg(postgres_url) as conn:
        pg_columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'exchanges'"
            " ORDER BY ordinal_position"
        )]  # fmt: skip
        pg_indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'exchanges'")}
    import sqlite3

    lite = sqlite3.connect(tmp_path / "k.sqlite3")
    try:
        lite_columns = [r[1] for r in lite.execute("PRAGMA table_info(exchanges)")]
        lite_indexes = {r[1] for r in lite.execute("PRAGMA index_list(exchanges)")}
    finally:
        lite.close()
    assert pg_columns == lite_columns
    assert pg_indexes - {"exchanges_pkey"} == {i for i in lite_indexes if not i.startswith("sqlite_autoindex")}


def test_aggregates_and_filters_match_sqlite(postgres_url: str, tmp_path: Path, stores: list[Any]) -> None:
    pgs, lite = open_store(postgres_url, **FAST), open_store(tmp_path / "k.sqlite3", **FAST)
    stores += [pgs, lite]
    records = [
        analysed(1, "c1"),
        analysed(2, "c1", kind="title", cause="side_request"),
        analysed(3, "c1", cause="volatile_datetime", status=500),
        analysed(4, "c2", cause="volatile_datetime", model=None),
        analysed(5, "c2", cause=None, error=None, status=200),
        analysed(6, "c3", cause="slot_evicted"),
        make_exchange(7),  # not analysed
        make_exchange(8, full=False),
    ]
    for store in (pgs, lite):
        for x in records:
            store.submit(x)
        assert store.flush()
    assert pgs.totals() == lite.totals()

    def normalise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # GROUP_CONCAT(DISTINCT) has no defined order in SQLite; compare the set of models
        return [{**r, "models": sorted((r["models"] or "").split(","))} for r in rows]

    assert normalise(pgs.sessions()) == normalise(lite.sessions())
    assert pgs.sessions(limit=1)[0]["conversation"] == "c3"
    for kwargs in ({"conversation": "c1"}, {"cause": "volatile_datetime"}, {"model": "gemma-3"}, {"session": "s1"},
                   {"before": records[4].started_at, "limit": 2}):  # fmt: skip
        assert [x.id for x in pgs.list_exchanges(**kwargs)] == [x.id for x in lite.list_exchanges(**kwargs)]
    assert [x.id for x in pgs.iter_exchanges(batch_size=3)] == [x.id for x in lite.iter_exchanges(batch_size=3)]
    assert pgs.find_ids("ex00000") == lite.find_ids("ex00000")
    assert pgs.get_exchange(records[0].id) == lite.get_exchange(records[0].id) == records[0]


def test_open_store_url_forms_keep_the_password_out_of_logs(
    postgres_url: str, stores: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    rest = postgres_url.removeprefix("postgresql://postgres@")
    for url in (f"postgresql://postgres:s3cret-pw@{rest}", f"postgres://postgres:s3cret-pw@{rest}",
                f"postgresql+psycopg://postgres:s3cret-pw@{rest}"):  # fmt: skip
        store = open_store(url, **FAST)
        stores.append(store)
        assert isinstance(store, PostgresStore) and isinstance(store, Store)
        assert "s3cret" not in f"{store.path} {store!r}" and store.path.startswith("postgresql://postgres@")
    store.submit(make_exchange(1, method=None))  # rejected: its warning names the store
    assert store.flush()
    assert store.stats.rejected == 1
    assert caplog.records and all("s3cret" not in r.getMessage() for r in caplog.records)
    assert all("Failing row contains" not in r.getMessage() for r in caplog.records)  # no row data in logs


def test_unreachable_server_fails_at_open_naming_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket closes
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        open_store(f"postgresql://kvlens:pw@127.0.0.1:{port}/kvlens", connect_timeout=2)
    assert time.monotonic() - started < 10
    assert any(f"postgresql://kvlens@127.0.0.1:{port}/kvlens" in note for note in info.value.__notes__)


def test_replicas_starting_together_migrate_once(postgres_url: str, stores: list[Any]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            stores.append(open_store(postgres_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(stores) == 4
    assert {s.schema_version for s in stores} == {2}
    with pg(postgres_url) as conn:
        assert conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(1,), (2,)]


def test_dropped_connections_are_retried_and_nothing_is_lost(
    postgres_url: str, postgres_server: Any, stores: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.store")
    store = open_store(postgres_url, **FAST)
    stores.append(store)
    store.submit(make_exchange(0))
    assert store.flush()
    dbname = postgres_url.rsplit("/", 1)[1]
    with pg(postgres_server.admin_url) as admin:
        # A restart, a failover, an idle-connection reaper: every kvlens connection is cut.
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'kvlens'",
            (dbname,),
        ).fetchone()[0]
        assert killed >= 1
    for n in range(1, 51):
        store.submit(make_exchange(n))
    assert store.flush(timeout=10.0)
    assert store.count() == 51 and store.stats.written == 51 and store.stats.dropped == 0
    assert store.stats.write_failures >= 1 and "terminat" in (store.stats.last_error or "")
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_database_refusing_connections_keeps_records_until_it_is_back(
    postgres_url: str, postgres_server: Any, stores: list[Any]
) -> None:
    store = open_store(postgres_url, **FAST)
    stores.append(store)
    dbname = postgres_url.rsplit("/", 1)[1]
    with pg(postgres_server.admin_url) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        try:
            for n in range(20):
                store.submit(make_exchange(n))
            wait_until(lambda: store.stats.write_failures >= 3, timeout=10)
            assert not store.flush(timeout=0.1) and store.pending == 20
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    assert store.flush(timeout=10.0)
    assert store.count() == 20 and store.stats.dropped == 0


def test_nul_in_a_text_column_is_stored_not_rejected(postgres_url: str, stores: list[Any]) -> None:
    store = open_store(postgres_url, **FAST)
    stores.append(store)
    x = make_exchange(1, model="qwen\x00evil", session="s\x00")
    store.submit(x)
    assert store.flush()
    assert store.stats.rejected == 0
    got = store.get_exchange(x.id)
    assert got is not None and got.model == "qwen\ufffdevil" and got.session == "s\ufffd"
    assert got.request_body == x.request_body and got.response_body == x.response_body
    assert store.get_exchange("ex\x00") is None and store.find_ids("ex\x00") == []


def test_reads_still_answer_after_close(postgres_url: str) -> None:
    store = open_store(postgres_url, **FAST)
    store.submit(make_exchange(1))
    store.close()
    assert store.count() == 1 and [x.id for x in store.list_exchanges()] == ["ex000001"]
