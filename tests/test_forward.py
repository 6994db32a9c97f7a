"""The relay, over real sockets: byte-identical bodies, streaming, headers, failures, records."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import KvlensApp, create_app, uvicorn_options
from proxy.config import load_settings
from proxy.store import SQLiteStore
from tests.servers import free_port, serve_in_thread
from tests.upstreams import SAMPLES, ScriptedUpstream, garbage_server, recorded_nonstream, recorded_sse_events


@contextlib.contextmanager
def kvlens(upstream_url: str, db: Path | SQLiteStore, **overrides: Any) -> Iterator[tuple[str, KvlensApp]]:
    """kvlens on a free port in front of `upstream_url`; yields its URL and the app (store, flush).
    `db` is the SQLite file, or a store already open (closed here at the end either way)."""
    port = free_port()
    settings = load_settings(
        environ={}, overrides={"upstream_url": upstream_url, "listen": f"127.0.0.1:{port}", **overrides}
    )
    store = db if isinstance(db, SQLiteStore) else SQLiteStore(db)
    app = create_app(settings, store=store)
    opts = uvicorn_options(settings)
    opts.pop("host")
    try:
        with serve_in_thread(app, **opts) as url:
            yield url, app
    finally:
        store.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, ScriptedUpstream]]:
    app = ScriptedUpstream()
    with serve_in_thread(app, server_header=False, date_header=False) as url:
        yield url, app


@pytest.fixture
def proxy(upstream: tuple[str, ScriptedUpstream], tmp_path: Path) -> Iterator[tuple[str, KvlensApp]]:
    with kvlens(upstream[0], tmp_path / "kvlens.sqlite3") as running:
        yield running


def records(app: KvlensApp, n: int = 50) -> list[Any]:
    """Everything kvlens recorded so far, newest first (waits for analysis and the store writer)."""
    assert app.flush(10)
    return app.store.list_exchanges(n, None, None, None)


async def test_nonstream_body_and_headers_identical(proxy: tuple[str, KvlensApp]) -> None:
    url, store = proxy
    status, headers, body = recorded_nonstream()
    async with httpx.AsyncClient() as client:
        r = await client.post(url + "/recorded/chat-nonstream", json={"model": "m", "messages": []})
    assert r.status_code == status
    assert r.content == body
    assert r.headers.get_list("server") == ["llama.cpp"]  # the upstream's, once; uvicorn adds none
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["content-length"] == str(len(body))
    assert "access-control-allow-origin" in r.headers
    [rec] = records(store)
    assert rec.status == 200 and rec.error is None
    assert rec.usage == orjson.loads(body)["usage"]
    assert rec.upstream_timings == orjson.loads(body)["timings"]
    assert rec.cached_tokens == 0 and rec.prompt_tokens == 50 and rec.completion_tokens == 16
    assert rec.output_text == orjson.loads(body)["choices"][0]["message"]["content"]
    assert rec.model == "m" and rec.stream is False


@pytest.mark.parametrize("sample", ["chat-stream.sse.txt", "chat-stream-no-usage.sse.txt"])
async def test_stream_identical_and_never_coalesced(proxy: tuple[str, KvlensApp], sample: str) -> None:
    url, store = proxy
    events = recorded_sse_events(sample)
    pace = 0.06
    arrivals: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/recorded/chat-stream?pace={pace}&sample={sample}", json={}) as r:
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-accel-buffering"] == "no"
            async for chunk in r.aiter_raw():
                arrivals.append((time.perf_counter(), chunk))
    assert b"".join(c for _, c in arrivals) == b"".join(events)
    # Each event left the upstream 60 ms after the previous one; the relay must not hold any back.
    assert len(arrivals) == len(events)
    assert [c for _, c in arrivals] == events
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert sum(g > pace / 2 for g in gaps) >= 0.8 * len(gaps)

    [rec] = records(store)
    assert rec.events == len(events)
    assert rec.t_first_token_ms is not None and rec.t_first_token_ms > rec.t_first_byte_ms
    last = orjson.loads(events[-2][6:])
    assert rec.upstream_timings == last["timings"]
    assert rec.cached_tokens == last["timings"]["cache_n"]
    assert rec.finish_reason == "length"
    texts = [orjson.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1] if orjson.loads(e[6:])["choices"]]
    assert rec.output_text == "".join(t for t in texts if t)
    assert rec.gap_max_ms is not None and rec.gap_max_ms >= pace * 1000 / 2
    if sample == "chat-stream.sse.txt":
        assert rec.usage == last["usage"]


async def test_methods_paths_query_and_headers(proxy: tuple[str, KvlensApp], upstream: Any) -> None:
    url, store = proxy
    upstream_host = upstream[0].removeprefix("http://")
    async with httpx.AsyncClient() as client:
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"):
            r = await client.request(
                method,
                url + "/v1/some%20thing/x?b=2&a=1&a=%2F&empty=",
                headers={
                    "Authorization": "Bearer sk-secret",
                    "Accept-Encoding": "gzip, br",
                    "X-Custom": "kept",
                    "Connection": "keep-alive, X-Drop-Me",
                    "X-Drop-Me": "hop-by-hop because Connection names it",
                    "Keep-Alive": "timeout=5",
                    "TE": "trailers",
                    "x-session-id": "ses_1",
                },
                content=b"payload" if method in ("PUT", "PATCH", "POST") else None,
            )
            seen = r.json()
            assert seen["method"] == method
            assert seen["raw_path"] == "/v1/some%20thing/x"
            assert seen["query"] == "b=2&a=1&a=%2F&empty="
            headers = dict(seen["headers"])
            assert headers["host"] == upstream_host
            assert headers["authorization"] == "Bearer sk-secret"
            assert headers["accept-encoding"] == "gzip, br"
            assert headers["x-custom"] == "kept"
            for hop in ("connection", "x-drop-me", "keep-alive", "te"):
                assert hop not in headers
            # the relay adds nothing of its own
            assert "user-agent" in headers and headers["user-agent"].startswith("python-httpx")
            assert headers.get("accept") == "*/*"
            if method == "GET":
                assert "content-type" not in headers and seen["body_len"] == 0
    recs = records(store)
    assert len(recs) == 6
    for rec in recs:
        assert rec.request_headers["authorization"] == "[redacted]"
        assert rec.session == "ses_1" and rec.session_header == "x-session-id"
        assert rec.query == "b=2&a=1&a=%2F&empty="


async def test_request_body_streamed_and_intact(proxy: tuple[str, KvlensApp]) -> None:
    url, _ = proxy
    import hashlib

    blob = bytes(range(256)) * (5 * 4096)  # 5 MiB

    async def chunks() -> Any:
        for i in range(0, len(blob), 65536):
            yield blob[i : i + 65536]
            await asyncio.sleep(0)

    async with httpx.AsyncClient() as client:
        r = await client.post(url + "/upload", content=chunks())  # chunked transfer encoding
        seen = r.json()
        assert seen["body_len"] == len(blob)
        assert seen["body_sha256"] == hashlib.sha256(blob).hexdigest()
        r = await client.post(url + "/upload", content=blob)  # Content-Length
        assert r.json()["body_sha256"] == hashlib.sha256(blob).hexdigest()


async def test_compressed_body_passes_untouched(proxy: tuple[str, KvlensApp]) -> None:
    url, _ = proxy
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
            raw = b"".join([c async for c in r.aiter_raw()])
    assert r.headers["content-encoding"] == "gzip"
    assert raw == gzip.compress(b'{"hello": "compressed world"}' * 50, mtime=0)


async def test_reserved_prefix_is_kvlens(proxy: tuple[str, KvlensApp]) -> None:
    url, _ = proxy
    async with httpx.AsyncClient() as client:
        r = await client.get(url + "/_kvlens/nope")
        assert r.status_code == 404 and r.headers["x-kvlens-error"] == "not_found"
        assert set(r.json()["error"]) >= {"message", "type", "code"}
        r = await client.get(url + "/_kvlensish")  # not the prefix: forwarded
        assert r.json()["path"] == "/_kvlensish"
        r = await client.get(url + "/_kvlens/health")
        assert r.json()["status"] == "ok"


async def test_upstream_refused_gives_502(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with kvlens(dead, tmp_path / "db.sqlite3") as (url, store):
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/v1/chat/completions", json={"model": "x", "stream": True})
        assert r.status_code == 502
        error = r.json()["error"]
        assert error["code"] == "upstream_connect" and dead in error["message"]
        assert r.headers["x-kvlens-error"] == "upstream_connect"
        [rec] = records(store)
        assert rec.error.kind == "upstream_connect" and rec.status == 502
        assert rec.model == "x" and rec.stream is True


async def test_upstream_stall_gives_504(upstream: Any, tmp_path: Path) -> None:
    with kvlens(upstream[0], tmp_path / "db.sqlite3", upstream_read_timeout=0.3) as (url, store):
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/stall?s=2")
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_read_timeout"
        [rec] = records(store)
        assert rec.error.kind == "upstream_read_timeout"


async def test_upstream_not_http_gives_502(tmp_path: Path) -> None:
    with garbage_server() as bad, kvlens(bad, tmp_path / "db.sqlite3") as (url, store):
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/v1/models")
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_protocol"
        [rec] = records(store)
        assert rec.error.kind == "upstream_protocol"


async def test_upstream_dies_midstream_client_sees_truncation(proxy: tuple[str, KvlensApp]) -> None:
    url, store = proxy
    received = b""
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", url + "/die-midstream?events=3", json={}) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
    assert received == b"".join(recorded_sse_events()[:3])  # what the upstream sent, nothing invented
    [rec] = records(store)
    assert rec.error.kind == "upstream_died_midstream"
    assert rec.status == 200 and rec.events == 3


async def test_client_disconnect_closes_upstream(proxy: tuple[str, KvlensApp], upstream: Any) -> None:
    url, store = proxy
    app: ScriptedUpstream = upstream[1]
    before = app.disconnects
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", url + "/slow-stream?pace=0.05") as r:
            async for _ in r.aiter_raw():
                break
    deadline = time.monotonic() + 2
    while app.disconnects == before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert app.disconnects == before + 1
    [rec] = records(store)
    assert rec.error.kind == "client_disconnected"


async def test_api_lists_and_shows_records(proxy: tuple[str, KvlensApp]) -> None:
    url, store = proxy
    async with httpx.AsyncClient() as client:
        for session in ("a", "b", "a"):
            await client.post(url + "/recorded/chat-nonstream", json={"model": "m"}, headers={"x-session-id": session})
        store.flush(5)
        listed = (await client.get(url + "/_kvlens/api/requests?limit=10")).json()["requests"]
        assert len(listed) == 3 and listed[0]["started_at"] >= listed[-1]["started_at"]
        assert "request_body" not in listed[0]
        only_a = (await client.get(url + "/_kvlens/api/requests?session=a")).json()["requests"]
        assert [r["session"] for r in only_a] == ["a", "a"]
        one = (await client.get(url + f"/_kvlens/api/requests/{listed[0]['id']}")).json()
        assert orjson.loads(one["request_body"]) == {"model": "m"}
        assert one["upstream_timings"]["prompt_n"] == 50
        assert one["ttft_ms"] is not None and one["cached_tokens"] == 0
        bad = await client.get(url + "/_kvlens/api/requests?limit=0")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
        missing = await client.get(url + "/_kvlens/api/requests/nope")
        assert missing.status_code == 404


def test_samples_are_present() -> None:
    assert (SAMPLES / "chat-stream.sse.txt").exists()
