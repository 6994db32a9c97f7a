"""The cache analysis in a child process, so that it never competes with the relay for the GIL.

`proxy.analyzer.Analyzer` does 1-35 ms of pure-Python work per request (tokenizer calls, prefix
matching, the shadow cache model, the explanation), more for 50k-token prompts. In a thread of the
proxy process every one of those milliseconds is time the event loop may wait for the GIL:
benchmarks/overhead.py measured the relay's added p99 at concurrency 1 at 6.9 ms with the analysis
thread busy against 3.6 ms without it (1.5 ms with the analysis in this child process). In a child
process the operating system's scheduler, not the GIL, shares the CPU, and the child runs at a lower
priority (ANALYSIS_NICE) so that a busy machine (llama-server's own CPU threads included) serves the
traffic first.

The data flow is the thread version's with two pipes in the middle: the relay hands each finished
exchange to `submit` (an append to a queue; a sender thread pickles and writes it, never the event
loop), the child analyses it with the same `Analyzer` and sends the record back, analysis attached,
to a collector thread here that updates the metrics and submits it to the proxy's one store. So
each store has one writer, and its counters, health and logs are the proxy's.

What waits for analysis is bounded in count (analysis.queue) and in bytes (analysis.queue_mib):
beyond either, records are stored at once, unanalysed, and counted (kvlens_analysis_skipped).
Nothing is lost on the way out: `close` lets the child analyse what is queued, tells it to hurry
(send the rest back unanalysed) when the deadline nears, and stores whatever was never sent itself.
A kill -9 of the proxy loses what it loses with the thread: the exchanges waiting for analysis and
for the store (both on /metrics). The child then reads EOF (or a broken pipe) and exits.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from proxy.analyzer import SKIPPED_QUEUE_FULL
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.store import Store

log = logging.getLogger("kvlens.analyzer")

ANALYSIS_NICE = 10
"""How much lower the child's CPU priority is than the proxy's (os.nice): under contention the relay
and the upstream win; the analysis catches up when the machine is idle (or its queue overflows and
requests are stored unanalysed, counted in kvlens_analysis_skipped)."""
IDLE_TICK_S = 0.5
"""How often an idle child looks for failed requests' records whose findings window has passed."""
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
        self.max_bytes = settings.analysis_queue_mib * 1024 * 1024
        # Each counter has one writer: the event loop counts what goes out, the collector what comes back.
        self._sent = self._sent_bytes = 0
        self._returned = self._returned_bytes = 0
        self._sizes: dict[str, int] = {}
        self._flushes: dict[int, threading.Event] = {}
        self._flush_ids = itertools.count()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._sender: _Sender | None = None
        self._hurry: Any = None
        self._collector: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Exchanges handed to the child whose record has not come back yet (queued, or being analysed)."""
        return max(0, self._sent - self._returned)

    @property
    def pending_bytes(self) -> int:
        return max(0, self._sent_bytes - self._returned_bytes)

    def start(self) -> None:
        ctx = _context()
        to_child, from_proxy = ctx.Pipe(duplex=False)[::-1]
        from_child, to_proxy = ctx.Pipe(duplex=False)
        self._hurry = ctx.RawValue("b", 0)  # shared memory, no lock: one writer (here), one reader
        self._process = ctx.Process(
            target=child_main, args=(self.settings, from_proxy, to_proxy, self._hurry),
            name="kvlens-analysis", daemon=True,
        )  # fmt: skip
        self._process.start()
        from_proxy.close()  # the child holds the only copies now: each side sees EOF when the other is gone
        to_proxy.close()
        self._sender = _Sender(to_child, self._unsendable)
        self._sender.start()
        self._collector = threading.Thread(target=self._collect, args=(from_child,), name="kvlens-analysis-records",
                                           daemon=True)  # fmt: skip
        self._collector.start()

    def submit(self, exchange: Exchange) -> None:
        """On the event loop, for every finished exchange: never blocks."""
        if self._sender is None or self._process is None or not self._process.is_alive():
            self._store_unanalysed(exchange, SKIPPED_NOT_RUNNING)
            return
        size = len(exchange.request_body or b"") + len(exchange.response_body or b"")
        if self.pending >= self.settings.analysis_queue or self.pending_bytes + size > self.max_bytes:
            self._store_unanalysed(exchange, SKIPPED_QUEUE_FULL)
            return
        prompt = self.handoff.take(exchange.id) if self.handoff is not None else None
        self._sizes[exchange.id] = size
        self._sent += 1
        self._sent_bytes += size
        self._sender.put(("exchange", exchange, prompt))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is analysed and stored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        if self._sender is not None and self._process is not None and self._process.is_alive():
            done = threading.Event()
            flush_id = next(self._flush_ids)
            self._flushes[flush_id] = done
            self._sender.put(("flush", flush_id))
            try:
                if not done.wait(timeout):
                    return False
            finally:
                self._flushes.pop(flush_id, None)
        return self.store.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 30.0) -> None:
        """Let the child finish the queue, telling it to hurry (send the rest back unanalysed) near the end;
        every record is in the store's queue when this returns, but those a stuck child held (logged)."""
        process, sender = self._process, self._sender
        if process is None or sender is None:
            return
        sender.put(("close",))
        process.join(timeout * 0.8)
        if process.is_alive():
            self._hurry.value = 1
            process.join(max(1.0, timeout * 0.2))
        if process.is_alive():
            process.terminate()
            process.join(1.0)
        for message in sender.abandon():  # never sent: stored here, as they are
            if message[0] == "exchange":
                self._returned_unsent(message[1])
        sender.join(5.0)
        if self._collector is not None:
            self._collector.join(10.0)  # it ends at the EOF the child's exit leaves
        if self.pending:
            log.warning("the analysis process stopped holding %d records; they are lost", self.pending)
        self._process = self._sender = self._collector = None

    def _unsendable(self, message: Any, error: BaseException) -> None:
        """The sender could not pickle an exchange: store it here, unanalysed, rather than lose it."""
        if message[0] == "exchange":
            self._returned_unsent(message[1], f"analysis skipped: the exchange could not be sent to the analysis "
                                              f"process ({type(error).__name__}: {error})")

    def _returned_unsent(self, exchange: Exchange, reason: str = SKIPPED_SHUTDOWN) -> None:
        self._count_returned(exchange)
        self._store_unanalysed(exchange, reason)

    def _count_returned(self, exchange: Exchange) -> None:
        self._returned_bytes += self._sizes.pop(exchange.id, 0)
        self._returned += 1

    def _store_unanalysed(self, exchange: Exchange, reason: str) -> None:
        self.skipped += 1
        exchange.analysis = {"error": reason}
        if not self.settings.capture_bodies:
            exchange.request_body = exchange.response_body = None
        self.store.submit(exchange)

    def _collect(self, conn: Connection) -> None:
        """Records coming back from the child: metrics, then the store; and flush acknowledgements."""
        with conn:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return  # the child exited
                if message[0] == "record":
                    _, exchange, self.failures = message
                    self._count_returned(exchange)
                    if self.metrics is not None and exchange.analysis:
                        try:
                            self.metrics.observe_analysis(exchange)
                        except Exception:  # metrics must never cost the record
                            log.exception("metrics for %s failed", exchange.id)
                    self.store.submit(exchange)
                elif message[0] == "flushed":
                    event = self._flushes.get(message[1])
                    if event is not None:
                        event.set()


class _Sender(threading.Thread):
    """Pickles and writes messages to the child in order, off the event loop (a write to a full pipe
    waits here, never there)."""

    def __init__(self, conn: Connection, on_unpicklable: Any) -> None:
        super().__init__(name="kvlens-analysis-sender", daemon=True)
        self.conn = conn
        self.on_unpicklable = on_unpicklable
        self._items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._ready = threading.Condition()
        self._abandoned = False

    def put(self, message: tuple[Any, ...]) -> None:
        with self._ready:
            self._items.append(message)
            self._ready.notify()

    def abandon(self) -> list[tuple[Any, ...]]:
        """Stop sending; what was never sent, in order."""
        with self._ready:
            self._abandoned = True
            left, self._items = list(self._items), collections.deque()
            self._ready.notify()
        return left

    def run(self) -> None:
        with self.conn:
            while True:
                with self._ready:
                    while not self._items and not self._abandoned:
                        self._ready.wait()
                    if self._abandoned:
                        return
                    message = self._items.popleft()
                try:
                    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:  # noqa: BLE001  (anything a record might carry by mistake)
                    self.on_unpicklable(message, exc)
                    continue
                try:
                    self.conn.send_bytes(data)
                except OSError:  # the child is gone: what is left is abandoned by close()
                    with self._ready:
                        self._items.appendleft(message)
                        while not self._abandoned:
                            self._ready.wait()
                    return
                if message[0] == "close":
                    return


# ---- the child -------------------------------------------------------------------------------------------


class _ProxyGone(BaseException):
    """The proxy process went away: nothing this process holds can be stored any more."""


class _SendBack:
    """The child's stand-in for the store: every record the analyzer stores goes back to the proxy."""

    def __init__(self, conn: Connection, failures: Any) -> None:
        self.conn = conn
        self.failures = failures

    def submit(self, exchange: Exchange) -> None:
        try:
            self.conn.send(("record", exchange, self.failures()))
        except OSError:
            raise _ProxyGone from None

    def flush(self, timeout: float | None = None) -> bool:
        return True


def child_main(settings: Settings, inbox: Connection, outbox: Connection, hurry: Any) -> None:
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
        _serve(analyzer, inbox, outbox, hurry)
    except _ProxyGone:
        pass
    finally:
        analyzer.tokenizer.close()
        inbox.close()
        outbox.close()


def _serve(analyzer: Any, inbox: Connection, outbox: Connection, hurry: Any) -> None:
    findings = analyzer.findings
    while True:
        try:
            if not inbox.poll(min(findings.due() or IDLE_TICK_S, IDLE_TICK_S)):
                analyzer.store_records(findings.expire())  # failed requests' records whose window passed
                continue
            message = inbox.recv()
        except (EOFError, OSError):
            return  # the proxy went away
        kind = message[0]
        if kind == "exchange":
            _, exchange, prompt = message
            if hurry.value:
                exchange.analysis = {"error": SKIPPED_SHUTDOWN}
                analyzer.store_records([exchange])
                continue
            if prompt is not None:
                analyzer.handoff.put(exchange.id, prompt)
            analyzer.analyse_and_store(exchange)
        elif kind == "flush":
            analyzer.store_records(findings.drain())
            _send(outbox, ("flushed", message[1]))
        elif kind == "close":
            analyzer.store_records(findings.drain())
            return


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        conn.send(message)
    except OSError:
        raise _ProxyGone from None
