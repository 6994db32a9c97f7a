"""Prompt identity: chained block keys and an index of recent token sequences by shared prefix.

This module owns the answer to "which recent prompt shares the longest token prefix with this one,
and exactly how long is that prefix?" (`best_match_id` / `best_prefix`), and "how long is the common
prefix with that one earlier sequence?" (`common_prefix` against a predecessor's held sequence).
Comparing a 100k-token prompt token by token against 1,000 recent prompts is far too slow for a
per-request analysis, and storing 1,000 copies of a 100k-token agent session is far too big, so:

* A prompt is cut into fixed blocks; block i gets a key chained over all blocks before it
  (`block_keys`, vLLM's automatic-prefix-caching scheme). Equal keys mean equal prefixes, so one
  dict lookup per block replaces comparing the block and everything before it.
* `PrefixIndex` stores each distinct block once, as the node of a trie keyed by block key (the chain
  makes a key's position implicit). Sequences are their chain of keys plus a tail shorter than a
  block. Long agent sessions repeat the same prefix hundreds of times; it is stored once.
* The exact LCP is finished inside the first differing block with byte-slice compares.

The keys are also the `hash_ids` of the Mooncake trace format, so their byte layout is a stable,
documented contract (see `block_keys`). Pure: no I/O, no threads, no clocks.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from array import array
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Collection, Iterator, Sequence

from proxy.cachemodel import TOKEN_TYPECODE, TokenArray, first_difference
from proxy.cachemodel import common_prefix as _common_prefix

__all__ = ["ROOT_KEY", "KeyedTokens", "PrefixIndex", "block_keys", "keyed", "lcp", "pack_tokens"]

ROOT_KEY = bytes(8)  # key_{-1}: the chain's fixed root (8 zero bytes)
KEY_SIZE = 8         # blake2b digest_size: 64-bit keys, what Mooncake hash_ids hold
_TOKEN_BYTES = 4     # each token id is a little-endian uint32
_BIG_ENDIAN = sys.byteorder == "big"
_TYPECODE = TOKEN_TYPECODE  # "I" (or "L" where that is 4 bytes): uint32
# Children of one node sharing the winning LCP that are scanned for the most recent sequence. More
# than this many different continuations tied at the same length (e.g. thousands of unrelated
# prompts that all start with the same BOS token) only happens at the root; the LCP stays exact,
# only the "most recent among ties" choice is then limited to the first ones in token order.
_TIE_SCAN = 256


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    The same function as `proxy.cachemodel.common_prefix` (llama-server's `get_common_prefix`),
    re-exported so analysis code has one name for it and one implementation to trust."""
    return _common_prefix(a, b)


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as consecutive little-endian uint32 (4 bytes each): the layout that is hashed.

    Ids must be in [0, 2**32); an out-of-range id raises OverflowError rather than being wrapped,
    since a wrapped id would silently alias another token."""
    if isinstance(tokens, array) and tokens.typecode == _TYPECODE and not _BIG_ENDIAN:
        return tokens.tobytes()
    packed = array(_TYPECODE, tokens)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _unpack_tokens(data: bytes) -> list[int]:
    tokens = array(_TYPECODE)
    tokens.frombytes(data)
    if _BIG_ENDIAN:
        tokens.byteswap()
    return tokens.tolist()


def _chain(packed: bytes, block_size: int) -> list[bytes]:
    """Chained keys of the full blocks of an already packed sequence."""
    step = block_size * _TOKEN_BYTES
    view = memoryview(packed)
    blake2b = hashlib.blake2b
    keys: list[bytes] = []
    prev = ROOT_KEY
    for start in range(0, len(packed) - step + 1, step):
        h = blake2b(prev, digest_size=KEY_SIZE)
        h.update(view[start:start + step])
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass(frozen=True, slots=True)
class KeyedTokens:
    """A token sequence packed and hashed once, so that the index's operations on one prompt
    (lookup, LCP with the predecessor, insert) share a single hashing pass: hashing is most of the
    per-request cost."""

    packed: bytes        # pack_tokens(tokens)
    keys: list[bytes]    # block_keys(tokens, block_size)
    block_size: int

    def __len__(self) -> int:
        return len(self.packed) // _TOKEN_BYTES

    @property
    def chain(self) -> bytes:
        """All keys concatenated: comparing two chains as bytes finds the first differing block."""
        return b"".join(self.keys)

    def tokens(self) -> list[int]:
        return _unpack_tokens(self.packed)


def keyed(tokens: Sequence[int], block_size: int = 64) -> KeyedTokens:
    """Pack and hash `tokens` once (see KeyedTokens)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    packed = pack_tokens(tokens)
    return KeyedTokens(packed, _chain(packed, block_size), block_size)


def block_keys(tokens: Sequence[int], block_size: int = 64) -> list[bytes]:
    """Chained 8-byte keys of the FULL blocks of `tokens` (a trailing partial block has no key).

    Exact layout (a stable contract: these are exported as Mooncake `hash_ids`):

        key_{-1} = 8 zero bytes
        key_i    = BLAKE2b(key_{i-1} || LE32(t[i*B]) || ... || LE32(t[i*B + B - 1]), digest_size=8)

    with B = block_size, LE32 = the token id as a 4-byte little-endian unsigned integer, and
    BLAKE2b without key, salt or personalisation. key_i depends on every token up to the end of
    block i, so equal keys mean equal prefixes (up to a 2**-64 collision chance), and the position
    is implicit."""
    return keyed(tokens, block_size).keys


def _byte_lcp(a: bytes, b: bytes) -> int:
    """Longest common prefix of two byte strings, by bisection over C-speed slice compares."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return first_difference(a, b, 0, n)


_Recent = tuple[int, str]  # (insertion order, seq_id): the larger order is the more recent


def _later(a: _Recent | None, b: _Recent | None) -> _Recent | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a[0] >= b[0] else b


class _Node:
    """One distinct block (or tail) in the trie of stored sequences.

    `count` is the number of stored sequences passing through it (the refcount); `best` is the most
    recently added of them, kept so ties resolve to the most recent without visiting holders."""

    __slots__ = ("key", "pos", "data", "count", "best", "kids", "ends")

    def __init__(self, key: bytes, pos: int, data: bytes) -> None:
        self.key = key    # block key, or parent key + tail bytes for a tail, ROOT_KEY for the root
        self.pos = pos    # block index (tails: the number of full blocks before them; root: -1)
        self.data = data  # the packed tokens of this block or tail
        self.count = 0
        self.best: _Recent | None = None
        self.kids: list[_Node] | None = None     # children, sorted by data
        self.ends: dict[str, int] | None = None  # seq_id -> order, for sequences ending here


def _data(node: _Node) -> bytes:
    return node.data


class _Seq:
    __slots__ = ("chain", "tail", "n_tokens", "order")

    def __init__(self, chain: bytes, tail: bytes | None, n_tokens: int, order: int) -> None:
        self.chain = chain        # its block keys concatenated (8 bytes per block)
        self.tail = tail          # key of its tail node, None when it ends on a block boundary
        self.n_tokens = n_tokens
        self.order = order


class PrefixIndex:
    """Recent token sequences, each distinct block stored once, searchable by longest prefix.

    Structure: a trie whose nodes are distinct blocks (keyed by their chained block key) plus one
    node per distinct tail (keyed by parent key + tail bytes); each node counts the sequences
    through it and knows the most recent one; each node's children are kept sorted by their packed
    tokens, so the child sharing the most tokens with a query block is one of the two bisection
    neighbours. A sequence is its chain of keys (8 bytes per block) and its tail key.

    Memory bound: `stored_tokens` is the number of DISTINCT tokens held, i.e. block_size per
    distinct block plus the length of each distinct (prefix, tail) pair. After each `add`, the
    least-recently-added sequences are evicted until `stored_tokens <= max_tokens` (a sequence whose
    own distinct tokens exceed the bound is therefore not kept). A block is freed when no stored
    sequence references it. Measured RAM: about 8.5 bytes per distinct token at block_size 64
    (4 for the token, ~250 bytes of bookkeeping per block), so the default bound is ~425 MB; not
    bounded by max_tokens: 8 bytes per block per stored sequence (its key chain).

    Thread-safety: none. The index is owned by the single analysis worker thread; every call must
    come from that thread (no locks are taken)."""

    def __init__(self, block_size: int = 64, max_tokens: int = 50_000_000) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.max_tokens = max_tokens
        self._root = _Node(ROOT_KEY, -1, b"")
        self._nodes: dict[bytes, _Node] = {}
        self._seqs: dict[str, _Seq] = {}  # insertion order = add order: the first is the oldest
        self._orders = itertools.count()
        self._stored = 0

    # -- small protocol ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __iter__(self) -> Iterator[str]:
        """Stored ids, least recently added first (the eviction order)."""
        return iter(list(self._seqs))

    @property
    def stored_tokens(self) -> int:
        """Distinct tokens held (the quantity `max_tokens` bounds)."""
        return self._stored

    def keyed(self, tokens: Sequence[int] | KeyedTokens) -> KeyedTokens:
        """`tokens` packed and hashed with this index's block size (reuse it across calls)."""
        if isinstance(tokens, KeyedTokens):
            if tokens.block_size != self.block_size:
                raise ValueError(f"keyed with block_size {tokens.block_size}, index uses {self.block_size}")
            return tokens
        return keyed(tokens, self.block_size)

    # -- reading -------------------------------------------------------------------------------

    def get(self, seq_id: str) -> list[int] | None:
        """The stored tokens of `seq_id`, rebuilt from its blocks; None if unknown or evicted."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        return _unpack_tokens(b"".join(node.data for node in self._path(seq)[1:]))

    def get_array(self, seq_id: str) -> array | None:
        """`get` as a uint32 array (`proxy.cachemodel.TokenArray`: 4 bytes a token, no int objects)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        tokens = TokenArray()
        tokens.frombytes(b"".join(node.data for node in self._path(seq)[1:]))
        if _BIG_ENDIAN:
            tokens.byteswap()
        return tokens

    def keys_of(self, seq_id: str) -> list[bytes] | None:
        """The block keys of `seq_id` (its Mooncake hash_ids); None if unknown or evicted."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        return [seq.chain[i:i + KEY_SIZE] for i in range(0, len(seq.chain), KEY_SIZE)]

    def n_tokens(self, seq_id: str) -> int | None:
        seq = self._seqs.get(seq_id)
        return None if seq is None else seq.n_tokens

    def common_prefix(self, seq_id: str, tokens: Sequence[int] | KeyedTokens) -> int:
        """Exact LCP of `tokens` with stored `seq_id` (KeyError if not stored).

        Equal leading keys are skipped in one bytes compare of the two key chains; only the first
        differing block (or the tails) is compared token by token."""
        seq = self._seqs[seq_id]
        query = self.keyed(tokens)
        same = _byte_lcp(seq.chain, query.chain) // KEY_SIZE
        n_blocks = len(seq.chain) // KEY_SIZE
        if same < n_blocks:
            theirs = self._nodes[seq.chain[same * KEY_SIZE:(same + 1) * KEY_SIZE]].data
        else:
            theirs = self._nodes[seq.tail].data if seq.tail is not None else b""
        step = self.block_size * _TOKEN_BYTES
        ours = query.packed[same * step:(same + 1) * step]
        return same * self.block_size + _byte_lcp(theirs, ours) // _TOKEN_BYTES

    def longest_prefix(
        self, tokens: Sequence[int] | KeyedTokens, exclude: Collection[str] = ()
    ) -> tuple[str | None, int]:
        """The stored sequence (not in `exclude`) sharing the longest prefix with `tokens`, and the
        exact length of that prefix; `(None, 0)` when none shares even the first token. Ties go to
        the most recently added (see _TIE_SCAN for the one bound on that).

        Cost: one dict lookup per matching block walking down the trie, then one bisection among
        the deepest node's children and slice compares inside one block. Sequences shorter than a
        block or diverging in the first block are the root's children, found the same way."""
        query = self.keyed(tokens)
        excluded = [self._seqs[s] for s in set(exclude) if s in self._seqs]
        excluded_ids = {id_ for id_ in exclude if id_ in self._seqs}
        if not len(query) or self._root.count <= len(excluded):
            return None, 0
        node, depth = self._root, 0
        for key in query.keys:
            child = self._nodes.get(key)
            if child is None or (excluded and self._live(child, excluded) <= 0):
                break
            node, depth = child, depth + 1
        step = self.block_size * _TOKEN_BYTES
        extra, best = self._finish(node, query.packed[depth * step:(depth + 1) * step], excluded, excluded_ids)
        length = depth * self.block_size + extra
        if length == 0 or best is None:
            return None, 0
        return best[1], length

    # -- writing -------------------------------------------------------------------------------

    def add(self, seq_id: str, tokens: Sequence[int] | KeyedTokens) -> None:
        """Store `tokens` as `seq_id` (replacing any previous one), then evict to the bound."""
        query = self.keyed(tokens)
        self.remove(seq_id)
        order = next(self._orders)
        recent = (order, seq_id)
        step = self.block_size * _TOKEN_BYTES
        node = self._root
        node.count += 1
        node.best = recent
        for pos, key in enumerate(query.keys):
            child = self._nodes.get(key)
            if child is None:
                child = self._new_node(node, key, pos, query.packed[pos * step:(pos + 1) * step])
            child.count += 1
            child.best = recent
            node = child
        tail_data = query.packed[len(query.keys) * step:]
        tail_key = None
        if tail_data:
            tail_key = node.key + tail_data
            child = self._nodes.get(tail_key) or self._new_node(node, tail_key, len(query.keys), tail_data)
            child.count += 1
            child.best = recent
            node = child
        if node.ends is None:
            node.ends = {}
        node.ends[seq_id] = order
        self._seqs[seq_id] = _Seq(query.chain, tail_key, len(query), order)
        self._evict()

    def remove(self, seq_id: str) -> bool:
        """Forget `seq_id` and free the blocks only it referenced; False if it was not stored."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        path = self._path(seq)
        last = path[-1]
        del last.ends[seq_id]
        if not last.ends:
            last.ends = None
        for i in range(len(path) - 1, -1, -1):
            node = path[i]
            node.count -= 1
            if node.count == 0:
                if i:
                    self._drop_node(path[i - 1], node)
                else:
                    node.best = None
            elif node.best is not None and node.best[1] == seq_id:
                node.best = self._recompute_best(node)
        return True

    # -- internals -----------------------------------------------------------------------------

    def _path(self, seq: _Seq) -> list[_Node]:
        nodes = self._nodes
        chain = seq.chain
        path = [self._root]
        path.extend(nodes[chain[i:i + KEY_SIZE]] for i in range(0, len(chain), KEY_SIZE))
        if seq.tail is not None:
            path.append(nodes[seq.tail])
        return path

    def _new_node(self, parent: _Node, key: bytes, pos: int, data: bytes) -> _Node:
        node = _Node(key, pos, data)
        self._nodes[key] = node
        if parent.kids is None:
            parent.kids = []
        insort(parent.kids, node, key=_data)
        self._stored += len(data) // _TOKEN_BYTES
        return node

    def _drop_node(self, parent: _Node, node: _Node) -> None:
        del self._nodes[node.key]
        del parent.kids[bisect_left(parent.kids, node.data, key=_data)]
        if not parent.kids:
            parent.kids = None
        self._stored -= len(node.data) // _TOKEN_BYTES

    def _recompute_best(self, node: _Node) -> _Recent | None:
        """Most recent sequence through `node`, from its children (already up to date)."""
        best: _Recent | None = None
        if node.ends:
            last = next(reversed(node.ends))  # insertion order is add order
            best = (node.ends[last], last)
        for kid in node.kids or ():
            best = _later(best, kid.best)
        return best

    def _evict(self) -> None:
        while self._stored > self.max_tokens and self._seqs:
            self.remove(next(iter(self._seqs)))

    def _live(self, node: _Node, excluded: list[_Seq]) -> int:
        """How many non-excluded sequences pass through `node` (the chain gives each key one
        position, so "seq holds node" is one slice compare)."""
        count = node.count
        if node is self._root:
            return count - len(excluded)
        if len(node.key) == KEY_SIZE:
            start = node.pos * KEY_SIZE
            for seq in excluded:
                if seq.chain[start:start + KEY_SIZE] == node.key:
                    count -= 1
        else:
            for seq in excluded:
                if seq.tail == node.key:
                    count -= 1
        return count

    def _finish(
        self, node: _Node, segment: bytes, excluded: list[_Seq], excluded_ids: set[str]
    ) -> tuple[int, _Recent | None]:
        """Tokens of `segment` (the query's block after `node`) matched by the best child of `node`,
        and the most recent live sequence achieving it.

        In sorted order, the LCP with `segment` only falls moving away from its insertion point, so
        the best child is the nearest live one on either side; every child with that LCP shares
        the same leading bytes, a contiguous run scanned (up to _TIE_SCAN) for the most recent."""
        kids = node.kids
        if segment and kids:
            at = bisect_left(kids, segment, key=_data)
            matched = 0
            for side in (range(at - 1, -1, -1), range(at, len(kids))):
                for i in side:  # dead children are skipped: at most one per excluded sequence
                    if self._live(kids[i], excluded) > 0:
                        matched = max(matched, _byte_lcp(kids[i].data, segment))
                        break
            extra = matched // _TOKEN_BYTES
            if extra:
                shared = segment[:extra * _TOKEN_BYTES]
                best: _Recent | None = None
                i = bisect_left(kids, shared, key=_data)
                end = min(len(kids), i + _TIE_SCAN)
                while i < end and kids[i].data.startswith(shared):
                    kid = kids[i]
                    if self._live(kid, excluded) > 0:
                        best = _later(best, self._most_recent(kid, excluded, excluded_ids))
                    i += 1
                return extra, best
        if node is self._root:
            return 0, None
        return 0, self._most_recent(node, excluded, excluded_ids)

    def _most_recent(self, node: _Node, excluded: list[_Seq], excluded_ids: set[str]) -> _Recent | None:
        """Most recently added non-excluded sequence through `node` (which has at least one).

        Only descends where the recorded most recent is excluded, so the walk follows the excluded
        sequences' own paths (iteratively: a path can be thousands of blocks deep)."""
        best: _Recent | None = None
        stack = [node]
        while stack:
            current = stack.pop()
            top = current.best
            if top is None or (best is not None and top[0] <= best[0]):
                continue
            if top[1] not in excluded_ids:
                best = top
                continue
            if current.ends:
                for seq_id in reversed(current.ends):
                    if seq_id not in excluded_ids:
                        best = _later(best, (current.ends[seq_id], seq_id))
                        break
            for kid in current.kids or ():
                if self._live(kid, excluded) > 0:
                    stack.append(kid)
        return best
