"""The emulator's chat template: OpenAI messages -> one ChatML prompt string, as llama-server renders it.

Modelled on the Qwen-style template of the recorded model (`props.json` `chat_template`) plus Qwen3's
reasoning rules, because those rules are what cause template-driven cache misses in the field:

- `tools` go into the system block, before the history; `tool_calls` render as
  `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, the arguments parsed and re-serialised
  (llama-server parses them before templating: whitespace differences vanish, key order stays);
- tool results render inside a user turn as `<tool_response>` blocks;
- `reasoning_content` renders as `<think>\\n...\\n</think>\\n\\n` before the content, but by default only
  for assistant turns after the last user message, as Qwen3 does: once a new user message arrives,
  earlier reasoning disappears from the prompt and reuse stops at the first such turn. The emulator
  setting `drop_past_reasoning=False`, or `chat_template_kwargs.preserve_thinking`, keeps it;
- `enable_thinking=false` closes an empty think block in the generation prompt only (not in history).

`render` also reports where each user message starts, which the cache model needs for its
user-message checkpoints (the server finds them through `message_delimiters`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.emulator.tokenizer import Tokenizer

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
GENERATION_PROMPT = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


class TemplateError(ValueError):
    """The messages cannot be rendered (llama-server answers 400 invalid_request_error)."""


@dataclass
class Rendered:
    text: str
    user_starts: list[int] = field(default_factory=list)
    """Character offsets where a user message's `<|im_start|>` begins."""
    generation_prompt: str = ""


@dataclass(frozen=True)
class TemplateOptions:
    add_generation_prompt: bool = True
    enable_thinking: bool = True
    keep_reasoning: bool = False


def options_from_body(body: Mapping[str, Any], *, drop_past_reasoning: bool) -> TemplateOptions:
    """Read add_generation_prompt and chat_template_kwargs (enable_thinking, preserve_thinking)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise TemplateError("chat_template_kwargs must be an object")
    preserve = bool(kwargs.get("preserve_thinking", False))
    return TemplateOptions(
        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
        enable_thinking=bool(kwargs.get("enable_thinking", True)),
        keep_reasoning=preserve or not drop_past_reasoning,
    )


def render_content(content: Any) -> str:
    """A message's content: a string, or the text parts of a list (other parts are ignored)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return str(content)


def tojson(value: Any) -> str:
    """Jinja's `tojson` as the server's template engine writes it: `, ` and `: `, key order kept."""
    return json.dumps(value, ensure_ascii=False)


def _arguments(raw: Any) -> str:
    if isinstance(raw, str):
        try:
            return tojson(json.loads(raw))
        except ValueError:
            return raw
    return tojson(raw if raw is not None else {})


def _tool_calls(calls: Any, content: str) -> str:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise TemplateError("tool_calls must be an array")
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise TemplateError("tool_calls entries must be objects")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise TemplateError("a tool call's function must be an object")
        if (i == 0 and content) or i > 0:
            out.append("\n")
        out.append(f'<tool_call>\n{{"name": "{fn.get("name", "")}", "arguments": {_arguments(fn.get("arguments"))}}}'
                   "\n</tool_call>")
    return "".join(out)


def _split_reasoning(message: Mapping[str, Any], content: str) -> tuple[str, str]:
    """(reasoning, content): `reasoning_content`, or a `<think>` block left inside the content."""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        return reasoning.strip("\n"), content.lstrip("\n")
    if "</think>" in content:
        head, _, tail = content.partition("</think>")
        return head.split("<think>")[-1].strip("\n"), tail.lstrip("\n")
    return "", content


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return -1


def _assistant(message: Mapping[str, Any], show_reasoning: bool, prefill: bool) -> str:
    content = render_content(message.get("content"))
    reasoning, content = _split_reasoning(message, content)
    head = f"<think>\n{reasoning}\n</think>\n\n" if reasoning and show_reasoning else ""
    body = GENERATION_PROMPT + head + content + _tool_calls(message.get("tool_calls") or [], content)
    return body if prefill else body + "<|im_end|>\n"


def _system_block(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any]) -> str:
    first_is_system = bool(messages) and messages[0].get("role") == "system"
    system = render_content(messages[0].get("content")) if first_is_system else ""
    if tools:
        lead = system + "\n\n" if first_is_system else ""
        return "<|im_start|>system\n" + lead + TOOLS_HEADER + "".join("\n" + tojson(t) for t in tools) + TOOLS_FOOTER
    return f"<|im_start|>system\n{system}<|im_end|>\n" if first_is_system else ""


def render(messages: Sequence[Any], tools: Sequence[Any] | None, options: TemplateOptions) -> Rendered:
    """Render a chat request's messages (and tools) into the prompt llama-server would tokenize."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise TemplateError("'messages' must be a non-empty array")
    if not all(isinstance(m, Mapping) for m in messages):
        raise TemplateError("each message must be an object")
    if tools and (not isinstance(tools, Sequence) or isinstance(tools, str)):
        raise TemplateError("'tools' must be an array")
    tools = list(tools or [])
    parts = [_system_block(messages, tools)]
    user_starts: list[int] = []
    offset = len(parts[0])
    last_user = _last_user_index(messages)
    prefill = options.add_generation_prompt and messages[-1].get("role") == "assistant"
    for i, message in enumerate(messages):
        role = message.get("role")
        text = ""
        if role == "system" and i == 0:
            continue
        if role in ("user", "system"):
            if role == "user":
                user_starts.append(offset)
            text = f"<|im_start|>{role}\n{render_content(message.get('content'))}<|im_end|>\n"
        elif role == "assistant":
            show = options.keep_reasoning or i > last_user
            text = _assistant(message, show, prefill and i == len(messages) - 1)
        elif role == "tool":
            opens = i == 0 or messages[i - 1].get("role") != "tool"
            closes = i == len(messages) - 1 or messages[i + 1].get("role") != "tool"
            text = ("<|im_start|>user" if opens else "") + "\n<tool_response>\n"
            text += render_content(message.get("content")) + "\n</tool_response>" + ("<|im_end|>\n" if closes else "")
        else:
            raise TemplateError(f"unsupported message role: {role!r}")
        parts.append(text)
        offset += len(text)
    generation = ""
    if options.add_generation_prompt and not prefill:
        generation = GENERATION_PROMPT + ("" if options.enable_thinking else EMPTY_THINK)
        parts.append(generation)
    return Rendered(text="".join(parts), user_starts=user_starts, generation_prompt=generation)


def encode(tokenizer: Tokenizer, rendered: Rendered) -> tuple[list[int], list[int]]:
    """Prompt tokens (with BOS, specials parsed) and the token index of each user-message start.

    Each user start sits on a `<|im_start|>` special token, a hard tokenizer boundary, so tokenizing
    the pieces between starts and concatenating gives exactly the tokens of the whole text."""
    tokens: list[int] = []
    starts: list[int] = []
    cuts = [0, *rendered.user_starts, len(rendered.text)]
    for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if n > 0:
            starts.append(len(tokens))
        tokens.extend(tokenizer.tokenize(rendered.text[a:b], add_special=n == 0, parse_special=True))
    return tokens, starts


# What /props reports as `chat_template`: the Jinja equivalent of `render` above.
CHAT_TEMPLATE = """{%- macro render_content(content) -%}
    {%- if content is string -%}{{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}{{- part.text -}}
            {%- elif part is string -%}{{- part -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}{{- content -}}{%- endif -%}
{%- endmacro -%}
{%- set preserve = preserve_thinking is defined and preserve_thinking -%}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- render_content(messages[0].content) + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string and message.reasoning_content %}
            {%- set reasoning = message.reasoning_content.strip('\\n') %}{%- set content = content.lstrip('\\n') %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if reasoning and (preserve or loop.index0 > ns.last_query_index) %}
            {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- if message.tool_calls %}
            {%- for tc in message.tool_calls %}
                {%- set f = tc.function if tc.function is defined else tc %}
                {%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}
                {{- '<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
                {%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
