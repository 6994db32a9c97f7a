"""The transparent path: relay one request to the upstream and its response back, byte for byte.

This is kvlens' hot path, so it is a plain ASGI callable with no framework routing and no
middleware, and its upstream client is a small HTTP/1.1 client of its own: asyncio protocols over
a keep-alive pool, with httptools (llhttp, the parser uvicorn and Node use) reading responses.
The request goes out as one write (head and body); the body streams to the upstream as it arrives
when the client sends it in parts (unless token limits or admission control are configured: then
`proxy.limits.Gate` reads completion requests whole, checks and maybe queues them before they are
sent). The response streams back chunk by chunk as the parser delivers it: every chunk the upstream
wrote (each SSE event of llama-server) is sent on alone, never buffered, coalesced or decompressed.
Only after a chunk has been handed to the client does the side reader (`proxy.sse`) look at it.

Why not a general client: per request, aiohttp's client costs ~200 us of CPU on this class of
machine and httpx's 1.5-2 ms, this one ~25 us (benchmarks/overhead.py; README "Performance"),
and CPU per request decides the proxy's latency under concurrency. httpx remains for everything off
this path.

Failures are data (`ExchangeError`), raised here as `_Failure` with their kind, the client's status
and the message. Before the response head: the client gets an OpenAI-style JSON error (502/504)
naming the upstream. After it: the client's connection is cut exactly as the upstream's was, so a
truncated stream stays visibly truncated and kvlens never invents content. When the client goes
away, the upstream connection is closed at once so llama-server frees its slot.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

from proxy import exchange as ex_mod
from proxy.config import Settings
from proxy.exchange import Exchange, ExchangeError
from proxy.sse import ResponseReader

log = logging.getLogger("kvlens.forward")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# RFC 9110 §7.6.1 connection-specific headers: never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length"}  # the relay writes its own Host and framing
KVLENS_ERROR_HEADER = "x-kvlens-error"

IDLE_REUSE_S = 4.0
"""A pooled connection idle longer than this is closed rather than reused: llama-server (cpp-httplib)
closes idle keep-alive connections after 5 s, and a request written as it does would be lost."""
SWITCH_INTERVAL_S = 0.0005
"""The longest another thread (analysis, store writer) keeps the GIL while the event loop waits for it.
Python's default is 5 ms, which a relayed request would pay on every wake-up of the loop whenever
the analysis is busy: benchmarks/overhead.py measured p99 at concurrency 1 fall from ~30 ms to ~10 ms
with 0.5 ms (analysis on, saturated), at no measurable cost to throughput."""
READ_HIGH_WATER = 1 << 20
"""Response bytes buffered for a slow client before the upstream connection stops being read."""


class UpstreamAborted(Exception):
    """Raised after the response started, to make the server cut the client's connection.

    An HTTP/1.1 response can only signal "incomplete" by closing without the final chunk; ASGI
    has no message for that, so the relay raises and uvicorn closes the connection. The app's
    log filter keeps this expected event out of the error log.
    """


class _ClientGone(Exception):
    """The client disconnected while its request body was still being read."""


class _Failure(Exception):
    """The upstream failed: an `ExchangeError` kind, the HTTP status for the client, the message."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind, self.status, self.message = kind, status, message


class Forwarder:
    """Owns the pooled upstream connections; one instance per running proxy."""

    def __init__(self, settings: Settings, on_done: Callable[[Exchange], None]) -> None:
        self.settings = settings
        self.on_done = on_done
        self._base_path = urlsplit(settings.upstream_url).path.rstrip("/").encode("latin-1")
        self._upstream_shown = without_credentials(settings.upstream_url)
        self._pool: _Pool | None = None
        self.gate: Any = None
        """`proxy.limits.Gate` when limits or admission control are configured (set by the app), else None:
        then the relay below runs exactly as if limits did not exist."""

    async def start(self) -> None:
        _tune_interpreter()
        self._pool = _Pool(self.settings, asyncio.get_running_loop())

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._pool is not None, "Forwarder.start() was not awaited"
        t0 = time.perf_counter()
        ex = _new_exchange(scope, self.settings)
        ex.upstream = self._upstream_shown
        relay = _Relay(self, scope, receive, send, ex, t0)
        try:
            await relay.run()
        finally:
            ex.t_done_ms = relay.ms()
            relay.reader_apply()
            _read_request_fields(ex, relay.request_body_for_parse)
            try:
                self.on_done(ex)
            except Exception:  # the record's consumer must never break the client's traffic
                log.exception("recording exchange %s failed", ex.id)

    def request_target(self, scope: Scope) -> bytes:
        """The upstream request target: its base path, then the client's raw path and query as sent."""
        target = self._base_path + (scope.get("raw_path") or scope["path"].encode())
        query = scope.get("query_string")
        return target + b"?" + query if query else target


class _Relay:
    """The state of one relayed exchange (kept out of Forwarder so the pool object stays stateless)."""

    def __init__(self, fwd: Forwarder, scope: Scope, receive: Receive, send: Send, ex: Exchange, t0: float) -> None:
        self.fwd = fwd
        self.scope = scope
        self.receive = receive
        self.send = send
        self.ex = ex
        self.t0 = t0
        keep = fwd.settings.capture_bodies or fwd.settings.analysis_enabled  # analysis reads the body
        self.cap = fwd.settings.capture_max_body_bytes if keep else 0
        self.request_body_for_parse = bytearray()
        self.reader: ResponseReader | None = None
        self.response_started = False
        self.client_gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._response_capture = bytearray()
        self.ticket: Any = None  # the admission ticket (proxy.admission), released when the exchange ends

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    async def run(self) -> None:
        task = self._owner = asyncio.current_task()
        assert task is not None
        try:
            await self._exchange()
        except (asyncio.CancelledError, _ClientGone) as exc:
            if not self.client_gone.is_set():  # not our disconnect watcher: the server is stopping
                self._fail(ex_mod.ERROR_PROXY_SHUTDOWN,
                           "kvlens was stopping and its shutdown grace period ended before the response did")
                raise
            if isinstance(exc, asyncio.CancelledError):
                task.uncancel()
            self._fail(ex_mod.ERROR_CLIENT_DISCONNECTED, "the client closed the connection")
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
            if self.ticket is not None:
                self.ticket.release()

    async def _exchange(self) -> None:
        gate = self.fwd.gate
        if gate is None or not gate.applies(self.scope):
            body = await self._request_body()
        else:  # limits / admission: the body is read whole, checked, maybe queued (proxy.limits)
            body = await gate.admit(self)
            if body is None:
                return  # kvlens answered the client itself (a limit, the queue) and the record says why
        pool = self.fwd._pool
        assert pool is not None
        conn: _Upstream | None = None
        try:
            try:
                conn = await pool.acquire()
                head = _request_head(self.scope, self.fwd.request_target(self.scope), pool.host_header, body)
                if body is None or isinstance(body, bytes):
                    conn.send_request(head, body, self.scope["method"] == "HEAD")
                else:
                    await conn.send_streamed(head, body, _has_content_length(self.scope["headers"]))
                await conn.wait_head()
            except _Failure as exc:
                self._fail(exc.kind, exc.message)
                await self._send_error(exc.status, exc.kind, exc.message)
                return
            await self._relay_response(conn)
        finally:
            if conn is not None:
                pool.release(conn)  # reused only when the response was read whole: else closed, freeing the slot

    async def _request_body(self) -> bytes | AsyncIterator[bytes] | None:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.client_gone.set()
            raise _ClientGone
        chunk = message.get("body", b"")
        if not message.get("more_body", False):
            self._note_request_chunk(chunk)
            self._watch_disconnect()
            return chunk if (chunk or self.scope["method"] not in ("GET", "HEAD")) else None
        return self._stream_request_body(chunk)

    async def _stream_request_body(self, first: bytes) -> AsyncIterator[bytes]:
        self._note_request_chunk(first)
        if first:
            yield first
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                return
            chunk = message.get("body", b"")
            self._note_request_chunk(chunk)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        self._watch_disconnect()

    def _note_request_chunk(self, chunk: bytes) -> None:
        self.ex.request_size += len(chunk)
        room = self.cap - len(self.request_body_for_parse)
        if room > 0 and chunk:
            self.request_body_for_parse += chunk if len(chunk) <= room else chunk[:room]

    def _watch_disconnect(self) -> None:
        """Once the body is read, the only message left is http.disconnect: cancel the relay on it."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                return

    def _client_left(self) -> None:
        """The client disconnected: mark it, and cancel the relay so the upstream request is closed."""
        self.client_gone.set()
        self._cancel_owner()

    def _cancel_owner(self) -> None:
        if self._owner is not None and not self._owner.done():
            self._owner.cancel()

    async def _relay_response(self, conn: _Upstream) -> None:
        ex = self.ex
        ex.t_upstream_headers_ms = self.ms()
        ex.status = conn.status
        raw_headers = conn.headers
        redact = self.fwd.settings.redact_headers
        ex.response_headers = headers = _header_dict(raw_headers, redact)
        ex.content_type = content_type = _first_value(raw_headers, b"content-type")
        self.reader = reader = ResponseReader(content_type)
        listed = headers.get("connection")
        await self.send({
            "type": "http.response.start", "status": conn.status,
            "headers": _downstream_headers(raw_headers, listed),
        })  # fmt: skip
        self.response_started = True
        capture = self._response_capture
        cap = self.cap
        send = self.send
        try:
            while True:
                chunk = conn.read_nowait()
                if chunk is None:
                    chunk = await conn.read()
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                now = self.ms()
                if ex.t_first_byte_ms is None:
                    ex.t_first_byte_ms = now
                ex.response_size += len(chunk)
                if len(capture) < cap:
                    capture += chunk[: cap - len(capture)]
                reader.feed(chunk, now)
        except _Failure as exc:
            self._fail(exc.kind, exc.message)
            raise UpstreamAborted(exc.message) from None
        reader.finish(self.ms())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_error(self, status: int, kind: str, message: str) -> None:
        body = orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": kind}})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (KVLENS_ERROR_HEADER.encode(), kind.encode()),
        ]
        self.ex.status = status
        self.ex.metadata["kvlens_response"] = True
        self.ex.response_body = body
        self.ex.response_size = len(body)
        self.ex.content_type = "application/json"
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _fail(self, kind: str, message: str) -> None:
        if self.ex.error is None:
            self.ex.error = ExchangeError(kind=kind, message=message, at_ms=round(self.ms(), 3))

    def reader_apply(self) -> None:
        if self.reader is not None:
            if self.ex.error is not None:
                self.reader.finish(self.ms())  # keep what arrived before the cut
            self.reader.apply(self.ex)
        if self.cap and self.ex.response_body is None and self._response_capture:
            self.ex.response_body = bytes(self._response_capture)
        if self.cap and self.request_body_for_parse:
            self.ex.request_body = bytes(self.request_body_for_parse)


_tuned = False


def _tune_interpreter() -> None:
    """Once per process, for the relay's tail latency: the GIL comes back to the event loop within
    SWITCH_INTERVAL_S, and what exists at startup (modules, settings, the app) leaves the garbage
    collector's view (gc.freeze), so a full collection pauses every thread for what the analysis
    keeps rather than for everything imported too (one full collection under the benchmark: 49 ms
    before, 13 ms after)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


# ---- the upstream client: a keep-alive pool of HTTP/1.1 connections -----------------------------------


class _Pool:
    """Keep-alive connections to the one upstream, most recently used first, at most `limit` open."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        url = settings.upstream_url
        parts = urlsplit(url)
        secure = parts.scheme.lower() == "https"
        self.loop = loop
        self.url = without_credentials(url)  # the URL in error messages: clients and records never see a password
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if secure else 80):
            netloc += f":{parts.port}"
        self.host_header = netloc.encode("idna") if not netloc.isascii() else netloc.encode()
        self.limit = settings.upstream_max_connections
        self.connect_timeout = settings.upstream_connect_timeout or None
        self.read_timeout = settings.upstream_read_timeout or None
        self.idle: list[_Upstream] = []
        self.open: set[_Upstream] = set()
        self.opening = 0
        self.waiters: collections.deque[asyncio.Future[_Upstream | None]] = collections.deque()
        self.closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = min(1.0, (self.read_timeout or 1.0) / 10)

    async def acquire(self) -> _Upstream:
        idle = self.idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                if now - conn.idle_since > IDLE_REUSE_S:
                    conn.close()
                    continue
                return conn
        while self.limit and len(self.open) + self.opening >= self.limit:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result())
                elif not waiter.done():
                    self.waiters.remove(waiter)
                raise
            if handed is not None and not handed.closed:
                return handed
        return await self._connect()

    async def _connect(self) -> _Upstream:
        self.opening += 1
        try:
            connect = self.loop.create_connection(
                lambda: _Upstream(self), self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )  # fmt: skip
            _, conn = await asyncio.wait_for(connect, self.connect_timeout)
        except TimeoutError:
            raise _Failure(ex_mod.ERROR_CONNECT_TIMEOUT, 504,
                           f"kvlens: timed out connecting to upstream {self.url}") from None
        except OSError as exc:
            raise _Failure(ex_mod.ERROR_CONNECT, 502,
                           f"kvlens: cannot connect to upstream {self.url}: {exc or type(exc).__name__}") from None
        finally:
            self.opening -= 1
        if self.closed:
            conn.close()
            raise _Failure(ex_mod.ERROR_CONNECT, 502, f"kvlens: cannot connect to upstream {self.url}: shutting down")
        return conn

    def release(self, conn: _Upstream) -> None:
        """Back to the pool if its response was read whole and the upstream keeps it alive, else closed."""
        if not conn.reusable():
            conn.close()
            return
        conn.idle_since = self.loop.time()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def lost(self, conn: _Upstream) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        while self.waiters:  # room for one more connection
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def watch(self) -> None:
        """A response is awaited: make sure the read-timeout sweep runs."""
        if self._sweeper is None and self.read_timeout:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """One timer for the whole pool rather than one per request: every read_timeout/10 (at most
        1 s), fail the exchanges whose upstream sent nothing for read_timeout."""
        now, waiting = self.loop.time(), False
        for conn in tuple(self.open):
            if conn.awaiting:
                waiting = True
                conn.check_quiet(now, self.read_timeout or 0.0)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep) if waiting else None

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.open):
            conn.close()
        self.idle.clear()


class _Upstream(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time.

    httptools calls back as it parses: the head completes `wait_head`, each body chunk (each chunk
    of a chunked response: each SSE event llama-server writes) is queued for `read` as its own item,
    and the end of the message ends `read`. Reading pauses while a slow client leaves more than
    READ_HIGH_WATER bytes queued. The read timeout (no byte for upstream.read_timeout seconds, checked
    by the pool's sweep) runs from the moment the request is written until the response is complete."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.busy = False
        self.head_only = False
        self.interim = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.failure: _Failure | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.awaiting = False  # the request is written and its response not complete: the read timeout runs
        self._reads = 0
        self._seen_reads = 0
        self._quiet_since = 0.0
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: an upstream that talks out of turn is not reused
            self.close()
            return
        self._reads += 1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.head_done:
                self._end(_Failure(ex_mod.ERROR_DIED_MIDSTREAM, 502,
                                   f"kvlens: upstream {self.pool.url} sent a malformed response body: {exc}"))
            else:
                self._end(_Failure(ex_mod.ERROR_PROTOCOL, 502,
                                   f"kvlens: upstream {self.pool.url} sent an invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.busy and not self.complete and self.failure is None:
            if not self.head_done:
                self._end(_Failure(ex_mod.ERROR_PROTOCOL, 502,
                                   f"kvlens: upstream {self.pool.url} closed the connection without a response"))
            elif not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers):
                self._end(None)  # a body delimited by the end of the connection: complete
            else:
                self._end(_Failure(ex_mod.ERROR_DIED_MIDSTREAM, 502,
                                   f"kvlens: upstream {self.pool.url} closed the connection mid-response"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (32, 9):  # optional trailing whitespace is not part of the value
            value = value.rstrip(b" \t")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue and other interim responses: skipped
            self.interim = True
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.head_only:  # a response to HEAD has no body, whatever its Content-Length says
            self.keep_alive = False  # the parser does not know that: the connection is not reused
            self._end(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self._end(None)

    # the relay's side

    def send_request(self, head: bytes, body: bytes | None, head_only: bool) -> None:
        self._begin(head_only)
        assert self.transport is not None
        if body and len(body) > 65536:  # no copy of a large body
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body if body else head)
        self._await_response()

    async def send_streamed(self, head: bytes, body: AsyncIterator[bytes], length_given: bool) -> None:
        """Write a body that arrives in parts: as is under the client's Content-Length, else chunked."""
        self._begin(False)
        transport = self.transport
        assert transport is not None
        transport.write(head)
        async for chunk in body:
            if self.closed:
                break  # the upstream went away (maybe answering early): the head wait says what happened
            transport.write(chunk if length_given else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self._writing_paused:
                self._drain = self.loop.create_future()
                await self._drain
                self._drain = None
        else:
            if not length_given and not self.closed:
                transport.write(b"0\r\n\r\n")
        self._await_response()

    async def wait_head(self) -> None:
        while not self.head_done and self.failure is None:
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        if not self.head_done and self.failure is not None:
            raise self.failure

    def read_nowait(self) -> bytes | None:
        """The next body chunk if one is queued, b"" at the end, None when the caller must `await read()`."""
        if self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            if self._reading_paused and self._buffered < READ_HIGH_WATER // 4:
                self._reading_paused = False
                if self.transport is not None and not self.closed:
                    self.transport.resume_reading()
            return chunk
        if self.complete:
            return b""
        if self.failure is not None:
            raise self.failure
        return None

    async def read(self) -> bytes:
        while True:
            chunk = self.read_nowait()
            if chunk is not None:
                return chunk
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and not self._chunks
                and self.failure is None and not self.pool.closed)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.busy = self.awaiting = False

    # internals

    def _begin(self, head_only: bool) -> None:
        self.busy = True
        self.head_only = head_only
        self.interim = self.head_done = self.complete = False
        self.status = 0
        self.headers = []
        self.failure = None

    def _end(self, failure: _Failure | None) -> None:
        """The response is complete (failure None) or failed; wake the relay, stop the read timeout."""
        if failure is None:
            self.complete = True
            self.busy = False
        elif self.failure is None:
            self.failure = failure
        self.awaiting = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _await_response(self) -> None:
        if self.pool.read_timeout and not self.complete and self.failure is None:
            self.awaiting = True
            self._seen_reads = self._reads
            self._quiet_since = self.loop.time()
            self.pool.watch()

    def check_quiet(self, now: float, timeout: float) -> None:
        """The pool's sweep: fail the exchange when nothing arrived for `timeout` seconds."""
        if self._reads != self._seen_reads or self._reading_paused:  # news, or waiting for our own client
            self._seen_reads = self._reads
            self._quiet_since = now
            return
        if now - self._quiet_since < timeout:
            return
        where = "in the middle of the response" if self.head_done else "before responding"
        self._end(_Failure(ex_mod.ERROR_READ_TIMEOUT, 504,
                           f"kvlens: upstream {self.pool.url} sent nothing for too long {where}"))
        self.close()


# ---- requests, headers, records ------------------------------------------------------------------------


def without_credentials(url: str) -> str:
    """The URL without a user:password part (records, error messages and logs show this one)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _request_head(scope: Scope, target: bytes, host: bytes, body: bytes | AsyncIterator[bytes] | None) -> bytes:
    """The request line and headers for the upstream: the client's headers minus hop-by-hop ones (and
    those its Connection header names), with the relay's own Host and body framing."""
    raw = scope["headers"]
    listed: set[bytes] | None = None
    for name, value in raw:
        if name.lower() == b"connection":
            listed = listed or set()
            listed.update(token.strip().lower() for token in value.split(b","))
    parts = [scope["method"].encode(), b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    length_given = False
    for name, value in raw:
        key = name.lower()
        if key in _NOT_FORWARDED or (listed and key in listed):
            if key == b"content-length" and not isinstance(body, bytes) and body is not None:
                parts += (name, b": ", value, b"\r\n")  # a streamed body keeps the client's declared length
                length_given = True
            continue
        parts += (name, b": ", value, b"\r\n")
    if isinstance(body, bytes):
        parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
    elif body is not None and not length_given:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _has_content_length(raw: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-length" for name, _ in raw)


def _downstream_headers(raw: list[tuple[bytes, bytes]], connection: str | None) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones (and those its Connection header names)."""
    if connection is None:
        return [(name, value) for name, value in raw if name.lower() not in _HOP_BY_HOP]
    listed = {token.strip().lower().encode("latin-1") for token in connection.split(",")}
    return [(name, value) for name, value in raw if (key := name.lower()) not in _HOP_BY_HOP and key not in listed]


def _first_value(raw: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in raw:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _new_exchange(scope: Scope, settings: Settings) -> Exchange:
    client = scope.get("client")
    ex = Exchange(
        started_at=time.time(),
        method=scope["method"],
        path=scope["path"],
        query=(scope.get("query_string") or b"").decode("latin-1"),
        client=f"{client[0]}:{client[1]}" if client else None,
    )
    ex.request_headers = _header_dict(scope["headers"], settings.redact_headers)
    for name in settings.sessions_headers:
        value = ex.request_headers.get(name)
        if value:
            ex.session, ex.session_header = value, name
            break
    return ex


def _header_dict(raw: Any, redact: tuple[str, ...]) -> dict[str, str]:
    """Headers as a dict for the record: lower-case names, repeats joined, credentials redacted."""
    out: dict[str, str] = {}
    for name, value in raw:
        key = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if key in redact:
            text = "[redacted]"
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _read_request_fields(ex: Exchange, body: bytes | bytearray) -> None:
    """model and stream from a JSON request body; runs after the response, never before forwarding.

    Clients do not always send Content-Type, so the body's first byte decides (JSON objects only)."""
    if not body or body.lstrip()[:1] != b"{":
        return
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict):
        model = obj.get("model")
        ex.model = model if isinstance(model, str) else None
        ex.stream = obj.get("stream") is True
