"""The replay report: original vs replayed, per request and in total, as JSON and as a terminal table.

Per request and side (`original`, `replayed`, and `compared` with `--compare`): status and error,
prompt tokens, cached tokens (llama-server's `cache_n`), prompt tokens processed (`prompt_n`),
prompt seconds (`prompt_ms`), TTFT (kvlens' measurement for the original, the replayer's for the
replay: first generated token of a stream, first byte of a plain response), generation tok/s, and
the cache analysis' lost seconds and top cause. The replayed side has an analysis only when the
upstream is a kvlens proxy: the replayer finds its records by the `x-kvlens-replay-run` and
`x-kvlens-replay-of` request headers in `GET /_kvlens/api/requests` (newest first, paged with
`before`), waiting up to `--analysis-wait` seconds for the analysis to be written.

Totals cover the requests that were replayed (a partial report compares like with like), and lost
seconds are summed by top cause for each side, with the change. With `--compare`, each request's
two outputs are compared field by field (status, content, reasoning, tool calls): the first
difference gives the character offset and, by tokenizing both outputs with the upstream's
tokenizer (or kvlens' approximation, then labelled so), the token index.

The JSON report is versioned (`kvlens_replay_report`: 1) and written atomically.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from proxy.exchange import Exchange
from proxy.prefix import lcp

if TYPE_CHECKING:
    from proxy.replay import Item, Replayer

REPORT_VERSION = 1
_API_PAGE = 1000
_CLOCK_SKEW_S = 60.0  # records this much older than the run cannot be ours, even across hosts
_SNIPPET = 40
_TOKENIZED_DIVERGENCES = 20  # token indexes cost two upstream calls each: only for the first ones


# ---- reading back from a kvlens proxy ---------------------------------------------------------------


async def probe_kvlens(urls: Iterable[str | None]) -> dict[str, Any]:
    """Which upstreams are kvlens proxies (`proxies`: url -> /_kvlens/health) or refuse connections
    (`unreachable`: url -> why)."""
    proxies: dict[str, Any] = {}
    unreachable: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        for url in urls:
            if url is None:
                continue
            try:
                r = await client.get(f"{url}/_kvlens/health")
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                unreachable[url] = str(exc) or type(exc).__name__
                continue
            except httpx.HTTPError:
                continue
            try:
                info = r.json()
            except ValueError:
                continue
            if r.status_code == 200 and isinstance(info, dict) and info.get("status") == "ok" and "version" in info:
                proxies[url] = info
    return {"proxies": proxies, "unreachable": unreachable}


async def fetch_analyses(proxies: dict[str, Any], replayer: Replayer, wait: float) -> dict[str, dict[str, Any]]:
    """url -> {original id -> that proxy's record of the replayed request (with its analysis)}."""
    from proxy.replay import REPLAY_OF_HEADER, REPLAY_RUN_HEADER

    found: dict[str, dict[str, Any]] = {url: {} for url in proxies}
    expected: dict[str, set[str]] = {}
    for url in proxies:
        expected[url] = {
            i.original.id for i in replayer.items
            if i.state == "done" and _sent_to(i, url, replayer)
        }  # fmt: skip
    oldest = replayer.started_at - _CLOCK_SKEW_S
    deadline = time.monotonic() + wait
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        for url in proxies:
            while True:
                before: float | None = None
                while len(found[url]) < len(expected[url]):
                    params: dict[str, Any] = {"limit": _API_PAGE}
                    if before is not None:
                        params["before"] = before
                    try:
                        r = await client.get(f"{url}/_kvlens/api/requests", params=params)
                        page = r.json().get("requests") or []
                    except (httpx.HTTPError, ValueError, AttributeError):
                        break
                    for rec in page:
                        headers = rec.get("request_headers") or {}
                        if (rec.get("metadata") or {}).get("analysis_pending"):
                            continue  # the provisional copy: its analysed record replaces it shortly
                        if headers.get(REPLAY_RUN_HEADER) == replayer.run_id and headers.get(REPLAY_OF_HEADER):
                            found[url][headers[REPLAY_OF_HEADER]] = rec
                    starts = [rec["started_at"] for rec in page if isinstance(rec.get("started_at"), (int, float))]
                    if len(page) < _API_PAGE or not starts or min(starts) < oldest:
                        break
                    before = min(starts)
                if len(found[url]) >= len(expected[url]) or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.25)
    return found


def _sent_to(item: Item, url: str, replayer: Replayer) -> bool:
    return url == replayer.options.upstream or (url == replayer.options.compare and item.compared is not None)


# ---- building the report ---------------------------------------------------------------------------


def build_report(replayer: Replayer, source: str, bad_lines: Sequence[tuple[int, str]], kvlens: dict[str, Any]) -> dict[str, Any]:
    options = replayer.options
    analyses = kvlens.get("analyses") or {}
    proxies = kvlens.get("proxies") or {}
    replayed_by = analyses.get(options.upstream, {}) if options.upstream in proxies else None
    compared_by = analyses.get(options.compare, {}) if options.compare in proxies else None
    items = replayer.items
    done = [i for i in items if i.state == "done"]

    requests = []
    for item in items:
        entry: dict[str, Any] = {
            "index": item.index,
            "id": item.original.id,
            "conversation": item.lane,
            "method": item.original.method,
            "path": item.original.path,
            "stream": item.original.stream,
            "t": round(item.t, 3),
            "state": item.state,
        }
        if item.skip:
            entry["skipped"] = item.skip
        if item.sent_at is not None:
            entry["sent_at"] = round(item.sent_at, 3)
        entry["original"] = side(item.original, item.original.analysis)
        if item.replayed is not None:
            entry["replayed"] = side(item.replayed, *_proxy_record(replayed_by, item))
        if item.compared is not None:
            entry["compared"] = side(item.compared, *_proxy_record(compared_by, item))
        requests.append(entry)

    divergences = _divergences(replayer) if options.compare else None
    by_index = {d["index"]: d for d in divergences or []}
    for entry in requests:
        if options.compare and entry["state"] == "done":
            entry["divergence"] = by_index.get(entry["index"])

    sides = ["original", "replayed"] + (["compared"] if options.compare else [])
    done_entries = [e for e in requests if e["state"] == "done"]
    totals = {name: _totals([e[name] for e in done_entries if name in e]) for name in sides}
    lost = {name: _lost_by_cause([e[name] for e in done_entries if name in e]) for name in sides}
    change = None
    if lost["replayed"] is not None and lost["original"] is not None:
        causes = sorted(set(lost["original"]) | set(lost["replayed"]))
        change = {c: round(lost["replayed"].get(c, 0.0) - lost["original"].get(c, 0.0), 4) for c in causes}

    return {
        "kvlens_replay_report": REPORT_VERSION,
        "run_id": replayer.run_id,
        "source": source,
        "upstream": options.upstream,
        "upstream_is_kvlens": options.upstream in proxies,
        "compare": options.compare,
        "compare_is_kvlens": options.compare in proxies if options.compare else None,
        "options": {
            "pace": options.pace,
            "speed": options.speed,
            "concurrency": options.concurrency,
            "deterministic": options.deterministic,
            "seed": options.seed if options.deterministic else None,
            "headers_added": [name for name, _ in options.headers],
        },
        "started_at": replayer.started_at or None,
        "duration_s": round(replayer.duration, 3),
        "complete": replayer.stop_reason is None and all(i.state in ("done", "skipped") for i in items),
        "stopped": replayer.stop_reason,
        "requests_planned": len(items),
        "requests_done": len(done),
        "requests_skipped": sum(i.state == "skipped" for i in items),
        "requests_not_sent": sum(i.state == "pending" and i.sent_at is None for i in items),
        "requests_interrupted": sum(i.state == "interrupted" or (i.state == "pending" and i.sent_at is not None)
                                    for i in items),
        "bad_lines": [{"line": n, "error": message} for n, message in bad_lines],
        "totals": totals,
        "lost_seconds_by_cause": {**lost, "change": change},
        "outputs": _outputs_summary(divergences, done) if options.compare else None,
        "requests": requests,
    }


def side(x: Exchange, analysis: dict[str, Any] | None, kvlens_id: str | None = None) -> dict[str, Any]:
    """The numbers the report compares, for one outcome of one request."""
    timings = x.upstream_timings or {}
    processed = _int(timings.get("prompt_n"))
    prompt = x.prompt_tokens
    if prompt is None and processed is not None and x.cached_tokens is not None:
        prompt = processed + x.cached_tokens  # llama-server: cache_n + prompt_n == prompt_tokens
    if processed is None and prompt is not None and x.cached_tokens is not None:
        processed = prompt - x.cached_tokens
    prompt_ms = timings.get("prompt_ms")
    analysis = analysis if isinstance(analysis, dict) else None
    causes = (analysis or {}).get("causes") or []
    out: dict[str, Any] = {
        "status": x.status,
        "error": x.error.kind if x.error else None,
        "prompt_tokens": prompt,
        "cached_tokens": x.cached_tokens,
        "prompt_processed": processed,
        "prompt_s": round(prompt_ms / 1000, 4) if isinstance(prompt_ms, (int, float)) else None,
        "ttft_ms": round(x.ttft_ms, 1) if x.ttft_ms is not None else None,
        "gen_tps": round(x.gen_tps, 2) if x.gen_tps is not None else None,
        "completion_tokens": x.completion_tokens,
        "lost_seconds": (analysis or {}).get("lost_seconds"),
        "cause": causes[0].get("code") if causes and isinstance(causes[0], dict) else None,
        "analysed": analysis is not None and "error" not in analysis,
    }
    if x.error:
        out["error_message"] = x.error.message
    if kvlens_id:
        out["kvlens_id"] = kvlens_id
    return out


def _proxy_record(records: dict[str, Any] | None, item: Item) -> tuple[dict[str, Any] | None, str | None]:
    if records is None:
        return None, None
    rec = records.get(item.original.id)
    if rec is None:
        return None, None
    return rec.get("analysis"), rec.get("id")


def _totals(sides: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> float | int | None:
        values = [s[key] for s in sides if s.get(key) is not None]
        return round(sum(values), 4) if values else None

    ttfts = [s["ttft_ms"] for s in sides if s.get("ttft_ms") is not None]
    tps = [s["gen_tps"] for s in sides if s.get("gen_tps")]
    prompt, cached = total("prompt_tokens"), total("cached_tokens")
    return {
        "requests": len(sides),
        "errors": sum(1 for s in sides if s.get("error") or (s.get("status") or 0) >= 400),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "reuse": round(cached / prompt, 4) if prompt and cached is not None else None,
        "prompt_processed": total("prompt_processed"),
        "prompt_s": total("prompt_s"),
        "ttft_ms_mean": round(statistics.fmean(ttfts), 1) if ttfts else None,
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "gen_tps_mean": round(statistics.fmean(tps), 2) if tps else None,
        "lost_seconds": total("lost_seconds") if any(s.get("analysed") for s in sides) else None,
    }


def _lost_by_cause(sides: list[dict[str, Any]]) -> dict[str, float] | None:
    if not any(s.get("analysed") for s in sides):
        return None
    out: dict[str, float] = {}
    for s in sides:
        if s.get("cause") and isinstance(s.get("lost_seconds"), (int, float)):
            out[s["cause"]] = round(out.get(s["cause"], 0.0) + s["lost_seconds"], 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---- comparing two upstreams' outputs ------------------------------------------------------------


def first_difference(a: Exchange, b: Exchange) -> dict[str, Any] | None:
    """Where two outcomes of one request first differ: the field, and the character offset in it."""
    status_a = (a.status, a.error.kind if a.error else None)
    status_b = (b.status, b.error.kind if b.error else None)
    if status_a != status_b:
        return {"field": "status", "char": None, "a": _status(a), "b": _status(b)}
    for name, va, vb in (
        ("content", a.output_text, b.output_text),
        ("reasoning", a.output_reasoning, b.output_reasoning),
        ("tool_calls", _calls(a), _calls(b)),
    ):
        sa, sb = va or "", vb or ""
        if sa != sb:
            char = len(os.path.commonprefix([sa, sb]))
            start = max(char - 10, 0)
            a_part, b_part = sa[start : char + _SNIPPET], sb[start : char + _SNIPPET]
            return {"field": name, "char": char, "a": a_part, "b": b_part, "texts": (sa, sb)}
    return None


def _divergences(replayer: Replayer) -> list[dict[str, Any]]:
    out = []
    for item in replayer.items:
        if item.state != "done" or item.replayed is None or item.compared is None:
            continue
        diff = first_difference(item.replayed, item.compared)
        if diff is not None:
            out.append({"index": item.index, "id": item.original.id, **diff})
    texts = [d for d in out if "texts" in d][:_TOKENIZED_DIVERGENCES]
    if texts:
        from proxy.tokens import Tokenizer

        with Tokenizer(replayer.options.upstream, timeout=10.0) as tokenizer:
            for d in texts:
                sa, sb = d["texts"]
                ta, tb = tokenizer.text_tokens(sa), tokenizer.text_tokens(sb)
                if ta.tokens is not None and tb.tokens is not None:
                    d["token"] = lcp(ta.tokens, tb.tokens)
                    d["token_source"] = ta.source if ta.source == tb.source else "approximate"
    for d in out:
        d.pop("texts", None)
        d.setdefault("token", None)
    return out


def _outputs_summary(divergences: list[dict[str, Any]] | None, done: Sequence[Item]) -> dict[str, Any]:
    compared = sum(1 for i in done if i.replayed is not None and i.compared is not None)
    divergences = divergences or []
    return {"compared": compared, "identical": compared - len(divergences), "different": len(divergences),
            "first_difference": divergences[0] if divergences else None}  # fmt: skip


def _status(x: Exchange) -> str:
    return f"{x.status if x.status is not None else '-'}" + (f" {x.error.kind}" if x.error else "")


def _calls(x: Exchange) -> str:
    return orjson.dumps(x.output_tool_calls).decode() if x.output_tool_calls else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---- output ----------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    os.replace(tmp, path)


_ROW_FIELDS = (
    ("status", "status", None), ("cached", "cached_tokens", 0), ("processed", "prompt_processed", 0),
    ("prompt s", "prompt_s", 2), ("ttft ms", "ttft_ms", 0), ("tg tok/s", "gen_tps", 1),
    ("lost s", "lost_seconds", 2), ("cause", "cause", None),
)  # fmt: skip


def format_report(report: dict[str, Any], rows: int = 50, report_path: str | None = None) -> str:
    opts = report["options"]
    target = report["upstream"] + (" (kvlens)" if report["upstream_is_kvlens"] else "")
    pace = f"pace {opts['pace']}" + (f" x{opts['speed']:g}" if opts["pace"] == "recorded" else "")
    lines = [
        f"replay of {report['requests_planned']} requests from {report['source']} -> {target}"
        + (f" and {report['compare']}" if report["compare"] else ""),
        f"{pace}, concurrency {opts['concurrency']}" + (f", deterministic (seed {opts['seed']})" if opts["deterministic"] else "")
        + f"; {report['requests_done']} replayed in {report['duration_s']:.1f} s",
    ]
    if report["stopped"]:
        lines.append(f"STOPPED: {report['stopped']} (partial report)")
    lines.append("")
    shown = [e for e in report["requests"] if e["state"] == "done"][: max(rows, 0)]
    if shown:
        header = ("#", "request", "conversation") + tuple(label for label, _, _ in _ROW_FIELDS)
        table = [header]
        for e in shown:
            cells = [str(e["index"]), e["id"][:12], _short(e["conversation"], 16)]
            for _, key, digits in _ROW_FIELDS:
                cells.append(_pair(e["original"].get(key), e.get("replayed", {}).get(key), digits))
            table.append(tuple(cells))
        lines += _columns(table)
        more = report["requests_done"] - len(shown)
        if more > 0:
            lines.append(f"... {more} more" + (f" in {report_path}" if report_path else " (pass --report FILE.json for all)"))
        lines.append("(each cell: original→replayed)")
        lines.append("")

    sides = [s for s in ("original", "replayed", "compared") if s in report["totals"]]
    names = {"original": "original", "replayed": "replayed", "compared": "compared"}
    table = [("totals", *[names[s] for s in sides], "change")]
    for label, key, digits in (
        ("requests", "requests", 0), ("errors", "errors", 0), ("prompt tokens", "prompt_tokens", 0),
        ("cached tokens", "cached_tokens", 0), ("reuse", "reuse", 3), ("prompt tokens processed", "prompt_processed", 0),
        ("prompt seconds", "prompt_s", 2), ("TTFT mean ms", "ttft_ms_mean", 0), ("TTFT p50 ms", "ttft_ms_p50", 0),
        ("generation tok/s (mean)", "gen_tps_mean", 1), ("lost seconds", "lost_seconds", 2),
    ):  # fmt: skip
        values = [report["totals"][s].get(key) for s in sides]
        table.append((label, *[_num(v, digits) for v in values], _delta(values[0], values[1], digits)))
    lines += _columns(table)

    lost = report["lost_seconds_by_cause"]
    if lost["original"] is not None or lost["replayed"] is not None:
        lines.append("")
        causes = sorted(set(lost["original"] or {}) | set(lost["replayed"] or {}))
        table = [("lost seconds by cause", "original", "replayed", "change")]
        for cause in causes:
            a = (lost["original"] or {}).get(cause, 0.0) if lost["original"] is not None else None
            b = (lost["replayed"] or {}).get(cause, 0.0) if lost["replayed"] is not None else None
            table.append((cause, _num(a, 2), _num(b, 2), _delta(a, b, 2)))
        if len(table) > 1:
            lines += _columns(table)
        if lost["replayed"] is None:
            lines.append("(replayed: no analysis; replay through a kvlens proxy to get it)")

    outputs = report.get("outputs")
    if outputs is not None:
        lines.append("")
        first = outputs["first_difference"]
        if first is None:
            lines.append(f"outputs: identical for all {outputs['compared']} requests compared")
        else:
            where = f"character {first['char']}" if first["char"] is not None else "status"
            if first.get("token") is not None:
                where += f", token {first['token']}" + (" (approximate)" if first.get("token_source") == "approximate" else "")
            lines.append(f"outputs: {outputs['different']} of {outputs['compared']} requests differ; first difference "
                         f"at request #{first['index']} ({first['id'][:12]}), {first['field']} {where}:")
            lines.append(f"  {report['upstream']}: {first['a']!r}")
            lines.append(f"  {report['compare']}: {first['b']!r}")
    extra = []
    if report["requests_skipped"]:
        extra.append(f"{report['requests_skipped']} skipped (see the JSON report)")
    if report["bad_lines"]:
        extra.append(f"{len(report['bad_lines'])} malformed input lines skipped")
    if report["requests_not_sent"] or report["requests_interrupted"]:
        extra.append(f"{report['requests_not_sent']} not sent, {report['requests_interrupted']} abandoned in flight")
    if extra:
        lines.append("")
        lines.append("; ".join(extra))
    return "\n".join(lines)


def _columns(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def _pair(a: Any, b: Any, digits: int | None) -> str:
    return "-" if a is None and b is None else f"{_num(a, digits)}→{_num(b, digits)}"


def _num(value: Any, digits: int | None) -> str:
    if value is None:
        return "-"
    if digits is None or isinstance(value, str):
        return str(value)
    return f"{value:.{digits}f}"


def _delta(a: Any, b: Any, digits: int) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    d = b - a
    return ("+" if d > 0 else "") + f"{d:.{digits}f}"


def _short(value: str | None, width: int) -> str:
    if not value:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"
