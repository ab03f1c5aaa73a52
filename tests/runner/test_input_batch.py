"""The flat batch built over the whole plan at once equals the plain row-by-row layout, for any mix of chunks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk
from atom_trio.runner.input_batch import InputBatch
from atom_trio.sampling_params import SamplingParams

BLOCK_SIZE = 4


def row_by_row(inputs: InputBatch, chunks: list[SeqChunk]) -> dict[str, list]:
    """The layout spelled out one token at a time: what `InputBatch.prepare` must equal."""
    input_ids, positions, slots, feed_rows, feed_sources = [], [], [], [], []
    for chunk in chunks:
        for k, token in enumerate(chunk.token_ids):
            position = chunk.start_pos + k
            if token == PREVIOUS_TOKEN:
                feed_rows.append(len(input_ids))
                feed_sources.append(inputs.last_rows[chunk.seq_id])
                token = 0
            input_ids.append(token)
            positions.append(position)
            slots.append(chunk.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
    width = max(len(c.block_table) for c in chunks)
    return {
        "input_ids": input_ids,
        "positions": positions,
        "slot_mapping": slots,
        "block_tables": [c.block_table + [0] * (width - len(c.block_table)) for c in chunks],
        "context_lens": [c.start_pos + len(c.token_ids) for c in chunks],
        "query_lens": [len(c.token_ids) for c in chunks],
        "feed_rows": feed_rows,
        "feed_sources": feed_sources,
    }


@st.composite
def chunk(draw, seq_id: int) -> SeqChunk:
    kind = draw(st.sampled_from(["prefill", "decode", "fed decode", "verify"]))
    start = draw(st.integers(0, 40))
    if kind == "prefill":
        tokens = draw(st.lists(st.integers(0, 999), min_size=1, max_size=12))
    elif kind == "fed decode":
        tokens = [PREVIOUS_TOKEN]
    else:
        tokens = draw(st.lists(st.integers(0, 999), min_size=1, max_size=1 if kind == "decode" else 5))
    num_blocks = -(-(start + len(tokens)) // BLOCK_SIZE) + draw(st.integers(0, 2))
    table = draw(st.lists(st.integers(0, 500), min_size=num_blocks, max_size=num_blocks))
    return SeqChunk(
        seq_id=seq_id,
        token_ids=tokens,
        start_pos=start,
        block_table=table,
        prompt_len=start,
        sample=True,
        sampling_params=SamplingParams(),
        num_draft_tokens=len(tokens) - 1 if kind == "verify" else 0,
    )


@st.composite
def plans(draw) -> list[SeqChunk]:
    num_seqs = draw(st.integers(1, 12))
    return [draw(chunk(seq_id)) for seq_id in draw(st.permutations(range(100, 100 + num_seqs)))]


@settings(max_examples=150, deadline=None)
@given(chunks=plans(), last_row_seed=st.randoms(use_true_random=False))
def test_prepare_equals_the_row_by_row_layout(chunks, last_row_seed):
    inputs = InputBatch(block_size=BLOCK_SIZE, max_model_len=4096, device=torch.device("cpu"))
    seq_ids = [c.seq_id for c in chunks]
    last_row_seed.shuffle(seq_ids)
    inputs.last_rows = {seq_id: row for row, seq_id in enumerate(seq_ids)}  # as `keep_sampled` leaves them
    batch = inputs.prepare(chunks)
    expected = row_by_row(inputs, chunks)
    assert batch.input_ids.dtype == batch.positions.dtype == batch.slot_mapping.dtype == torch.long
    assert batch.block_tables.dtype == batch.context_lens.dtype == torch.int32
    for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens"):
        assert getattr(batch, name).tolist() == expected[name], name
    assert batch.query_lens == expected["query_lens"]
    assert batch.context_lens_host == expected["context_lens"]
    assert batch.feed_rows == expected["feed_rows"] and batch.feed_sources == expected["feed_sources"]
    assert batch.is_decode == all(len(c.token_ids) == 1 for c in chunks)
