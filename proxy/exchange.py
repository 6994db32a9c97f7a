"""The exchange record: one request/response pair as every kvlens feature sees it.

`forward` creates an `Exchange` when a request arrives, the SSE/JSON side-parser fills in usage,
upstream timings and generated text, and the finished record goes to the store off the client's
critical path. The API, the CLI, (later) analysis, the dashboard and replay all read this one
record, so it is plain data: no I/O, no references to sockets or clients. `to_dict`/`from_dict`
are the single serialisation used by the store, the JSON API and export.

Timing fields are milliseconds since `started_at` (the moment kvlens received the request head),
measured with a monotonic clock, so they never go backwards if the wall clock is adjusted.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# Error kinds, stable strings that end up in the store, the API and tests.
ERROR_CONNECT = "upstream_connect"  # refused, unreachable, DNS failure
ERROR_CONNECT_TIMEOUT = "upstream_connect_timeout"
ERROR_READ_TIMEOUT = "upstream_read_timeout"  # no byte for read_timeout seconds
ERROR_PROTOCOL = "upstream_protocol"  # not HTTP, malformed response head
ERROR_DIED_MIDSTREAM = "upstream_died_midstream"  # connection closed before the body was complete
ERROR_CLIENT_DISCONNECTED = "client_disconnected"
ERROR_CLIENT_BODY = "client_body_error"  # the client's request body could not be read
ERROR_INTERNAL = "proxy_internal"
ERROR_PROXY_SHUTDOWN = "proxy_shutdown"  # kvlens stopped (SIGTERM) and its grace period ended mid-response
# kvlens answered itself and the request never reached the upstream (proxy.limits, proxy.admission).
ERROR_LIMIT_EXCEEDED = "limit_exceeded"  # over a configured context/input/output limit (HTTP 400)
ERROR_LIMIT_UNCOUNTABLE = "limit_uncountable"  # a limit applies and the body cannot be counted (HTTP 400)
ERROR_BODY_TOO_LARGE = "request_too_large"  # over limits.max_body_bytes (HTTP 413)
ERROR_QUEUE_TIMEOUT = "queue_timeout"  # waited admission.queue_timeout_s in the admission queue (HTTP 429)
ERROR_QUEUE_FULL = "queue_full"  # the admission queue already held admission.max_queue requests (HTTP 429)


@dataclass(slots=True)
class ExchangeError:
    """Why an exchange did not end with a complete upstream response.

    A failure is data, not an exception: an upstream 500 is an ordinary response (status 500,
    no error), while a refused connection or a stream cut short is an `ExchangeError`. Both a
    response and an error can be present (the upstream died after sending headers).
    """

    kind: str
    message: str
    at_ms: float | None = None


@dataclass(slots=True)
class Exchange:
    """One proxied request and what came back. Every field is plain data."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = 0.0
    """Wall-clock Unix time (seconds) when kvlens received the request head."""

    method: str = "GET"
    path: str = "/"
    """The request path without the query string."""
    query: str = ""
    client: str | None = None
    """Client address "host:port" as seen by kvlens."""
    session: str | None = None
    """Conversation key from the first configured session header present (x-session-id, ...)."""
    session_header: str | None = None
    """Which header the session key came from, so a user can tell opencode from open-webui."""
    model: str | None = None
    """The request body's "model" field, when the body is JSON."""
    stream: bool = False
    """The request asked for a streamed response ("stream": true)."""
    upstream: str = ""
    """Base URL of the upstream this exchange was sent to."""

    request_headers: dict[str, str] = field(default_factory=dict)
    """Request headers as received, credentials redacted."""
    request_body: bytes | None = None
    """Up to `body_capture_bytes` of the request body (None when capture is off)."""
    request_size: int = 0
    """Full request body size in bytes, whether captured or not."""

    status: int | None = None
    """Upstream HTTP status (None when no response head arrived)."""
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes | None = None
    """Up to `body_capture_bytes` of the response body, exactly as relayed (may be compressed)."""
    response_size: int = 0
    content_type: str | None = None

    error: ExchangeError | None = None

    # Proxy-side timings, ms since started_at.
    t_admitted_ms: float | None = None
    """Admission control let the request go to the upstream (None without admission control); the
    time before it was spent reading the body, counting tokens and waiting in the admission queue
    (metadata["admission"]["queued_ms"] is the queue's share)."""
    t_upstream_headers_ms: float | None = None
    """Response head received from the upstream."""
    t_first_byte_ms: float | None = None
    """First response body byte received from the upstream."""
    t_first_token_ms: float | None = None
    """First SSE event carrying generated content (text, reasoning or a tool call)."""
    t_done_ms: float | None = None
    """Last byte relayed to the client (or the moment the exchange ended abnormally)."""
    events: int = 0
    """Number of SSE data events relayed (0 for non-streamed responses)."""
    gap_mean_ms: float | None = None
    """Mean time between successive SSE events after the first token."""
    gap_max_ms: float | None = None

    # What the upstream said about the work it did.
    usage: dict[str, Any] | None = None
    """The OpenAI `usage` object as received."""
    upstream_timings: dict[str, Any] | None = None
    """llama-server's `timings` object as received (cache_n, prompt_n, prompt_ms, ...)."""
    finish_reason: str | None = None

    # Generated output, kept for analysis (the held sequence is prompt + generated tokens).
    output_text: str | None = None
    output_reasoning: str | None = None
    output_tool_calls: list[dict[str, Any]] | None = None

    analysis: dict[str, Any] | None = None
    """The prompt-cache analysis (`proxy.analyzer`): prompt tokens, reuse expected vs reported, the
    divergence from the conversation's previous request, causes and fixes. None until analysed, or
    for requests that are not chat/completions."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form annotations from later stages (analysis, limits); stored as JSON."""
    schema_version: int = SCHEMA_VERSION

    # Convenience views over the raw fields, used by the API, the CLI and the store's columns.

    @property
    def prompt_tokens(self) -> int | None:
        """usage.prompt_tokens; else llama-server's timings (cache_n + prompt_n), which it sends even
        when the client did not ask for usage (open-webui streams without include_usage)."""
        value = _int_or_none((self.usage or {}).get("prompt_tokens"))
        if value is None and self.upstream_timings:
            cache_n = _int_or_none(self.upstream_timings.get("cache_n"))
            prompt_n = _int_or_none(self.upstream_timings.get("prompt_n"))
            if cache_n is not None and prompt_n is not None:
                return cache_n + prompt_n
        return value

    @property
    def completion_tokens(self) -> int | None:
        value = _int_or_none((self.usage or {}).get("completion_tokens"))
        if value is None and self.upstream_timings:
            return _int_or_none(self.upstream_timings.get("predicted_n"))
        return value

    @property
    def cached_tokens(self) -> int | None:
        """Tokens the upstream reused from its cache: timings.cache_n, else usage's cached_tokens."""
        if self.upstream_timings and "cache_n" in self.upstream_timings:
            return _int_or_none(self.upstream_timings.get("cache_n"))
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return _int_or_none(details.get("cached_tokens") if isinstance(details, dict) else None)

    def analysis_value(self, key: str) -> Any:
        return (self.analysis or {}).get(key)

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token; for non-streamed responses, time to the complete answer's first byte."""
        return self.t_first_token_ms if self.t_first_token_ms is not None else (
            self.t_first_byte_ms if not self.stream else None
        )

    @property
    def prompt_tps(self) -> float | None:
        t = self.upstream_timings or {}
        value = t.get("prompt_per_second")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def gen_tps(self) -> float | None:
        """Generation speed: the upstream's own figure when it reports one, else measured here."""
        t = self.upstream_timings or {}
        value = t.get("predicted_per_second")
        if isinstance(value, (int, float)):
            return float(value)
        n = self.completion_tokens
        if n and n > 1 and self.t_first_token_ms is not None and self.t_done_ms is not None:
            span = self.t_done_ms - self.t_first_token_ms
            return (n - 1) / (span / 1000) if span > 0 else None
        return None

    def to_dict(self, with_bodies: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; bodies become text (UTF-8, undecodable bytes replaced)."""
        data = {name: plain(getattr(self, name)) for name in _FIELDS}  # dataclasses.asdict, 8x faster
        for name in ("request_body", "response_body"):
            raw = data.pop(name)
            if with_bodies:
                data[name] = raw.decode("utf-8", "replace") if raw is not None else None
        data["prompt_tokens"] = self.prompt_tokens
        data["completion_tokens"] = self.completion_tokens
        data["cached_tokens"] = self.cached_tokens
        data["ttft_ms"] = self.ttft_ms
        data["prompt_tps"] = self.prompt_tps
        data["gen_tps"] = self.gen_tps
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Exchange:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for name in ("request_body", "response_body"):
            value = kwargs.get(name)
            if isinstance(value, str):
                kwargs[name] = value.encode("utf-8")
        if isinstance(kwargs.get("error"), dict):
            kwargs["error"] = ExchangeError(**kwargs["error"])
        return cls(**kwargs)


_FIELDS = tuple(f.name for f in dataclasses.fields(Exchange))
_ATOMS = frozenset({str, int, float, bool, type(None), bytes})


def plain(value: Any) -> Any:
    """What `dataclasses.asdict` makes of a value (dataclasses become dicts, containers are copied
    deeply), without its generic per-value machinery: the store's writer calls this for every record."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    if kind is list:
        return [plain(v) for v in value]
    if kind is tuple:
        return tuple(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return copy.deepcopy(value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
