"""The cache analysis in a child process, so that it never competes with the relay for the GIL.

`proxy.analyzer.Analyzer` does 1-35 ms of pure-Python work per request (tokenizer calls, prefix
matching, the shadow cache model, the explanation). In a thread of the proxy process every one of
those milliseconds is time the event loop may wait for the GIL: benchmarks/overhead.py measured the
relay's added p99 at concurrency 1 at 6.9 ms with the analysis thread busy against 3.6 ms without it.
In a child process the operating system's scheduler, not the GIL, shares the CPU, and the child runs
at a lower priority (ANALYSIS_NICE) so that a busy machine (llama-server's own CPU threads included)
serves the traffic first.

The data flow stays the thread version's, with a pipe in the middle: the relay hands each finished
exchange to `submit` (a non-blocking put; the queue's feeder thread pickles it, not the event
loop), the child analyses it with the same `Analyzer`, and sends the record back, analysis
attached, to a collector thread here that updates the metrics and submits it to the proxy's one
store. So there is one writer per store, and the store's counters, health and logs are the proxy's.

Nothing is lost on the way out: on `close` the child analyses what is queued, and is told to hurry
(send the rest back unanalysed) when the deadline nears. What a kill -9 of the proxy loses is what
it loses with the thread: the exchanges still waiting for analysis (kvlens_analysis_queue_length)
and for the store (kvlens_store_pending). The child notices its lifeline pipe break and exits at once.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.store import Store

log = logging.getLogger("kvlens.analyzer")

ANALYSIS_NICE = 10
"""How much lower the child's CPU priority is than the proxy's (os.nice): under contention the relay
and the upstream win; the analysis catches up when the machine is idle (or its queue overflows and
requests are stored unanalysed, counted in kvlens_analysis_skipped)."""
IDLE_TICK_S = 0.5
"""How often an idle child checks that the proxy process is still there."""
SKIPPED_SHUTDOWN = "analysis skipped: kvlens was shutting down"
SKIPPED_NOT_RUNNING = "analysis skipped: the analysis process is not running"


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (Linux, macOS): each child is forked from a small clean process
    that imported the analysis once, so starting one costs milliseconds and never forks the proxy's
    threads; spawn elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["proxy.analysis_process", "proxy.analyzer"])
        return ctx
    return multiprocessing.get_context("spawn")


class AnalysisProcess:
    """The proxy's handle on the analysis child (the surface of `proxy.analyzer.Analyzer` the app uses)."""

    def __init__(self, settings: Settings, store: Store, metrics: Any | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.handoff: Any | None = None
        """`proxy.limits.PromptHandoff`: prompt counts made on the hot path travel with their exchange."""
        self.skipped = 0
        self.failures = 0
        self._sent = 0
        self._returned = 0
        self._flushes: dict[int, threading.Event] = {}
        self._flush_ids = itertools.count()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._inbox: Any = None
        self._outbox: Any = None
        self._hurry: Any = None
        self._lifeline: Connection | None = None
        self._collector: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Exchanges handed to the child whose record has not come back yet (waiting, or being analysed)."""
        return max(0, self._sent - self._returned)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        ctx = _context()
        self._inbox = _Inbox(self._unsendable, ctx=ctx)
        self._outbox, self._hurry = ctx.Queue(), ctx.Event()
        child_end, self._lifeline = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=child_main,
            args=(self.settings, self._inbox, self._outbox, self._hurry, child_end),
            name="kvlens-analysis",
            daemon=True,
        )
        self._process.start()
        child_end.close()  # the child holds the only read end: it sees EOF when this process dies
        self._collector = threading.Thread(target=self._collect, name="kvlens-analysis-records", daemon=True)
        self._collector.start()

    def submit(self, exchange: Exchange) -> None:
        """On the event loop, for every finished exchange: never blocks."""
        process = self._process
        if process is None or not process.is_alive():
            self._store_unanalysed(exchange, SKIPPED_NOT_RUNNING)
            return
        if self.pending >= self.settings.analysis_queue:
            from proxy.analyzer import SKIPPED_QUEUE_FULL

            self._store_unanalysed(exchange, SKIPPED_QUEUE_FULL)
            return
        prompt = self.handoff.take(exchange.id) if self.handoff is not None else None
        self._sent += 1
        self._inbox.put(("exchange", exchange, prompt))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is analysed and stored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        if self._process is not None and self._process.is_alive():
            done = threading.Event()
            flush_id = next(self._flush_ids)
            self._flushes[flush_id] = done
            self._inbox.put(("flush", flush_id))
            try:
                if not done.wait(timeout):
                    return False
            finally:
                self._flushes.pop(flush_id, None)
        return self.store.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 30.0) -> None:
        """Let the child finish the queue, telling it to hurry (send the rest back unanalysed) near the end;
        every record it sends back is in the store's queue when this returns."""
        process = self._process
        if process is None:
            return
        self._inbox.put(("close",))
        process.join(timeout * 0.8)
        if process.is_alive():
            self._hurry.set()
            process.join(max(1.0, timeout * 0.2))
        if process.is_alive():
            log.warning("the analysis process did not stop in time; %d records lost", self.pending)
            process.terminate()
            process.join(1.0)
        self._process = None
        self._outbox.put(("stop",))  # after the child's last record: the collector ends once it has read them
        if self._collector is not None:
            self._collector.join(10.0)
        for q in (self._inbox, self._outbox):
            q.close()
            q.join_thread()
        if self._lifeline is not None:
            self._lifeline.close()

    def _unsendable(self, message: Any, error: Exception) -> None:
        """The feeder thread could not pickle an exchange: store it here, unanalysed, rather than lose it."""
        if message and message[0] == "exchange":
            self._sent -= 1
            self._store_unanalysed(message[1], f"analysis skipped: the exchange could not be sent to the analysis "
                                               f"process ({type(error).__name__}: {error})")

    def _store_unanalysed(self, exchange: Exchange, reason: str) -> None:
        self.skipped += 1
        exchange.analysis = {"error": reason}
        if not self.settings.capture_bodies:
            exchange.request_body = exchange.response_body = None
        self.store.submit(exchange)

    def _collect(self) -> None:
        """Records coming back from the child: metrics, then the store; and flush acknowledgements."""
        while True:
            try:
                message = self._outbox.get()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "record":
                _, exchange, self.failures = message
                self._returned += 1
                if self.metrics is not None and exchange.analysis:
                    try:
                        self.metrics.observe_analysis(exchange)
                    except Exception:  # metrics must never cost the record
                        log.exception("metrics for %s failed", exchange.id)
                self.store.submit(exchange)
            elif kind == "flushed":
                event = self._flushes.get(message[1])
                if event is not None:
                    event.set()
            elif kind == "stop":
                return


class _Inbox(multiprocessing.queues.Queue):  # type: ignore[type-arg]
    """The queue to the child, whose feeder thread hands what it cannot pickle back to the proxy."""

    def __init__(self, on_error: Any, *, ctx: multiprocessing.context.BaseContext) -> None:
        super().__init__(ctx=ctx)
        self._on_error = on_error

    def __getstate__(self) -> Any:  # the child gets the pipe, not the callback
        return super().__getstate__()

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        self._on_error = None

    def _on_queue_feeder_error(self, e: Exception, obj: Any) -> None:
        if self._on_error is None:
            super()._on_queue_feeder_error(e, obj)
        else:
            self._on_error(obj, e)


# ---- the child -------------------------------------------------------------------------------------------


class _SendBack:
    """The child's stand-in for the store: every record the analyzer stores goes back to the proxy."""

    def __init__(self, outbox: Any, analyzer_failures: Any) -> None:
        self.outbox = outbox
        self.failures = analyzer_failures

    def submit(self, exchange: Exchange) -> None:
        self.outbox.put(("record", exchange, self.failures()))

    def flush(self, timeout: float | None = None) -> bool:
        return True


def child_main(settings: Settings, inbox: Any, outbox: Any, hurry: Any, lifeline: Connection) -> None:
    """The analysis process: analyse every exchange that arrives, in order, and send its record back."""
    from proxy.analyzer import Analyzer
    from proxy.limits import PromptHandoff

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the proxy decides
    try:
        os.nice(ANALYSIS_NICE)
    except OSError:
        pass
    analyzer: Analyzer
    send_back = _SendBack(outbox, lambda: analyzer.failures)
    analyzer = Analyzer(settings, send_back)  # type: ignore[arg-type]
    analyzer.handoff = PromptHandoff()
    try:
        _serve(analyzer, inbox, outbox, hurry, lifeline)
    finally:
        analyzer.tokenizer.close()
        outbox.close()
        outbox.join_thread()  # every record is in the pipe before the process exits


def _serve(analyzer: Any, inbox: Any, outbox: Any, hurry: Any, lifeline: Connection) -> None:
    findings = analyzer.findings
    while True:
        try:
            message = inbox.get(timeout=min(findings.due() or IDLE_TICK_S, IDLE_TICK_S))
        except queue.Empty:  # nothing arrived while a failure's records were held: send them
            analyzer.store_records(findings.expire())
            if _orphaned(lifeline):
                return
            continue
        kind = message[0]
        if _orphaned(lifeline):  # the proxy was killed: its store went with it, nothing here can be kept
            return
        if kind == "exchange":
            _, exchange, prompt = message
            if hurry.is_set():
                exchange.analysis = {"error": SKIPPED_SHUTDOWN}
                analyzer.store_records([exchange])
                continue
            if prompt is not None:
                analyzer.handoff.put(exchange.id, prompt)
            analyzer.analyse_and_store(exchange)
        elif kind == "flush":
            analyzer.store_records(findings.drain())
            outbox.put(("flushed", message[1]))
        elif kind == "close":
            analyzer.store_records(findings.drain())
            return


def _orphaned(lifeline: Connection) -> bool:
    """The proxy process is gone (its end of the lifeline closed, so ours reads EOF)."""
    try:
        return lifeline.poll()
    except OSError:
        return True
