"""The relay's own upstream client (proxy/forward.py) on the HTTP/1.1 corners a general client covers.

A raw TCP upstream answers each request with a scripted byte string, so the responses can be what
uvicorn would never send: interim 100 responses, a body delimited by the end of the connection,
Connection: close, a HEAD answer with a Content-Length. Every case is followed by another request
through the same kvlens, which must not be confused by what came before (pool reuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.test_forward import kvlens, records

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


@contextlib.contextmanager
def raw_upstream(answer: Callable[[bytes], tuple[bytes, bool]]) -> Iterator[tuple[str, list[bytes]]]:
    """A keep-alive TCP server: `answer(request head)` gives (bytes to send, close after)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    stop = threading.Event()
    heads: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        buf = b""
        with conn:
            conn.settimeout(5)
            while not stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length, chunked = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                if chunked:  # read up to the last chunk; the body itself is of no interest here
                    while b"\r\n0\r\n\r\n" not in b"\r\n" + buf:
                        buf += conn.recv(65536)
                    buf = (b"\r\n" + buf).split(b"\r\n0\r\n\r\n", 1)[1]
                else:
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    buf = buf[length:]
                heads.append(head)
                reply, close = answer(head)
                conn.sendall(reply)
                if close:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", heads
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close()


def script(**by_path: tuple[bytes, bool]) -> Callable[[bytes], tuple[bytes, bool]]:
    def answer(head: bytes) -> tuple[bytes, bool]:
        path = head.split(b" ")[1].decode()
        return by_path.get(path, (OK, False))

    return answer


async def test_interim_100_response_is_skipped(tmp_path: Path) -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    with raw_upstream(script(**{"/a": (reply, False)})) as (up, _), kvlens(up, tmp_path / "k.sqlite3") as (url, _app):
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/a", content=b"{}")
            assert r.status_code == 200 and r.content == b'{"ok":true}'
            assert (await client.get(url + "/b")).json() == {"ok": True}


async def test_body_until_the_connection_closes(tmp_path: Path) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + b"all of it " * 1000
    with raw_upstream(script(**{"/eof": (reply, True)})) as (up, _), kvlens(up, tmp_path / "k.sqlite3") as (url, app):
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/eof")
            assert r.status_code == 200 and r.content == b"all of it " * 1000
            assert (await client.get(url + "/next")).json() == {"ok": True}
        rec = next(x for x in records(app) if x.path == "/eof")
        assert rec.error is None and rec.response_size == 10_000


async def test_head_response_has_no_body_and_the_next_request_is_clean(tmp_path: Path) -> None:
    head_reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    with raw_upstream(script(**{"/h": (head_reply, False)})) as (up, _), kvlens(up, tmp_path / "k.sqlite3") as (url, _app):
        async with httpx.AsyncClient() as client:
            r = await client.head(url + "/h")
            assert r.status_code == 200 and r.headers["content-length"] == "11" and r.content == b""
            assert (await client.get(url + "/after")).json() == {"ok": True}


async def test_connection_close_is_not_reused_and_keep_alive_is(tmp_path: Path) -> None:
    closing = OK.replace(b"Content-Length: 11", b"Connection: close\r\nContent-Length: 11")
    with raw_upstream(script(**{"/close": (closing, True)})) as (up, heads), kvlens(up, tmp_path / "k.sqlite3") as (url, _):
        async with httpx.AsyncClient() as client:
            for path in ("/close", "/a", "/b", "/close", "/c"):
                assert (await client.get(url + path)).json() == {"ok": True}
    assert len(heads) == 5
    assert all(b"\r\nHost: 127.0.0.1:" in h and b"connection" not in h.lower().split(b"\r\n", 1)[1] for h in heads)


async def test_pool_limit_queues_requests(tmp_path: Path) -> None:
    def slow(head: bytes) -> tuple[bytes, bool]:
        threading.Event().wait(0.05)
        return OK, False

    with raw_upstream(slow) as (up, heads), kvlens(up, tmp_path / "k.sqlite3", upstream_max_connections=2) as (url, _):
        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(*(client.get(f"{url}/q{i}") for i in range(8)))
    assert [r.status_code for r in answers] == [200] * 8 and len(heads) == 8


async def test_chunked_upload_keeps_a_declared_length_else_is_chunked(tmp_path: Path) -> None:
    blob = b"x" * 300_000

    async def parts() -> object:  # spaced out, so kvlens gets the body in parts and streams it on
        for i in range(0, len(blob), 50_000):
            yield blob[i : i + 50_000]
            await asyncio.sleep(0.02)

    with raw_upstream(script()) as (up, heads), kvlens(up, tmp_path / "k.sqlite3") as (url, _):
        async with httpx.AsyncClient() as client:
            assert (await client.post(url + "/len", content=blob)).json() == {"ok": True}
            assert (await client.post(url + "/chunked", content=parts())).json() == {"ok": True}
            assert (await client.get(url + "/after")).json() == {"ok": True}
    assert b"content-length: 300000" in heads[0].lower()
    assert b"transfer-encoding: chunked" in heads[1].lower() and b"content-length" not in heads[1].lower()
