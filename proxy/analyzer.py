"""The cache analysis of every chat/completion request, off the client's critical path.

The relay hands each finished `Exchange` to `Analyzer.submit` (a non-blocking enqueue). One
worker thread then, in arrival order: parses the request body, gets the prompt's token ids from
the upstream's own tokenizer (`proxy.tokens`), classifies the request into a conversation and a
kind (`proxy.sessions`), finds its predecessor and the longest prefix among recent prompts
(`proxy.prefix`), replays it through a shadow of the server's cache policy (`proxy.cachemodel`)
to get the reuse a correct server would give, asks `proxy.explain` where and why the prompt
diverged, prices the loss in seconds, attaches the result as `exchange.analysis`, and only then
submits the record to the store. A failure anywhere here is recorded in the analysis
(`analysis.error`) and never reaches the client, whose response has long been sent.

Memory is bounded: token sequences live once in the prefix index (capped in distinct tokens),
and only the last main turn of the most recent conversations is kept whole (capped in count); the
other recent turns keep only what classification reads (`_slim`). Token ids are uint32 arrays
(`proxy.cachemodel.TokenArray`, 4 bytes a token against 36 in a list) from the tokenizer to the
cache model, whose slots and host-RAM cache (up to --cache-ram, millions of tokens) hold them too.
Nothing here forms reference cycles: what a request allocates is freed when its analysis ends, not
at a full garbage collection, which a process holding the prefix index's millions of objects runs
rarely (tests/test_analysis_memory.py; benchmarks/analysis_memory.py measures it).
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import functools
import logging
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import asdict
from typing import Any

import orjson

from proxy.cachemodel import CacheConfig, CacheModel, Launch, concat
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.explain import Evidence, explain
from proxy.findings import Findings
from proxy.limits import context_shift_risk, n_ctx_of, requested_output
from proxy.prefix import PrefixIndex
from proxy.sessions import classify
from proxy.store import Store
from proxy.tokens import Tokenizer, compact_tokens
from proxy.turn import KIND_MAIN, KIND_OTHER, KIND_SUBAGENT, Turn

log = logging.getLogger("kvlens.analyzer")

COMPLETION_PATHS = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion"}
)
MIN_SHARED_PREFIX = 64  # below one block, a prefix shared with an unrelated prompt is BOS/template noise
SKIPPED_QUEUE_FULL = "analysis skipped: the analysis queue was full"
USER_MARKERS = ("<|im_start|>user",)  # ChatML (Qwen, the emulator); where user messages start
TOOL_RESPONSE_AFTER_MARKER = "\n<tool_response>"  # ChatML tool results also open a "user" turn
TRIM_EVERY_BYTES = 8 << 20  # request bodies analysed between two returns of free heap memory to the OS


class Analyzer:
    """Owns the analysis worker thread and everything it remembers about past requests."""

    def __init__(
        self, settings: Settings, store: Store, tokenizer: Tokenizer | None = None, metrics: Any | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.tokenizer = tokenizer or Tokenizer(settings.upstream_url)
        self.index = PrefixIndex(max_tokens=settings.analysis_max_tokens)
        self.last_main: OrderedDict[str, Turn] = OrderedDict()
        self.wire: deque[Turn] = deque(maxlen=256)
        self.model: CacheModel | None = None
        self._queue: queue.Queue[Exchange | None] = queue.Queue(maxsize=settings.analysis_queue)
        self._thread: threading.Thread | None = None
        self.skipped = 0
        self.failures = 0
        self.handoff: Any | None = None
        """`proxy.limits.PromptHandoff`: prompts the limits already counted on the hot path (set by the app)."""
        self._n_ctx: int | None = None
        self._heap = _HeapTrim(TRIM_EVERY_BYTES)
        self.findings = Findings(
            settings.upstream_url,
            props=self.tokenizer.props,
            server_name=lambda: "llama-server" if self.tokenizer.capability == "llama-server" else "the upstream",
            kv_unified=settings.server_kv_unified,
            admission=(settings.admission_max_in_flight, settings.admission_kv_budget_tokens),
        )
        """`proxy.findings`: upstream failures flagged on the record (it may hold a failed record for up to
        its window, until the requests that failed with it have arrived)."""

    # The loop side.

    def submit(self, exchange: Exchange) -> None:
        """Called on the event loop for every finished exchange: never blocks."""
        if self._thread is None:
            self.store.submit(exchange)
            return
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:  # analysis is behind: keep the record, skip its analysis
            self.skipped += 1
            exchange.analysis = {"error": SKIPPED_QUEUE_FULL}
            self.store_records([exchange])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvlens-analyzer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Analyse what is queued (bounded by `timeout`), then stop; records are never dropped."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        self.tokenizer.close()
        while True:  # whatever the worker could not reach in time goes to the store unanalysed
            try:
                leftover = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(leftover, Exchange):
                self.store_records([leftover])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is analysed and stored (tests, shutdown)."""
        done = threading.Event()
        if self._thread is None:
            return self.store.flush(timeout)
        self._queue.put(_Marker(done))  # type: ignore[arg-type]
        return done.wait(timeout) and self.store.flush(timeout)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.findings.due())
            except queue.Empty:  # nothing arrived while a failure's records were held: write them
                self.store_records(self.findings.expire())
                continue
            if item is None:
                self.store_records(self.findings.drain())
                return
            if isinstance(item, _Marker):
                self.store_records(self.findings.drain())
                item.done.set()
                continue
            self.analyse_and_store(item)

    # The worker side.

    def analyse_and_store(self, exchange: Exchange) -> None:
        self._heap.note(len(exchange.request_body or b""))
        try:
            self.analyse(exchange)
        except Exception as exc:  # a bug here must cost the analysis, never the record
            self.failures += 1
            log.exception("analysis of %s failed", exchange.id)
            exchange.analysis = {"error": f"analysis failed: {type(exc).__name__}: {exc}"}
        if self.metrics is not None:
            try:
                self.metrics.observe_analysis(exchange)
            except Exception:
                log.exception("metrics for %s failed", exchange.id)
        try:
            a = exchange.analysis or {}
            ready = self.findings.observe(exchange, a.get("prompt_tokens"), a.get("tokens_source"))
        except Exception:  # a finding bug must cost the finding, never the record
            log.exception("findings for %s failed", exchange.id)
            ready = [exchange]
        self.store_records(ready)

    def store_records(self, exchanges: list[Exchange]) -> None:
        """To the store, without the bodies unless capture.bodies (the analysis needed them, the user may not)."""
        for exchange in exchanges:
            if not self.settings.capture_bodies:
                exchange.request_body = exchange.response_body = None
            self.store.submit(exchange)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def analyse(self, exchange: Exchange) -> None:
        if exchange.method != "POST" or exchange.path not in COMPLETION_PATHS:
            return
        if exchange.metadata.get("not_forwarded"):  # kvlens answered it (a limit, the queue): the server never saw it
            return
        turn = Turn(exchange=exchange, body=_parse_body(exchange.request_body))
        classify(turn, self.wire)
        if turn.kind == KIND_OTHER:
            return
        if turn.body is None:
            if exchange.request_body and exchange.request_size > len(exchange.request_body):
                self._truncated(turn)
            return
        self._tokenize(turn)
        self._flag_context_shift(turn)
        predecessor = self.last_main.get(turn.conversation or "") if turn.conversation else None
        if predecessor is not None and predecessor.held is None:
            predecessor.held = self.index.get_array(predecessor.id)
        between = self._between(predecessor)
        common, best_id, best = self._prefixes(turn, predecessor)
        launch = self._simulate(turn)
        evidence = Evidence(
            turn=turn,
            predecessor=predecessor,
            between=between,
            common_prefix=common,
            best_prefix=best,
            cached_upstream=exchange.cached_tokens,
            cached_expected=launch.n_past if launch is not None and launch.error is None else None,
            prediction=launch,
            server_memory=self.settings.server_memory,
            cache_prompt_disabled=(turn.body or {}).get("cache_prompt") is False,
        )
        divergence, causes = explain(evidence)
        exchange.analysis = self._summarise(evidence, best_id, divergence, causes)
        if predecessor is not None:
            predecessor.held = None  # it lives in the index; the turn object stays small
        self._remember(turn)

    def _truncated(self, turn: Turn) -> None:
        """A completion request whose body was cut at capture.max_body_bytes: nothing to tokenize or compare,
        so the analysis says what is missing (explain answers `unknown`) instead of being absent."""
        ex = turn.exchange
        predecessor = self.last_main.get(turn.conversation or "") if turn.conversation else None
        evidence = Evidence(turn=turn, predecessor=predecessor, cached_upstream=ex.cached_tokens,
                            server_memory=self.settings.server_memory)
        divergence, causes = explain(evidence)
        ex.analysis = self._summarise(evidence, None, divergence, causes)
        ex.analysis["tokens_error"] = (f"request body not captured: {ex.request_size:,} bytes, more than "
                                       f"capture.max_body_bytes ({self.settings.capture_max_body_bytes:,})")

    def _tokenize(self, turn: Turn) -> None:
        ex = turn.exchange
        prompt = self.handoff.take(ex.id) if self.handoff is not None else None
        if prompt is None:
            if isinstance(self.tokenizer, Tokenizer):  # uint32 arrays, not 50k-int lists
                prompt = self.tokenizer.prompt(ex.path, turn.body or {}, compact=True)
            else:
                prompt = self.tokenizer.prompt(ex.path, turn.body or {})
        # Ids and offsets as uint32 arrays (`TokenArray`, 4 bytes a token): what the prefix index, the
        # cache model and explain compare at C speed; a list that does not fit one stays a list.
        tokens = None if prompt.tokens is None else compact_tokens(prompt.tokens)
        turn.tokens, turn.tokens_source, turn.tokens_error = tokens, prompt.source, prompt.error
        turn.rendered = prompt.rendered
        turn.token_offsets = None if prompt.offsets is None else compact_tokens(prompt.offsets)
        if turn.tokens is None or ex.status != 200:
            return
        generated = self._generated_tokens(ex)
        turn.held = concat(turn.tokens, generated[:-1]) if generated else turn.tokens
        turn.extra["generated"] = generated

    def _flag_context_shift(self, turn: Turn) -> None:
        """metadata["context_shift_risk"] when prompt + max output > the server's n_ctx (limits or not)."""
        ex = turn.exchange
        if turn.tokens is None or "context_shift_risk" in ex.metadata:
            return
        n_ctx = self._n_ctx = self._n_ctx or n_ctx_of(self.tokenizer.props())
        limits = ex.metadata.get("limits") or {}
        max_output = limits.get("max_output") if "max_output" in limits else requested_output(turn.body or {})[1]
        if context_shift_risk(len(turn.tokens), max_output, n_ctx):
            ex.metadata["context_shift_risk"] = {
                "prompt_tokens": len(turn.tokens), "max_output": max_output, "n_ctx": n_ctx, "by": "analysis",
            }  # fmt: skip

    def _generated_tokens(self, ex: Exchange) -> list[int]:
        """The reply as the model sampled it, re-tokenized; ends with the EOS token on a natural stop.

        The server holds prompt + generated[:-1]: the last sampled token is never decoded. On a
        natural stop that token is EOS, so the whole visible reply is held."""
        raw = _raw_reply(ex)
        tokens = self.tokenizer.text(raw) if raw else []
        tokens = list(tokens or [])
        if ex.finish_reason in ("stop", "tool_calls", "eos"):
            tokens.append(-1)  # stands for EOS: dropped by [:-1], never compared
        return tokens

    def _between(self, predecessor: Turn | None) -> list[Turn]:
        if predecessor is None:
            return []
        out: list[Turn] = []
        for turn in reversed(self.wire):
            if turn is predecessor:
                break
            out.append(turn)
        return list(reversed(out))

    def _prefixes(self, turn: Turn, predecessor: Turn | None) -> tuple[int | None, str | None, int | None]:
        if turn.tokens is None:
            return None, None, None
        # Hash the held sequence once and use it for the lookups and for `add`: the prompt is its
        # prefix, so every prefix length is capped at the prompt's length.
        keyed = self.index.keyed(turn.held if turn.held is not None else turn.tokens)
        turn.extra["keyed"] = keyed
        n = len(turn.tokens)
        common = None
        if predecessor is not None and predecessor.held is not None and predecessor.id in self.index:
            common = min(n, self.index.common_prefix(predecessor.id, keyed))
        best_id, best = self.index.longest_prefix(keyed)
        return common, best_id, min(n, best)

    def _simulate(self, turn: Turn) -> Launch | None:
        """Replay the request through the shadow cache model: the reuse a correct server gives."""
        ex = turn.exchange
        if turn.tokens is None or ex.status is None or (ex.error is not None and ex.status is None):
            return None
        model = self._model()
        if model is None:
            return None
        launch = model.launch(
            turn.tokens,
            id_slot=_int((turn.body or {}).get("id_slot"), -1),
            cache_prompt=(turn.body or {}).get("cache_prompt") if isinstance((turn.body or {}).get("cache_prompt"), bool) else None,
            user_starts=_user_starts(turn),
        )
        if launch is None:  # every shadow slot busy: the real server queued it; ours is sequential
            return None
        if launch.error is None:
            model.finish(launch, turn.extra.get("generated") or [])
        return launch

    def _model(self) -> CacheModel | None:
        if self.model is None:
            props = self.tokenizer.props()
            if not props:
                return None
            self.model = CacheModel(self._cache_config(props))
        return self.model

    def _cache_config(self, props: dict[str, Any]) -> CacheConfig:
        s = self.settings
        slots = _int(props.get("total_slots"), 1)
        n_ctx_slot = _int((props.get("default_generation_settings") or {}).get("n_ctx"), 4096)
        unified = s.server_kv_unified
        return CacheConfig(
            n_slots=slots,
            n_ctx=n_ctx_slot if unified else n_ctx_slot * slots,
            kv_unified=unified,
            memory=s.server_memory,  # type: ignore[arg-type]
            n_swa=s.server_swa_window,
            swa_full=s.server_swa_full,
            cache_ram_mib=s.server_cache_ram_mib,
        )

    def _remember(self, turn: Turn) -> None:
        if turn.held is not None:
            self.index.add(turn.id, turn.extra.pop("keyed", None) or turn.held)
        turn.extra.pop("keyed", None)
        turn.held = turn.tokens = None  # kept once, in the index
        turn.extra.pop("generated", None)
        # What later requests never read, dropped: with 50k-token prompts these are ~2 MB a turn, and 256
        # turns are remembered (benchmarks/soak.py). Offsets serve only the request's own divergence; the
        # bodies are on their way to the store (a copy of the record without them, so the store's is whole).
        turn.token_offsets = None
        turn.exchange = dataclasses.replace(turn.exchange, request_body=None, response_body=None)
        self.wire.append(turn)
        if turn.kind in (KIND_MAIN, KIND_SUBAGENT) and turn.conversation:  # a subagent is its own chain
            replaced = self.last_main.get(turn.conversation)
            self.last_main[turn.conversation] = turn
            self.last_main.move_to_end(turn.conversation)
            if replaced is not None and replaced is not turn:
                _slim(replaced)
            while len(self.last_main) > self.settings.analysis_max_conversations:
                _slim(self.last_main.popitem(last=False)[1])
        else:
            _slim(turn)

    def _summarise(self, ev: Evidence, best_id: str | None, divergence: Any, causes: list[Any]) -> dict[str, Any]:
        turn, ex = ev.turn, ev.turn.exchange
        prompt_tokens = len(turn.tokens) if turn.tokens is not None else ex.prompt_tokens
        cached = ev.cached_upstream if ev.cached_upstream is not None else ev.cached_expected
        ideal = _ideal_reuse(turn, ev, prompt_tokens)
        lost = max(0, ideal - cached) if ideal is not None and cached is not None else None
        per_token = _prompt_ms_per_token(ex)
        return {
            "prompt_tokens": prompt_tokens,
            "tokens_source": turn.tokens_source,
            "tokens_error": turn.tokens_error,
            "conversation": turn.conversation,
            "kind": turn.kind,
            "side_kind": turn.side_kind,
            "predecessor_id": ev.predecessor.id if ev.predecessor is not None else None,
            "best_match_id": best_id,
            "best_prefix": ev.best_prefix,
            "common_prefix": ev.common_prefix,
            "sim": _ratio(ev.common_prefix, prompt_tokens),
            "f_keep": _ratio(ev.common_prefix, len(ev.predecessor.held or []) if ev.predecessor else None),
            "cached_upstream": ev.cached_upstream,
            "cached_expected": ev.cached_expected,
            "reusable_tokens": ideal,
            "lost_tokens": lost,
            "lost_seconds": round(lost * per_token / 1000.0, 4) if lost is not None and per_token else None,
            "prediction": _prediction(ev.prediction),
            "divergence": asdict(divergence) if divergence is not None else None,
            "causes": [asdict(c) for c in causes],
        }


def _slim(turn: Turn) -> None:
    """A turn no longer any conversation's last (so never a predecessor again) stays in `wire` only for
    `sessions.classify`, which matches a side request's embedded user text against recent main turns'
    user messages, and for explain's "requests in between" (kind, conversation). The rest goes: its
    body but those user messages, and its rendered prompt (with 50k-token prompts ~0.8 MB a turn)."""
    if turn.kind == KIND_MAIN and turn.body is not None:
        turn.body = {"messages": [m for m in turn.messages if m.get("role") == "user"]}
    else:
        turn.body = None
    turn.rendered = None


class _HeapTrim:
    """Gives the C heap's free pages back to the OS (glibc `malloc_trim`) every `every` bytes of
    request bodies analysed; nothing where there is no such call (macOS, musl).

    A 50k-token request makes ~10 MB of short-lived buffers above pymalloc's 512 bytes (the body, the
    rendered prompt, the /tokenize answer), each prompt a little longer than the last, between
    long-lived ones (cached prompts, the conversations' last turns). glibc reuses the holes they leave
    poorly and returns only the top of its heap, so the process kept growing: benchmarks/analysis_memory.py
    measured 464 MiB RSS after 6,000 such requests with 179 MiB of it free heap, 298 MiB after a trim;
    trimming every 8 MiB of bodies (~20 such requests) keeps the RSS at what is in use, for ~0.1 ms
    a request."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.pending = 0
        self.trim = _malloc_trim()

    def note(self, nbytes: int) -> None:
        if self.trim is None:
            return
        self.pending += nbytes
        if self.pending >= self.every:
            self.pending = 0
            try:
                self.trim(0)
            except Exception:  # never worth failing an analysis for
                self.trim = None


@functools.cache
def _malloc_trim() -> Any | None:
    """glibc's malloc_trim, looked up in the running process; None elsewhere."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class _Marker:
    def __init__(self, done: threading.Event) -> None:
        self.done = done


def _parse_body(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _raw_reply(ex: Exchange) -> str:
    """The generated text in the ChatML/Qwen layout the model emitted it (reasoning, content, tool calls)."""
    parts = []
    if ex.output_reasoning:
        parts.append(f"<think>\n{ex.output_reasoning}\n</think>\n\n")
    if ex.output_text:
        parts.append(ex.output_text)
    for call in ex.output_tool_calls or []:
        args = call.get("arguments") or "{}"
        try:
            args_obj = orjson.loads(args)
        except orjson.JSONDecodeError:
            args_obj = args
        payload = orjson.dumps({"name": call.get("name"), "arguments": args_obj}).decode()
        parts.append(f"\n<tool_call>\n{payload}\n</tool_call>")
    return "".join(parts)


def _user_starts(turn: Turn) -> list[int]:
    """Token positions where user messages start (where llama-server places context checkpoints)."""
    text, offsets = turn.rendered, turn.token_offsets
    if not text or not offsets:
        return []
    starts = []
    for marker in USER_MARKERS:
        pos = text.find(marker)
        while pos >= 0:
            if not text.startswith(TOOL_RESPONSE_AFTER_MARKER, pos + len(marker)):
                # The last token starting at `pos`: zero-width tokens before it (the BOS that add_special
                # prepends, at offset 0) are not where the message starts.
                index = bisect.bisect_right(offsets, pos) - 1
                if index >= 0 and offsets[index] == pos:
                    starts.append(index)
            pos = text.find(marker, pos + 1)
    return sorted(starts)


def _ideal_reuse(turn: Turn, ev: Evidence, prompt_tokens: int | None) -> int | None:
    """What an ideal client and server would reuse: all the predecessor's held tokens the prompt still
    needs (an append-only conversation), else the longest prefix any recent prompt shares."""
    if prompt_tokens is None:
        return None
    cap = max(0, prompt_tokens - 1)  # llama-server always evaluates at least one token
    is_own_turn = turn.kind in (KIND_MAIN, KIND_SUBAGENT)  # a side request never continues the chat
    if is_own_turn and ev.predecessor is not None and ev.predecessor.held is not None:
        return min(len(ev.predecessor.held), cap)
    if ev.best_prefix is not None and ev.best_prefix >= MIN_SHARED_PREFIX:
        return min(ev.best_prefix, cap)
    return 0


def _prompt_ms_per_token(ex: Exchange) -> float | None:
    t = ex.upstream_timings or {}
    value = t.get("prompt_per_token_ms")
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    ms, n = t.get("prompt_ms"), t.get("prompt_n")
    if isinstance(ms, (int, float)) and isinstance(n, int) and n > 0:
        return float(ms) / n
    return None


def _prediction(launch: Launch | None) -> dict[str, Any] | None:
    if launch is None:
        return None
    return {
        "slot": launch.slot_id,
        "selection": launch.selection,
        "f_sim": round(launch.f_sim, 4),
        "f_keep": round(launch.f_keep, 4),
        "ram_loaded": launch.ram_loaded,
        "checkpoint_restored": launch.checkpoint_restored.n_tokens if launch.checkpoint_restored else None,
        "full_reprocess_forced": launch.full_reprocess_forced,
        "error": launch.error,
    }


def _ratio(num: int | None, den: int | None) -> float | None:
    return round(num / den, 4) if num is not None and den else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
