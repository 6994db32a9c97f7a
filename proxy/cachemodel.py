"""A pure, deterministic model of llama-server's prompt-cache policy (slots, host-RAM cache, checkpoints).

It owns the answer to "given what the server holds, how many prompt tokens will this request reuse?"
(`cache_n` = `n_past`), and the state changes that answer implies: which slot is picked, what moves
into and out of the host-RAM prompt cache, which context checkpoints exist. The llama-server emulator
drives it to produce realistic `timings.cache_n`, and the proxy can replay traffic through it to
predict expected reuse and explain a miss.

It mirrors current master as described in shared/research/llama-server-cache.md (§1, §2.1, §2.3,
§2.4, §6), confirmed against the b10470 recordings. No I/O, no threads, no clocks: `t_last_used` is a
logical tick, so equal inputs give equal outputs. Deliberate simplifications are noted where made
(the SWA `pos_min` estimate, one slot per batch, no `n_cache_reuse`, no media).

Token sequences are stored as `TokenArray`s (uint32, 4 bytes a token): with the default 8 GiB
--cache-ram the RAM cache alone can hold ~4M tokens, 150 MB as lists of ints, 16 MB as arrays; and
every launch compares the prompt with each slot and RAM entry (`common_prefix`), which on arrays
costs what the common prefix costs, at C speed.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

MemoryKind = Literal["plain", "swa", "hybrid"]

MIB = 1 << 20
_LCP_CHUNK = 256  # common_prefix on lists compares slices of this many tokens before going token by token
_LCP_FIRST = 16   # common_prefix on arrays compares this many tokens first, then doubling runs
TOKEN_TYPECODE = next(c for c in "IL" if array(c).itemsize == 4)
"""array typecode of token ids: unsigned 32-bit, the layout `proxy.prefix` hashes (4 bytes a token,
against 8 + 28 for an int in a list)."""


class TokenArray(array):
    """Token ids stored as unsigned 32-bit integers (4 bytes each), comparing equal to a list of the
    same ids. What the model stores for slots and RAM entries: a 50k-token prompt is 200 KB instead of
    the 1.8 MB of a list of ints, and `common_prefix` compares two of them at C speed. Never changed in
    place once stored (slots and entries share them), only replaced."""

    __slots__ = ()

    def __new__(cls, tokens: Sequence[int] | array = ()) -> TokenArray:
        return super().__new__(cls, TOKEN_TYPECODE, tokens)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, array):
            return array.__eq__(self, other)
        if isinstance(other, (list, tuple, range)):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenArray({self.tolist()!r})"

    def __copy__(self) -> TokenArray:  # array's would return a plain array
        return TokenArray(self)

    def __deepcopy__(self, memo: object) -> TokenArray:
        return TokenArray(self)


def as_tokens(tokens: Sequence[int]) -> Sequence[int]:
    """`tokens` as a fresh TokenArray; ids outside [0, 2**32) (or not ints) stay a list, which every
    function here still handles (slowly)."""
    try:
        return TokenArray(tokens)
    except (OverflowError, TypeError):
        return list(tokens)


def head(tokens: Sequence[int], n: int) -> Sequence[int]:
    """The first n tokens, as a new sequence of the same kind (a TokenArray for an array)."""
    if isinstance(tokens, array) and tokens.typecode == TOKEN_TYPECODE:
        out = TokenArray()
        out.frombytes(memoryview(tokens).cast("B")[:max(0, n) * 4])
        return out
    return list(tokens[:n])


def concat(tokens: Sequence[int], more: Sequence[int]) -> Sequence[int]:
    """tokens + more, as a new sequence (a TokenArray when both fit one)."""
    if isinstance(tokens, array):
        out = as_tokens(tokens)
        if isinstance(out, array):
            try:
                out.extend(more)
                return out
            except (OverflowError, TypeError):
                pass
    return list(tokens) + list(more)


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (server_tokens::get_common_prefix).

    On two token arrays of the same type (what the model and the analysis store): compares a short
    run, then runs of doubling length, then bisects inside the run that differs, all slice compares
    at C speed, so the cost follows the common prefix, not the lengths: a prompt that differs from a
    cached 100k-token one at its first tokens costs a microsecond. Other sequences: compares whole
    slices first, then chunks, and walks token by token only inside the one chunk that differs."""
    if isinstance(a, array) and isinstance(b, array) and a.typecode == b.typecode:
        return _array_prefix(a, b)
    a = a if isinstance(a, list) else list(a)
    b = b if isinstance(b, list) else list(b)
    n = min(len(a), len(b))
    # one slice (of the longer list) instead of two: this runs on 100k-token prompts per slot
    if (a == b[:n]) if len(a) == n else (b == a[:n]):
        return n
    i = 0
    while i + _LCP_CHUNK <= n and a[i:i + _LCP_CHUNK] == b[i:i + _LCP_CHUNK]:
        i += _LCP_CHUNK
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _array_prefix(a: array, b: array) -> int:
    n = min(len(a), len(b))
    lo, step = 0, _LCP_FIRST
    while True:  # invariant: a[:lo] == b[:lo]
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            break
        if hi == n:
            return n
        lo, step = hi, step * 2
    return first_difference(a, b, lo, hi)


def first_difference(a: Any, b: Any, lo: int, hi: int) -> int:
    """Where two sliceable sequences first differ, given a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisection
    over slice compares, which run at C speed on arrays and bytes."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CacheConfig:
    n_slots: int = 4
    n_ctx: int = 8192              # -c: total context
    kv_unified: bool = True        # llama-server auto -np gives unified KV; an explicit -np N gives False
    memory: MemoryKind = "plain"
    n_swa: int = 128               # only for memory="swa"
    swa_full: bool = False
    n_batch: int = 2048
    n_ubatch: int = 512
    slot_prompt_similarity: float = 0.1
    cache_prompt: bool = True      # server default for requests (--no-cache-prompt sets False)
    cache_ram_mib: int = 8192      # 0 = off, -1 = unlimited
    cache_idle_slots: bool = True  # forced off when cache_ram_mib == 0
    n_ctx_checkpoints: int = 32
    checkpoint_min_step: int = 8192
    state_bytes_per_token: int = 2060   # size of a RAM-cache entry per token (real: 2.713 MiB for 1381 tokens)
    checkpoint_bytes: int = 1 << 20     # size of one context checkpoint
    # Builds after 2026-09-03 (#28302, later than b10470 and the research): the min-step eviction only
    # runs once the checkpoint list is full, and a checkpoint at the same n_tokens is replaced.
    checkpoint_evict_only_when_full: bool = False

    @property
    def n_ctx_slot(self) -> int:
        """Per-slot context (llama_n_ctx_seq): the whole -c with unified KV, else pad256(n_ctx / np)."""
        return self.n_ctx if self.kv_unified else _pad256(self.n_ctx // self.n_slots)

    @property
    def n_swa_eff(self) -> int:
        """The server's `n_swa`: 0 for non-SWA models and with --swa-full (#22288)."""
        return self.n_swa if self.memory == "swa" and not self.swa_full else 0

    @property
    def swa_cells(self) -> int:
        """S, the SWA cache size in cells (llama_kv_cache_iswa); the whole context with --swa-full."""
        if self.swa_full:
            return self.n_ctx_slot
        n_seq = self.n_slots if self.kv_unified else 1
        return _pad256(min(self.n_ctx_slot, self.n_swa * n_seq + self.n_ubatch))

    @property
    def makes_checkpoints(self) -> bool:
        """`do_checkpoint`: hybrid/recurrent memory (seq_rm FULL/RS) or SWA without --swa-full."""
        return self.n_ctx_checkpoints > 0 and (self.memory == "hybrid" or self.n_swa_eff > 0)

    @property
    def ram_enabled(self) -> bool:
        return self.cache_ram_mib != 0

    @property
    def ram_limit_bytes(self) -> int:
        """`limit_size` of server_prompt_cache: 0 means no size limit (-1 = unlimited)."""
        return max(0, self.cache_ram_mib) * MIB


@dataclass
class Checkpoint:
    n_tokens: int
    pos_min: int
    pos_max: int
    id_task: int
    size_bytes: int


@dataclass
class SlotState:
    id: int
    tokens: Sequence[int]          # what the slot's KV holds: prompt + generated[:-1] (a TokenArray)
    checkpoints: list[Checkpoint]
    t_last_used: int = -1          # logical clock, set at release
    is_processing: bool = False
    id_task: int = -1
    n_prompt_tokens_processed: int = 0   # current task's prompt_n; 0 after release, as the real /slots shows
    n_prompt_tokens_cache: int = 0       # current task's cache_n; 0 after release, as the real /slots shows


@dataclass
class RamEntry:
    tokens: Sequence[int]          # a TokenArray, shared with the slot it was saved from
    checkpoints: list[Checkpoint]
    size_bytes: int


@dataclass
class Launch:
    id_task: int
    slot_id: int
    selection: str                 # "lcp" | "lru" | "explicit"
    f_sim: float                   # best similarity at selection (0 for LRU)
    f_keep: float
    ram_saved: bool                # the slot's previous prompt was saved to the RAM cache by this selection
    ram_loaded: bool               # a better prompt was loaded from the RAM cache
    n_tokens: int                  # prompt length
    n_past: int                    # == timings.cache_n == usage.prompt_tokens_details.cached_tokens
    prompt_n: int                  # n_tokens - n_past (tokens to actually process)
    checkpoint_restored: Checkpoint | None
    full_reprocess_forced: bool    # "forcing full prompt re-processing due to lack of cache data"
    error: str | None              # None, or "exceed_context_size" (then n_past = prompt_n = 0, slot released)
    log: list[str] = field(default_factory=list)  # llama-server-like log lines, minus the timestamp


@dataclass
class _Selection:
    slot: SlotState
    selection: str
    f_sim: float
    f_keep: float
    update_cache: bool


def _slot_line(level: str, func: str, slot_id: int, id_task: int, msg: str) -> str:
    return f"{level} slot {func[:12]:>12}: id {slot_id:2d} | task {id_task} | {msg}"


def _srv_line(level: str, func: str, msg: str) -> str:
    return f"{level} srv  {func[:12]:>12}: {msg}"


class CacheModel:
    """The server's slots and host-RAM prompt cache, advanced one launch/finish at a time."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.slots: list[SlotState] = [SlotState(id=i, tokens=TokenArray(), checkpoints=[])
                                       for i in range(config.n_slots)]
        self.ram: list[RamEntry] = []  # oldest first
        self._clock = 0
        self._next_task = 0

    # ---- public API ---------------------------------------------------------------------------

    def launch(self, tokens: Sequence[int], *, id_slot: int = -1, cache_prompt: bool | None = None,
               user_starts: Sequence[int] = ()) -> Launch | None:
        """Admit a completion task as process_single_task + update_slots would; None = deferred."""
        cfg = self.config
        tokens = as_tokens(tokens)  # the model's own copy: slots and RAM entries share it from here
        log: list[str] = []
        sel = self._get_available_slot(tokens, id_slot, log)
        if sel is None:
            return None
        slot = sel.slot
        ram_saved = ram_loaded = False
        if sel.update_cache and cfg.ram_enabled:
            ram_saved, ram_loaded = self._update_prompt_cache(slot, tokens, log)
        id_task = self._next_task
        self._next_task += 1
        slot.is_processing, slot.id_task = True, id_task
        log.append(_slot_line("I", "launch_slot_", slot.id, id_task, "processing task, is_child = 0"))
        self._save_idle_slots(log)
        launch = Launch(id_task=id_task, slot_id=slot.id, selection=sel.selection, f_sim=sel.f_sim,
                        f_keep=sel.f_keep, ram_saved=ram_saved, ram_loaded=ram_loaded, n_tokens=len(tokens),
                        n_past=0, prompt_n=0, checkpoint_restored=None, full_reprocess_forced=False,
                        error=None, log=log)
        self._start_prompt(slot, launch, tokens, cfg.cache_prompt if cache_prompt is None else cache_prompt,
                           user_starts)
        return launch

    def finish(self, launch: Launch, generated: Sequence[int]) -> None:
        """Release the slot: it keeps prompt + generated[:-1], since the last sampled token is never
        decoded. Also right for a cancelled request (generated = what was produced so far)."""
        slot = self.slots[launch.slot_id]
        if not slot.is_processing or slot.id_task != launch.id_task:
            return  # already released (error, empty prompt) or a stale handle
        slot.tokens = concat(slot.tokens, list(generated[:-1]))
        self._release(slot)

    def slot_snapshot(self) -> list[dict]:
        """GET /slots fields per slot. The real server omits the task fields while id_task == -1."""
        return [{"id": s.id, "n_ctx": self.config.n_ctx_slot, "is_processing": s.is_processing,
                 "id_task": s.id_task, "n_prompt_tokens": len(s.tokens),
                 "n_prompt_tokens_processed": s.n_prompt_tokens_processed,
                 "n_prompt_tokens_cache": s.n_prompt_tokens_cache} for s in self.slots]

    # ---- slot selection: get_available_slot ------------------------------------------------------

    def _get_available_slot(self, tokens: Sequence[int], id_slot: int, log: list[str]) -> _Selection | None:
        """Explicit id (wrapped modulo n_slots), else best LCP similarity > thold, else LRU.

        Deviation: for an explicit slot that is busy, llama-server first runs the RAM-cache update on
        it and then defers; we defer without touching anything."""
        cfg = self.config
        ret: SlotState | None = None
        selection = ""
        if id_slot != -1:
            ret, selection = self.slots[id_slot % cfg.n_slots], "explicit"
            if ret.is_processing:
                return None
            log.append(_slot_line("I", "get_availabl", ret.id, -1, f"selected slot by id ({id_slot})"))
        f_sim_best, lcp_best, f_keep, update_cache = 0.0, 0, 0.0, False
        if cfg.slot_prompt_similarity != 0:
            for slot in self.slots:
                if id_slot != -1 and slot.id != id_slot:  # raw id, as llama-server compares it
                    continue
                if slot.is_processing or not slot.tokens or not tokens:
                    continue
                lcp = common_prefix(slot.tokens, tokens)
                f_sim = lcp / len(tokens)
                log.append(_slot_line("I", "get_availabl", slot.id, -1, f" - checking sim = {f_sim:.3f} "
                                      f"({lcp}/{len(tokens)}) > {cfg.slot_prompt_similarity:.3f}"))
                if f_sim > f_sim_best and f_sim > cfg.slot_prompt_similarity:
                    f_sim_best, lcp_best, ret = f_sim, lcp, slot
                    selection = selection or "lcp"
            if ret is not None and ret.tokens:  # an empty slot gives f_keep = NaN: no cache update
                f_keep = lcp_best / len(ret.tokens)  # 0 for an explicit slot below the threshold
                if selection == "lcp":
                    log.append(_slot_line("I", "get_availabl", ret.id, -1, "selected slot by LCP similarity, "
                                          f"f_sim_best = {f_sim_best:.3f} (> {cfg.slot_prompt_similarity:.3f} "
                                          f"thold), f_keep = {f_keep:.3f}"))
                update_cache = f_keep < 0.5  # "we are about to lose a large portion"
        if ret is None:
            ret = self._lru_slot()
            if ret is None:
                return None
            selection, update_cache = "lru", True
            log.append(_slot_line("I", "get_availabl", ret.id, -1,
                                  f"selected slot by LRU, t_last = {ret.t_last_used}"))
        return _Selection(ret, selection, f_sim_best, f_keep, update_cache)

    def _lru_slot(self) -> SlotState | None:
        """Smallest t_last_used among idle slots; `<=` makes the last index win a tie."""
        ret: SlotState | None = None
        for slot in self.slots:
            if not slot.is_processing and (ret is None or slot.t_last_used <= ret.t_last_used):
                ret = slot
        return ret

    # ---- host-RAM prompt cache: server_prompt_cache ---------------------------------------------

    def _update_prompt_cache(self, slot: SlotState, tokens: Sequence[int], log: list[str]) -> tuple[bool, bool]:
        """get_available_slot's update: prompt_save, prompt_load (never fails here), update()."""
        log.append(_srv_line("I", "get_availabl", "updating prompt cache"))
        saved = self._prompt_save(slot, log)
        loaded = self._prompt_load(slot, tokens, log)
        self._ram_update(log)
        return saved, loaded

    def _save_idle_slots(self, log: list[str]) -> None:
        """process_single_task after a launch: publish every idle slot to RAM; clear it if unified KV."""
        cfg = self.config
        if not (cfg.cache_idle_slots and cfg.ram_enabled):
            return
        for slot in self.slots:
            if slot.is_processing:
                continue
            log.append(_slot_line("I", "process_sing", slot.id, -1, "saving idle slot to prompt cache"))
            if self._prompt_save(slot, log):
                self._ram_update(log)
            if cfg.kv_unified:  # [TAG_IDLE_SLOT_CLEAR]
                slot.tokens, slot.checkpoints = TokenArray(), []

    def _prompt_save(self, slot: SlotState, log: list[str]) -> bool:
        """server_slot::prompt_save + server_prompt_cache::alloc; True if an entry was added."""
        if not slot.tokens:
            return False
        limit = self.config.ram_limit_bytes
        size = len(slot.tokens) * self.config.state_bytes_per_token + sum(c.size_bytes for c in slot.checkpoints)
        log.append(_srv_line("I", "prompt_save", f" - saving prompt with length {len(slot.tokens)}, "
                             f"total state size = {size / MIB:.3f} MiB (draft: 0.000 MiB)"))
        if any(common_prefix(e.tokens, slot.tokens) == len(slot.tokens) for e in self.ram):
            log.append(_srv_line("I", "alloc", " - prompt is already in the cache, skipping"))
            return False
        if limit > 0 and size > limit:
            log.append(_srv_line("W", "alloc", " - prompt is larger than the cache size limit, skipping"))
            return False
        obsolete = [common_prefix(e.tokens, slot.tokens) == len(e.tokens) for e in self.ram]
        for e in itertools.compress(self.ram, obsolete):
            log.append(_srv_line("I", "alloc", f" - removing obsolete cached prompt with length {len(e.tokens)}"))
        self.ram = list(itertools.compress(self.ram, [not o for o in obsolete]))
        while limit > 0 and self.ram and self._ram_size() + size > limit:
            log.append(_srv_line("W", "alloc", " - making room for prompt cache entry, removing oldest"))
            self.ram.pop(0)
        tokens = slot.tokens if isinstance(slot.tokens, TokenArray) else as_tokens(slot.tokens)
        self.ram.append(RamEntry(tokens, list(slot.checkpoints), size))
        return True

    def _prompt_load(self, slot: SlotState, tokens: Sequence[int], log: list[str]) -> bool:
        """server_prompt_cache::load: greedy scan, oldest first, for an entry beating the slot on both
        f_keep and f_sim; it moves into the slot with its checkpoints and leaves the cache."""
        lcp_b = common_prefix(slot.tokens, tokens)
        f_keep_b = lcp_b / len(slot.tokens) if slot.tokens else -1.0
        f_sim_b = lcp_b / len(tokens) if tokens else 0.0
        log.append(_srv_line("I", "load", f" - looking for better prompt, base f_keep = {f_keep_b:.3f}, "
                             f"f_sim = {f_sim_b:.3f}"))
        best: RamEntry | None = None
        for e in self.ram:
            lcp = common_prefix(e.tokens, tokens)
            f_keep, f_sim = lcp / len(e.tokens), (lcp / len(tokens) if tokens else 0.0)
            log.append(_srv_line("I", "load", f"   - prompt with length {len(e.tokens):7d}, lcp = {lcp:7d}, "
                                 f"f_keep = {f_keep:.3f}, f_sim = {f_sim:.3f}"))
            if f_keep < 0.25:  # don't trash large prompts
                continue
            if f_keep > f_keep_b and f_sim > f_sim_b:
                f_keep_b, f_sim_b, best = f_keep, f_sim, e
        if best is None:
            return False
        log.append(_srv_line("I", "load", f" - found better prompt with f_keep = {f_keep_b:.3f}, "
                             f"f_sim = {f_sim_b:.3f}"))
        slot.tokens, slot.checkpoints = best.tokens, list(best.checkpoints)
        self.ram = [e for e in self.ram if e is not best]
        return True

    def _ram_size(self) -> int:
        return sum(e.size_bytes for e in self.ram)

    def _ram_update(self, log: list[str]) -> None:
        """server_prompt_cache::update: enforce the size limit, then the token limit (n_ctx, raised to
        what the size limit could hold at the current bytes per token)."""
        limit, limit_tokens = self.config.ram_limit_bytes, self.config.n_ctx
        while limit > 0 and self.ram and self._ram_size() > limit:
            self.ram.pop(0)
        n_tokens = sum(len(e.tokens) for e in self.ram)
        spt = max(1.0, self._ram_size() / max(1, n_tokens))
        limit_tokens_cur = max(limit_tokens, int(limit / spt)) if limit > 0 else limit_tokens
        while limit_tokens > 0 and self.ram and sum(len(e.tokens) for e in self.ram) > limit_tokens_cur:
            self.ram.pop(0)
        log.append(_srv_line("I", "update", f" - cache state: {len(self.ram)} prompts, {self._ram_size() / MIB:.3f} "
                             f"MiB (limits: {limit / MIB:.3f} MiB, {limit_tokens} tokens, {limit_tokens_cur} est)"))
        for e in self.ram:
            log.append(_srv_line("I", "update", f"   - prompt: {len(e.tokens):7d} tokens, checkpoints: "
                                 f"{len(e.checkpoints):2d}, {e.size_bytes / MIB:9.3f} MiB"))

    # ---- prompt start: update_slots, SLOT_STATE_STARTED -------------------------------------------

    def _seq_pos_min(self, n_cached: int) -> int:
        """llama_memory_seq_pos_min for a sequence holding n_cached tokens (§2.3); -1 when empty.
        SWA is an estimate: cells are reused ring-style once outside the window."""
        if n_cached == 0:
            return -1
        if self.config.memory == "hybrid":
            return n_cached - 1  # the recurrent state only knows its last position
        if self.config.memory == "swa":
            return max(0, n_cached - self.config.swa_cells)
        return 0

    def _start_prompt(self, slot: SlotState, launch: Launch, tokens: Sequence[int], cache_prompt: bool,
                      user_starts: Sequence[int]) -> None:
        cfg, log = self.config, launch.log
        n_tokens = len(tokens)
        if n_tokens == 0:
            log.append(_slot_line("W", "operator()", slot.id, launch.id_task, "empty prompt - releasing slot"))
            self._release(slot)
            return
        log.append(_slot_line("I", "operator()", slot.id, launch.id_task,
                              f"new prompt, n_ctx_slot = {cfg.n_ctx_slot}, n_keep = 0, task.n_tokens = {n_tokens}"))
        if n_tokens >= cfg.n_ctx_slot:  # §6
            launch.error = "exceed_context_size"
            log.append(_srv_line("E", "send_error", f"task id = {launch.id_task}, error: request ({n_tokens} tokens) "
                                 f"exceeds the available context size ({cfg.n_ctx_slot} tokens), try increasing it"))
            self._release(slot)
            return
        n_past = self._compute_n_past(slot, launch, tokens, cache_prompt)
        launch.n_past, launch.prompt_n = n_past, n_tokens - n_past
        slot.n_prompt_tokens_cache, slot.n_prompt_tokens_processed = n_past, n_tokens - n_past
        slot.tokens = head(slot.tokens, n_past)  # keep_first(n_past)
        log.append(_slot_line("I", "operator()", slot.id, launch.id_task,
                              f"cached n_tokens = {n_past}, memory_seq_rm [{n_past}, end)"))
        self._process_prompt(slot, tokens, sorted(set(user_starts)), launch.id_task, log)

    def _compute_n_past(self, slot: SlotState, launch: Launch, tokens: Sequence[int], cache_prompt: bool) -> int:
        """§2.1: LCP, then the pos_min test that may restore a checkpoint or force a full reprocess,
        the erase of invalidated checkpoints, and "evaluate at least 1 token"."""
        cfg, log, tid = self.config, launch.log, launch.id_task
        n_tokens = len(tokens)
        n_past = common_prefix(slot.tokens, tokens) if cache_prompt else 0
        pos_next = n_past
        has_new = n_past < n_tokens
        thold = max(0, pos_next - cfg.n_swa_eff - (0 if has_new else 1))
        if 0 < n_past <= len(slot.tokens) and self._seq_pos_min(len(slot.tokens)) >= thold:
            ck = self._find_checkpoint(slot, pos_next, thold, tid, log)
            if ck is not None:
                pos_next = min(pos_next, max(ck.pos_min + 1, ck.pos_max))
                n_past = min(pos_next, ck.n_tokens)  # size_up_to_pos(pos_next) == pos_next for text
                launch.checkpoint_restored = ck
                log.append(_slot_line("I", "operator()", slot.id, tid, f"restored context checkpoint (pos_min = "
                                      f"{ck.pos_min}, pos_max = {ck.pos_max}, n_tokens = {ck.n_tokens}, n_past = "
                                      f"{n_past}, size = {ck.size_bytes / MIB:.3f} MiB)"))
            else:
                pos_next = n_past = 0
                launch.full_reprocess_forced = True
                log.append(_slot_line("I", "operator()", slot.id, tid, "forcing full prompt re-processing due to "
                                      "lack of cache data (likely due to SWA or hybrid/recurrent memory, see "
                                      "https://github.com/ggml-org/llama.cpp/pull/13194#issuecomment-2868343055)"))
        for ck in [c for c in slot.checkpoints if c.pos_max > pos_next]:
            log.append(_slot_line("I", "operator()", slot.id, tid, "erased invalidated context checkpoint (pos_min = "
                                  f"{ck.pos_min}, pos_max = {ck.pos_max}, n_tokens = {ck.n_tokens}, "
                                  f"pos_next = {pos_next})"))
        slot.checkpoints = [c for c in slot.checkpoints if c.pos_max <= pos_next]
        if n_past == n_tokens and n_past > 0:  # [TAG_PROMPT_LOGITS]
            log.append(_slot_line("W", "operator()", slot.id, tid, "need to evaluate at least 1 token for each "
                                  f"active slot (n_past = {n_past}, task.n_tokens() = {n_tokens})"))
            n_past -= 1
            log.append(_slot_line("W", "operator()", slot.id, tid, f"n_past was set to {n_past}"))
        return n_past

    def _find_checkpoint(self, slot: SlotState, pos_next: int, thold: int, id_task: int,
                         log: list[str]) -> Checkpoint | None:
        """Newest checkpoint not past pos_next whose pos_min is below thold (or 0)."""
        for ck in reversed(slot.checkpoints):
            log.append(_slot_line("I", "operator()", slot.id, id_task,
                                  f"checking checkpoint with [{ck.pos_min}, {ck.pos_max}] against {thold}..."))
            if ck.pos_max <= pos_next and (ck.pos_min < thold or ck.pos_min == 0):
                return ck
        return None

    # ---- prompt processing: batch filling and create_checkpoint (§2.4) ----------------------------

    def _process_prompt(self, slot: SlotState, tokens: Sequence[int], user_starts: list[int], id_task: int,
                        log: list[str]) -> None:
        """Append the rest of the prompt batch by batch, creating the checkpoints update_slots would."""
        cfg = self.config
        n, n_tokens = len(slot.tokens), len(tokens)
        if not cfg.makes_checkpoints:
            slot.tokens = tokens
            return
        last_user_pos = user_starts[-1] if user_starts else -1
        starts = set(user_starts)
        while n < n_tokens:
            start = n
            n = self._batch_end(slot, start, n_tokens, user_starts, last_user_pos)
            near_end = n_tokens < n + cfg.n_ubatch
            keep = n == n_tokens or start in starts or near_end  # skip ordinary mid-prompt checkpoints
            pos_min = self._seq_pos_min(start)  # created before decoding: the state of `start` tokens
            last = slot.checkpoints[-1].n_tokens if slot.checkpoints else None
            spaced = last is None or start == last_user_pos or near_end or start > last + cfg.checkpoint_min_step
            if keep and pos_min >= 0 and spaced:
                self._create_checkpoint(slot, start, pos_min, id_task, log)
        slot.tokens = tokens

    def _batch_end(self, slot: SlotState, start: int, n_tokens: int, user_starts: list[int],
                   last_user_pos: int) -> int:
        """Where a batch starting at `start` stops: n_batch tokens, the end, a qualifying user-message
        start, or 4+n_ubatch / 4 tokens before the end (#20288). Breaks are tested after each push."""
        cfg = self.config
        end = min(n_tokens, start + cfg.n_batch)
        for off in (4 + cfg.n_ubatch, 4):
            brk = n_tokens - min(cfg.n_batch, off)
            if start < brk < end:
                end = brk
        last = slot.checkpoints[-1].n_tokens if slot.checkpoints else None
        for pos in user_starts[bisect.bisect_right(user_starts, start):]:
            if pos >= end:
                break
            if pos == last_user_pos or last is None or pos > last + cfg.checkpoint_min_step:
                return pos
        return end

    def _create_checkpoint(self, slot: SlotState, start: int, pos_min: int, id_task: int, log: list[str]) -> None:
        """create_checkpoint: evict other tasks' checkpoints within min_step of the previous kept one,
        drop the oldest beyond n_ctx_checkpoints, append the state of the first `start` tokens."""
        cfg = self.config
        cks = list(slot.checkpoints)
        if not cfg.checkpoint_evict_only_when_full or len(cks) + 1 >= cfg.n_ctx_checkpoints:
            kept: list[Checkpoint] = []
            for ck in cks:
                if ck.id_task != id_task and kept and ck.n_tokens <= kept[-1].n_tokens + cfg.checkpoint_min_step:
                    continue
                kept.append(ck)
            cks = kept
        while cks and len(cks) >= cfg.n_ctx_checkpoints:
            cks.pop(0)
        if cfg.checkpoint_evict_only_when_full:
            cks = [c for c in cks if c.n_tokens != start]  # supersede, don't duplicate
        ck = Checkpoint(n_tokens=start, pos_min=pos_min, pos_max=start - 1, id_task=id_task,
                        size_bytes=cfg.checkpoint_bytes)
        slot.checkpoints = cks + [ck]
        log.append(_slot_line("I", "create_check", slot.id, id_task, f"created context checkpoint "
                              f"{len(cks) + 1} of {cfg.n_ctx_checkpoints} (pos_min = {pos_min}, pos_max = "
                              f"{ck.pos_max}, n_tokens = {start}, size = {ck.size_bytes / MIB:.3f} MiB)"))

    # ---- release ------------------------------------------------------------------------------------

    def _release(self, slot: SlotState) -> None:
        """server_slot::release: stamp t_last_used with the next tick; reset() zeroes the stats."""
        self._clock = max([self._clock] + [s.t_last_used for s in self.slots]) + 1
        slot.t_last_used = self._clock
        slot.is_processing = False
        slot.n_prompt_tokens_processed = slot.n_prompt_tokens_cache = 0
