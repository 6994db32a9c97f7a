"""Why a request reused less of the server's prompt cache than it could: divergence and causes.

This module owns the comparison of one request with what the server held after its predecessor (the
previous main request of the same conversation), at three levels:

- **body**: the request JSON against the predecessor's messages *plus the reply the server generated*
  (a client that replays the reply unchanged is healthy; one that drops its reasoning is not);
- **render**: bodies extend each other but the rendered prompts (or token ids) do not, i.e. the chat
  template rewrote history (Qwen3 dropping earlier thinking, `enable_thinking=false`);
- **server**: prompts extend each other but the server reused less (slot taken by other traffic, no
  context checkpoint on SWA/hybrid memory, `cache_prompt: false`, restart).

`explain(evidence)` returns the first divergence and the causes, most important first; the cause
wording lives in `proxy.causes`. Pure: values in, values out, no I/O; token numbers, the cache-model
prediction and the requests seen in between are gathered by the analyzer into an `Evidence`.
Detection rules: shared/research/client-divergence.md and llama-server-cache.md §7-§9.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.cachemodel import common_prefix as token_lcp
from proxy.causes import (Cause, checkpoint_note, common_text_prefix, describe_between, describe_tools_change, make,
                          reserialization, short_key, system_causes, volatile_causes)
from proxy.exchange import Exchange
from proxy.sessions import RAG_TEMPLATE_START, client_of, content_text, stable_user_text
from proxy.turn import KIND_MAIN, KIND_OTHER, KIND_SUBAGENT, Turn

__all__ = ["Cause", "Divergence", "Evidence", "explain", "held_body", "locate_body_divergence",
           "locate_render_divergence"]

SNIPPET = 60
PRUNED_MARKER = "[Old tool result content cleared]"
COMPACTION_USER_MARKERS = ("What did we do so far?", "Use the above summary generated from your last session")
SUMMARY_HEADINGS = ("## Goal", "## Progress")
TEMPLATE_OPTION_FIELDS = ("chat_template_kwargs", "reasoning_effort")
SYSTEM_ROLES = ("system", "developer")
REASONING_MARKUP = ("<think>", "<|channel|>analysis", "analysis<|message|>")  # Qwen/GLM/DeepSeek, gpt-oss
MIN_LOST_TOKENS = 32  # server reuse this far below the shared prefix counts as a server-side loss...
MIN_LOST_FRACTION = 0.05  # ...if it is also this fraction of the shared prefix
SLOT_SIMILARITY = 0.1  # llama-server --slot-prompt-similarity default


@dataclass
class Divergence:
    level: str  # "none" | "body" | "render" | "server"
    message_index: int | None = None  # index in the NEW request's messages
    role: str | None = None
    field: str | None = None
    """Body: "content", "reasoning_content", "tool_calls[0].function.arguments", "tools", "model",
    "chat_template_kwargs", "prompt", "messages" (a message inserted/removed: roles differ). Render:
    "rendered" (text known) or "tokens" (only token ids known)."""
    char_offset: int | None = None  # in that field's text ("rendered": in the rendered prompt)
    token_offset: int | None = None  # LCP with the predecessor's held sequence, when tokens are known
    before: str | None = None  # ±60 chars of the held text around the divergence
    after: str | None = None  # ±60 chars of the new text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evidence:
    turn: Turn
    predecessor: Turn | None
    between: list[Turn] = field(default_factory=list)
    common_prefix: int | None = None
    best_prefix: int | None = None
    cached_upstream: int | None = None
    cached_expected: int | None = None
    prediction: Any | None = None  # proxy.cachemodel.Launch
    server_memory: str = "plain"  # "plain" | "swa" | "hybrid"
    cache_prompt_disabled: bool = False


# ---- what the server held --------------------------------------------------------------------------


def reply_message(ex: Exchange) -> dict[str, Any] | None:
    """The assistant message the server generated for `ex` (None when nothing was captured)."""
    if not (ex.output_text or ex.output_reasoning or ex.output_tool_calls):
        return None
    msg: dict[str, Any] = {"role": "assistant", "content": ex.output_text or ""}
    if ex.output_reasoning:
        msg["reasoning_content"] = ex.output_reasoning
    if ex.output_tool_calls:
        msg["tool_calls"] = [_nested_call(c) for c in ex.output_tool_calls if isinstance(c, dict)]
    return msg


def _nested_call(call: dict[str, Any]) -> dict[str, Any]:
    """The SSE parser keeps calls flat ({id, name, arguments}); requests nest them under `function`."""
    if "function" in call:
        return call
    return {"id": call.get("id"), "type": "function",
            "function": {"name": call.get("name", ""), "arguments": call.get("arguments", "")}}


def held_body(prev: Turn) -> dict[str, Any]:
    """The predecessor's body as the server held it afterwards: its messages plus the generated reply."""
    body = dict(prev.body or {})
    if isinstance(body.get("messages"), list):
        reply = reply_message(prev.exchange)
        body["messages"] = prev.messages + ([reply] if reply else [])
    elif isinstance(body.get("prompt"), str) and prev.exchange.output_text:
        body["prompt"] = body["prompt"] + prev.exchange.output_text
    return body


# ---- body level -----------------------------------------------------------------------------------


_lcp = common_text_prefix


def _snip(text: str, at: int) -> str:
    return text[max(0, at - SNIPPET):at + SNIPPET]


def _reasoning(msg: dict[str, Any]) -> str:
    for key in ("reasoning_content", "reasoning", "thinking"):
        value = msg.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _args_text(raw: Any) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)


def message_fields(msg: dict[str, Any]) -> dict[str, str]:
    """A message as (field → text), in the order templates render them; absent/empty reasoning omitted."""
    out = {"role": str(msg.get("role"))}
    if msg.get("name"):
        out["name"] = str(msg["name"])
    if _reasoning(msg):
        out["reasoning_content"] = _reasoning(msg)
    out["content"] = content_text(msg.get("content"))
    calls = msg.get("tool_calls")
    for k, call in enumerate(calls if isinstance(calls, list) else []):
        fn = call.get("function", call) if isinstance(call, dict) else {}
        fn = fn if isinstance(fn, dict) else {}
        out[f"tool_calls[{k}].function.name"] = str(fn.get("name", ""))
        out[f"tool_calls[{k}].function.arguments"] = _args_text(fn.get("arguments"))
        if isinstance(call, dict) and call.get("id"):
            out[f"tool_calls[{k}].id"] = str(call["id"])
    if msg.get("tool_call_id"):
        out["tool_call_id"] = str(msg["tool_call_id"])
    return out


def _field_rank(name: str) -> tuple[int, int, int]:
    fixed = {"role": 0, "name": 1, "reasoning_content": 2, "content": 3, "tool_call_id": 5}
    if name in fixed:
        return (fixed[name], 0, 0)
    m = re.match(r"tool_calls\[(\d+)\]\.(function\.name|function\.arguments|id)", name)
    return (4, int(m.group(1)), ("function.name", "function.arguments", "id").index(m.group(2))) if m else (6, 0, 0)


def _message_divergence(old: list[dict], new: list[dict], i: int) -> Divergence | None:
    if i >= len(old) or i >= len(new) or old[i] == new[i]:  # identical dicts: the common case, C speed
        return None
    a, b = message_fields(old[i]), message_fields(new[i])
    if a["role"] != b["role"]:
        return Divergence("body", i, b["role"], "messages", None, None, _snip(a["content"], 0), _snip(b["content"], 0))
    for name in sorted(a.keys() | b.keys(), key=_field_rank):
        x, y = a.get(name, ""), b.get(name, "")
        if x != y:
            at = _lcp(x, y)
            return Divergence("body", i, b["role"], name, at, None, _snip(x, at), _snip(y, at))
    return None


def _tools_text(tools: Any) -> str:
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) if isinstance(tools, list) else ""


def _tools_divergence(old: Any, new: Any) -> Divergence | None:
    a, b = _tools_text(old), _tools_text(new)
    if a == b:
        return None
    at = _lcp(a, b)
    return Divergence("body", None, None, "tools", at, None, _snip(a, at), _snip(b, at))


def _option_divergence(prev_body: dict, body: dict) -> Divergence | None:
    for name in (*TEMPLATE_OPTION_FIELDS, "model"):
        if prev_body.get(name) != body.get(name):
            a, b = json.dumps(prev_body.get(name)), json.dumps(body.get(name))
            return Divergence("body", None, None, name, None, None, a, b)
    return None


def _prompt_text(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "".join(prompt)
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def locate_body_divergence(prev_body: dict, body: dict) -> Divergence | None:
    """First difference between `prev_body` (use `held_body(prev)`) and `body`, in render order.

    Render order: leading system messages, then tools (templates put them in or right after the system
    turn), then the other messages. None when `body` extends `prev_body` (or repeats a prefix of it)."""
    old, new = prev_body.get("messages"), body.get("messages")
    if not isinstance(old, list) and not isinstance(new, list):
        a, b = _prompt_text(prev_body), _prompt_text(body)
        if not b.startswith(a) and not a.startswith(b):
            at = _lcp(a, b)
            return Divergence("body", None, None, "prompt", at, None, _snip(a, at), _snip(b, at))
        return _option_divergence(prev_body, body)
    old, new = _message_dicts(old), _message_dicts(new)
    n_system = next((i for i, m in enumerate(new) if m.get("role") not in SYSTEM_ROLES), len(new))
    for i in range(n_system):
        found = _message_divergence(old, new, i)
        if found:
            return found
    found = _tools_divergence(prev_body.get("tools"), body.get("tools"))
    for i in range(n_system, min(len(old), len(new))):
        if found:
            return found
        found = _message_divergence(old, new, i)
    return found or _option_divergence(prev_body, body)


# ---- render level ---------------------------------------------------------------------------------


def _generated_text(prev: Turn) -> str:
    """The reply as a Qwen/ChatML-style model wrote it after the generation prompt (tool calls omitted)."""
    ex, head = prev.exchange, ""
    if ex.output_reasoning:
        opened = (prev.rendered or "").endswith("<think>\n")
        head = ("" if opened else "<think>\n") + ex.output_reasoning.strip("\n") + "\n</think>\n\n"
    return head + (ex.output_text or "")


def _message_at(turn: Turn, char: int) -> int | None:
    """Index of the message whose rendered text contains `char` (anchored on each message's text)."""
    text, cursor, found = turn.rendered or "", 0, None
    for i, msg in enumerate(turn.messages):
        fields = message_fields(msg)
        anchor = fields["content"][:32] or fields.get("tool_calls[0].function.name", "")
        pos = text.find(anchor, cursor) if anchor else -1
        if pos < 0:
            continue
        if pos > char:
            break
        found, cursor = i, pos + len(anchor)
    if found is None and turn.messages and turn.messages[0].get("role") in SYSTEM_ROLES:
        return 0
    return found


def _held_tokens_lcp(prev: Turn, turn: Turn) -> int | None:
    held = prev.held if prev.held is not None else prev.tokens
    return token_lcp(held, turn.tokens) if held is not None and turn.tokens is not None else None


def locate_render_divergence(prev: Turn, turn: Turn, lcp_tokens: int | None = None) -> Divergence | None:
    """Where the rendered prompt stops extending what the server held, when the bodies extend each other.

    Text when both renders are known (field "rendered", char_offset into the rendered prompt), else token
    ids (field "tokens"). Inside the previous reply only a lost reasoning block counts: anything else
    there is re-tokenisation drift, which the research shows is normal. `lcp_tokens`: the token LCP of
    the held sequence and the prompt when the caller already knows it (the analyzer does, from the
    prefix index), else it is computed here."""
    if lcp_tokens is None:
        lcp_tokens = _held_tokens_lcp(prev, turn)
    if prev.rendered is not None and turn.rendered is not None:
        return _text_render_divergence(prev, turn, lcp_tokens)
    prev_prompt = _prompt_tokens(prev)  # the analyzer may have released prev.tokens (held is kept)
    if lcp_tokens is None or prev_prompt is None or turn.tokens is None or lcp_tokens >= len(turn.tokens):
        return None
    in_reply = lcp_tokens - prev_prompt
    if in_reply >= 0 and not (prev.exchange.output_reasoning and in_reply <= 1):
        return None
    index = None
    if turn.token_offsets and turn.rendered is not None and lcp_tokens < len(turn.token_offsets):
        index = _message_at(turn, turn.token_offsets[lcp_tokens])
    role = turn.messages[index].get("role") if index is not None else None
    return Divergence("render", index, role, "tokens", None, lcp_tokens, None, None)


def _text_render_divergence(prev: Turn, turn: Turn, lcp_tokens: int | None) -> Divergence | None:
    prompt, new = prev.rendered or "", turn.rendered or ""
    held = prompt + _generated_text(prev)
    at = _lcp(held, new)
    if at >= len(held) or at >= len(new):
        return None
    index = _message_at(turn, at)
    if at >= len(prompt):  # inside the previous reply: only its lost reasoning counts
        if _reasoning_rerendered(prev, new):
            return None  # drift (tool-call markup, re-tokenisation): normal
        at = len(prompt)
        index = len(prev.messages) if len(prev.messages) < len(turn.messages) else index
    role = turn.messages[index].get("role") if index is not None else None
    return Divergence("render", index, role, "rendered", at, lcp_tokens, _snip(held, at), _snip(new, at))


def _reasoning_rerendered(prev: Turn, new: str) -> bool:
    """Whether the reply's reasoning (if any) appears again, in whatever markup, after the old prompt."""
    reasoning = (prev.exchange.output_reasoning or "").strip()
    start = len(prev.rendered or "")
    return not reasoning or reasoning[:200] in new[start:start + len(reasoning) + 400]


# ---- causes of a body divergence -----------------------------------------------------------------


@dataclass
class _Ctx:
    ev: Evidence
    held_body: dict[str, Any]
    held: list[dict[str, Any]]
    new: list[dict[str, Any]]
    reply_index: int | None
    lost: str
    client: str | None


def _prompt_tokens(turn: Turn) -> int | None:
    return len(turn.tokens) if turn.tokens is not None else turn.exchange.prompt_tokens


def _lost_phrase(ev: Evidence) -> str:
    total = _prompt_tokens(ev.turn)
    if total is None or ev.common_prefix is None:
        return ""
    return f"; {max(0, total - ev.common_prefix):,} prompt tokens after it re-processed"


def _body_causes(div: Divergence, ctx: _Ctx) -> list[Cause]:
    prev_body, body = ctx.held_body, ctx.ev.turn.body or {}
    if div.field == "model":
        return [make("model_changed", old=prev_body.get("model"), new=body.get("model"))]
    if div.field in TEMPLATE_OPTION_FIELDS:
        return [make("template_options_changed", field=div.field, old=div.before, new=div.after, lost=ctx.lost)]
    if div.field == "tools":
        return [make("tools_changed", detail=describe_tools_change(prev_body.get("tools"), body.get("tools")),
                     lost=ctx.lost)]
    if div.field == "prompt":
        a, b = _prompt_text(prev_body), _prompt_text(body)
        return volatile_causes(a, b, div.char_offset or 0, "prompt", "prompt", ctx.client, ctx.lost) or [
            make("history_rewritten", where="the prompt", what=f"changed at char {div.char_offset}", lost=ctx.lost)]
    return _message_causes(div, ctx)


def _message_causes(div: Divergence, ctx: _Ctx) -> list[Cause]:
    i = div.message_index if div.message_index is not None else 0
    old, new = ctx.held[i], ctx.new[i]
    if old.get("role") in SYSTEM_ROLES and div.field == "content":
        return system_causes(content_text(old.get("content")), content_text(new.get("content")),
                             div.char_offset or 0, f"messages[{i}].content", ctx.client, ctx.lost)
    for detect in (_compaction, _truncation, _pruned, _reasoning_lost, _user_rewrite, _reply_rewrite):
        found = detect(div, ctx, i)
        if found:
            return found
    what = "was replaced by another message" if div.field == "messages" else \
        f"{div.field} changed at char {div.char_offset}"
    return [make("history_rewritten", where=f"messages[{i}] ({old.get('role')})", what=what, lost=ctx.lost)]


def _compaction(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    marker = None
    for msg in ctx.new[i:]:
        text = content_text(msg.get("content")).strip()
        if msg.get("role") == "user" and text.startswith(COMPACTION_USER_MARKERS):
            marker = text.split("\n", 1)[0][:60]
        elif msg.get("role") == "assistant" and all(h in text for h in SUMMARY_HEADINGS):
            marker = marker or "a `## Goal … ## Progress` summary"
    if marker is None and not (len(ctx.new) * 2 <= len(ctx.held) and _truncated_at(ctx, i) is None):
        return []
    note = f" (starts with “{marker}”)" if marker else " (far fewer messages)"
    return [make("compaction", old=len(ctx.held), new=len(ctx.new), marker=note, lost=ctx.lost)]


def _same(a: dict, b: dict) -> bool:
    return message_fields(a) == message_fields(b)


def _truncated_at(ctx: _Ctx, i: int) -> int | None:
    """j > i such that the new messages from i on continue the held ones from j on (messages dropped)."""
    for j in range(i + 1, len(ctx.held)):
        span = min(len(ctx.held) - j, len(ctx.new) - i)
        if span > 0 and all(_same(ctx.held[j + k], ctx.new[i + k]) for k in range(span)):
            return j
    return None


def _truncation(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    j = _truncated_at(ctx, i)
    if j is None:
        return []
    return [make("history_truncated", count=j - i, start=i, end=j - 1, lost=ctx.lost)]


def _pruned(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    def pruned(k: int) -> bool:
        msg = ctx.new[k]
        return (msg.get("role") == "tool" and content_text(msg.get("content")).strip() == PRUNED_MARKER
                and k < len(ctx.held) and content_text(ctx.held[k].get("content")).strip() != PRUNED_MARKER)
    if not pruned(i):
        return []
    count = sum(1 for k in range(i, len(ctx.new)) if pruned(k))
    return [make("tool_output_pruned", count=count, index=i, lost=ctx.lost)]


def _reasoning_lost(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    old, new = ctx.held[i], ctx.new[i]
    if old.get("role") != "assistant":
        return []
    dropped = _reasoning(old) if div.field == "reasoning_content" and not _reasoning(new) else ""
    held_text, new_text = content_text(old.get("content")), content_text(new.get("content"))
    if div.field == "content" and "</think>" in held_text and "</think>" not in new_text:
        head, _, tail = held_text.rpartition("</think>")
        dropped = head if tail.strip() == new_text.strip() else ""
    if not dropped:
        return []
    return [make("reasoning_dropped", ctx.client, index=i, chars=f"{len(dropped):,}", lost=ctx.lost)]


def _user_rewrite(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    old, new = ctx.held[i], ctx.new[i]
    if old.get("role") != "user" or div.field != "content":
        return []
    a, b = content_text(old.get("content")), content_text(new.get("content"))
    if a.lstrip().startswith(RAG_TEMPLATE_START) and stable_user_text(a) == b.strip():
        detail = (f"messages[{i}] carried the retrieved context ({len(a) - len(b):,} chars) on the previous turn; "
                  "now it is only the query")
        return [make("rag_context_moved", detail=detail, lost=ctx.lost)]
    if "<system-reminder>" in a and "<system-reminder>" not in b and stable_user_text(a) == stable_user_text(b):
        return [make("reminder_moved", index=i, lost=ctx.lost)]
    return []


def _reply_rewrite(div: Divergence, ctx: _Ctx, i: int) -> list[Cause]:
    if i != ctx.reply_index:
        return []
    if div.field == "messages":
        return [make("history_rewritten", where=f"messages[{i}] (the previous reply)", lost=ctx.lost,
                     what="was not replayed: another message stands in its place")]
    a = message_fields(ctx.held[i]).get(div.field or "", "")
    b = message_fields(ctx.new[i]).get(div.field or "", "")
    detail = reserialization(div.field or "", a, b)
    if detail is None:
        return [make("history_rewritten", where=f"messages[{i}] (the previous reply)", lost=ctx.lost,
                     what=f"came back with a different {div.field} (from char {div.char_offset})")]
    return [make("assistant_reserialized", index=i, detail=detail)]


# ---- causes of a render divergence -----------------------------------------------------------------


def _render_causes(div: Divergence, ev: Evidence, lost: str) -> list[Cause]:
    prev, turn = ev.predecessor, ev.turn
    kwargs = (turn.body or {}).get("chat_template_kwargs") or {}
    where = f"messages[{div.message_index}] ({div.role})" if div.message_index is not None else "an earlier turn"
    held = (prev.rendered or "") + _generated_text(prev)
    at_think = div.field == "rendered" and held[div.char_offset or 0:].startswith(REASONING_MARKUP)
    if at_think and isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
        detail = f"enable_thinking=false: {where} is rendered without the empty <think></think> block " \
                 "the generation prompt had" + _position(div)
        return [make("template_rerender", "nothink", detail=detail, lost=lost)]
    if at_think or (div.field == "tokens" and prev.exchange.output_reasoning):
        detail = f"the reasoning of {where} was dropped from the rendered prompt after a new user message" \
                 + _position(div)
        return [make("template_rerender", "thinking", detail=detail, lost=lost)]
    detail = f"{where} renders differently" + _position(div)
    return [make("template_rerender", detail=detail, lost=lost)]


def _position(div: Divergence) -> str:
    where = [f"rendered char {div.char_offset:,}" if div.char_offset is not None else "",
             f"token {div.token_offset:,}" if div.token_offset is not None else ""]
    return f" ({', '.join(w for w in where if w)})" if any(where) else ""


# ---- server level ---------------------------------------------------------------------------------


def _others_between(ev: Evidence) -> list[Turn]:
    return [t for t in ev.between if t.kind != KIND_OTHER
            and (t.kind != KIND_MAIN or t.conversation != ev.turn.conversation)]


def _significant(lost: int, shared: int) -> bool:
    return lost >= MIN_LOST_TOKENS and lost >= MIN_LOST_FRACTION * shared


def _server_causes(ev: Evidence, extends: bool) -> list[Cause]:
    if ev.cache_prompt_disabled:
        reuse = f" (cache_n = {ev.cached_upstream:,})" if ev.cached_upstream is not None else ""
        return [make("cache_disabled", reuse=reuse)]
    reused = ev.cached_upstream if ev.cached_upstream is not None else ev.cached_expected
    shared = ev.common_prefix
    if shared is None and extends and ev.predecessor is not None:
        shared = _prompt_tokens(ev.predecessor)
    if reused is None or shared is None or not _significant(shared - reused, shared):
        return []
    pred, others, memory = ev.prediction, _others_between(ev), ev.server_memory
    forced = bool(getattr(pred, "full_reprocess_forced", False))
    causes = []
    if others:
        selection = getattr(pred, "selection", None)
        note = f" (the server picked a slot by {selection.upper()})" if selection in ("lcp", "lru") else ""
        causes.append(make("slot_evicted", shared=f"{shared:,}", reused=f"{reused:,}", selection=note,
                           between=describe_between(others, ev.turn.conversation)))
    # SWA/hybrid memory explains the loss when the cache model says so (a forced re-process, or a restore
    # from a checkpoint); without a prediction, the memory kind alone. Otherwise a loss on such a server
    # (a restart, an LRU slot, an id_slot pin) is what it would be on plain memory.
    by_memory = getattr(pred, "checkpoint_restored", None) is not None if pred is not None else \
        memory in ("swa", "hybrid")
    if forced or (by_memory and not others):
        causes.append(make("no_checkpoint", shared=f"{shared:,}", memory=memory, what=checkpoint_note(pred, reused)))
    if causes:
        return causes
    prompt = _prompt_tokens(ev.turn)
    if getattr(pred, "selection", None) == "lru" or (pred is None and prompt and shared / prompt < SLOT_SIMILARITY):
        pct = f"{shared / prompt:.0%}" if prompt else "?"
        return [make("slot_similarity_low", shared=f"{shared:,}", prompt=f"{prompt or 0:,}", pct=pct,
                     reused=f"{reused:,}")]
    if ev.cached_expected is not None and ev.cached_upstream is not None and \
            not _significant(ev.cached_expected - ev.cached_upstream, shared):
        return [make("unknown", detail=f"the server reused {reused:,} of {shared:,} shared tokens and kvlens' cache "
                                       f"model predicted that too ({ev.cached_expected:,}); see the server log")]
    return [make("server_cache_lost", reused=f"{reused:,}", shared=f"{shared:,}")]


# ---- explain --------------------------------------------------------------------------------------


def explain(ev: Evidence) -> tuple[Divergence, list[Cause]]:
    """The first divergence from what the server held, and the causes (most important first, never empty)."""
    turn, prev = ev.turn, ev.predecessor
    if turn.kind not in (KIND_MAIN, KIND_SUBAGENT) or (turn.kind == KIND_SUBAGENT and prev is None):
        return _explain_side(ev)
    if prev is None:
        shared = f"; it shares {ev.best_prefix:,} tokens with an earlier prompt" if ev.best_prefix else ""
        causes = [make("first_request", conversation=short_key(turn.conversation), shared=shared)]
        return Divergence("none", token_offset=ev.common_prefix), causes + _server_causes(ev, False)
    if prev.body is None or turn.body is None:
        div = Divergence("none", token_offset=ev.common_prefix)
        return div, _server_causes(ev, False) or [make("unknown", detail="a request body was not captured")]
    return _explain_chain(ev)


def _explain_side(ev: Evidence) -> tuple[Divergence, list[Cause]]:
    turn, prev = ev.turn, ev.predecessor
    div = None
    if prev is not None and prev.body is not None and turn.body is not None:
        div = locate_body_divergence(held_body(prev), turn.body)
    div = div or Divergence("none")
    div.token_offset = ev.common_prefix
    client = client_of(turn)
    variant = "open-webui" if client == "open-webui" else f"opencode-{turn.side_kind}" if client == "opencode" else None
    label = " ".join(x for x in (client, turn.side_kind or turn.kind) if x)
    parent = turn.extra.get("parent")
    extra = f" (a subagent of {short_key(parent)})" if parent else \
        "; it takes a slot, so the conversation's next turn may have to re-process"
    causes = [make("side_request", variant, label=label, conversation=short_key(turn.conversation),
                   extra=extra)]
    if prev is None and turn.kind == KIND_SUBAGENT:
        causes.append(make("first_request", conversation=short_key(turn.conversation), shared=""))
    if ev.cache_prompt_disabled:
        causes.append(make("cache_disabled", reuse=""))
    return div, causes


def _explain_chain(ev: Evidence) -> tuple[Divergence, list[Cause]]:
    turn, prev = ev.turn, ev.predecessor
    held = held_body(prev)
    reply = reply_message(prev.exchange)
    ctx = _Ctx(ev, held, _message_dicts(held.get("messages")), turn.messages,
               len(prev.messages) if reply else None, _lost_phrase(ev), client_of(turn))
    div = locate_body_divergence(held, turn.body or {})
    causes = _body_causes(div, ctx) if div else []
    if div is None:
        div = locate_render_divergence(prev, turn, ev.common_prefix)
        causes = _render_causes(div, ev, ctx.lost) if div else []
    extends = div is None or div.field == "model"
    server = _server_causes(ev, extends)
    if div is None:
        div = Divergence("server" if server else "none")
    if div.token_offset is None:
        div.token_offset = ev.common_prefix
    causes += server
    if (held.get("model") != (turn.body or {}).get("model")) and not any(c.code == "model_changed" for c in causes):
        causes.append(make("model_changed", old=held.get("model"), new=(turn.body or {}).get("model")))
    return div, causes or [_append_only(ev, ctx)]


def _append_only(ev: Evidence, ctx: _Ctx) -> Cause:
    added = len(ctx.new) - len(ctx.held)
    what = f"+{added} message(s)" if added > 0 else "a repeat of the held prompt (retry/regenerate)"
    reuse = ""
    total = _prompt_tokens(ev.turn)
    if ev.cached_upstream is not None and total:
        reuse = f"; {ev.cached_upstream:,} of {total:,} prompt tokens reused"
    held_n = len(ev.predecessor.held) if ev.predecessor.held is not None else None
    if ev.common_prefix is not None and held_n is not None and ev.common_prefix < held_n:
        reuse += f"; re-tokenising the reply diverged {held_n - ev.common_prefix} token(s) before its end (normal)"
    return make("append_only", prev=ev.predecessor.id[:12], added=what, reuse=reuse)


def _message_dicts(messages: Any) -> list[dict[str, Any]]:
    """The messages of a body as the analysis reads them: a client may send anything under the key."""
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
