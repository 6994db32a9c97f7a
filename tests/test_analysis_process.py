"""The analysis runs in a child process (analysis.isolation = process, the default): it analyses what
the proxy hands it, sends every record back to the proxy's store, never loses one, and never outlives
the proxy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.analysis_process import AnalysisProcess
from proxy.analyzer import SKIPPED_QUEUE_FULL
from proxy.config import load_settings
from proxy.emulator import EmulatorSettings, create_app as create_emulator
from proxy.exchange import Exchange
from proxy.store import SQLiteStore
from tests.servers import serve_in_thread
from tests.test_faults import CHAT, chat, kvlens_serve, wait_until_up
from tests.test_forward import kvlens, records


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    settings = EmulatorSettings(prompt_tps=200_000, gen_tps=2000, ctx=65536)
    with serve_in_thread(create_emulator(settings), server_header=False, date_header=False) as url:
        yield url


def _metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in httpx.get(url + "/_kvlens/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[1])
    return 0.0


def test_analysis_runs_in_a_child_process_and_records_come_back(emulator: str, tmp_path: Path) -> None:
    with kvlens(emulator, tmp_path / "k.sqlite3") as (url, app):
        analysis = app.analyzer
        assert isinstance(analysis, AnalysisProcess)
        child = analysis._process
        assert child is not None and child.is_alive() and child.pid != os.getpid()
        messages = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "one"}]
        with httpx.Client(timeout=30) as client:
            first = client.post(url + CHAT, json={"messages": messages, "max_tokens": 8}).json()
            messages += [first["choices"][0]["message"], {"role": "user", "content": "two"}]
            assert client.post(url + CHAT, json={"messages": messages, "max_tokens": 8}).status_code == 200
            assert client.get(url + "/v1/models").status_code == 200  # not a completion: stored, not analysed
        got = sorted(records(app), key=lambda x: x.started_at)
        assert [x.path for x in got] == [CHAT, CHAT, "/v1/models"]
        one, two, models = got
        assert one.analysis and one.analysis["prompt_tokens"] > 100 and one.analysis["kind"] == "main"
        assert two.analysis and two.analysis["conversation"] == one.analysis["conversation"]
        assert two.analysis["cached_expected"] >= one.analysis["prompt_tokens"] - 1  # an append-only turn
        assert two.analysis["cached_upstream"] == two.cached_tokens
        assert models.analysis is None
        assert _metric(url, "kvlens_analysed_requests_total", kind="main") == 2  # metrics from the child's results
        assert _metric(url, "kvlens_analysis_queue_length") == 0
    assert child.exitcode == 0  # closed with the app, cleanly


def test_an_exchange_that_cannot_be_pickled_is_stored_unanalysed(tmp_path: Path) -> None:
    """The feeder thread pickles out of sight; an exchange it cannot send must not vanish with its error."""
    settings = load_settings(environ={}, overrides={"upstream_url": "http://127.0.0.1:9"})
    store = SQLiteStore(tmp_path / "k.sqlite3")
    analysis = AnalysisProcess(settings, store)
    analysis.start()
    try:
        fine = Exchange(method="GET", path="/v1/models", status=200)
        odd = Exchange(method="GET", path="/v1/models", status=200)
        odd.metadata["callback"] = lambda: None  # what a future feature might carry by mistake
        analysis.submit(fine)
        analysis.submit(odd)
        assert analysis.flush(20)
    finally:
        analysis.close()
        store.close()
    stored = {x.id: x for x in SQLiteStore(tmp_path / "k.sqlite3").iter_exchanges()}
    assert set(stored) == {fine.id, odd.id}
    assert stored[fine.id].analysis is None
    assert "could not be sent to the analysis process" in stored[odd.id].analysis["error"]
    assert analysis.skipped == 1 and analysis.pending == 0


@pytest.mark.parametrize("bound", [{"analysis_queue": 0}, {"analysis_queue_mib": 0}])
def test_a_full_queue_stores_unanalysed_and_counts(emulator: str, tmp_path: Path, bound: dict[str, int]) -> None:
    """The queue to the analysis is bounded in requests and in bytes (50k-token prompts are ~200 KB each)."""
    with kvlens(emulator, tmp_path / "k.sqlite3", **bound) as (url, app):
        with httpx.Client(timeout=30) as client:
            for i in range(3):
                assert client.post(url + CHAT, json=chat(f"q{i}")).status_code == 200
        got = records(app)
        assert len(got) == 3 and all(x.analysis == {"error": SKIPPED_QUEUE_FULL} for x in got)
        assert _metric(url, "kvlens_analysis_skipped_total") == 3


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if _alive(p)]
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_the_analysis_process_never_outlives_kvlens(emulator: str, tmp_path: Path) -> None:
    """kill -9 of `kvlens serve`: its analysis child (forked by multiprocessing's forkserver) goes too."""
    with kvlens_serve(emulator, tmp_path / "k.sqlite3") as (url, proc):
        assert httpx.post(url + CHAT, json=chat("hello"), timeout=30).status_code == 200
        descendants = _children(proc.pid)
        descendants += [g for c in descendants for g in _children(c)]
        assert len(descendants) >= 2, descendants  # the forkserver and the analysis process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait_gone(descendants)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_ctrl_c_stops_kvlens_and_its_analysis_cleanly(emulator: str, tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the analysis process included: it must
    leave the shutdown to the proxy, which analyses what was queued, stores it, and exits 0 with nothing
    alarming on stderr (no traceback, no leaked-semaphore warning from multiprocessing)."""
    import subprocess
    import sys

    from tests.servers import free_port

    db = tmp_path / "k.sqlite3"
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", emulator, "--listen", f"127.0.0.1:{port}", "--db", str(db)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url + "/_kvlens/health", proc)
        with httpx.Client(timeout=30) as client:
            for i in range(5):
                assert client.post(url + CHAT, json=chat(f"before ctrl-c {i}")).status_code == 200
        descendants = _children(proc.pid)
        descendants += [g for c in descendants for g in _children(c)]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "leaked" not in err and "Warning" not in err, err
    _wait_gone(descendants)
    stored = list(SQLiteStore(db).iter_exchanges())
    assert len(stored) == 5 and all(x.analysis and x.analysis.get("prompt_tokens") for x in stored)


def test_close_with_a_backlog_stores_every_record(tmp_path: Path) -> None:
    """Shutdown with more queued than the analysis can do before its deadline: the child is told to hurry
    and sends the rest back unanalysed, and whatever it never received is stored here; nothing is lost."""
    from proxy.analysis_process import SKIPPED_SHUTDOWN

    settings = load_settings(environ={}, overrides={"upstream_url": "http://127.0.0.1:9"})  # local tokenizer
    store = SQLiteStore(tmp_path / "k.sqlite3")
    analysis = AnalysisProcess(settings, store)
    analysis.start()
    n = 400
    try:
        for i in range(n):
            body = {"messages": [{"role": "user", "content": f"request {i} " + "lorem ipsum dolor " * 3000}]}
            analysis.submit(Exchange(method="POST", path=CHAT, status=200, request_body=orjson.dumps(body),
                                     session=f"s{i % 7}"))  # fmt: skip
        analysis.close(timeout=1.0)
        assert store.flush(30)
    finally:
        store.close()
    stored = list(SQLiteStore(tmp_path / "k.sqlite3").iter_exchanges())
    assert len(stored) == n and analysis.pending == 0
    errors = [x.analysis.get("error") for x in stored if x.analysis]
    analysed = [x for x in stored if x.analysis and x.analysis.get("prompt_tokens")]
    # How many were analysed before the deadline depends on the machine's load; that every record is
    # there, analysed or marked, and that the hurry path ran, does not.
    assert SKIPPED_SHUTDOWN in errors, (len(analysed), set(errors))
    assert len(analysed) + errors.count(SKIPPED_SHUTDOWN) == n
