"""A `Turn`: one recorded request as the cache analysis sees it.

The analysis worker builds a Turn from a finished `Exchange`: the parsed request body, the prompt's
token ids (from the upstream's own tokenizer when possible), the rendered prompt text, and the
sequence the server holds afterwards (prompt + generated tokens minus the last sampled one).
`sessions` classifies Turns into conversations and side requests, `explain` compares a Turn with
its predecessor, and the analyzer keeps the recent Turns of each conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.exchange import Exchange

# Request kinds. "main" is a conversation's own turn; the rest are side requests that a client
# sends on behalf of a conversation (often with the same session id) and that are not its next turn.
KIND_MAIN = "main"
KIND_TITLE = "side:title"  # opencode title generator, open-webui "### Task: Generate a concise ... title"
KIND_TASK = "side:task"  # open-webui tags / follow-ups / query generation / autocomplete / tool selection
KIND_COMPACTION = "side:compaction"  # opencode's compaction agent request
KIND_SUBAGENT = "side:subagent"  # opencode task-tool subagent (x-parent-session-id)
KIND_OTHER = "other"  # not a chat/completion request (tokenize, props, ...): not analysed


@dataclass(slots=True)
class Turn:
    exchange: Exchange
    body: dict[str, Any] | None
    """The parsed JSON request body (None when it is not a JSON object)."""
    tokens: Sequence[int] | None = None
    """Prompt token ids as the server sees them (None when no tokenizer could say). The analyzer keeps
    them as a uint32 array (`proxy.cachemodel.TokenArray`, 4 bytes a token), never changed in place."""
    tokens_source: str | None = None
    """"upstream" (the server's own tokenizer) | "approximate" (kvlens' local rendering) | None."""
    tokens_error: str | None = None
    rendered: str | None = None
    """The prompt text after the chat template, when known."""
    token_offsets: Sequence[int] | None = None
    """Character offset in `rendered` where each token starts (same length as `tokens`), when known."""
    held: Sequence[int] | None = None
    """What the server's slot holds after this request: tokens + generated tokens[:-1]."""
    kind: str = KIND_MAIN
    """KIND_* above."""
    side_kind: str | None = None
    """Finer label for side requests, e.g. "title", "tags", "follow_ups", "query", "compaction"."""
    conversation: str | None = None
    """Conversation key: the session header's value, else a fingerprint of the conversation's start."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.exchange.id

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs = (self.body or {}).get("messages")
        return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
