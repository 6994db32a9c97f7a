"""What the kvlens relay adds to a request, measured against the same upstream directly.

    python benchmarks/relay_overhead.py [--requests 2000]

A minimal upstream (not the emulator, so it is never the bottleneck) answers 1 KB JSON; kvlens
runs as `kvlens serve` in its own process with its SQLite store on. A keep-alive client at
concurrency 1 alternates direct and proxied requests so both arms see the same machine noise.
Two kvlens arms run side by side: analysis on (the default: every request is tokenized, hashed,
diffed and explained in the worker thread; this upstream has no /tokenize, so kvlens renders and
tokenizes locally, the most CPU the analysis can take) and analysis off. Prints the added latency
p50/p99 (proxied minus direct percentile) of each and their ratio. This is the quick check for
the proxy core; the full benchmark (concurrency 16/64, streaming, nginx, LiteLLM) is overhead.py.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port  # noqa: E402

UPSTREAM = '''
import uvicorn
BODY = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"' + b"a" * 900 + b'"}}]}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), log_level="warning", access_log=False)
'''


def wait_up(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/_kvlens/health")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not come up")


def timed(conn: http.client.HTTPConnection, body: bytes) -> float:
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    return (time.perf_counter() - t) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    up_port, on_port, off_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="kvlens-bench-")
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port)])
    procs = [upstream]
    for port, analysis in ((on_port, "true"), (off_port, "false")):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{up_port}",
             "--listen", f"127.0.0.1:{port}", "--db", os.path.join(tmp, f"bench-{port}.sqlite3"), "--log-level", "warning"],
            cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, "KVLENS_ANALYSIS_ENABLED": analysis},
        ))  # fmt: skip
    try:
        for port in (up_port, on_port, off_port):
            wait_up(port)
        body = (b'{"model":"m","messages":[{"role":"system","content":"' + b"You are a careful assistant. " * 40
                + b'"},{"role":"user","content":"' + b"x" * 1000 + b'"}]}')  # fmt: skip
        arms = {name: http.client.HTTPConnection("127.0.0.1", port)
                for name, port in (("direct", up_port), ("analysis on", on_port), ("analysis off", off_port))}
        times: dict[str, list[float]] = {name: [] for name in arms}
        for i in range(args.requests + 200):
            for name, conn in arms.items():  # interleaved, so all arms share the machine's noise
                elapsed = timed(conn, body)
                if i >= 200:  # the first 200 warm up connections and caches
                    times[name].append(elapsed)
        direct = times["direct"]
        print(f"{args.requests} requests per arm, concurrency 1, ~2 KB chat JSON in, 1 KB out, store on")
        for name, values in times.items():
            added = "" if name == "direct" else (
                f"   added p50 {pct(values, .5) - pct(direct, .5):.3f} ms  p99 {pct(values, .99) - pct(direct, .99):.3f} ms")
            print(f"{name:<13} p50 {pct(values, .5):.3f} ms  p99 {pct(values, .99):.3f} ms{added}")
        on, off = times["analysis on"], times["analysis off"]
        print(f"ratio analysis on/off: p50 {pct(on, .5) / pct(off, .5):.2f}  mean {statistics.mean(on) / statistics.mean(off):.2f}")
        print(f"ratio kvlens/direct (mean, analysis on) {statistics.mean(on) / statistics.mean(direct):.2f}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    main()
