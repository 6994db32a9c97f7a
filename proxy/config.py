"""Settings for `kvlens serve`: declared once, read from a TOML file, the environment and flags.

Every setting is a `Setting` with its name, type, default and help text. The same list builds the
`Settings` dataclass defaults, the `KVLENS_*` environment names, the `--help` of `kvlens serve` and
the example TOML, so none of them can drift from the others. Precedence, lowest to highest:
built-in default < TOML file (`--config`) < environment (`KVLENS_*`) < command-line flags.
This is the only module that reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SESSION_HEADERS = ("x-session-id", "x-session-affinity", "x-openwebui-chat-id")
LIMIT_ACTIONS = ("reject", "clamp")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    """Dotted TOML key, e.g. "upstream.read_timeout"; the env var is KVLENS_UPSTREAM_READ_TIMEOUT."""
    default: Any
    help: str

    @property
    def attr(self) -> str:
        return self.name.replace(".", "_")

    @property
    def env(self) -> str:
        return "KVLENS_" + self.attr.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("upstream.url", "http://127.0.0.1:8080", "Base URL of the llama-server (or other OpenAI-compatible server)."),
    Setting("upstream.connect_timeout", 10.0, "Seconds to wait for the upstream to accept a connection (then 502/504)."),
    Setting(
        "upstream.read_timeout",
        600.0,
        "Seconds to wait for the next byte from the upstream. Long on purpose: a 50k-token prefill on a slow "
        "machine sends nothing for minutes. 0 = wait forever.",
    ),
    Setting("upstream.max_connections", 1000, "Pooled connections to the upstream (0 = unlimited)."),
    Setting("listen", "127.0.0.1:8081", "HOST:PORT to listen on. Keep 127.0.0.1 unless you mean to expose prompts."),
    Setting(
        "store.path",
        "",
        "SQLite file for the exchange records (empty = the user data directory, see --help), or a "
        "postgresql://user:pass@host/db URL (several replicas sharing one database).",
    ),
    Setting("capture.bodies", True, "Store request and response bodies (redacted headers are always stored)."),
    Setting("capture.max_body_bytes", 8 * 1024 * 1024, "Bodies larger than this are stored truncated (bytes)."),
    Setting(
        "sessions.headers",
        list(DEFAULT_SESSION_HEADERS),
        "Request headers that name a conversation, first present wins "
        "(opencode: x-session-id/x-session-affinity; open-webui: X-OpenWebUI-Chat-Id).",
    ),
    Setting("analysis.enabled", True, "Explain every chat/completion request's prompt-cache reuse (off the hot path)."),
    Setting("analysis.max_tokens", 10_000_000, "Distinct prompt tokens kept in memory for prefix matching (~9 bytes each)."),
    Setting("analysis.max_conversations", 1000, "Conversations whose last request is kept for comparison."),
    Setting("analysis.queue", 10_000, "Finished requests waiting for analysis; beyond it they are stored unanalysed."),
    Setting(
        "analysis.queue_mib",
        256,
        "Request and response bytes waiting for analysis, at most (MiB); beyond it requests are stored unanalysed.",
    ),
    Setting(
        "analysis.isolation",
        "process",
        "Where the analysis runs: process (a child process at low CPU priority, so it never holds the relay's "
        "GIL) or thread (inside the proxy process; for debugging).",
    ),
    Setting(
        "server.memory",
        "plain",
        "The upstream model's KV memory: plain, swa (sliding window: gpt-oss, Gemma) or hybrid (Qwen3.5/3.6, "
        "Nemotron-H). llama-server does not report it; it decides when partial reuse is possible.",
    ),
    Setting("server.swa_window", 128, "n_swa of an swa model (gpt-oss 128, Gemma 1024)."),
    Setting("server.swa_full", False, "The server runs with --swa-full."),
    Setting("server.kv_unified", True, "The server's KV cache is unified (llama-server's default without an explicit -np)."),
    Setting("server.cache_ram_mib", 8192, "The server's --cache-ram (0 = off, -1 = unlimited)."),
    Setting("limits.context", 0, "Prompt tokens + max output tokens must fit in this many tokens (0 = no limit)."),
    Setting("limits.input", 0, "Most prompt tokens a request may have (0 = no limit)."),
    Setting(
        "limits.output",
        0,
        "Most output tokens a request may ask for; a request without max_tokens asks for this (0 = no limit).",
    ),
    Setting(
        "limits.action",
        "reject",
        "reject (HTTP 400 context_length_exceeded) or clamp (lower max_tokens / max_completion_tokens / n_predict "
        "to fit). A prompt over the input limit is always rejected.",
    ),
    Setting(
        "limits.max_body_bytes",
        64 * 1024 * 1024,
        "With limits or admission on, request bodies are read whole before forwarding; larger ones get HTTP 413.",
    ),
    Setting(
        "limits.tokenize_timeout",
        5.0,
        "Seconds to wait for the upstream's tokenizer when a limit needs an exact count; then a safe estimate "
        "(half the prompt's bytes) is used and the record says so.",
    ),
    Setting("admission.max_in_flight", 0, "Requests forwarded at once; more wait in a FIFO queue (0 = no limit)."),
    Setting(
        "admission.kv_budget_tokens",
        0,
        "Sum over forwarded requests of (prompt + max output tokens); more wait in the queue (0 = no budget).",
    ),
    Setting(
        "admission.queue_timeout_s", 120.0, "Seconds a request may wait in the queue, then HTTP 429 (0 = no timeout)."
    ),
    Setting("admission.max_queue", 1000, "Requests that may wait at once; beyond it HTTP 429 at once."),
    Setting(
        "shutdown.grace_s",
        30.0,
        "On SIGTERM/Ctrl-C kvlens stops accepting connections and lets requests in flight finish for this many "
        "seconds, then cuts the rest and writes every record (0 = wait for them however long they take).",
    ),
    Setting(
        "security.api_token",
        "",
        "Token required for kvlens' own /_kvlens/ API, dashboard and metrics (Authorization: Bearer TOKEN, or "
        "?token=TOKEN in the dashboard's URL); /_kvlens/health and the dashboard's static files stay open. "
        "Set it whenever kvlens listens on anything but 127.0.0.1. Proxied requests are not affected.",
    ),
    Setting(
        "redact.headers",
        ["authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"],
        "Header names whose values are never stored (replaced by a short fingerprint).",
    ),
)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """One `[limits.models."NAME"]` table: None inherits the [limits] default, 0 means no limit."""

    model: str
    context: int | None = None
    input: int | None = None
    output: int | None = None
    action: str | None = None


LIMITS_MODELS_ENV = "KVLENS_LIMITS_MODELS"
TABLE_FIELDS = ("limits_models",)  # Settings fields that are not scalar Settings


@dataclass(frozen=True, slots=True)
class Settings:
    upstream_url: str = SETTINGS[0].default
    upstream_connect_timeout: float = SETTINGS[1].default
    upstream_read_timeout: float = SETTINGS[2].default
    upstream_max_connections: int = SETTINGS[3].default
    listen: str = SETTINGS[4].default
    store_path: str = SETTINGS[5].default
    capture_bodies: bool = SETTINGS[6].default
    capture_max_body_bytes: int = SETTINGS[7].default
    sessions_headers: tuple[str, ...] = field(default=DEFAULT_SESSION_HEADERS)
    analysis_enabled: bool = True
    analysis_max_tokens: int = 10_000_000
    analysis_max_conversations: int = 1000
    analysis_queue: int = 10_000
    analysis_queue_mib: int = 256
    analysis_isolation: str = "process"
    server_memory: str = "plain"
    server_swa_window: int = 128
    server_swa_full: bool = False
    server_kv_unified: bool = True
    server_cache_ram_mib: int = 8192
    limits_context: int = 0
    limits_input: int = 0
    limits_output: int = 0
    limits_action: str = "reject"
    limits_max_body_bytes: int = 64 * 1024 * 1024
    limits_tokenize_timeout: float = 5.0
    admission_max_in_flight: int = 0
    admission_kv_budget_tokens: int = 0
    admission_queue_timeout_s: float = 120.0
    admission_max_queue: int = 1000
    shutdown_grace_s: float = 30.0
    security_api_token: str = field(default="", repr=False)  # never in a log line or a traceback
    redact_headers: tuple[str, ...] = field(default=tuple(SETTINGS[-1].default))
    limits_models: tuple[ModelLimits, ...] = ()
    """Per-model overrides of the [limits] defaults: the `[limits.models."NAME"]` tables (not a scalar
    Setting: TOML tables, `KVLENS_LIMITS_MODELS` or `--limit-models` as JSON; each layer replaces the whole table)."""

    @property
    def listen_host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_listen(self.listen)[1]


def load_settings(
    toml_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults < TOML < environment < overrides (flag values; None means "not given")."""
    values: dict[str, Any] = {s.attr: s.default for s in SETTINGS}
    if toml_path:
        values.update(_from_toml(Path(toml_path)))
    environ = os.environ if environ is None else environ
    values.update(_from_environ(environ))
    if environ.get(LIMITS_MODELS_ENV):
        values["limits_models"] = parse_limits_models(environ[LIMITS_MODELS_ENV], LIMITS_MODELS_ENV)
    for key, value in (overrides or {}).items():
        if value is not None and key == "limits_models":
            values[key] = parse_limits_models(value, "command line")
        elif value is not None:
            values[key] = _coerce(_by_attr(key), value, "command line")
    return _build(values)


def parse_limits_models(value: Any, origin: str) -> tuple[ModelLimits, ...]:
    """{"NAME": {"context": N, "input": N, "output": N, "action": "reject"|"clamp"}} (a dict or its JSON)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{origin}: per-model limits must be a JSON object: {exc}") from None
    if isinstance(value, tuple) and all(isinstance(v, ModelLimits) for v in value):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: per-model limits must be a table of model names, got {value!r}")
    out = []
    for name, table in value.items():
        where = f'{origin} [limits.models."{name}"]'
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: must be a table with context/input/output/action")
        unknown = sorted(set(table) - {"context", "input", "output", "action"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: context, input, output, action)")
        numbers: dict[str, int | None] = {}
        for key in ("context", "input", "output"):
            number = table.get(key)
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
                raise ConfigError(f"{where}: {key} must be a non-negative integer, got {number!r}")
            numbers[key] = number
        action = table.get("action")
        if action is not None and action not in LIMIT_ACTIONS:
            raise ConfigError(f"{where}: action must be reject or clamp, got {action!r}")
        out.append(ModelLimits(str(name), numbers["context"], numbers["input"], numbers["output"], action))
    return tuple(out)


def _by_attr(attr: str) -> Setting:
    for setting in SETTINGS:
        if setting.attr == attr:
            return setting
    raise KeyError(attr)


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        node: Any = data
        for part in setting.name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            values[setting.attr] = _coerce(setting, node, f"{path} [{setting.name}]")
    models = (data.get("limits") or {}).get("models") if isinstance(data.get("limits"), dict) else None
    if models is not None:
        values["limits_models"] = parse_limits_models(models, str(path))
    return values


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    return {s.attr: _coerce(s, environ[s.env], s.env) for s in SETTINGS if environ.get(s.env)}


def _coerce(setting: Setting, value: Any, origin: str) -> Any:
    """Convert `value` to the setting's type; strings (env, flags) are parsed."""
    kind = type(setting.default)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                    raise ValueError(value)
                return lowered in {"1", "true", "yes", "on"}
            return bool(value)
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip().lower() for item in items if str(item).strip())
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {value!r} is not a valid {kind.__name__} for {setting.name}") from None


def _build(values: dict[str, Any]) -> Settings:
    for key in ("sessions_headers", "redact_headers"):
        values[key] = tuple(str(v).lower() for v in values[key])
    settings = Settings(**values)
    _split_listen(settings.listen)
    if not settings.upstream_url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream.url must start with http:// or https://, got {settings.upstream_url!r}")
    if settings.analysis_isolation not in ("process", "thread"):
        raise ConfigError(f"analysis.isolation must be process or thread, got {settings.analysis_isolation!r}")
    if settings.server_memory not in ("plain", "swa", "hybrid"):
        raise ConfigError(f"server.memory must be plain, swa or hybrid, got {settings.server_memory!r}")
    if settings.limits_action not in LIMIT_ACTIONS:
        raise ConfigError(f"limits.action must be reject or clamp, got {settings.limits_action!r}")
    if settings.limits_tokenize_timeout <= 0:
        raise ConfigError("limits.tokenize_timeout must be positive")
    for name in ("upstream_connect_timeout", "upstream_read_timeout", "capture_max_body_bytes", "limits_context",
                 "limits_input", "limits_output", "limits_max_body_bytes", "limits_tokenize_timeout",
                 "admission_max_in_flight", "admission_kv_budget_tokens", "admission_queue_timeout_s",
                 "admission_max_queue", "shutdown_grace_s"):  # fmt: skip
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name.replace('_', '.', 1)} must not be negative")
    return settings


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def settings_help() -> str:
    """One line per setting: TOML key, env var, default. Shown at the end of `kvlens serve --help`."""
    lines = []
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, list) else s.default
        lines.append(f"  {s.name:<26} {s.env:<34} default: {default!s}")
    table = 'limits.models."NAME"'
    lines.append(f"  {table:<26} {LIMITS_MODELS_ENV:<34} per-model context/input/output/action (env/flag: JSON)")
    return "\n".join(lines)


assert [f.name for f in dataclasses.fields(Settings) if f.name not in TABLE_FIELDS] == [
    s.attr for s in SETTINGS
], "Settings and SETTINGS drifted"
