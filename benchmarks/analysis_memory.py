"""Memory and CPU of the analysis over a long soak-like run, in one process (no proxy, no pipes).

    .venv/bin/python benchmarks/analysis_memory.py [--requests 1500] [--prompt-tokens 50000]
        [--conversations 40] [--census-every 250] [--tracemalloc] [--direct]

Drives `Analyzer.analyse_and_store` the way the analysis process does, with the bodies and replies of
benchmarks/soak.py (agent conversations: a ~40k-word system prompt each plus a sliding window of
turns, so every prompt is ~50k tokens and the prefix index evicts all the time). The tokenizer is
the real `proxy.tokens.Tokenizer` against soak.py's stub llama-server (a subprocess: one token per
word, `/apply-template`, `/tokenize` with pieces, `/props`), or with --direct the same answers
computed in-process without HTTP (to see the analysis' own CPU).

Every --census-every requests it prints this process' RSS and the CPU per analysed request since the
last census, and a census of what the analysis holds (bytes measured by walking the objects):
the cache model's slots and RAM cache, the prefix index, the tokenizer's caches, the remembered
turns. With --tracemalloc the top allocation sites are printed at the end (slow: use fewer
requests); with --malloc-stats, pymalloc's and glibc's own accounts and what malloc_trim gives back;
with --dump, every analysis as a JSON line (exchange ids are fixed, so two versions' dumps compare
byte for byte). Not a test: run it by hand.

Measured on the 2-core dev machine (issue 10), HTTP stub, default settings:
  before: 500 requests: RSS 1735 MiB and growing ~2 MiB a request, 88-98 ms CPU a request. What held it:
          the httpx response cycles (each request's /tokenize answer, 1.5 MB, freed only by a full
          collection), then glibc's fragmented heap (1.9 GB free inside it after 200 requests), then
          lists of ints (RAM cache 36 bytes a token) and unbounded-by-bytes caches and turns.
  after:  500 requests: RSS 190 MiB, 46-49 ms CPU a request; 8,000 requests: RSS 310 MiB, flat from
          6,000 on (the prefix index at analysis.max_tokens), peak 358 MiB.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import subprocess
import sys
import time
import zlib
from array import array
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak import PIECE, VOCAB, Conversation, render  # noqa: E402
from proxy.analyzer import Analyzer  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from proxy.exchange import Exchange  # noqa: E402
from proxy.tokens import Tokenizer  # noqa: E402
from tests.servers import free_port  # noqa: E402


class NullStore:
    def __init__(self) -> None:
        self.n = 0

    def submit(self, exchange: Exchange) -> None:
        self.n += 1

    def flush(self, timeout: float | None = None) -> bool:
        return True


class DirectTransport(httpx.BaseTransport):
    """soak.py's stub answers, computed in-process (no sockets, no other process)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/props":
            data: Any = {"default_generation_settings": {"n_ctx": 131072}, "total_slots": 4, "build_info": "b10470-stub"}
        elif path == "/apply-template":
            data = {"prompt": render(orjson.loads(request.read()).get("messages") or [])}
        elif path == "/tokenize":
            req = orjson.loads(request.read())
            pieces = PIECE.findall(req.get("content") or "")
            tokens = [{"id": zlib.crc32(p.encode()) % 150_000, "piece": p} for p in pieces]
            data = {"tokens": tokens if req.get("with_pieces") else [t["id"] for t in tokens]}
        else:
            return httpx.Response(404, json={"error": {"code": 404, "message": "File Not Found"}})
        return httpx.Response(200, content=orjson.dumps(data), headers={"content-type": "application/json"})


def malloc_report() -> str:
    """Where the RSS is: pymalloc's arenas (small objects) and glibc's heap (larger blocks), and what
    malloc_trim gives back (free glibc memory the process was still holding)."""
    import ctypes
    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pass
    # sys._debugmallocstats writes to the C stderr: read it through a pipe on fd 2
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(w)
        os.close(saved)
    text = b""
    while chunk := os.read(r, 65536):
        text += chunk
    os.close(r)
    stats = text.decode(errors="replace")

    def num(label: str) -> int:
        m = re.search(re.escape(label) + r"\s*=\s*([\d,]+)", stats)
        return int(m.group(1).replace(",", "")) if m else -1

    arenas = num("# arenas allocated current")
    in_use = num("# bytes in allocated blocks")
    parts = [f"pymalloc: {arenas} arenas ({arenas * (1 << 20) / 2**20:.0f} MiB), {in_use / 2**20:.0f} MiB in blocks"]
    try:
        libc = ctypes.CDLL("libc.so.6")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc.mallinfo2.restype = MallInfo2
        mi = libc.mallinfo2()
        parts.append(f"glibc: heap {mi.arena / 2**20:.0f} MiB ({mi.uordblks / 2**20:.0f} in use, {mi.fordblks / 2**20:.0f} "
                     f"free), mmapped {mi.hblkhd / 2**20:.0f} MiB")
        before = rss_kib()
        libc.malloc_trim(0)
        parts.append(f"malloc_trim(0): RSS {before / 1024:.0f} -> {rss_kib() / 1024:.0f} MiB")
    except (OSError, AttributeError):
        pass
    return "; ".join(parts)


class GcClock:
    """Time spent in the cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.count[info["generation"]] += 1

    def take(self) -> tuple[list[float], list[int]]:
        out = (self.seconds, self.count)
        self.seconds, self.count = [0.0, 0.0, 0.0], [0, 0, 0]
        return out


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ---- a census of what the analysis holds ------------------------------------------------------------


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of `obj` and everything it references that was not counted yet (iterative)."""
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is None or isinstance(o, type):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, (str, bytes, bytearray, array, int, float, bool, memoryview)):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)) or type(o).__name__ == "deque":
            stack.extend(o)
        else:
            if hasattr(o, "__dict__"):
                stack.append(vars(o))
            for cls in type(o).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if isinstance(name, str) and hasattr(o, name):
                        stack.append(getattr(o, name))
    return total


def census(an: Analyzer) -> dict[str, str]:
    seen: set[int] = set()
    out: dict[str, str] = {}
    m = an.model
    if m is not None:
        ram_tokens = sum(len(e.tokens) for e in m.ram)
        out["model.ram"] = f"{len(m.ram)} entries, {ram_tokens:,} tokens, {deep_size(m.ram, seen) / 2**20:.1f} MiB"
        out["model.slots"] = (f"{sum(len(s.tokens) for s in m.slots):,} tokens, "
                              f"{deep_size(m.slots, seen) / 2**20:.1f} MiB")
    out["index"] = (f"{len(an.index)} seqs, {an.index.stored_tokens:,} distinct tokens, "
                    f"{deep_size(an.index, seen) / 2**20:.1f} MiB")
    tk = an.tokenizer
    for name in ("_prompts", "_texts"):
        lru = getattr(tk, name, None)
        if lru is not None:
            out[f"tokenizer.{name}"] = (f"{len(lru)} entries, weight {lru._weight:,}, "
                                        f"{deep_size(lru._data, seen) / 2**20:.1f} MiB")
    out["last_main"] = f"{len(an.last_main)} turns, {deep_size(an.last_main, seen) / 2**20:.1f} MiB"
    out["wire"] = f"{len(an.wire)} turns, {deep_size(an.wire, seen) / 2**20:.1f} MiB (beyond last_main)"
    out["findings"] = f"{deep_size(an.findings, seen) / 2**20:.1f} MiB"
    return out


def exchange_for(raw: bytes, session: str, reply: str, n_words: int, t: float, id_: str) -> Exchange:
    cached = max(0, n_words - 200)
    response = orjson.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": reply}}]})
    return Exchange(
        id=id_, started_at=t, method="POST", path="/v1/chat/completions", session=session, session_header="x-session-id",
        request_headers={"content-type": "application/json", "x-session-id": session}, request_body=raw,
        request_size=len(raw), status=200, model="soak", stream=False, finish_reason="stop",
        response_body=response, response_size=len(response),
        usage={"prompt_tokens": n_words, "completion_tokens": 12, "total_tokens": n_words + 12,
               "prompt_tokens_details": {"cached_tokens": cached}},
        upstream_timings={"cache_n": cached, "prompt_n": min(n_words, 200), "prompt_ms": 50.0,
                          "predicted_n": 12, "predicted_ms": 60.0},
        output_text=reply,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--prompt-tokens", type=int, default=50_000)
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--census-every", type=int, default=250)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--direct", action="store_true", help="the stub's answers in-process, no HTTP")
    parser.add_argument("--malloc-stats", action="store_true", help="at the end: allocator stats, then malloc_trim")
    parser.add_argument("--memory", default="plain", choices=("plain", "swa", "hybrid"), help="server.memory")
    parser.add_argument("--dump", metavar="PATH", help="write every analysis as a JSON line (to compare versions)")
    parser.add_argument("--no-census", action="store_true", help="RSS and CPU only (the census walks every object)")
    args = parser.parse_args()

    stub = None
    if args.direct:
        upstream = "http://stub.invalid"
        client = httpx.Client(transport=DirectTransport())
    else:
        port = free_port()
        stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--serve-stub", str(port),
                                 "--server-ms", "0"], env={**os.environ, "PYTHONPATH": str(ROOT)})
        upstream = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(upstream + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = None
    try:
        settings = load_settings(environ={}, overrides={"server_memory": args.memory})
        dump = open(args.dump, "wb") if args.dump else None
        tokenizer = Tokenizer(upstream, client=client)
        store = NullStore()
        an = Analyzer(settings, store, tokenizer=tokenizer)  # type: ignore[arg-type]
        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start(1)
        system_words = max(100, args.prompt_tokens * 4 // 5)
        window = max(2, (args.prompt_tokens - system_words) // 45)
        convs = [Conversation(c, system_words, window) for c in range(args.conversations)]
        rng = random.Random(0)
        print(f"{args.requests} requests, ~{args.prompt_tokens} prompt tokens, {args.conversations} conversations, "
              f"tokenizer {'in-process' if args.direct else 'HTTP stub'}; start RSS {rss_kib() / 1024:.0f} MiB",
              flush=True)
        gc_clock = GcClock()
        cpu_total = wall_total = 0.0
        cpu_window, n_window = 0.0, 0
        peak_rss = 0
        t = 1000.0
        for i in range(args.requests):
            conv = convs[i % len(convs)]
            raw = conv.next_body()
            reply = " ".join(rng.choice(VOCAB) for _ in range(12))
            n_words = len(render(orjson.loads(raw)["messages"]).split())
            ex = exchange_for(raw, conv.session, reply, n_words, t, f"req-{i:06d}")
            t += 1
            c0, w0 = time.process_time(), time.perf_counter()
            an.analyse_and_store(ex)
            c1, w1 = time.process_time(), time.perf_counter()
            cpu_total += c1 - c0
            wall_total += w1 - w0
            cpu_window += c1 - c0
            n_window += 1
            if an.failures:
                raise SystemExit(f"analysis failed at request {i}")
            conv.answer(reply)
            if dump is not None:
                dump.write(orjson.dumps({"i": i, "analysis": ex.analysis}, option=orjson.OPT_SORT_KEYS) + b"\n")
            if (i + 1) % args.census_every == 0 or i + 1 == args.requests:
                rss = rss_kib()
                peak_rss = max(peak_rss, rss)
                gc_s, gc_n = gc_clock.take()
                print(f"after {i + 1:>6} requests: RSS {rss / 1024:6.0f} MiB, CPU {cpu_window / n_window * 1000:6.1f} ms "
                      f"per request (last {n_window}; of which gc {sum(gc_s) / n_window * 1000:.1f} ms, "
                      f"{gc_n[2]} full collections)", flush=True)
                cpu_window, n_window = 0.0, 0
                if not args.no_census:
                    for key, value in census(an).items():
                        print(f"    {key:<18} {value}")
        print(f"total: {args.requests} requests, CPU {cpu_total / args.requests * 1000:.1f} ms per request, "
              f"wall {wall_total / args.requests * 1000:.1f} ms per request; peak RSS (VmHWM) "
              f"{rss_kib('VmHWM') / 1024:.0f} MiB; stored {store.n}, analysis failures {an.failures}")
        if dump is not None:
            dump.close()
        last = ex.analysis or {}
        print(f"last analysis: prompt_tokens {last.get('prompt_tokens')}, common_prefix {last.get('common_prefix')}, "
              f"cached_expected {last.get('cached_expected')}, causes {[c['code'] for c in last.get('causes') or []]}")
        if args.malloc_stats:
            gc.collect()
            print(malloc_report())
        if args.tracemalloc:
            import tracemalloc

            gc.collect()
            snap = tracemalloc.take_snapshot()
            print("top allocation sites (tracemalloc, live at the end):")
            for stat in snap.statistics("lineno")[:20]:
                print(f"  {stat.size / 2**20:8.1f} MiB {stat.count:>9} blocks  {stat.traceback[0]}")
    finally:
        if stub is not None:
            stub.terminate()
            stub.wait(10)


if __name__ == "__main__":
    main()
