"""BlockManager: reference counts, prefix cache publication, lookup and LRU eviction."""

from __future__ import annotations

import pytest

from atom_trio.core import block_manager as bm_module
from atom_trio.core.block_manager import ROOT_HASH, BlockManager, hash_block
from atom_trio.sampling_params import SamplingParams
from atom_trio.core.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        request_id=str(seq_id),
        index=0,
        prompt_token_ids=tokens,
        params=SamplingParams(),
        eos_token_ids=frozenset(),
        max_model_len=1024,
    )


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What a step does to a sequence: blocks for the tokens, then (after the step) publication."""
    manager.grow(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    manager.publish(seq)


def test_hash_chains_parent_and_tokens() -> None:
    first = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert first == hash_block(ROOT_HASH, (1, 2, 3, 4))
    assert first != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(ROOT_HASH, [5, 6, 7, 8])


def test_blocks_are_published_only_after_their_kv_is_computed() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    manager.grow(seq, 10)
    assert len(seq.block_table) == 3
    assert manager.cached_blocks == {}  # allocated, KV not computed yet
    assert manager.match_prefix(make_seq(list(range(10)), 1)) == [[]]

    seq.num_computed_tokens = 6
    manager.publish(seq)
    assert list(manager.cached_blocks.values()) == seq.block_table[:1]  # only the one full computed block
    seq.num_computed_tokens = 10
    manager.publish(seq)
    assert list(manager.cached_blocks.values()) == seq.block_table[:2]  # the partial third block stays private
    assert seq.block_hashes == [hash_block(ROOT_HASH, [0, 1, 2, 3]), hash_block(seq.block_hashes[0], [4, 5, 6, 7])]


def test_match_prefix_never_serves_the_last_token() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(8)))
    compute(manager, seq, 8)
    assert len(manager.cached_blocks) == 2
    # the same 8 tokens: the second block holds the last token, which must be computed
    assert manager.match_prefix(make_seq(list(range(8)), 1)) == [seq.block_table[:1]]
    assert manager.match_prefix(make_seq(list(range(9)), 2)) == [seq.block_table[:2]]
    assert manager.match_prefix(make_seq([0, 1, 2, 9, 4, 5, 6, 7, 8], 3)) == [[]]


def test_reference_counts_and_free_lists() -> None:
    manager = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(9)), 0)
    compute(manager, a, 9)
    b = make_seq(list(range(9)) + [42], 1)
    hits = manager.match_prefix(b)
    assert hits == [a.block_table[:2]]
    manager.share(b, hits)
    assert [manager.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert manager.num_free_blocks == 3

    manager.free(a)
    assert [manager.blocks[i].ref_count for i in b.block_table] == [1, 1]
    assert manager.num_free_blocks == 4  # a's partial block went back empty
    manager.free(b)
    assert manager.num_free_blocks == 6 and manager.num_evictable_blocks == 2
    assert manager.usage == 0.0

    with pytest.raises(AssertionError, match="freed twice"):
        b.block_tables = [[0]]
        manager.free(b)


def test_freed_cached_blocks_survive_until_no_empty_block_is_left_then_lru() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS)
    old = make_seq([1, 1, 1, 1, 9], 0)
    compute(manager, old, 5)
    manager.free(old)
    newer = make_seq([2, 2, 2, 2, 9], 1)
    compute(manager, newer, 5)
    newer_block = newer.block_table[0]
    manager.free(newer)
    assert manager.num_evictable_blocks == 2 and len(manager.cached_blocks) == 2

    # two empty blocks are left: using them evicts nothing
    filler = make_seq([3] * 7, 2)
    manager.grow(filler, 7)
    assert len(manager.cached_blocks) == 2
    # the next block evicts the least recently freed cached block (old's), not newer's
    manager.grow(filler, 9)
    assert manager.match_prefix(make_seq([1, 1, 1, 1, 9], 3)) == [[]]
    assert manager.match_prefix(make_seq([2, 2, 2, 2, 9], 4)) == [[newer_block]]


def test_sharing_an_unheld_cached_block_takes_it_off_the_free_list() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq([5] * 5, 0)
    compute(manager, a, 5)
    cached_id = a.block_table[0]
    manager.free(a)
    b = make_seq([5] * 6, 1)
    hits = manager.match_prefix(b)
    assert hits == [[cached_id]] and manager.num_evictable_among(hits) == 1
    manager.share(b, hits)
    manager.grow(b, 6)
    manager.grow(make_seq([7] * 8, 2), 8)  # takes the last two blocks, not the one b shares
    assert manager.num_free_blocks == 0
    assert manager.blocks[cached_id].ref_count == 1 and manager.blocks[cached_id].block_hash is not None


def test_hash_collision_costs_a_miss_not_wrong_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 7)
    manager = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], 0)
    compute(manager, a, 9)
    assert len(manager.cached_blocks) == 1  # the second block collides with the first and stays private
    assert manager.match_prefix(make_seq([9, 9, 9, 9, 0], 1)) == [[]]
    assert manager.match_prefix(make_seq([1, 2, 3, 4, 0], 2)) == [a.block_table[:1]]
    # same hash chain, same tokens in block 1 but under a different parent
    assert manager.match_prefix(make_seq([1, 2, 3, 4, 1, 2, 3, 4, 0], 3)) == [a.block_table[:1]]


def test_prefix_caching_off_publishes_nothing() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    compute(manager, a, 9)
    assert manager.cached_blocks == {}
    manager.free(a)
    assert manager.num_evictable_blocks == 0 and manager.num_free_blocks == 4
    assert manager.match_prefix(make_seq(list(range(9)), 1)) == [[]]


# -- KV cache groups: full attention and a sliding window -----------------------------------------------


def test_a_sliding_group_releases_what_leaves_the_window_and_keeps_cached_blocks() -> None:
    manager = BlockManager(num_blocks=16, block_size=BS, windows=(None, 6))
    null = manager.null_block
    seq = make_seq(list(range(20)))
    compute(manager, seq, 14)  # positions 0-13; the next token (14) sees 9-14: blocks 2 and 3
    manager.release(seq)
    full, sliding = seq.block_tables
    assert len(full) == len(sliding) == 4 and null not in full
    assert sliding[:2] == [null, null] and null not in sliding[2:]
    assert manager.num_free_blocks == 16 - 6
    # the released blocks were published (full blocks of known tokens): they stay cached, evictable
    assert manager.num_evictable_blocks == 2 and len(manager.cached_by_group[1]) == 3
    assert manager.chunk_table(seq, 4) == [full[0], null, full[1], null, full[2], sliding[2], full[3], sliding[3]]
    manager.free(seq)
    assert manager.num_free_blocks == 16 and seq.block_tables == [[], []]


def test_a_prefix_hit_needs_the_sliding_window_before_it_cached_too() -> None:
    manager = BlockManager(num_blocks=32, block_size=BS, windows=(None, 6))
    null = manager.null_block
    a = make_seq(list(range(24)))
    compute(manager, a, 8)  # blocks 0 and 1 published in both groups
    first_sliding = list(a.block_tables[1])
    manager.grow(a, 20)
    a.num_computed_tokens = 20
    manager.release(a)  # position 20 sees 15-20: sliding blocks 0-2 go, block 2 before it was published
    manager.publish(a)
    full, sliding = a.block_tables
    assert sliding[:3] == [null] * 3 and manager.num_evictable_blocks == 2  # blocks 0 and 1 stay cached
    # the full group has 3 blocks of this prompt, but position 12 would see 7-12, and sliding block 2 is gone
    assert manager.match_prefix(make_seq(list(range(12)) + [99, 98], 1)) == [full[:2], first_sliding]
    # position 20 sees 15-20: sliding blocks 3 and 4, both cached
    assert manager.match_prefix(make_seq(list(range(21)), 2)) == [full[:5], [null, null, null, *sliding[3:5]]]


def test_the_longest_sequence_that_fits_alone_counts_a_window_per_sliding_group() -> None:
    assert BlockManager(num_blocks=16, block_size=BS).max_tokens_alone() == 16 * BS
    # 16 blocks: a window of 6 takes at most ceil(6 / 4) + 1 = 3, leaving 13 for the full group
    assert BlockManager(num_blocks=16, block_size=BS, windows=(None, 6)).max_tokens_alone() == 13 * BS
    # a pool too small for the window to fill: b + min(b, 3) <= 4 blocks
    assert BlockManager(num_blocks=4, block_size=BS, windows=(None, 6)).max_tokens_alone() == 2 * BS
