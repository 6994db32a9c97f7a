"""Wiring: the ASGI app `kvlens serve` runs.

Requests under the reserved prefix `/_kvlens/` go to kvlens' own API; everything else, whatever
its method or path, goes to the relay. The dispatch is one string test in a plain ASGI callable,
so proxied requests pay for no framework routing or middleware. The lifespan opens the upstream
connection pool and closes the store (flushing pending records) on shutdown.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from proxy.analysis_process import AnalysisProcess
from proxy.analyzer import Analyzer
from proxy.api import PREFIX, create_api
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.forward import Forwarder, Receive, Scope, Send, UpstreamAborted
from proxy.limits import Gate
from proxy.store import Store, default_db_path, open_store

log = logging.getLogger("kvlens")


class KvlensApp:
    """The proxy: `/_kvlens/*` is ours, every other request is forwarded."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self._relays = 0
        self._owns_store = store is None
        self.store: Store = store if store is not None else open_store(settings.store_path or default_db_path())
        self.metrics = Metrics()
        self.analyzer = _analyzer(settings, self.store, self.metrics)
        self.metrics.watch(store=self.store, analyzer=self.analyzer)
        self.forwarder = Forwarder(settings, on_done=self.record)
        self.gate = Gate(settings) if Gate.wanted(settings) else None  # limits / admission control
        self.forwarder.gate = self.gate
        if self.gate is not None and self.analyzer is not None:
            self.analyzer.handoff = self.gate.handoff  # prompts counted for a limit are not tokenized again
        self.api = create_api(
            self.store, settings.upstream_url, metrics=self.metrics, token=settings.security_api_token
        )

    def record(self, exchange: Exchange) -> None:
        """Hand a finished exchange on: to the analysis, or straight to the store (non-blocking).

        With the analysis on, a provisional copy (no bodies, no analysis yet) goes to the store at once and
        the analysed record replaces it (same id) when it is ready: a kill -9 then loses at most the store's
        unflushed batch, never the analysis backlog, and the dashboard lists a request as soon as it ends."""
        self.metrics.observe_exchange(exchange)  # before submit: after it, the record belongs to another thread
        if self.analyzer is not None:
            self.store.submit(_provisional(exchange))
            self.analyzer.submit(exchange)
            return
        if not self.settings.capture_bodies:
            exchange.request_body = exchange.response_body = None
        self.store.submit(exchange)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every exchange in flight has finished, been analysed and written (tests, shutdown).

        A client can read a response's last byte a moment before the relay hands the exchange on, so
        first wait for the relays to finish."""
        deadline = time.monotonic() + timeout
        while self._relays and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.analyzer is not None:
            return self.analyzer.flush(timeout)
        return self.store.flush(timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(PREFIX) and (len(path) == len(PREFIX) or path[len(PREFIX)] == "/"):
                await self.api(scope, receive, send)
            else:
                self._relays += 1  # finished exchanges are handed on before this drops back
                try:
                    await self.forwarder(scope, receive, send)
                finally:
                    self._relays -= 1
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003, "reason": "kvlens does not proxy WebSockets"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.forwarder.start()
                    if self.gate is not None:
                        await self.gate.start()
                    if self.analyzer is not None:
                        self.analyzer.start()
                except Exception as exc:  # reported to the server, which exits with the message
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.forwarder.close()
                if self.gate is not None:
                    await self.gate.close()
                if self.analyzer is not None:
                    await asyncio.to_thread(self.analyzer.close)
                if self._owns_store:
                    self.store.close()
                else:
                    self.store.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _provisional(exchange: Exchange) -> Exchange:
    record = copy.copy(exchange)  # shallow: ~10x cheaper than dataclasses.replace, on the event loop
    record.request_body = record.response_body = None
    record.metadata = {**exchange.metadata, "analysis_pending": True}
    return record


def _analyzer(settings: Settings, store: Store, metrics: Metrics) -> Analyzer | AnalysisProcess | None:
    """The analysis in a child process by default (see proxy.analysis_process), in a thread when asked."""
    if not settings.analysis_enabled:
        return None
    if settings.analysis_isolation == "process":
        return AnalysisProcess(settings, store, metrics=metrics)
    return Analyzer(settings, store, metrics=metrics)


def create_app(settings: Settings, store: Store | None = None) -> KvlensApp:
    install_log_filter()
    return KvlensApp(settings, store)


class _DropUpstreamAborted(logging.Filter):
    """uvicorn logs every exception that ends a response; a cut upstream stream is expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, UpstreamAborted)


_FILTER = _DropUpstreamAborted()


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Server options for the relay: the upstream's Server/Date headers pass through, so uvicorn adds none."""
    return {
        "host": settings.listen_host,
        "port": settings.listen_port,
        "server_header": False,
        "date_header": False,
        "access_log": False,
        "timeout_keep_alive": 75,
    }
