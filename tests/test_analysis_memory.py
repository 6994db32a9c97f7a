"""What the analysis keeps in memory over a long run, and the compact token storage behind it.

The analysis process holds, per request, a prompt of up to ~100k tokens in several places (the
tokenizer's caches, the shadow cache model's slots and host-RAM cache, the prefix index, the last
turn of each conversation). These tests pin the shape of that memory: token ids as 4-byte arrays
that compare at C speed and give the same answers as lists, caches bounded in bytes, turns that
drop what no later request reads, and no reference cycles, so nothing waits for a full garbage
collection. Token-level behaviour (cache_n, the analysis itself) is pinned by test_cachemodel.py,
test_emulator_cache.py and the analysis e2e tests; here only that arrays and lists agree.
"""

from __future__ import annotations

import copy
import gc
import pickle
import random
import re
import weakref
import zlib
from typing import Any

import httpx
import orjson
import pytest

from proxy.analyzer import Analyzer
from proxy.cachemodel import CacheConfig, CacheModel, TokenArray, as_tokens, common_prefix, concat, head
from proxy.config import load_settings
from proxy.exchange import Exchange
from proxy.tokens import Tokenizer
from proxy.turn import KIND_MAIN, KIND_TITLE

PIECE = re.compile(r"\s*\S+|\s+")


def naive_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- token arrays ----------------------------------------------------------------------------------


def test_common_prefix_on_arrays_agrees_with_lists() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.choice([0, 1, 2, 15, 16, 17, 100, 1000, 5000])
        a = [rng.randrange(4) for _ in range(n)]
        cut = rng.randrange(0, n + 1)
        b = a[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        want = naive_prefix(a, b)
        assert common_prefix(TokenArray(a), TokenArray(b)) == want
        assert common_prefix(TokenArray(b), TokenArray(a)) == want
        assert common_prefix(TokenArray(a), b) == want == common_prefix(a, TokenArray(b))  # mixed: the list path


@pytest.mark.parametrize("at", [0, 1, 15, 16, 17, 48, 49, 99_999, 150_000, 199_999, 200_000])
def test_common_prefix_on_200k_token_arrays(at: int) -> None:
    a = TokenArray(i % 7919 for i in range(200_000))
    b = TokenArray(a)
    if at < len(b):
        b[at] = 150_001
    assert common_prefix(a, b) == at
    assert common_prefix(a, head(a, at)) == at


def test_token_array_behaves_like_the_list_it_replaces() -> None:
    t = TokenArray([1, 2, 300_000])
    assert t == [1, 2, 300_000] and [1, 2, 300_000] == t and t != [1, 2] and t != [1, 2, 3]
    assert TokenArray() == [] and t == TokenArray([1, 2, 300_000]) and t.itemsize == 4
    assert head(t, 2) == [1, 2] and isinstance(head(t, 2), TokenArray)
    assert concat(t, [7]) == [1, 2, 300_000, 7] and isinstance(concat(t, [7]), TokenArray)
    assert concat(t, [-1]) == [1, 2, 300_000, -1]  # an id that does not fit: a list, same values
    assert as_tokens([5, -3]) == [5, -3] and isinstance(as_tokens([5, -3]), list)
    copied = pickle.loads(pickle.dumps(t))
    assert isinstance(copied, TokenArray) and copied == t
    assert isinstance(copy.deepcopy(t), TokenArray) and isinstance(copy.copy(t), TokenArray)


def test_cache_model_stores_arrays_and_answers_as_with_lists() -> None:
    """The same traffic as lists and as arrays: the same launches, logs and RAM cache, stored as arrays."""
    rng = random.Random(3)
    convs = [[rng.randrange(150_000) for _ in range(rng.randrange(50, 400))] for _ in range(6)]
    models = [CacheModel(CacheConfig(n_slots=2, memory=m, cache_ram_mib=1)) for m in ("hybrid", "hybrid")]
    for step in range(120):
        c = rng.randrange(len(convs))
        convs[c] = convs[c] + [rng.randrange(150_000) for _ in range(rng.randrange(1, 300))]
        if rng.random() < 0.1:
            convs[c] = convs[c][: len(convs[c]) // 2]  # history rewritten
        generated = [rng.randrange(150_000) for _ in range(5)]
        starts = sorted(rng.sample(range(len(convs[c])), 2))
        launches = [models[0].launch(list(convs[c]), user_starts=starts),
                    models[1].launch(TokenArray(convs[c]), user_starts=starts)]
        a, b = launches
        assert (a.slot_id, a.selection, a.n_past, a.ram_loaded, a.ram_saved, a.log) == \
               (b.slot_id, b.selection, b.n_past, b.ram_loaded, b.ram_saved, b.log), step
        for model, launch in zip(models, launches):
            model.finish(launch, generated)
            convs_held = convs[c] + generated[:-1]
        assert models[0].slots[a.slot_id].tokens == convs_held
    assert [e.tokens for e in models[0].ram] == [e.tokens for e in models[1].ram]
    stored = [s.tokens for s in models[0].slots] + [e.tokens for e in models[0].ram]
    assert stored and all(isinstance(t, TokenArray) for t in stored)


# ---- the tokenizer ----------------------------------------------------------------------------------


class StubLlama:
    """llama-server's /props, /apply-template and /tokenize (with pieces), one token per word; it keeps a
    weak reference to every response it makes."""

    def __init__(self) -> None:
        self.responses: list[weakref.ref[httpx.Response]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/props":
            data: Any = {"default_generation_settings": {"n_ctx": 131072}, "total_slots": 4}
        elif path == "/apply-template":
            messages = orjson.loads(request.content).get("messages") or []
            data = {"prompt": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                    + "<|im_start|>assistant\n"}
        elif path == "/tokenize":
            req = orjson.loads(request.content)
            pieces = PIECE.findall(req.get("content") or "")
            data = {"tokens": [{"id": zlib.crc32(p.encode()) % 150_000, "piece": p} for p in pieces]}
            if not req.get("with_pieces"):
                data = {"tokens": [t["id"] for t in data["tokens"]]}
        else:
            return httpx.Response(404, json={"error": {"code": 404, "message": "File Not Found"}})
        response = httpx.Response(200, content=orjson.dumps(data), headers={"content-type": "application/json"})
        self.responses.append(weakref.ref(response))
        return response


def tokenizer(stub: StubLlama, **kwargs: Any) -> Tokenizer:
    return Tokenizer("http://stub.invalid", client=httpx.Client(transport=httpx.MockTransport(stub)), **kwargs)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def chat(rng: random.Random, n_words: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": words(rng, n_words)},
                                       {"role": "user", "content": words(rng, 20)}]}


def test_responses_are_freed_without_the_garbage_collector() -> None:
    """httpx ties a response to its stream in a cycle; the tokenizer breaks it, so a 50k-token /tokenize
    answer (1.5 MB) is freed when the call returns, not at a full collection that may not come for long."""
    stub = StubLlama()
    rng = random.Random(1)
    with tokenizer(stub) as tk:
        gc.collect()
        gc.disable()
        try:
            prompt = tk.prompt("/v1/chat/completions", chat(rng, 2000))
            tk.text("a reply")
            alive = [r for r in stub.responses if r() is not None]
        finally:
            gc.enable()
    assert prompt.tokens and len(stub.responses) >= 3 and alive == []


def test_compact_prompts_equal_lists_and_caches_are_bounded_in_bytes() -> None:
    stub = StubLlama()
    rng = random.Random(2)
    bodies = [chat(rng, 30_000) for _ in range(4)]  # ~30k tokens: ~0.5 MB cached each (ids, offsets, text)
    with tokenizer(stub, cache_mib=1) as tk:
        for body in bodies:
            as_list = tk.prompt("/v1/chat/completions", body)
            compact = tk.prompt("/v1/chat/completions", body, compact=True)  # a cache hit
            assert isinstance(as_list.tokens, list) and isinstance(as_list.offsets, list)
            assert isinstance(compact.tokens, TokenArray) and isinstance(compact.offsets, TokenArray)
            assert compact.tokens == as_list.tokens and compact.offsets == as_list.offsets
            assert compact.rendered == as_list.rendered and len(as_list.tokens) > 30_000
            compact.tokens.append(1)  # the caller's own copy: the cache is untouched
            assert tk.prompt("/v1/chat/completions", body).tokens == as_list.tokens
            assert tk._prompts.nbytes <= 1 << 20 and tk._texts.nbytes <= 1 << 20
        assert 1 <= len(tk._prompts) < len(bodies)  # the byte bound, not the 256 entries
        assert tk.cache_stats["prompt_hits"] == 8


# ---- the analyzer -----------------------------------------------------------------------------------


class NullStore:
    def submit(self, exchange: Exchange) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True


def exchange(body: dict[str, Any], session: str | None, reply: str) -> Exchange:
    raw = orjson.dumps(body)
    headers = {"content-type": "application/json"} | ({"x-session-id": session} if session else {})
    return Exchange(method="POST", path="/v1/chat/completions", session=session, request_headers=headers,
                    request_body=raw, request_size=len(raw), status=200, finish_reason="stop", output_text=reply,
                    usage={"prompt_tokens": 10, "completion_tokens": 3}, upstream_timings={"cache_n": 0})


def analyzer(stub: StubLlama) -> Analyzer:
    return Analyzer(load_settings(environ={}, overrides={}), NullStore(), tokenizer=tokenizer(stub))  # type: ignore[arg-type]


def test_remembered_turns_keep_only_what_later_requests_read() -> None:
    rng = random.Random(4)
    an = analyzer(StubLlama())
    convs = {f"s{i}": chat(rng, 300) for i in range(3)}
    for _ in range(3):
        for session, body in convs.items():
            ex = exchange(body, session, "ok done")
            an.analyse_and_store(ex)
            assert ex.analysis and ex.analysis["prompt_tokens"] > 300 and "error" not in ex.analysis
            body["messages"] += [{"role": "assistant", "content": "ok done"}, {"role": "user", "content": words(rng, 9)}]
    last = set(map(id, an.last_main.values()))
    assert len(an.wire) == 9 and len(last) == 3
    for turn in an.wire:
        assert turn.tokens is None and turn.held is None and turn.token_offsets is None
        assert turn.exchange.request_body is None
        if id(turn) in last:  # a predecessor to be: what explain compares
            assert turn.rendered and turn.body is not None and turn.body["messages"][0]["role"] == "system"
        else:  # only the user messages sessions.classify matches side requests against
            assert turn.rendered is None and all(m["role"] == "user" for m in turn.body["messages"])
    model = an.model
    assert model is not None
    assert all(isinstance(t, TokenArray) for t in [s.tokens for s in model.slots] + [e.tokens for e in model.ram])


def test_a_side_request_still_finds_the_conversation_of_a_slimmed_turn() -> None:
    """A title request without a session names the first user message of the conversation; the only
    turn that has it is no longer its conversation's last (the history was rewritten since)."""
    rng = random.Random(5)
    an = analyzer(StubLlama())
    first = chat(rng, 200)
    first["messages"][1]["content"] = "how do I cache prompts"
    an.analyse_and_store(exchange(first, "conv-a", "like this"))
    rewritten = chat(rng, 200)  # same session, nothing in common: the first turn is slimmed
    an.analyse_and_store(exchange(rewritten, "conv-a", "fine"))
    old = an.wire[0]
    assert old.rendered is None and old.kind == KIND_MAIN and an.last_main["conv-a"] is an.wire[1]
    title = {"model": "m", "messages": [
        {"role": "system", "content": "You are a title generator. You output ONLY a thread title."},
        {"role": "user", "content": "Generate a title for this conversation:\n"},
        {"role": "user", "content": "how do I cache prompts"}]}
    ex = exchange(title, None, "Prompt caching")
    an.analyse_and_store(ex)
    assert an.wire[-1].kind == KIND_TITLE and an.wire[-1].conversation == "conv-a"
    assert ex.analysis and ex.analysis["conversation"] == "conv-a"


def test_the_analysis_leaves_no_cyclic_garbage() -> None:
    """Everything a request allocates is freed by reference counting when its analysis ends: the
    analysis process holds millions of objects (the prefix index), so full collections are rare."""
    rng = random.Random(6)
    an = analyzer(StubLlama())
    bodies = {f"s{i}": chat(rng, 3000) for i in range(3)}

    def run(rounds: int) -> None:
        for _ in range(rounds):
            for session, body in bodies.items():
                an.analyse_and_store(exchange(body, session, "a reply"))
                body["messages"] += [{"role": "assistant", "content": "a reply"},
                                     {"role": "user", "content": words(rng, 30)}]

    run(2)  # warm: the model, first imports and caches
    gc.collect()
    gc.disable()
    try:
        run(3)
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0


def test_free_heap_memory_goes_back_to_the_os_every_few_mib_of_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps the holes short-lived large buffers leave in its heap; the analysis trims it every
    TRIM_EVERY_BYTES of request bodies (here 20 kB), a no-op where there is no malloc_trim."""
    import proxy.analyzer

    monkeypatch.setattr(proxy.analyzer, "TRIM_EVERY_BYTES", 20_000)
    rng = random.Random(8)
    an = analyzer(StubLlama())
    calls: list[int] = []
    an._heap.trim = lambda pad: calls.append(pad) or 1  # type: ignore[assignment, func-returns-value]
    sizes = []
    for i in range(8):
        ex = exchange(chat(rng, 1000), f"s{i}", "ok")
        sizes.append(len(ex.request_body or b""))
        an.analyse_and_store(ex)
    expected, pending = 0, 0
    for n in sizes:  # once the bodies since the last trim reach the threshold
        pending += n
        if pending >= 20_000:
            expected, pending = expected + 1, 0
    assert sum(sizes) > 40_000 and calls == [0] * expected and expected >= 2
