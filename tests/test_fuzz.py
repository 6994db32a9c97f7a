"""Bad input, generated: kvlens answers everything, crashes on nothing, and never makes a 5xx of its own.

Hypothesis drives a real kvlens on loopback in front of three upstreams: ScriptedUpstream's echo (every
request comes back), the llama-server emulator (completion bodies are parsed, tokenized, analysed), and
the emulator behind kvlens' limits and admission control (kvlens itself parses and counts the body
before forwarding). Inputs: malformed JSON, wrong types in completion bodies, huge bodies, deep
nesting, invalid UTF-8, odd methods, paths, queries and headers, and raw bytes that are not quite HTTP.

The upstreams are wrapped to stamp `x-fuzz-upstream` on every response they make, so a 5xx is either
the upstream's own (passed through: fine) or kvlens' (a failure, whether kvlens meant it, with
`x-kvlens-error`, or it crashed into uvicorn's bare 500). After each run kvlens must still be healthy,
the analysis must not have failed, and no error may have been logged.

Schemathesis fuzzes kvlens' own API from its OpenAPI document at /_kvlens/openapi.json; a separate test
walks the dashboard's static route with path traversal attempts. Every run is bounded (max_examples,
no deadline per example) so the suite stays fast; the Hypothesis example database is off, so runs
leave no files behind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from urllib.parse import quote
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

from proxy.app import KvlensApp
from proxy.config import load_settings
from proxy.exchange import Exchange
from proxy.emulator import UVICORN_OPTIONS, EmulatorSettings, create_app as create_emulator
from tests.servers import serve_in_thread
from tests.test_forward import kvlens, records
from tests.upstreams import ScriptedUpstream

MARK = b"x-fuzz-upstream"
# The suite runs a fixed, derandomized sample (the same inputs every run: no flaky failures). A longer hunt:
# KVLENS_FUZZ_EXAMPLES=2000 KVLENS_FUZZ_RANDOM=1 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("KVLENS_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("KVLENS_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)  # fmt: skip


class Marked:
    """Stamps every response the wrapped upstream starts with `x-fuzz-upstream: 1`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (MARK, b"1")]}
            await send(message)

        await self.app(scope, receive, marked)


class Errors(logging.Handler):
    """Every ERROR logged anywhere while a fuzz run lasts."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        self.seen.append(f"{record.name}: {record.getMessage()} {trace}")


@pytest.fixture
def errors() -> Iterator[Errors]:
    handler = Errors()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, KvlensApp]]:
    with serve_in_thread(Marked(ScriptedUpstream()), server_header=False, date_header=False) as up:
        with kvlens(up, tmp_path_factory.mktemp("fuzz") / "k.sqlite3") as running:
            yield running


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Small and fast: a fuzzed max_tokens of 2**62 with ignore_eos generates until the 4k context is full.
    app = create_emulator(EmulatorSettings(prompt_tps=1e7, gen_tps=1e6, ctx=4096))
    with serve_in_thread(Marked(app), **UVICORN_OPTIONS) as up:
        yield up


@pytest.fixture(scope="module")
def proxied(emulated: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, KvlensApp]]:
    with kvlens(emulated, tmp_path_factory.mktemp("fuzz") / "k.sqlite3") as running:
        yield running


@pytest.fixture(scope="module")
def gated(emulated: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, KvlensApp]]:
    limits = {"limits_context": 8192, "limits_output": 64, "limits_action": "clamp", "limits_max_body_bytes": 4 << 20,
              "admission_max_in_flight": 4, "admission_kv_budget_tokens": 100_000}  # fmt: skip
    with kvlens(emulated, tmp_path_factory.mktemp("fuzz") / "k.sqlite3", **limits) as running:
        yield running


# ---- what to send ---------------------------------------------------------------------------------

PATHS = ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/completion", "/completions", "/infill",
         "/v1/messages", "/v1/responses", "/tokenize", "/detokenize", "/apply-template", "/v1/models", "/props",
         "/slots", "/health", "/metrics", "/echo", "/"]  # fmt: skip
COMPLETION_PATHS = PATHS[:8]
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)  # fmt: skip
wrong = json_values | st.sampled_from([-1, 0, 2**64, "7", 1e308, float("nan"), [], {}, "", "\ud800"])
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool"]) | wrong,
                                        "content": st.text(max_size=200) | wrong, "tool_calls": wrong,
                                        "reasoning_content": wrong}),
    max_size=4,
) | wrong  # fmt: skip
completion_bodies = st.fixed_dictionaries(
    {},
    optional={"messages": messages, "prompt": st.text(max_size=200) | wrong, "max_tokens": wrong | st.integers(-5, 40),
              "n_predict": wrong, "max_completion_tokens": wrong, "stream": st.booleans() | wrong, "model": wrong,
              "tools": wrong, "cache_prompt": wrong, "id_slot": wrong, "stream_options": wrong,
              "temperature": wrong, "ignore_eos": wrong},
)  # fmt: skip


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")  # NaN and lone surrogates too


@st.composite
def bodies(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["completion", "json", "truncated", "bytes", "bad utf-8", "deep", "huge", "empty"]))
    if kind == "completion":
        return _dumps(draw(completion_bodies))
    if kind == "json":
        return _dumps(draw(json_values))
    if kind == "truncated":
        whole = _dumps(draw(completion_bodies))
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "bad utf-8":
        junk = draw(st.binary(min_size=1, max_size=20).filter(lambda b: not _utf8(b)))
        return b'{"messages": [{"role": "user", "content": "' + junk + b'"}], "max_tokens": 4}'
    if kind == "deep":
        depth = draw(st.integers(50, 100_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"messages":[', b"]}")]))
        return opener * depth + b"1" + closer * depth
    if kind == "huge":
        size = draw(st.integers(1, 6)) << 20
        return b'{"messages": [{"role": "user", "content": "' + b"x " * (size // 2) + b'"}], "max_tokens": 1}'
    return b""


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]) | st.from_regex(
    r"\A[A-Z]{1,10}\Z"
)
paths = st.sampled_from(PATHS) | st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@", min_size=1, max_size=12), max_size=4
).map(lambda parts: "/" + "/".join(parts))
queries = st.text(alphabet="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#"), max_size=40)
header_names = st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z").filter(
    lambda n: n.lower() not in ("host", "content-length", "transfer-encoding", "connection", "upgrade", "expect")
)
header_values = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip())
headers = st.lists(st.tuples(header_names, header_values), max_size=6) | st.sampled_from([
    [("content-type", b"application/json")], [("content-encoding", b"gzip")], [("accept-encoding", b"br, gzip")],
    [("x-session-id", b"\xff\xfe")], [("authorization", b"Bearer sk-" + b"a" * 5000)], [("te", b"trailers")],
    [("content-type", b"text/event-stream; charset=utf-16")],
])  # fmt: skip


def send(
    client: httpx.Client, url: str, method: str, path: str, query: str, hdrs: list[Any], body: bytes
) -> httpx.Response:
    target = url + path + (f"?{query}" if query else "")
    return client.request(method, target, headers=[(k.encode(), v) for k, v in hdrs], content=body or None)


def check(r: httpx.Response, what: str) -> None:
    if r.status_code >= 500:
        assert r.headers.get(MARK.decode()) == "1", (
            f"kvlens answered {r.status_code} itself ({r.headers.get('x-kvlens-error')}): {r.text[:300]!r} for {what}"
        )


def healthy_afterwards(url: str, app: KvlensApp, errors: Errors) -> None:
    """kvlens answers, stored every record, and neither the relay nor the analysis raised. The analysis runs
    in a child process whose log this one does not see: its failures are read from the records and the
    failure count it reports (each record says `analysis failed: <exception>`)."""
    assert httpx.get(url + "/_kvlens/health").json()["status"] == "ok"
    recs = records(app, 1000)
    assert recs
    assert app.store.stats.rejected == 0 and app.store.stats.dropped == 0
    failed = [str(x.analysis["error"]) for x in recs if x.analysis and str(x.analysis.get("error", "")).startswith(
        "analysis failed")]  # fmt: skip
    assert failed == [], failed
    assert app.analyzer is not None and app.analyzer.failures == 0
    assert errors.seen == [], errors.seen


def _fuzz_forwarding(url: str) -> Any:
    client = httpx.Client(timeout=60)

    @FUZZ
    @given(method=methods, path=paths, query=queries, hdrs=headers, body=bodies())
    def run(method: str, path: str, query: str, hdrs: list[Any], body: bytes) -> None:
        r = send(client, url, method, path, query, hdrs, body)
        check(r, f"{method} {path}?{query} {hdrs!r} {body[:200]!r}")

    return run, client


@pytest.mark.parametrize("target", ["scripted echo", "emulator", "emulator behind limits and admission"])
def test_fuzz_forwarding(target: str, scripted: Any, proxied: Any, gated: Any, errors: Errors) -> None:
    url, app = {"scripted echo": scripted, "emulator": proxied, "emulator behind limits and admission": gated}[target]
    run, client = _fuzz_forwarding(url)
    with client:
        run()
    healthy_afterwards(url, app, errors)


def test_fuzz_completion_bodies_through_the_analysis(proxied: Any, errors: Errors) -> None:
    """Completion bodies with a valid shape more often than not, so they get tokenized and analysed."""
    url, app = proxied

    @FUZZ
    @given(path=st.sampled_from(COMPLETION_PATHS), body=completion_bodies, stream=st.booleans())
    def run(path: str, body: dict[str, Any], stream: bool) -> None:
        if isinstance(body.get("messages"), list) and stream:
            body["stream"] = True
        r = client.post(url + path, content=_dumps(body))
        check(r, f"POST {path} {body!r}"[:500])

    with httpx.Client(timeout=60) as client:
        run()
    healthy_afterwards(url, app, errors)


# ---- raw bytes: not quite HTTP -------------------------------------------------------------------

raw_lines = st.sampled_from([
    b"GET / HTTP/1.1", b"GET /_kvlens/health HTTP/1.0", b"POST /v1/chat/completions HTTP/1.1", b"GARBAGE",
    b"GET /v1/models HTTP/9.9", b"GET  /v1/models  HTTP/1.1", b"GET /\x00 HTTP/1.1", b"\xff\xfe / HTTP/1.1",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1", b"GET http://evil.example/ HTTP/1.1", b"CONNECT evil:443 HTTP/1.1",
    b"GET /_kvlens/../v1/models HTTP/1.1", b"PRI * HTTP/2.0",
]) | st.binary(min_size=1, max_size=80).filter(lambda b: b"\r\n" not in b)  # fmt: skip
raw_headers = st.lists(st.sampled_from([
    b"Host: x", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
    b"Content-Length: 3\r\nContent-Length: 4", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
    b"Connection: close", b"Connection: upgrade\r\nUpgrade: websocket", b"Expect: 100-continue", b"NoColonHere",
    b" folded: continuation", b"X: " + b"v" * 20_000, b"X-Null: a\x00b", b"Content-Type: application/json",
]) | st.binary(max_size=40).filter(lambda b: b"\r\n" not in b), max_size=5)  # fmt: skip
raw_bodies = st.sampled_from(
    [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nbad chunk\r\n", b"{" * 1000]
) | st.binary(max_size=100)


def exchange_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # kvlens may close first: that is an answer too
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, OSError):
            pass
    return out


def statuses(response: bytes) -> list[tuple[int, bool]]:
    """(status, stamped by the upstream) of each response in a raw reply (pipelining gives several)."""
    found = []
    for block in response.split(b"HTTP/1.1 ")[1:]:
        head = block.split(b"\r\n\r\n", 1)[0]
        code = head[:3]
        if code.isdigit():
            found.append((int(code), MARK + b": 1" in head.lower()))
    return found


def test_fuzz_raw_requests(scripted: Any, errors: Errors) -> None:
    url, app = scripted

    @FUZZ
    @given(line=raw_lines, hdrs=raw_headers, body=raw_bodies)
    def run(line: bytes, hdrs: list[bytes], body: bytes) -> None:
        reply = exchange_raw(url, line + b"\r\n" + b"".join(h + b"\r\n" for h in hdrs) + b"\r\n" + body)
        for status, upstream in statuses(reply):
            assert status < 500 or upstream, reply[:500]

    run()
    healthy_afterwards(url, app, errors)


# ---- kvlens' own API: schemathesis from /_kvlens/openapi.json ------------------------------------


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with serve_in_thread(Marked(ScriptedUpstream())) as up:
        with kvlens(up, tmp_path_factory.mktemp("api") / "k.sqlite3") as (url, app):
            for i in range(3):  # a few records for the endpoints to find
                httpx.post(url + "/v1/chat/completions", json={"model": f"m{i}", "messages": []},
                           headers={"x-session-id": f"s{i}"})  # fmt: skip
            assert app.flush(10)
            yield schemathesis.openapi.from_url(url + "/_kvlens/openapi.json")  # the document kvlens serves


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_fuzz_no_server_error(api_schema: Any, mode: str) -> None:
    """Each operation of the OpenAPI document, with valid (positive) and invalid (negative) parameters.

    (Not `schemathesis.pytest.from_fixture`: under pytest 9 it reads `request.node._nodeid`, which is gone.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"GET /_kvlens/api/requests", "GET /_kvlens/api/requests/{request_id}",
                                               "GET /_kvlens/api/diff", "GET /_kvlens/health"}  # fmt: skip
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @settings(FUZZ, max_examples=max(10, EXAMPLES // 5), suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Any) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, f"{case.operation.label}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:  # kvlens' own refusals are marked and in the OpenAI shape
                assert response.headers.get("x-kvlens-error"), case.operation.label
                assert set(response.json()["error"]) >= {"message", "type", "code"}

        try:
            run()
        except Unsatisfiable:  # no parameter that can be made invalid
            assert mode == "negative", operation.label


# ---- the dashboard's static files: no way out of the package ---------------------------------------

TRAVERSALS = [
    "../../api.py", "..%2f..%2fapi.py", "..%2F..%2Fproxy%2Fapi.py", "%2e%2e/%2e%2e/api.py", "%2e%2e%2f%2e%2e%2fapi.py",
    "..", "%2e%2e", "....//....//api.py", "..\\..\\api.py", "..%5c..%5capi.py", "%252e%252e%252fapi.py",
    "/etc/passwd", "%2fetc%2fpasswd", "..%c0%af..%c0%afetc/passwd", "app.js%00.py", "app.js/../../api.py",
    "index.html", "__init__.py", "./app.js/..", "%00", "style.css/", ".%2e/.%2e/api.py", "app.js?../../api.py",
]  # fmt: skip


@pytest.mark.parametrize("name", TRAVERSALS)
def test_static_path_traversal(scripted: Any, name: str) -> None:
    url, _ = scripted
    reply = exchange_raw(url, f"GET /_kvlens/static/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    [(status, _)] = statuses(reply)
    body = reply.split(b"\r\n\r\n", 1)[1]
    if name in ("app.js?../../api.py",):  # the query is not part of the name: this is app.js
        assert status == 200 and body == (Path(__file__).parent.parent / "proxy/dashboard/app.js").read_bytes()
        return
    if status in (307, 308):  # a trailing slash dropped (Starlette): still one of the two assets, nothing else
        location = next(line for line in reply.split(b"\r\n") if line.lower().startswith(b"location:"))
        assert location.split(b"/_kvlens/static/", 1)[1] in (b"app.js", b"style.css"), location
        return
    assert status in (400, 404), reply[:300]
    for leak in (b"root:", b"import ", b"def ", b"<!doctype"):
        assert leak not in body.lower()


def test_static_names_fuzz(scripted: Any) -> None:
    url, _ = scripted

    @FUZZ
    @given(name=st.text(min_size=1, max_size=40))
    def run(name: str) -> None:
        r = client.get(url + "/_kvlens/static/" + quote(name, safe=""))
        if r.status_code in (307, 308):  # "x/" -> "x" (Starlette drops a trailing slash): still a static name
            assert r.headers["location"].startswith(url + "/_kvlens/static/"), r.headers["location"]
            return
        assert r.status_code in (400, 404) or (r.status_code == 200 and name in ("app.js", "style.css")), name

    with httpx.Client(timeout=30) as client:
        run()


class _Discard:
    """A store that keeps nothing: this test reads the analysis off the exchange itself."""

    def submit(self, exchange: Any) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True


ODD_VALUES: list[Any] = [1, "x", None, {"a": 1}, [1], [None], [{"role": 1}], True]


def test_malformed_messages_never_break_the_analysis(errors: Errors) -> None:
    """The shapes the fuzz once found crashing explain (a non-list `messages`, `tool_calls`, `tools`, a
    non-object tool call or function), in one conversation so that each is also compared with the last."""
    from proxy.analyzer import Analyzer

    config = load_settings(environ={}, overrides={"upstream_url": "http://127.0.0.1:9"})  # local tokenizer
    analyzer = Analyzer(config, _Discard())  # type: ignore[arg-type]
    hi = {"role": "user", "content": "hi"}
    bodies: list[dict[str, Any]] = []
    for odd in ODD_VALUES:
        bodies += [
            {"messages": odd},
            {"messages": [hi, {"role": "assistant", "content": "x", "tool_calls": odd}]},
            {"messages": [{"role": "user", "content": odd}]},
            {"messages": [{"role": "assistant", "tool_calls": [odd]}]},
            {"messages": [{"role": "assistant", "tool_calls": [{"function": odd}]}]},
            {"messages": [hi], "tools": odd},
        ]
    for body in bodies * 2:
        ex = Exchange(method="POST", path="/v1/chat/completions", status=200, request_body=orjson.dumps(body))
        ex.session = "one conversation"
        analyzer.analyse(ex)  # raises on a bug
    assert errors.seen == [], errors.seen
