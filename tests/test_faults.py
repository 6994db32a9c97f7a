"""kvlens under faults: an upstream that restarts or exits, clients that leave early, signals, a failing store.

The cases tests/test_forward.py and tests/test_proxy_emulator.py already cover (refused, stalled,
not HTTP, dying mid-stream, a mid-stream disconnect) are not repeated here; neither is the disconnect
while queued (tests/test_limits.py). Processes are real where the fault is about a process: the
emulator runs as a subprocess when it must exit or restart, `kvlens serve` when it gets SIGTERM or
SIGKILL. Store failures are real too: a second connection holding the write lock, an immutable file
(`chattr +i`, which binds root as well), and a full filesystem (a small tmpfs); the last two skip,
saying why, where the machine does not allow them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import KvlensApp
from proxy.emulator import UVICORN_OPTIONS, EmulatorSettings, create_app as create_emulator
from proxy.store import SQLiteStore
from tests.servers import free_port, serve_in_thread
from tests.test_forward import kvlens, records

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def chat(text: str, max_tokens: int = 8, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": stream, **extra}


# ---- processes -----------------------------------------------------------------------------------


class EmulatorProcess:
    """`python -m proxy.emulator.cli` on a fixed port, so it can be killed and started again in place."""

    def __init__(self, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.flags = flags
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.emulator.cli", "--port", str(self.port), *self.flags],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_up(self.url + "/health", self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def set_faults(self, **faults: Any) -> None:
        httpx.post(self.url + "/_emulator/faults", json=faults).raise_for_status()


@contextlib.contextmanager
def emulator_process(*flags: str) -> Iterator[EmulatorProcess]:
    emu = EmulatorProcess(*flags)
    emu.start()
    try:
        yield emu
    finally:
        emu.kill()


def wait_until_up(url: str, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"{url}: the process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.05)


@contextlib.contextmanager
def kvlens_serve(upstream: str, db: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, Any]]:
    """`kvlens serve` as a user runs it (a subprocess), yielding its URL and the Popen."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
         "--db", str(db), *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url + "/_kvlens/health", proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """An in-process emulator: 16 slots of 80k tokens, 50k prompt tokens a second, 50 generated (streams last)."""
    app = create_emulator(EmulatorSettings(prompt_tps=50_000, gen_tps=50, slots=16, ctx=16 * 81920))
    with serve_in_thread(app, **UVICORN_OPTIONS) as url:
        yield url


def cancelled(emu: str) -> int:
    return int(httpx.get(emu + "/_emulator/state").json()["requests_cancelled"])


async def cancelled_async(client: httpx.AsyncClient, emu: str) -> int:
    return int((await client.get(emu + "/_emulator/state")).json()["requests_cancelled"])


# ---- the upstream restarts, or exits -------------------------------------------------------------


async def test_upstream_restart_kvlens_stays_up_and_recovers(tmp_path: Path) -> None:
    with emulator_process("--gen-tps", "100") as emu, kvlens(emu.url, tmp_path / "k.sqlite3") as (url, app):
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(url + CHAT, json=chat("before"))).status_code == 200

            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # cut where the upstream was cut, nothing invented
                async with client.stream("POST", url + CHAT, json=chat("long", 2000, stream=True)) as r:
                    async for chunk in r.aiter_raw():
                        received += chunk
                        if received.count(b"data: ") >= 5:
                            emu.kill()
            assert b"[DONE]" not in received

            down = await client.post(url + CHAT, json=chat("while down"))
            assert down.status_code == 502 and down.headers["x-kvlens-error"] == "upstream_connect"
            assert (await client.get(url + "/_kvlens/health")).json()["status"] == "ok"

            emu.start()  # same port: the server came back
            for i in range(3):
                again = await client.post(url + CHAT, json=chat(f"after {i}"))
                assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
            async with client.stream("POST", url + CHAT, json=chat("stream after", 20, stream=True)) as r:
                body = b"".join([c async for c in r.aiter_raw()])
            assert body.endswith(b"data: [DONE]\n\n")
        kinds = [(x.error.kind if x.error else None) for x in sorted(records(app), key=lambda x: x.started_at)]
    assert kinds == [None, "upstream_died_midstream", "upstream_connect", None, None, None, None]


async def test_exit_process_fault(tmp_path: Path) -> None:
    with emulator_process() as emu, kvlens(emu.url, tmp_path / "k.sqlite3") as (url, app):
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(url + CHAT, json=chat("warm up"))).status_code == 200
            emu.set_faults(exit_process=True)
            r = await client.post(url + CHAT, json=chat("the last one", stream=True))
            assert r.status_code == 502 and r.headers["x-kvlens-error"] == "upstream_protocol"
            assert r.json()["error"]["code"] == "upstream_protocol" and emu.url in r.json()["error"]["message"]
            assert emu.proc is not None and emu.proc.wait(10) == 1
            after = await client.post(url + CHAT, json=chat("after"))
            assert after.status_code == 502 and after.json()["error"]["code"] == "upstream_connect"
            assert (await client.get(url + "/_kvlens/health")).status_code == 200
        recs = sorted(records(app), key=lambda x: x.started_at)
    assert [x.error.kind if x.error else None for x in recs] == [None, "upstream_protocol", "upstream_connect"]
    assert recs[1].status == 502 and recs[1].stream is True


# ---- the client leaves before the first token --------------------------------------------------------


@pytest.mark.parametrize("phase", ["stalled before the response head", "during prompt processing"])
async def test_client_disconnect_before_first_token(emulator: str, tmp_path: Path, phase: str) -> None:
    if phase == "stalled before the response head":
        httpx.post(emulator + "/_emulator/faults", json={"stall_s": 5.0, "count": 1}).raise_for_status()
        body = chat("stall", 50, stream=True)
    else:  # 60k tokens at 50k tokens/s: over a second of prefill with the SSE head already sent
        body = chat("word " * 60_000, 50, stream=True)
    try:
        with kvlens(emulator, tmp_path / "k.sqlite3") as (url, app):
            before = cancelled(emulator)
            host, port = url.removeprefix("http://").split(":")
            payload = orjson.dumps(body)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
            await asyncio.sleep(0.5)
            stalled = phase == "stalled before the response head"
            head = b"" if stalled else await asyncio.wait_for(reader.read(65536), 0.2)
            async with httpx.AsyncClient() as poll:
                await cancelled_async(poll, emulator)  # the polling connection is open before the clock starts
                writer.close()
                t_closed = time.monotonic()
                while await cancelled_async(poll, emulator) == before and time.monotonic() - t_closed < 3:
                    await asyncio.sleep(0.002)
                elapsed = time.monotonic() - t_closed
            [rec] = records(app)
    finally:
        httpx.post(emulator + "/_emulator/faults", json={}).raise_for_status()
    print(f"{phase}: client gone -> upstream request cancelled in {elapsed * 1000:.1f} ms")
    assert cancelled(emulator) == before + 1
    assert elapsed < 0.5  # the issue asks for 100 ms (measured: 5-60 ms); the rest is room for a loaded CI machine
    assert rec.error is not None and rec.error.kind == "client_disconnected"
    assert rec.t_first_token_ms is None
    if phase == "during prompt processing":
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    else:
        assert rec.status is None


# ---- SIGTERM and SIGKILL under load ------------------------------------------------------------------


def _stream_all(url: str, n: int, max_tokens: int, started: threading.Event | None = None) -> list[Any]:
    """n concurrent streams; each result is its body, or the exception that ended it."""

    async def one(client: httpx.AsyncClient, i: int, first: asyncio.Event) -> Any:
        try:
            async with client.stream("POST", url + CHAT, json=chat(f"stream {i}", max_tokens, stream=True,
                                                                  ignore_eos=True)) as r:
                out = b""
                async for chunk in r.aiter_raw():
                    out += chunk
                    if b'"content":"' in out:
                        first.set()
                return out
        except httpx.HTTPError as exc:
            return exc

    async def run() -> list[Any]:
        firsts = [asyncio.Event() for _ in range(n)]
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 4)) as client:
            tasks = [asyncio.create_task(one(client, i, firsts[i])) for i in range(n)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
            if started is not None:
                started.set()
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def _stored(db: Path) -> list[Any]:
    store = SQLiteStore(db)
    try:
        return [x for x in store.iter_exchanges()]
    finally:
        store.close()


def test_sigterm_under_load_finishes_in_flight_and_loses_nothing(emulator: str, tmp_path: Path) -> None:
    db = tmp_path / "term.sqlite3"
    n = 8
    with kvlens_serve(emulator, db) as (url, proc):
        started = threading.Event()
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.extend(_stream_all(url, n, 100, started)))
        worker.start()
        assert started.wait(30)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # it stopped accepting
            httpx.get(url + "/_kvlens/health", timeout=2)
        worker.join(60)
        proc.wait(30)
        stopped = time.monotonic() - t_term
        err = proc.stderr.read() if proc.stderr else ""
    assert all(isinstance(r, bytes) and r.endswith(b"data: [DONE]\n\n") for r in results), results
    assert proc.returncode in (0, -15), err
    stored = _stored(db)
    assert len(stored) == n and all(x.error is None and x.status == 200 for x in stored)
    assert all(x.analysis and x.analysis.get("prompt_tokens") for x in stored)  # analysed before the exit
    print(f"SIGTERM with {n} streams in flight: all finished, process gone after {stopped:.2f} s, "
          f"{len(stored)} records")


def test_sigterm_grace_period_cuts_what_runs_longer(emulator: str, tmp_path: Path) -> None:
    db = tmp_path / "grace.sqlite3"
    with kvlens_serve(emulator, db, env={"KVLENS_SHUTDOWN_GRACE_S": "1"}) as (url, proc):
        started = threading.Event()
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.extend(_stream_all(url, 2, 5000, started)))
        worker.start()
        assert started.wait(30)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped = time.monotonic() - t_term
        worker.join(30)
    assert 0.9 < stopped < 10, stopped  # the grace (1 s), then the store flush
    assert all(isinstance(r, httpx.HTTPError) for r in results)  # cut, not completed: nothing invented
    stored = _stored(db)
    assert len(stored) == 2  # the cut exchanges are recorded too
    assert all(x.finish_reason is None and x.events > 0 for x in stored)
    assert all(x.error is not None and x.error.kind == "proxy_shutdown" for x in stored)


@pytest.mark.parametrize("traffic", ["store only", "analysed"])
def test_kill_9_under_load_db_opens_and_loses_at_most_the_unflushed(
    emulator: str, tmp_path: Path, traffic: str
) -> None:
    """SIGKILL gives kvlens no chance to flush: what was still waiting for the store's next batch
    (flush_interval 0.2 s) is lost, and nothing else. The file must open cleanly with every committed
    record intact. "store only" is traffic the analysis skips (GET /v1/models). "analysed" is chat
    traffic, faster than the analysis: a provisional copy of each record is stored at once, so its
    backlog loses nothing but the analysis (those records say `analysis_pending`)."""
    db = tmp_path / "kill.sqlite3"
    done: list[tuple[float, str]] = []  # (time the client had the whole response, its marker)
    stop = threading.Event()

    async def client_loop(url: str, worker: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            i = 0
            while not stop.is_set():
                marker = f"w{worker}-{i}"
                try:
                    if traffic == "store only":
                        r = await client.get(url + "/v1/models", headers={"x-marker": marker})
                    else:
                        r = await client.post(url + CHAT, json=chat(marker, 1), headers={"x-marker": marker})
                    if r.status_code == 200:
                        done.append((time.monotonic(), marker))
                except httpx.HTTPError:
                    return
                i += 1

    with kvlens_serve(emulator, db) as (url, proc):
        runner = threading.Thread(target=lambda: asyncio.run(_gather(client_loop(url, w) for w in range(8))))
        runner.start()
        time.sleep(2.0)
        metrics = httpx.get(url + "/_kvlens/metrics").text
        t_scrape = time.monotonic()
        proc.kill()
        t_kill = time.monotonic()
        proc.wait(10)
        stop.set()
        runner.join(30)

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    records = _stored(db)  # SQLiteStore opens it (and migrates)
    stored = {x.request_headers.get("x-marker") for x in records}
    completed = [(t, m) for t, m in done if t <= t_kill]
    lost = [(t, m) for t, m in completed if m not in stored]
    oldest_lost = max((t_kill - t for t, _ in lost), default=0.0)
    waiting = _value(metrics, "kvlens_store_pending")
    after_scrape = sum(1 for t, _ in completed if t > t_scrape)
    print(f"kill -9, {traffic}: {len(completed)} responses completed, {len(completed) - len(lost)} stored, "
          f"{len(lost)} lost, all finished in the last {oldest_lost * 1000:.0f} ms before the kill; "
          f"{waiting:.0f} were waiting for the store at the last scrape, {after_scrape} finished after it; "
          f"{sum(1 for x in records if x.metadata.get('analysis_pending'))} stored before their analysis")
    assert completed and stored
    # Only what was still queued for the store (the bound /metrics shows), plus at most one exchange per
    # client connection that its client had finished but kvlens had not yet handed on when it was scraped.
    assert len(lost) <= waiting + after_scrape + 8
    assert oldest_lost < 0.7  # the unflushed batch: flush_interval 0.2 s, plus slack for a loaded machine
    if traffic == "analysed":
        pending = [x for x in records if x.metadata.get("analysis_pending")]
        assert all(x.analysis is None and x.request_body is None for x in pending)
        assert all(x.analysis and x.analysis.get("prompt_tokens") for x in records if x not in pending)


def _value(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _gather(coros: Any) -> None:
    await asyncio.gather(*coros)


# ---- the store fails, traffic flows -----------------------------------------------------------------

FAST_STORE = {"flush_interval": 0.01, "busy_timeout": 0.05, "retry_initial": 0.02, "retry_max": 0.1}


def kvlens_with_store(upstream: str, store: SQLiteStore) -> contextlib.AbstractContextManager[tuple[str, KvlensApp]]:
    return kvlens(upstream, store)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/_kvlens/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _store_outage(url: str, app: KvlensApp, error: str, caplog: pytest.LogCaptureFixture, break_it: Any,
                  mend_it: Any, n: int = 30, body: str = "x") -> None:
    """Traffic during an outage all succeeds; the failures show in the metrics and the health endpoint, the
    log has one warning for the burst, and every record is written once the store recovers."""
    with httpx.Client(timeout=30) as client:
        assert client.post(url + CHAT, json=chat("before")).status_code == 200
        assert app.flush(10)
        written_before, count_before = app.store.stats.written, app.store.count()
        break_it()
        try:
            for i in range(n):
                r = client.post(url + CHAT, json=chat(f"{body} {i}"))
                assert r.status_code == 200 and "x-kvlens-error" not in r.headers
            _wait(lambda: _metric(url, "kvlens_store_write_failures_total") >= 2)
            health = client.get(url + "/_kvlens/health").json()
            assert error in (health["store"]["last_error"] or ""), health
            assert _metric(url, "kvlens_store_pending") >= 1
        finally:
            mend_it()
        assert app.flush(20)
        # Each record is written twice: the provisional copy at once, the analysed one replacing it (same id).
        assert app.store.stats.written == written_before + 2 * n and app.store.stats.dropped == 0
        assert _metric(url, "kvlens_store_pending") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "write failed" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert any("resumed" in r.getMessage() for r in caplog.records)
    assert app.store.count() == count_before + n


def test_store_locked_traffic_flows_and_writing_resumes(
    emulator: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.store")
    db = tmp_path / "locked.sqlite3"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        holder.append(conn)

    def unlock() -> None:
        for conn in holder:
            conn.rollback()
            conn.close()

    with kvlens_with_store(emulator, SQLiteStore(db, **FAST_STORE)) as (url, app):
        _store_outage(url, app, "locked", caplog, lock, unlock)


def test_store_read_only_file_traffic_flows_and_writing_resumes(
    emulator: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`chattr +i` makes the database and its WAL unwritable, root included (not the -shm, which SQLite
    maps into memory: writing to an immutable mapping is a SIGBUS, not an error)."""
    caplog.set_level(logging.INFO, logger="proxy.store")
    db = tmp_path / "ro.sqlite3"
    files = [db, db.with_name(db.name + "-wal")]

    def chattr(flag: str) -> None:
        for path in files:
            subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)

    with kvlens_with_store(emulator, SQLiteStore(db, **FAST_STORE)) as (url, app):
        assert httpx.post(url + CHAT, json=chat("create the wal")).status_code == 200
        assert app.flush(10)
        try:
            chattr("+i")
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot make a file immutable here (chattr +i): {exc}")
        chattr("-i")
        _store_outage(url, app, "disk I/O error", caplog, lambda: chattr("+i"), lambda: chattr("-i"))


def test_store_disk_full_traffic_flows_and_writing_resumes(
    emulator: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database on a 1 MiB tmpfs: SQLite fails with "database or disk is full" (ENOSPC), then the
    filesystem is grown and writing resumes."""
    caplog.set_level(logging.INFO, logger="proxy.store")
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here: {exc}")
    try:
        db = mount / "full.sqlite3"

        def fill() -> None:
            (mount / "ballast").write_bytes(b"\0" * (mount_free(mount) - 4096))

        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, capture_output=True)

        with kvlens_with_store(emulator, SQLiteStore(db, **FAST_STORE)) as (url, app):
            _store_outage(url, app, "database or disk is full", caplog, fill, grow, body="y" * 20_000)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def mount_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
