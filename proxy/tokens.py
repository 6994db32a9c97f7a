"""Prompt identity: the token ids the upstream will see for a request, asked of the upstream itself.

kvlens explains cache reuse by comparing prompts token by token, so it needs the exact ids the server
put in its KV cache. Only the server knows them: its chat template and tokenizer decide. This module
owns getting them, off the hot path (kvlens' analysis worker thread, a synchronous `httpx.Client`,
never the asyncio loop):

- llama-server: `POST /apply-template` with the request's own body (it runs the same
  `oaicompat_chat_params_parse` as the chat endpoint), then `POST /tokenize {content, add_special:
  true, parse_special: true, with_pieces: true}`; this reproduces the task's tokens for text-only
  requests (research §4, §9). The pieces give each token's character offset in the rendered prompt,
  which turns a token divergence into a place in the conversation.
- vLLM: `POST /tokenize {model, messages, add_generation_prompt}` gives the ids (no text, no offsets).
- Anything else, or an upstream that is down or refuses: a local approximation (the emulator's
  ChatML template and toy tokenizer), labelled `approximate`, with `error` saying why.

What the upstream supports is probed once, lazily, and re-probed after failures with exponential
backoff (so a restarted or replaced upstream is picked up without hammering a dead one). Expensive
answers are cached: prompts by a hash of the body minus the fields that cannot change the rendering,
and tokenizations by a hash of the text (the proxy asks for the same text for limits, then analysis;
agents resend identical bodies on retries). Caches are bounded by entries, by total tokens and by bytes.

Nothing here raises: every failure becomes an `error` string. Thread-safe.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import itertools
import json
import logging
import operator
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from proxy.cachemodel import MIB, TOKEN_TYPECODE, TokenArray

log = logging.getLogger("kvlens.tokens")

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION_PATHS = frozenset({"/v1/completions", "/completions", "/completion"})
ANTHROPIC_PATHS = frozenset({"/v1/messages"})
RequestKind = Literal["chat", "completion", "anthropic"]

NOT_COMPLETION = "not a completion request"

# Top-level body fields that change sampling or delivery, never the rendered prompt. Everything else
# (messages, tools, tool_choice, chat_template_kwargs, reasoning_format, add_generation_prompt,
# model, and any field we do not know) stays in the cache key: a miss is cheap, a wrong hit is not.
NON_PROMPT_FIELDS = frozenset({
    "stream", "stream_options", "max_tokens", "max_completion_tokens", "n_predict", "n", "seed", "stop",
    "temperature", "dynatemp_range", "dynatemp_exponent", "top_p", "top_k", "min_p", "typical_p",
    "top_n_sigma", "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n",
    "penalty_last_n", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta",
    "logprobs", "top_logprobs", "n_probs", "post_sampling_probs", "logit_bias", "ignore_eos", "samplers",
    "timings_per_token", "return_progress", "return_tokens", "cache_prompt", "id_slot", "t_max_predict_ms",
    "n_keep", "n_discard", "n_indent", "user", "metadata", "store", "service_tier", "prompt_cache_key",
    "safety_identifier",
})
APPLY_TEMPLATE_DROP = frozenset({"stream", "stream_options"})
VLLM_CHAT_FIELDS = ("model", "tools", "chat_template", "chat_template_kwargs", "continue_final_message",
                    "add_special_tokens", "documents", "mm_processor_kwargs")
MEDIA_PART_TYPES = frozenset({"image_url", "input_audio", "file", "image", "audio"})

# What servers answer for a path they do not route (llama-server, Starlette/FastAPI, aiohttp, ...).
ROUTE_MISSING = frozenset({"not found", "file not found", "method not allowed", "404: not found",
                           "405: method not allowed", "404 page not found"})
PROBE_TEXT = "kvlens probe"
MIN_BACKOFF_S = 1.0


@dataclass
class PromptTokens:
    tokens: list[int] | None
    """Prompt token ids as the server will see them (None if unknown)."""
    source: str | None
    """"upstream" (the server's own template and tokenizer, or a token-id prompt used as is),
    "approximate" (local rendering), or None."""
    rendered: str | None
    """The prompt text (chat template applied), when known."""
    offsets: list[int] | None
    """Char offset in `rendered` at which each token starts (len == len(tokens)), when known. A token
    the text does not contain (the BOS `add_special` adds) has zero width; the byte tokens of one
    multi-byte character all start at that character."""
    error: str | None
    """What went wrong when tokens are missing or approximate (or a caveat about exact ones)."""


class UpstreamError(Exception):
    """One upstream call failed. `status` None means no HTTP answer (connect error, timeout)."""

    def __init__(self, message: str, status: int | None = None, *, route_missing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.route_missing = route_missing

    @property
    def down(self) -> bool:
        """The upstream is unreachable or failing as a whole: back off, then re-probe."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def changed(self) -> bool:
        """An endpoint we detected is gone (or answers garbage): the upstream is not what we probed.

        A 404 with the server's own message (vLLM's unknown model, a router's unknown model) is a
        refusal of this request, not a missing route."""
        return self.status == 200 or self.route_missing

    @property
    def transient(self) -> bool:
        return self.down or self.changed


# ---- pure helpers -------------------------------------------------------------------------------


def request_kind(path: str) -> RequestKind | None:
    """Which kind of prompt a request path carries (query string and trailing slash ignored)."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    if path in CHAT_PATHS:
        return "chat"
    if path in COMPLETION_PATHS:
        return "completion"
    if path in ANTHROPIC_PATHS:
        return "anthropic"
    return None


def body_key(kind: str, body: Mapping[str, Any]) -> bytes:
    """The prompt cache key: blake2b of the kind and the canonical JSON of the prompt-relevant fields."""
    relevant = {k: v for k, v in body.items() if k not in NON_PROMPT_FIELDS}
    try:
        canonical = orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # integers beyond 64 bits and the like
        canonical = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.blake2b(kind.encode() + b"\0" + canonical, digest_size=16).digest()


def text_key(text: str, add_special: bool) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16,
                           person=b"add_special" if add_special else b"no_special").digest()


_ID, _PIECE = operator.itemgetter("id"), operator.itemgetter("piece")
_INT_ONLY = frozenset({int})
_STR_ONLY = frozenset({str})


def piece_offsets(text: str, pieces: Sequence[str | bytes | Sequence[int]]) -> list[int] | None:
    """Char offset in `text` where each token piece starts, or None when the pieces do not spell `text`.

    Pieces are strings, or byte lists when not valid UTF-8 alone (a character split over byte-fallback
    tokens): bytes accumulate until they decode, and all tokens of one character start at it. A piece
    the text does not contain at that point (the BOS that add_special prepends) gets zero width; a
    SentencePiece leading space is tolerated. Linear, and fast on the common shapes (a 300k-token
    prompt takes a fraction of a second)."""
    chunks = _decode_pieces(pieces)
    joined = "".join(chunks)
    if joined == text:
        return _starts(chunks)
    if chunks and not text.startswith(chunks[0]) and joined[len(chunks[0]):] == text:  # BOS, not in the text
        return [0, *_starts(chunks[1:])]
    return _align(text, chunks)


def _decode_pieces(pieces: Sequence[str | bytes | Sequence[int]]) -> list[str]:
    """Each piece's text; a piece inside a multi-byte character is "" until its last byte arrives."""
    if set(map(type, pieces)) <= _STR_ONLY:  # the usual answer: nothing to decode
        return list(pieces)  # type: ignore[arg-type]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    chunks: list[str] = []
    pending = False
    for piece in pieces:
        if type(piece) is str and not pending:
            chunks.append(piece)
            continue
        raw = piece.encode("utf-8", "surrogatepass") if isinstance(piece, str) else bytes(piece)
        chunks.append(decoder.decode(raw))
        pending = bool(decoder.getstate()[0])
    if pending:  # the pieces end inside a character: U+FFFD, which the text does not have there
        chunks[-1] += decoder.decode(b"", final=True)
    return chunks


def _starts(chunks: Sequence[str]) -> list[int]:
    starts = list(itertools.accumulate(map(len, chunks), initial=0))
    starts.pop()  # the end of the last chunk
    return starts


def _align(text: str, chunks: Sequence[str]) -> list[int] | None:
    """The general case: match chunk by chunk, zero width for what the text lacks."""
    offsets: list[int] = []
    pos = 0
    for chunk in chunks:
        offsets.append(pos)
        if not chunk:
            continue
        if text.startswith(chunk, pos):
            pos += len(chunk)
        elif chunk[0] == " " and text.startswith(chunk[1:], pos):
            pos += len(chunk) - 1
    return offsets if pos == len(text) else None


def has_media(body: Mapping[str, Any]) -> bool:
    """Whether any message carries a non-text content part (its tokens are not in the text)."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(
                isinstance(p, Mapping) and p.get("type") in MEDIA_PART_TYPES for p in content):
            return True
    return False


def single_prompt(prompt: Any) -> tuple[Any, str | None]:
    """llama-server's tokenize_input_prompts, first prompt only: (prompt, note about the rest)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        note = f"{len(prompt)} prompts in one request: analysed the first" if len(prompt) > 1 else None
        return prompt[0], note
    return prompt, None


def is_token_list(value: Any) -> bool:
    return isinstance(value, list) and set(map(type, value)) <= _INT_ONLY  # bool is not a token id


def compact_tokens(tokens: Sequence[int]) -> Sequence[int]:
    """uint32 array storage for cached tokens and offsets (9x smaller than a list of ints; the array
    type `proxy.cachemodel` and `proxy.prefix` work on without conversion). An array of that type is
    kept as is: cached arrays are shared, never changed in place. Ids that do not fit stay a list."""
    if isinstance(tokens, array) and tokens.typecode == TOKEN_TYPECODE:
        return tokens
    try:
        return TokenArray(tokens)
    except (OverflowError, TypeError):
        return list(tokens)


def _as_list(tokens: Sequence[int] | None) -> list[int] | None:
    if tokens is None:
        return None
    return tokens.tolist() if isinstance(tokens, array) else list(tokens)


def _copy(tokens: Sequence[int] | None) -> Sequence[int] | None:
    """A caller's own copy of cached ids: an array stays an array (a memcpy), anything else a list."""
    if tokens is None:
        return None
    return TokenArray(tokens) if isinstance(tokens, array) and tokens.typecode == TOKEN_TYPECODE else list(tokens)


def _nbytes(value: Any) -> int:
    """Memory held by cached tokens, offsets or text (a list: its pointers and its int objects)."""
    if value is None:
        return 0
    if isinstance(value, list):
        return sys.getsizeof(value) + 32 * len(value)
    return sys.getsizeof(value)


_EMPTY_STREAM = httpx.ByteStream(b"")


def _unbind(response: httpx.Response) -> None:
    """Break the reference cycle httpx leaves between a read response and its stream (httpx 0.28 binds
    the stream to the response to time it), so that the response, its content (1.5 MB for a 50k-token
    /tokenize answer with pieces) and its request (the payload) are freed when the call returns. With
    the cycle they wait for a full garbage collection, which a process holding millions of objects
    (the prefix index) runs rarely: ~5 MB a 50k-token request piled up (benchmarks/analysis_memory.py).
    The content was read and the stream closed by then: the stream is never used again."""
    if response.is_closed:
        response.stream = _EMPTY_STREAM


def _describe(exc: httpx.HTTPError, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g} s"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in text.lower() else f"cannot connect ({text})"
    return f"{type(exc).__name__}: {text}"


def _server_message(response: httpx.Response) -> str:
    """The message of an error body (llama-server/OpenAI `error.message`, vLLM, FastAPI `detail`)."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:300]
    return response.text[:200]


# ---- the local approximation ----------------------------------------------------------------------


def approximate_text(text: str, *, add_special: bool) -> tuple[list[int], list[int] | None]:
    """The emulator tokenizer's ids for `text` (specials parsed) and their offsets."""
    from proxy.emulator.tokenizer import default_tokenizer  # lazy: the vocabulary takes ~0.3 s

    tk = default_tokenizer()
    tokens = tk.tokenize(text, add_special=add_special, parse_special=True)
    return tokens, piece_offsets(text, [tk.piece_json(t) for t in tokens])


def approximate_chat(body: Mapping[str, Any]) -> str:
    """A canonical rendering of a chat body (the emulator's ChatML template); ValueError if impossible."""
    from proxy.emulator.template import options_from_body, render

    options = options_from_body(body, drop_past_reasoning=True)
    return render(body.get("messages"), body.get("tools"), options).text


def anthropic_as_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic /v1/messages body as OpenAI chat messages (text blocks only), for approximation."""
    messages: list[Any] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend(body.get("messages") or [])
    return {"messages": messages}


# ---- caches -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    tokens: Sequence[int] | None
    source: str | None
    rendered: str | None
    offsets: Sequence[int] | None
    error: str | None

    @property
    def weight(self) -> int:
        return 1 + len(self.tokens or ())

    @property
    def nbytes(self) -> int:
        return 200 + _nbytes(self.tokens) + _nbytes(self.offsets) + _nbytes(self.rendered)

    def to_prompt(self, compact: bool = False) -> PromptTokens:
        """Fresh copies every time: callers may mutate what they get without touching the cache. Lists,
        or with `compact` uint32 arrays (`proxy.cachemodel.TokenArray`: a copy costs a memcpy, where a
        list of 50k ids costs 50k int objects)."""
        copy_ = _copy if compact else _as_list
        return PromptTokens(
            tokens=copy_(self.tokens),
            source=self.source,
            rendered=self.rendered,
            offsets=copy_(self.offsets),
            error=self.error,
        )


def _entry(tokens: Sequence[int] | None, source: str | None, rendered: str | None,
           offsets: Sequence[int] | None, error: str | None) -> _Entry:
    return _Entry(None if tokens is None else compact_tokens(tokens), source, rendered,
                  None if offsets is None else compact_tokens(offsets), error)


class LRU:
    """A thread-safe LRU bounded by entry count, by total weight (tokens) and by total bytes."""

    def __init__(self, max_entries: int, max_weight: int, max_bytes: int | None = None) -> None:
        self.max_entries = max(0, max_entries)
        self.max_weight = max(0, max_weight)
        self.max_bytes = None if max_bytes is None else max(0, max_bytes)
        self._data: OrderedDict[bytes, tuple[Any, int, int]] = OrderedDict()
        self._weight = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    @property
    def nbytes(self) -> int:
        """Bytes held, as given to `put`."""
        return self._bytes

    def put(self, key: bytes, value: Any, weight: int, nbytes: int = 0) -> None:
        if self.max_entries == 0 or weight > self.max_weight or (self.max_bytes is not None and nbytes > self.max_bytes):
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._weight -= old[1]
                self._bytes -= old[2]
            self._data[key] = (value, weight, nbytes)
            self._weight += weight
            self._bytes += nbytes
            while len(self._data) > self.max_entries or self._weight > self.max_weight or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                _, (_, w, b) = self._data.popitem(last=False)
                self._weight -= w
                self._bytes -= b

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._weight = 0
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)


# ---- the tokenizer -----------------------------------------------------------------------------------


class Tokenizer:
    """Prompt and reply token ids for one upstream. Never raises from its public methods."""

    def __init__(self, upstream_url: str, *, timeout: float = 30.0, client: httpx.Client | None = None,
                 cache_size: int = 256, allow_approximate: bool = True, cache_tokens: int = 16_000_000,
                 cache_mib: int = 48, retry_interval: float = 30.0, headers: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`cache_tokens` bounds each cache's total tokens and `cache_mib` its memory (ids, offsets and
        rendered text: ~0.8 MB for a 50k-token prompt); `retry_interval` caps the backoff after
        failures and spaces re-checks of a "none" upstream and of /props; `headers` go with every call
        (e.g. the upstream's API key); `clock` is for tests."""
        self.base_url = upstream_url.rstrip("/")
        self._headers = dict(headers or {})
        self.timeout = timeout
        self.allow_approximate = allow_approximate
        self.retry_interval = retry_interval
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=timeout, trust_env=False)
        self._clock = clock
        self._prompts = LRU(cache_size, cache_tokens, cache_mib * MIB)
        self._texts = LRU(cache_size, cache_tokens, cache_mib * MIB)
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._capability = "unknown"
        self._none_reason = ""
        self._probed_at = 0.0
        self._stale = False
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._vllm_model: str | None = None
        self._props: dict[str, Any] | None = None
        self._props_retry_at = 0.0

    # ---- lifecycle ----

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API ----

    @property
    def capability(self) -> str:
        """"llama-server" | "vllm" | "none" | "unknown" (not probed successfully yet)."""
        return self._capability

    @property
    def cache_stats(self) -> dict[str, int]:
        p, t = self._prompts, self._texts
        return {"prompt_hits": p.hits, "prompt_misses": p.misses, "prompt_entries": len(p),
                "text_hits": t.hits, "text_misses": t.misses, "text_entries": len(t)}

    def probe(self) -> str:
        """Detect now what the upstream supports (unless backing off after a failure)."""
        try:
            self._ready(force=True)
        except Exception:  # never raise
            log.exception("tokenizer probe failed")
        return self._capability

    def prompt(self, path: str, body: dict[str, Any], *, compact: bool = False) -> PromptTokens:
        """The prompt tokens of a completion request, as the upstream will see them. With `compact`, ids
        and offsets come as uint32 arrays (`proxy.cachemodel.TokenArray`) when they fit, not lists."""
        try:
            return self._prompt(path, body, compact)
        except Exception as exc:  # tokenizer failure never fails anything
            log.exception("prompt tokenization failed")
            return PromptTokens(None, None, None, None, f"tokenizer error: {type(exc).__name__}: {exc}")

    def text(self, text: str) -> list[int] | None:
        """Token ids of generated text (no BOS, specials parsed), None when the upstream cannot say.

        The server holds the sampled ids, and the reply comes back in the next prompt re-tokenized
        inside the rendering; re-tokenizing the reply text is the best we have (research §9: it can
        differ by a few tokens). `parse_special` is on because a `<think>` or `<tool_call>` in a reply
        was generated as the special token. Approximate ids only when the upstream has no tokenizer at
        all (capability "none"), so they match the approximate prompts; `text_tokens` says more."""
        result = self.text_tokens(text)
        if result.source == "upstream" or (result.source == "approximate" and self._capability == "none"):
            return result.tokens
        return None

    def text_tokens(self, text: str) -> PromptTokens:
        """`text` with its source, offsets and error; approximate (when allowed) on any failure."""
        try:
            return self._text_tokens(text)
        except Exception as exc:
            log.exception("text tokenization failed")
            return PromptTokens(None, None, text, None, f"tokenizer error: {type(exc).__name__}: {exc}")

    def props(self) -> dict[str, Any] | None:
        """GET /props, fetched once and cached; after a failure, refetched at most every retry_interval."""
        with self._lock:
            if self._props is not None:
                return copy.deepcopy(self._props)
            if self._clock() < self._props_retry_at:
                return None
        try:
            data = self._call("GET", "/props", None)
        except UpstreamError:
            data = None
        except Exception:
            log.exception("GET /props failed")
            data = None
        with self._lock:
            if isinstance(data, dict):
                self._props = data
                return copy.deepcopy(data)
            self._props_retry_at = self._clock() + self.retry_interval
        return None

    # ---- prompts ----

    def _prompt(self, path: str, body: Any, compact: bool = False) -> PromptTokens:
        kind = request_kind(path)
        if kind is None or not isinstance(body, Mapping):
            return PromptTokens(None, None, None, None, NOT_COMPLETION)
        if kind == "anthropic":
            reason = "upstream token ids for /v1/messages are not supported"
            return self._fallback("chat", anthropic_as_chat(body), reason).to_prompt(compact)
        key = body_key(kind, body)
        readiness = self._ready()  # first: a due re-probe may find another upstream and drop the cache
        cached = self._prompts.get(key)
        if cached is not None:
            return cached.to_prompt(compact)
        entry, cacheable = self._compute(kind, body, readiness)
        if cacheable:
            self._prompts.put(key, entry, entry.weight, entry.nbytes)
        return entry.to_prompt(compact)

    def _compute(self, kind: RequestKind, body: Mapping[str, Any],
                 readiness: tuple[str, str]) -> tuple[_Entry, bool]:
        """(entry, cacheable): upstream when possible, else the fallback; transient failures not cached."""
        if kind == "completion":
            prompt, note = single_prompt(body.get("prompt"))
            if is_token_list(prompt):  # the server uses token ids as given (no BOS is added)
                return _entry(prompt, "upstream", None, None, note), True
        capability, reason = readiness
        try:
            if capability == "llama-server":
                return self._llama_prompt(kind, body), True
            if capability == "vllm":
                return self._vllm_prompt(kind, body), True
        except UpstreamError as exc:
            self._note_failure(exc)
            return self._fallback(kind, body, exc.message), not exc.transient
        return self._fallback(kind, body, reason), capability == "none"

    def _llama_prompt(self, kind: RequestKind, body: Mapping[str, Any]) -> _Entry:
        if kind == "chat":
            payload = {k: v for k, v in body.items() if k not in APPLY_TEMPLATE_DROP}
            data = self._post("/apply-template", payload)
            rendered = data.get("prompt") if isinstance(data, Mapping) else None
            if not isinstance(rendered, str):
                raise UpstreamError("upstream /apply-template: no 'prompt' in the answer", 200)
            tokens, offsets = self._llama_tokenize(rendered, add_special=True)
            note = "media parts in the prompt: tokens cover the text only" if has_media(body) else None
            return _entry(tokens, "upstream", rendered, offsets, note)
        prompt, note = single_prompt(body.get("prompt"))
        if isinstance(prompt, str):
            tokens, offsets = self._llama_tokenize(prompt, add_special=True)
            return _entry(tokens, "upstream", prompt, offsets, note)
        if isinstance(prompt, list):  # ids mixed with strings: the server's tokenize_mixed
            data = self._post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
            return _entry(self._ids(data, "/tokenize"), "upstream", None, None, note)
        return _entry(None, None, None, None, "unsupported 'prompt' shape")

    def _vllm_prompt(self, kind: RequestKind, body: Mapping[str, Any]) -> _Entry:
        if isinstance(body.get("model"), str):
            self._vllm_model = body["model"]
        if kind == "chat":
            payload = {"messages": body.get("messages"),
                       "add_generation_prompt": body.get("add_generation_prompt", True)}
            payload.update({k: body[k] for k in VLLM_CHAT_FIELDS if k in body})
            return _entry(self._ids(self._post("/tokenize", payload), "/tokenize"), "upstream", None, None, None)
        prompt, note = single_prompt(body.get("prompt"))
        if not isinstance(prompt, str):
            return _entry(None, None, None, None, "unsupported 'prompt' shape")
        tokens, offsets = self._vllm_tokenize(prompt, add_special=True, model=body.get("model"))
        return _entry(tokens, "upstream", prompt, offsets, note)

    def _fallback(self, kind: str, body: Mapping[str, Any], reason: str) -> _Entry:
        """The local approximation, with `reason` as its error; no tokens when not allowed or impossible."""
        if not self.allow_approximate:
            return _entry(None, None, None, None, reason)
        try:
            if kind == "chat":
                rendered = approximate_chat(body)
            else:
                prompt, _ = single_prompt(body.get("prompt"))
                if not isinstance(prompt, str):
                    return _entry(None, None, None, None, f"{reason}; no local rendering of a non-string prompt")
                rendered = prompt
        except ValueError as exc:  # TemplateError: the messages cannot be rendered
            return _entry(None, None, None, None, f"{reason}; local rendering failed: {exc}")
        tokens, offsets = approximate_text(rendered, add_special=True)
        return _entry(tokens, "approximate", rendered, offsets, reason)

    # ---- reply text ----

    def _text_tokens(self, text: str) -> PromptTokens:
        capability, reason = self._ready()
        try:
            if capability == "llama-server":
                tokens, offsets = self._llama_tokenize(text, add_special=False)
                return PromptTokens(_as_list(tokens), "upstream", text, _as_list(offsets), None)
            if capability == "vllm":
                tokens, offsets = self._vllm_tokenize(text, add_special=False, model=self._vllm_model)
                return PromptTokens(_as_list(tokens), "upstream", text, None, None)
        except UpstreamError as exc:
            self._note_failure(exc)
            reason = exc.message
        if not self.allow_approximate:
            return PromptTokens(None, None, text, None, reason)
        tokens, offsets = approximate_text(text, add_special=False)
        return PromptTokens(tokens, "approximate", text, offsets, reason)

    # ---- upstream tokenization (cached by text) ----

    def _llama_tokenize(self, text: str, *, add_special: bool) -> tuple[Sequence[int], Sequence[int] | None]:
        """Ids and offsets, compacted (`compact_tokens`) and shared with the cache: never to be changed in place."""
        key = b"llama" + text_key(text, add_special)
        cached = self._texts.get(key)
        if cached is not None:
            return cached
        data = self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True,
                                        "with_pieces": True})
        items = data.get("tokens") if isinstance(data, Mapping) else None
        try:
            tokens = list(map(_ID, items))  # type: ignore[arg-type]
            try:
                pieces = list(map(_PIECE, items))  # type: ignore[arg-type]
            except KeyError:  # a token without its piece
                pieces = [t.get("piece", "") for t in items]  # type: ignore[union-attr]
        except (TypeError, KeyError, AttributeError):
            raise UpstreamError("upstream /tokenize: not llama-server's with_pieces answer", 200) from None
        if not is_token_list(tokens):
            raise UpstreamError("upstream /tokenize: token ids are not integers", 200)
        try:
            offsets = piece_offsets(text, pieces)
        except (TypeError, ValueError):  # pieces that are neither strings nor byte lists
            offsets = None
        result = (compact_tokens(tokens), None if offsets is None else compact_tokens(offsets))
        self._texts.put(key, result, 1 + len(tokens), 100 + _nbytes(result[0]) + _nbytes(result[1]))
        return result

    def _vllm_tokenize(self, text: str, *, add_special: bool, model: Any) -> tuple[Sequence[int], None]:
        """Ids, compacted and shared with the cache (see _llama_tokenize)."""
        key = b"vllm" + text_key(text, add_special) + str(model).encode()
        cached = self._texts.get(key)
        if cached is not None:
            return cached[0], None
        payload: dict[str, Any] = {"prompt": text, "add_special_tokens": add_special}
        if isinstance(model, str):
            payload["model"] = model
        tokens = compact_tokens(self._ids(self._post("/tokenize", payload), "/tokenize"))
        self._texts.put(key, (tokens, None), 1 + len(tokens), 100 + _nbytes(tokens))
        return tokens, None

    @staticmethod
    def _ids(data: Any, endpoint: str) -> list[int]:
        tokens = data.get("tokens") if isinstance(data, Mapping) else None
        if not is_token_list(tokens):
            raise UpstreamError(f"upstream {endpoint}: no token id list in the answer", 200)
        return list(tokens)  # type: ignore[arg-type]

    # ---- HTTP ----

    def _post(self, endpoint: str, payload: Any) -> Any:
        return self._call("POST", endpoint, payload)

    def _call(self, method: str, endpoint: str, payload: Any) -> Any:
        """One upstream call; the parsed JSON of a 200, else UpstreamError."""
        content = None if payload is None else orjson.dumps(payload)
        headers = {**self._headers, "content-type": "application/json"} if content is not None else self._headers
        try:
            response = self._client.request(method, self.base_url + endpoint, content=content, headers=headers,
                                            timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {endpoint}: {_describe(exc, self.timeout)}") from None
        _unbind(response)
        if response.status_code != 200:
            message = _server_message(response)
            missing = response.status_code in (404, 405) and message.lower().rstrip(".") in ROUTE_MISSING
            raise UpstreamError(f"upstream {endpoint}: {response.status_code} {message}", response.status_code,
                                route_missing=missing)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"upstream {endpoint}: answer is not JSON", 200) from None

    # ---- capability: probe, failures, backoff ----

    def _ready(self, force: bool = False) -> tuple[str, str]:
        """(capability to use now, why not upstream). Probes when due; "unavailable" while backing off."""
        with self._lock:
            now = self._clock()
            if now < self._retry_at:
                wait = self._retry_at - now
                return "unavailable", f"{self._last_error} (retrying in {wait:.0f} s)"
            due = force or self._stale or self._capability == "unknown" or (
                self._capability == "none" and now - self._probed_at >= self.retry_interval)
        if due:
            self._probe_once(force)
        with self._lock:
            if self._stale or self._capability == "unknown":
                return "unavailable", self._last_error or "upstream not probed"
            if self._capability == "none":
                return "none", self._none_reason
            return self._capability, ""

    def _probe_once(self, force: bool) -> None:
        with self._probe_lock:
            with self._lock:  # another thread may have probed, or failed, while we waited
                now = self._clock()
                fresh = not self._stale and self._capability != "unknown" and (
                    self._capability != "none" or now - self._probed_at < self.retry_interval)
                if (fresh and not force) or now < self._retry_at:
                    return
            try:
                capability, reason = self._detect()
            except UpstreamError as exc:
                self._note_failure(exc, probe=True)
                return
            self._set_capability(capability, reason)

    def _detect(self) -> tuple[str, str]:
        """llama-server (/tokenize with_pieces and /apply-template), vLLM (/tokenize with messages), none.

        Raises UpstreamError when the upstream is down, so the answer is not mistaken for "none"."""
        reasons = []
        try:
            data = self._post("/tokenize", {"content": PROBE_TEXT, "with_pieces": True})
            items = data.get("tokens") if isinstance(data, Mapping) else None
            if isinstance(items, list) and items and all(isinstance(t, Mapping) and "piece" in t for t in items):
                data = self._post("/apply-template", {"messages": [{"role": "user", "content": PROBE_TEXT}]})
                if isinstance(data, Mapping) and isinstance(data.get("prompt"), str):
                    return "llama-server", ""
                reasons.append("/apply-template gave no prompt")
            else:
                reasons.append("/tokenize has no pieces")
        except UpstreamError as exc:
            if exc.down:
                raise
            reasons.append(exc.message.removeprefix("upstream "))
        try:
            data = self._post("/tokenize", {"messages": [{"role": "user", "content": PROBE_TEXT}],
                                            "add_generation_prompt": True})
            if isinstance(data, Mapping) and "count" in data and is_token_list(data.get("tokens")) and data["tokens"]:
                return "vllm", ""
        except UpstreamError as exc:
            if exc.down:
                raise
        return "none", "upstream has no tokenizer endpoints (" + "; ".join(reasons) + ")"

    def _set_capability(self, capability: str, reason: str) -> None:
        with self._lock:
            restarted = self._failures > 0 or self._stale
            changed = capability != self._capability
            self._capability, self._none_reason = capability, reason
            self._probed_at = self._clock()
            self._stale, self._failures, self._retry_at, self._last_error = False, 0, 0.0, None
            if restarted or changed:  # maybe another model now: nothing cached still holds
                self._prompts.clear()
                self._texts.clear()
                self._props, self._props_retry_at = None, 0.0
        if changed:
            log.info("upstream %s tokenizer capability: %s", self.base_url, capability)

    def _note_failure(self, exc: UpstreamError, probe: bool = False) -> None:
        """Back off after the upstream went down or changed; a refused request changes nothing."""
        if not (probe or exc.transient):
            return
        with self._lock:
            self._failures += 1
            self._stale = True
            self._last_error = exc.message
            backoff = min(self.retry_interval, MIN_BACKOFF_S * 2 ** min(self._failures - 1, 20))
            self._retry_at = self._clock() + backoff
        log.debug("tokenizer upstream failure (%s), next probe in %.0f s", exc.message, backoff)
