"""Paged KV block accounting with a prefix cache keyed by chained xxhash64.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A
sequence's block table maps its positions to blocks. A *full* block whose KV
has been computed is published under a hash of (its parent block's hash, its
token ids), so a later sequence with the same prefix can point at the block
instead of recomputing it. A hit is exact whatever the hash does: it compares
the block's tokens and checks that the block was computed right after the
block matched just before it (each publication gets a serial number, and a
block records its parent's), so a hash collision costs a cache miss, never
wrong output. For the same reason a block is published only when its parent
is: a sequence whose block lost a publication race (another sequence
published the same content first) keeps the rest of its blocks private.

A block is in exactly one of three states:

- *in use*: ``ref_count > 0``, in one or more block tables;
- *cached*: ``ref_count == 0`` with a hash; its KV is kept for reuse and it is
  evicted least-recently-freed first, only when no empty block is left;
- *empty*: ``ref_count == 0`` without a hash.

Shared blocks (``ref_count > 1``) are always full and published, hence
immutable: a sequence only ever writes into blocks it alone holds.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import itertools

import xxhash

if TYPE_CHECKING:
    from .sequence import Sequence

ROOT_HASH = 0
"""The parent hash of a sequence's first block."""
ROOT_SERIAL = 0
"""The parent serial of a sequence's first block."""


def hash_block(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Chained xxhash64 of one full block: the parent's hash seeds the hash of the token ids."""
    return xxhash.xxh64_intdigest(array("q", token_ids).tobytes(), parent_hash)


class Block:
    """One physical KV block; the fields after ``ref_count`` are set while it is published."""

    __slots__ = ("block_id", "ref_count", "block_hash", "parent_hash", "token_ids", "serial", "parent_serial")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self._unpublish()

    def _unpublish(self) -> None:
        self.block_hash: int | None = None
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.serial = ROOT_SERIAL
        self.parent_serial = ROOT_SERIAL

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_count={self.ref_count}, hash={self.block_hash})"


class BlockManager:
    """Allocates blocks to sequences, counts references, and keeps the prefix cache.

    The caller (the scheduler) decides *when*: `match_prefix` + `share` at
    admission, `grow` before a step, `publish` after the step that computed
    the KV, `free` on finish, abort or preemption.
    """

    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached_blocks: dict[int, int] = {}
        """Block hash -> id of the block published under it."""
        self._empty: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody holds, least recently freed first (an O(1) LRU)."""
        self._serials = itertools.count(ROOT_SERIAL + 1)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: empty ones plus evictable cached ones."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached but unheld blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of ``seq``'s first ``num_blocks`` full blocks, extending its memo as needed."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            size = self.block_size
            tokens = seq.token_ids
            parent = hashes[-1] if hashes else ROOT_HASH
            for i in range(len(hashes), num_blocks):
                parent = hash_block(parent, tokens[i * size : (i + 1) * size])
                hashes.append(parent)
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding ``seq``'s longest cached prefix of full blocks.

        The block holding the last known token is never matched: the step
        must compute at least that token to get the logits for the next one.
        Nothing is taken yet; pass the result to `share`.
        """
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        tokens = seq.token_ids
        hits: list[int] = []
        parent_serial = ROOT_SERIAL
        for i in range((len(tokens) - 1) // size):
            block_id = self.cached_blocks.get(self.block_hashes(seq, i + 1)[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_serial != parent_serial or block.token_ids != tuple(tokens[i * size : (i + 1) * size]):
                break
            hits.append(block_id)
            parent_serial = block.serial
        return hits

    def num_evictable_among(self, block_ids: list[int]) -> int:
        """How many of ``block_ids`` are unheld cached blocks (sharing them takes them off the free list)."""
        blocks = self.blocks
        return sum(1 for b in block_ids if blocks[b].ref_count == 0)

    def share(self, seq: Sequence, block_ids: list[int]) -> None:
        """Start ``seq``'s (empty) block table with already computed blocks: cache hits or a sibling's."""
        assert not seq.block_table, "share() starts a block table"
        blocks = self.blocks
        for block_id in block_ids:
            block = blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
        seq.block_table = list(block_ids)
        if self.enable_prefix_caching:
            seq.num_published_blocks = len(block_ids)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks covering ``num_tokens`` positions; the caller checked `num_free_blocks`."""
        table = seq.block_table
        needed = -(-num_tokens // self.block_size) - len(table)
        for _ in range(needed):
            table.append(self._allocate())

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Give back ``seq``'s blocks past the first ``num_tokens`` positions: those held only rejected drafts.

        Such blocks were allocated for the drafts (`grow`), so they are private
        and unpublished: they go straight back to the empty list.
        """
        table = seq.block_table
        keep = -(-num_tokens // self.block_size)
        blocks = self.blocks
        while len(table) > keep:
            block = blocks[table.pop()]
            assert block.ref_count == 1 and block.block_hash is None, f"{block} held only drafts, so it is private"
            block.ref_count = 0
            self._empty.appendleft(block.block_id)

    def _allocate(self) -> int:
        if self._empty:
            block_id = self._empty.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.cached_blocks[block.block_hash]
            block._unpublish()
        self.blocks[block_id].ref_count = 1
        return block_id

    def publish(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly computed full blocks of known tokens to the prefix cache.

        A block in the cache must hold valid KV for whoever finds it, so this
        is called once the step that computes the block has been sent to the
        runner: the runner runs plans in order, and a sequence that finds the
        block can only be in a later plan. When the hash is taken already (two
        sequences computed the same prefix at once, or a collision) the block
        stays private, and so do the sequence's later blocks.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        start = seq.num_published_blocks
        if start >= num_full:
            return
        size = self.block_size
        hashes = self.block_hashes(seq, num_full)
        tokens = seq.token_ids
        blocks = self.blocks
        table = seq.block_table
        parent = blocks[table[start - 1]] if start else None
        for i in range(start, num_full):
            if parent is not None and parent.block_hash is None:
                break
            block = blocks[table[i]]
            block_hash = hashes[i]
            if block_hash in self.cached_blocks:
                break
            block.block_hash = block_hash
            block.token_ids = tuple(tokens[i * size : (i + 1) * size])
            block.serial = next(self._serials)
            if parent is not None:
                block.parent_hash = parent.block_hash
                block.parent_serial = parent.serial
            else:
                block.parent_hash = ROOT_HASH
            self.cached_blocks[block_hash] = block.block_id
            parent = block
        seq.num_published_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; published blocks stay cached, tail blocks first in line for eviction."""
        blocks = self.blocks
        for block_id in reversed(seq.block_table):
            block = blocks[block_id]
            if block.ref_count <= 0:
                raise AssertionError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._empty.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table = []
        seq.num_published_blocks = 0
        seq.num_computed_tokens = 0

    def is_free(self, block_id: int) -> bool:
        """Whether ``block_id`` sits on a free list (empty or evictable); for invariant checks."""
        return block_id in self._evictable or block_id in self._empty
