"""Bounded memory over a long run: 10,000 requests with 50k-token prompts through kvlens and its analysis.

`kvlens serve` runs as a subprocess (its RSS is what is measured, with its analysis process's: the sum of
/proc/PID/status VmRSS over the process tree sampled twice a second, and each process's VmHWM at the end) in front of a stub llama-server, also a subprocess, that answers the calls
the analysis makes the way llama-server does (`/apply-template`, `/tokenize` with pieces, `/props`,
`/health`) and the chat requests themselves, cheaply: one token per word, so a 50k-token prompt costs
the stub milliseconds, not the emulator's seconds. Everything kvlens does is real: relay, body capture,
the analysis (upstream tokenization of every prompt, the prefix index, the shadow cache model,
explain), findings, and the SQLite store with bodies.

The workload is agentic: `--conversations` conversations, each a ~40k-word system prompt of its own
plus a sliding window of recent turns, so every prompt is about `--prompt-tokens` tokens and extends
its conversation's previous one. The distinct tokens (conversations x 40k + every turn's new words)
far exceed analysis.max_tokens, so the prefix index's eviction runs all the time.

`--server-ms` is how long the stub takes per request (a real server needs at least that for the new
part of a 50k-token prompt); with 0 the clients outrun the analysis and its queue fills up, which is
the worst case for memory. Not a test: run it by hand.

    .venv/bin/python benchmarks/soak.py                          # 10,000 requests, 50k tokens, paced
    .venv/bin/python benchmarks/soak.py --server-ms 0            # clients faster than the analysis
    .venv/bin/python benchmarks/soak.py --requests 500 --prompt-tokens 5000   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port  # noqa: E402

VOCAB = ("cache prefix token slot reuse server prompt model agent tool call file edit read write search index "
         "block hash import class def return value error test build run shell diff patch line").split()  # fmt: skip
PIECE = re.compile(r"\s*\S+|\s+")


# ---- the stub llama-server ----------------------------------------------------------------------


class Stub:
    """llama-server's analysis endpoints and chat completions, one token per word (ids from crc32)."""

    def __init__(self, server_ms: float) -> None:
        self.delay = server_ms / 1000.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/health":
            await _json(send, {"status": "ok"})
        elif path == "/props":
            await _json(send, {"default_generation_settings": {"n_ctx": 131072}, "total_slots": 4,
                               "build_info": "b10470-stub"})  # fmt: skip
        elif path == "/apply-template":
            await _json(send, {"prompt": render(orjson.loads(body).get("messages") or [])})
        elif path == "/tokenize":
            req = orjson.loads(body)
            pieces = PIECE.findall(req.get("content") or "")
            tokens = [{"id": zlib.crc32(p.encode()) % 150_000, "piece": p} for p in pieces]
            if not req.get("with_pieces"):
                tokens = [t["id"] for t in tokens]  # type: ignore[index]
            await _json(send, {"tokens": tokens})
        elif path == "/v1/chat/completions":
            req = orjson.loads(body)
            n = len(render(req.get("messages") or []).split())
            if self.delay:
                await asyncio.sleep(self.delay)
            reply = " ".join(random.choice(VOCAB) for _ in range(12))
            await _json(send, {
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": n, "completion_tokens": 12, "total_tokens": n + 12,
                          "prompt_tokens_details": {"cached_tokens": max(0, n - 200)}},
                "timings": {"cache_n": max(0, n - 200), "prompt_n": min(n, 200), "prompt_ms": 50.0,
                            "predicted_n": 12, "predicted_ms": 60.0},
            })  # fmt: skip
        else:
            await _json(send, {"error": {"code": 404, "message": "File Not Found"}}, 404)


def render(messages: list[Any]) -> str:
    parts = [f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n" for m in messages if isinstance(m, dict)]
    return "".join(parts) + "<|im_start|>assistant\n"


async def _json(send: Any, obj: Any, status: int = 200) -> None:
    data = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def serve_stub(port: int, server_ms: float) -> None:
    import uvicorn

    uvicorn.run(Stub(server_ms), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- the run --------------------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"{rng.choice(VOCAB)}{rng.randrange(1000)}" for _ in range(n))


class Conversation:
    def __init__(self, c: int, system_words: int, window: int) -> None:
        rng = random.Random(c)
        self.rng = rng
        self.session = f"soak-{c}"
        self.system = {"role": "system", "content": words(rng, system_words)}
        self.turns: list[dict[str, Any]] = []
        self.window = window

    def next_body(self) -> bytes:
        self.turns.append({"role": "user", "content": words(self.rng, 40)})
        self.turns = self.turns[-self.window:]
        if self.turns[0]["role"] != "user":
            self.turns = self.turns[1:]
        return orjson.dumps({"model": "soak", "messages": [self.system, *self.turns], "max_tokens": 12})

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tree(pid: int) -> list[int]:
    """`pid` and its descendants: the proxy, multiprocessing's forkserver and the analysis process."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(c for c, parent in parents.items() if parent == p)
    return found


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += rss_kib(p)
        except OSError:
            pass
    return total


def wait_up(url: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.1)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--prompt-tokens", type=int, default=50_000)
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--server-ms", type=float, default=150.0,
                        help="stub time per chat request (0: as fast as possible; the analysis falls behind)")
    parser.add_argument("--db", help="SQLite file (default: a temporary one, deleted afterwards)")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub, args.server_ms)
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stub_port, kv_port = free_port(), free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--serve-stub", str(stub_port), "--server-ms",
                             str(args.server_ms)], env=env)  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="kvlens-soak-")
    db = args.db or str(Path(tmp.name) / "soak.sqlite3")
    kvlens = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{stub_port}",
                               "--listen", f"127.0.0.1:{kv_port}", "--db", db, "--log-level", "warning"],
                              cwd=ROOT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{kv_port}"
    samples: list[tuple[float, int, int]] = []  # (seconds, requests done, RSS KiB)
    done = [0]
    stop = threading.Event()
    try:
        wait_up(f"http://127.0.0.1:{stub_port}/health", stub)
        wait_up(url + "/_kvlens/health", kvlens)
        baseline = tree_rss_kib(kvlens.pid)
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, done[0], tree_rss_kib(kvlens.pid)))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        system_words = max(100, args.prompt_tokens * 4 // 5)
        window = max(2, (args.prompt_tokens - system_words) // 45)
        convs = [Conversation(c, system_words, window) for c in range(args.conversations)]
        print(f"kvlens pid {kvlens.pid}: {args.requests} requests, ~{args.prompt_tokens} prompt tokens each, "
              f"{args.conversations} conversations, concurrency {args.concurrency}, stub {args.server_ms:g} ms",
              flush=True)  # fmt: skip
        asyncio.run(drive(url, convs, args.requests, args.concurrency, done, samples))
        t_sent = time.monotonic() - t0
        with httpx.Client(timeout=30) as client:  # wait for the analysis and the store to catch up
            while True:
                text = client.get(url + "/_kvlens/metrics").text
                backlog = metric(text, "kvlens_analysis_queue_length") + metric(text, "kvlens_store_pending")
                if backlog == 0:
                    break
                time.sleep(1)
        t_all = time.monotonic() - t0
        stop.set()
        sampler.join()
        peaks = {p: (rss_kib(p, "VmHWM"), Path(f"/proc/{p}/cmdline").read_bytes()[:60]) for p in tree(kvlens.pid)}
        peak = max(s[2] for s in samples)
        final = tree_rss_kib(kvlens.pid)
        health = httpx.get(url + "/_kvlens/health").json()
        metrics = httpx.get(url + "/_kvlens/metrics").text
    finally:
        stop.set()
        kvlens.terminate()
        kvlens.wait(60)
        stub.terminate()
        stub.wait(10)
        tmp.cleanup()

    print(f"sent in {t_sent:.0f} s ({args.requests / t_sent:.1f} requests/s); analysed and stored after {t_all:.0f} s")
    print(f"kvlens RSS, all its processes together: start {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
          f"(sampled), end {final / 1024:.0f} MiB")
    for p, (hwm, cmd) in peaks.items():
        name = cmd.replace(bytes(1), b" ").decode(errors="replace")
        print(f"  pid {p} peak {hwm / 1024:.0f} MiB (VmHWM): {name}")
    for mark in (0.1, 0.25, 0.5, 0.75, 1.0):
        target = int(args.requests * mark)
        at = next((s for s in samples if s[1] >= target), samples[-1])
        print(f"  after {at[1]:>6} requests ({at[0]:6.0f} s): RSS {at[2] / 1024:6.0f} MiB")
    print(f"store: written {health['store']['written']}, dropped {health['store']['dropped']}, "
          f"write failures {health['store']['write_failures']}; analysis skipped "
          f"{metric(metrics, 'kvlens_analysis_skipped_total'):.0f}, "
          f"failed {metric(metrics, 'kvlens_analysis_failures_total'):.0f}")


async def drive(url: str, convs: list[Conversation], n: int, concurrency: int, done: list[int],
                samples: list[Any]) -> None:
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < n:
            conv = await queue.get()  # one request in flight per conversation, as a real agent
            sent += 1
            r = await client.post(url + "/v1/chat/completions", content=conv.next_body(),
                                  headers={"content-type": "application/json", "x-session-id": conv.session})
            r.raise_for_status()
            conv.answer(r.json()["choices"][0]["message"]["content"])
            done[0] += 1
            if done[0] % 1000 == 0:
                print(f"  {done[0]} requests, RSS {samples[-1][2] / 1024 if samples else 0:.0f} MiB", flush=True)
            queue.put_nowait(conv)

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


if __name__ == "__main__":
    main()
