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

KV cache groups. A model whose attention layers are of several kinds (GPT-OSS:
full attention, and a sliding window of ``W`` positions) has one group of
layers per kind, given by ``windows`` (``None`` for the full group, which comes
first). The groups share one pool of blocks, but each sequence has one block
table per group, all of the same length: a block of the full group holds the
full group's layers for ``block_size`` positions, a block of a sliding group
that group's layers. A sliding group's blocks that lie entirely before the
window of the next token to compute are *released* (`release`): unheld, they
go back to the free lists (cached ones stay cached, evictable), and the table
holds `null_block` there, a page the runner allocates past the pool and the
attention kernels mask out. So a sequence holds at most ``ceil(W /
block_size) + 1`` blocks of a sliding group however long it grows. A prefix
hit of ``k`` blocks needs the full group's blocks ``[0, k)`` and, in each
sliding group, the blocks covering the window of position ``k * block_size``;
every group's blocks of one position range are published together, under the
same hash and serial, so a sliding block is checked against the full group's
block whose chain was checked. With a single group nothing of this costs
anything: its table is the only one and nothing is released.
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

    __slots__ = (
        "block_id",
        "ref_count",
        "block_hash",
        "parent_hash",
        "token_ids",
        "serial",
        "parent_serial",
        "group",
    )

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
        self.group = 0

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_count={self.ref_count}, hash={self.block_hash})"


class BlockManager:
    """Allocates blocks to sequences, counts references, and keeps the prefix cache.

    The caller (the scheduler) decides *when*: `match_prefix` + `share` at
    admission, `release` and `grow` before a step, `publish` after the step
    that computed the KV, `free` on finish, abort or preemption.
    ``windows``: the KV cache groups (see the module's docstring); the
    default is one group of full attention.
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        windows: tuple[int | None, ...] = (None,),
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        if len(windows) > 1 and (windows[0] is not None or None in windows[1:] or min(windows[1:]) < 1):
            raise ValueError(f"KV cache groups {windows}: the full group (None) first, then windows of 1 or more")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self.num_groups = len(windows)
        self.null_block = num_blocks
        """The page a sliding group's table holds where its blocks were released (past the pool: never allocated)."""
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached_by_group: list[dict[int, int]] = [{} for _ in windows]
        """Per group: block hash -> id of the block published under it."""
        self._empty: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody holds, least recently freed first (an O(1) LRU)."""
        self._serials = itertools.count(ROOT_SERIAL + 1)

    @property
    def cached_blocks(self) -> dict[int, int]:
        """The full group's published blocks: block hash -> block id."""
        return self.cached_by_group[0]

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

    def max_tokens_alone(self) -> int:
        """The longest sequence that always fits when it runs alone (``num_blocks * block_size`` for one group).

        Alone, a sequence of ``b`` blocks holds ``b`` of the full group and at
        most ``ceil(W / block_size) + 1`` of a sliding group.
        """
        caps = [-(-w // self.block_size) + 1 for w in self.windows[1:]]
        num_blocks = self.num_blocks - sum(caps)
        if caps and num_blocks < max(caps):  # a pool so small that some window is never full
            fits = range(self.num_blocks + 1)
            num_blocks = max(b for b in fits if b + sum(min(b, c) for c in caps) <= self.num_blocks)
        return num_blocks * self.block_size

    def window_start(self, group: int, num_tokens: int) -> int:
        """The first block of ``group`` that the token at position ``num_tokens`` (or a later one) attends to."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_tokens - window + 1) // self.block_size

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

    def match_prefix(self, seq: Sequence) -> list[list[int]]:
        """Per group, the block table of ``seq``'s longest cached prefix of full blocks.

        The block holding the last known token is never matched: the step
        must compute at least that token to get the logits for the next one.
        A sliding group's table holds `null_block` before the window of the
        first position after the prefix. Nothing is taken yet; pass the
        result to `share`.
        """
        if not self.enable_prefix_caching:
            return [[] for _ in self.windows]
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
        if self.num_groups == 1:
            return [hits]
        return self._windowed_hits(seq, hits)

    def _windowed_hits(self, seq: Sequence, hits: list[int]) -> list[list[int]]:
        """The longest prefix of the full group's ``hits`` whose windows every sliding group has cached too."""
        blocks = self.blocks
        hashes = seq.block_hashes
        pages: list[list[int]] = []
        runs: list[list[int]] = []
        for group in range(1, self.num_groups):
            cached = self.cached_by_group[group]
            found: list[int] = []
            run: list[int] = []  # run[i]: how many blocks up to and including i are cached in a row
            for i, full_id in enumerate(hits):
                block_id = cached.get(hashes[i])
                ok = block_id is not None and blocks[block_id].serial == blocks[full_id].serial
                found.append(block_id if ok else self.null_block)
                run.append((run[-1] if run else 0) + 1 if ok else 0)
            pages.append(found)
            runs.append(run)
        size = self.block_size
        num_hits = len(hits)
        while num_hits and not all(
            run[num_hits - 1] >= num_hits - self.window_start(group, num_hits * size)
            for group, run in enumerate(runs, start=1)
        ):
            num_hits -= 1
        tables = [hits[:num_hits]]
        for group, found in enumerate(pages, start=1):
            start = self.window_start(group, num_hits * size)
            tables.append([self.null_block] * start + found[start:num_hits])
        return tables

    def prefix_of(self, tables: list[list[int]], num_blocks: int) -> list[list[int]]:
        """The first blocks of a sequence's ``tables``, at most ``num_blocks``, as many as every window allows.

        A sliding group may have released blocks that a sequence starting
        after a shorter prefix would attend to: that prefix is not usable.
        """
        size = self.block_size
        while num_blocks and any(
            self.null_block in tables[group][self.window_start(group, num_blocks * size) : num_blocks]
            for group in range(1, self.num_groups)
        ):
            num_blocks -= 1
        return [table[:num_blocks] for table in tables]

    def num_evictable_among(self, tables: list[list[int]]) -> int:
        """How many blocks of ``tables`` are unheld cached blocks (sharing them takes them off the free list)."""
        blocks = self.blocks
        null = self.null_block
        return sum(1 for table in tables for b in table if b != null and blocks[b].ref_count == 0)

    def share(self, seq: Sequence, tables: list[list[int]]) -> None:
        """Start ``seq``'s (empty) block tables with already computed blocks: cache hits or a sibling's."""
        assert not seq.block_table, "share() starts a block table"
        blocks = self.blocks
        null = self.null_block
        for table in tables:
            for block_id in table:
                if block_id == null:
                    continue
                block = blocks[block_id]
                if block.ref_count == 0:
                    del self._evictable[block_id]
                block.ref_count += 1
        seq.block_tables = [list(table) for table in tables]
        seq.num_released_blocks = self._released_before(len(tables[0]) * self.block_size)
        if self.enable_prefix_caching:
            seq.num_published_blocks = len(tables[0])

    def release(self, seq: Sequence) -> None:
        """Give back the sliding groups' blocks that no token from ``seq.num_computed_tokens`` on attends to.

        Unheld, a cached block stays cached (evictable); its table holds
        `null_block` from now on.
        """
        for group in range(1, self.num_groups):
            start = self.window_start(group, seq.num_computed_tokens)
            table = seq.block_tables[group]
            for i in range(seq.num_released_blocks, min(start, len(table))):
                block_id = table[i]
                if block_id != self.null_block:
                    table[i] = self.null_block
                    self._unref(self.blocks[block_id])
        seq.num_released_blocks = max(seq.num_released_blocks, self._released_before(seq.num_computed_tokens))

    def _released_before(self, num_tokens: int) -> int:
        """Blocks that every sliding group has released once ``num_tokens`` are computed (0 for one group)."""
        return min((self.window_start(g, num_tokens) for g in range(1, self.num_groups)), default=0)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks covering ``num_tokens`` positions in every group; the caller checked `num_free_blocks`.

        Each group needs as many new blocks (the tables have one length), so
        ``num_free_blocks // num_groups`` blocks of positions fit.
        """
        tables = seq.block_tables
        if len(tables) != self.num_groups:  # a sequence's first blocks
            assert not any(tables), "a sequence's tables cover every group"
            seq.block_tables = tables = [[] for _ in self.windows]
        needed = -(-num_tokens // self.block_size) - len(tables[0])
        for table in tables:
            for _ in range(needed):
                table.append(self._allocate())

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Give back ``seq``'s blocks past the first ``num_tokens`` positions: those held only rejected drafts.

        Such blocks were allocated for the drafts (`grow`), so they are private
        and unpublished: they go straight back to the empty list.
        """
        keep = -(-num_tokens // self.block_size)
        blocks = self.blocks
        for table in seq.block_tables:
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
            del self.cached_by_group[block.group][block.block_hash]
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
        stays private, and so do the sequence's later blocks. The sliding
        groups' blocks of the same positions go with the full group's, with
        its serial, unless released already or their hash is taken there.
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
        cached = self.cached_blocks
        parent = blocks[table[start - 1]] if start else None
        for i in range(start, num_full):
            if parent is not None and parent.block_hash is None:
                break
            block = blocks[table[i]]
            block_hash = hashes[i]
            if block_hash in cached:
                break
            block.block_hash = block_hash
            block.token_ids = tuple(tokens[i * size : (i + 1) * size])
            block.serial = next(self._serials)
            if parent is not None:
                block.parent_hash = parent.block_hash
                block.parent_serial = parent.serial
            else:
                block.parent_hash = ROOT_HASH
            cached[block_hash] = block.block_id
            parent = block
            for group in range(1, self.num_groups):
                self._publish_alongside(block, seq.block_tables[group][i], group)
        seq.num_published_blocks = num_full

    def _publish_alongside(self, full: Block, block_id: int, group: int) -> None:
        """Publish a sliding group's block as the full group's ``full`` of the same positions was."""
        cached = self.cached_by_group[group]
        if block_id == self.null_block or full.block_hash in cached:
            return
        block = self.blocks[block_id]
        block.block_hash, block.parent_hash, block.token_ids = full.block_hash, full.parent_hash, full.token_ids
        block.serial, block.parent_serial, block.group = full.serial, full.parent_serial, group
        cached[full.block_hash] = block_id

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; published blocks stay cached, tail blocks first in line for eviction."""
        null = self.null_block
        for table in seq.block_tables:
            for block_id in reversed(table):
                if block_id != null:
                    self._unref(self.blocks[block_id])
        seq.block_tables = [[] for _ in self.windows]
        seq.num_released_blocks = 0
        seq.num_published_blocks = 0
        seq.num_computed_tokens = 0

    def _unref(self, block: Block) -> None:
        if block.ref_count <= 0:
            raise AssertionError(f"block {block.block_id} freed twice")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is None:
                self._empty.append(block.block_id)
            else:
                self._evictable[block.block_id] = None

    def chunk_table(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The block table a chunk carries for ``seq``'s first ``num_blocks`` blocks.

        With several groups, their tables interleaved: entry ``i * num_groups +
        g`` is group ``g``'s block ``i``. So the table only grows at its end
        as the sequence does, as the plan's wire codec expects of it.
        """
        tables = seq.block_tables
        if len(tables) == 1:
            return tables[0][:num_blocks]
        return [block_id for blocks in zip(*tables) for block_id in blocks][: num_blocks * len(tables)]

    def is_free(self, block_id: int) -> bool:
        """Whether ``block_id`` sits on a free list (empty or evictable); for invariant checks."""
        return block_id in self._evictable or block_id in self._empty
