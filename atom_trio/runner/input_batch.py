"""Input preparation: the live sequences' token histories, and each plan as the flat batch every backend consumes.

The runner keeps each live sequence's tokens (prompt and output, for the
sampler's penalties and seeds) from the tokens the plans carry, and forgets
them when a plan lists the sequence as finished. A plan's chunks become one
`FlatBatch`: all tokens back to back (``input_ids``, ``positions``,
``slot_mapping``), and per sequence ``context_lens`` and ``block_tables``.
A model with several KV cache groups (`atom_trio.core.BlockManager`) gets a
chunk's tables interleaved, and each further group its own ``block_tables``
and ``slot_mapping`` (`FlatBatch.windowed`), its entries before the window of
the chunk's first token pointing at the null page.

The layout is computed with numpy over the whole batch, not row by row: at
batch 256 a per-row build of the block tables alone took milliseconds, the
whole of a small model's decode step. The block tables have a method of
their own (`InputBatch.block_tables`), the one place that reads the chunks'
tables, so a second table (per KV-cache group) is built beside it.

A decode chunk may carry `PREVIOUS_TOKEN` where the host does not know its
token yet: the token its sequence sampled in the step launched just before,
still on the device (`InputBatch.last_tokens`). Its row is filled in on the
device (`InputBatch.feed_previous_tokens`), and its place in the history once
the host reads the token (`InputBatch.fill`).

The checks here guard the plan's integrity (chunk shapes, positions within
``max_model_len``, one chunk per sequence, histories that line up), not the
client's data: the engine admits only token ids inside the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import attrs
import numpy as np
import torch

from atom_trio._device import host_to_device
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk
from atom_trio.layers.sampler import SampleRequest


class SeqHistory:
    """A sequence's tokens so far, split at the prompt's end; ``num_drafts`` of the last ones are unverified drafts."""

    __slots__ = ("_prompt_array", "num_drafts", "output", "prompt", "prompt_len")

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.num_drafts = 0
        self._prompt_array: np.ndarray | None = None

    def prompt_ids(self) -> list[int] | np.ndarray:
        """The prompt; once complete, as an int64 array made once (a repetition penalty reads it every step)."""
        if len(self.prompt) < self.prompt_len:
            return self.prompt
        if self._prompt_array is None:
            self._prompt_array = np.array(self.prompt, dtype=np.int64)
        return self._prompt_array

    def truncate(self, length: int) -> None:
        """Drop the tokens from position ``length`` on: drafts that were rejected (always output tokens)."""
        del self.output[length - self.prompt_len :]

    def tokens(self, length: int) -> list[int]:
        """The first ``length`` tokens, prompt first."""
        return self.prompt[:length] + self.output[: max(0, length - self.prompt_len)]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def extend(self, tokens: list[int]) -> None:
        missing = self.prompt_len - len(self.prompt)  # the output is empty while the prompt is incomplete
        if missing <= 0:
            self.output.extend(tokens)
            return
        self.prompt.extend(tokens[:missing])
        self.output.extend(tokens[missing:])

    def fill(self, position: int, token: int) -> None:
        """Put the sampled ``token`` where a `PREVIOUS_TOKEN` stands for it (nothing if none does)."""
        index = position - self.prompt_len
        if 0 <= index < len(self.output) and self.output[index] == PREVIOUS_TOKEN:
            self.output[index] = token


@attrs.frozen(kw_only=True)
class FlatBatch:
    """One step's flat batch: `AttentionMetadata`'s fields, built on the host, then copied to the device."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    query_lens: list[int]
    context_lens_host: list[int]
    feed_rows: list[int]
    """Rows of ``input_ids`` that take a token sampled by the previous step (`PREVIOUS_TOKEN`)..."""
    feed_sources: list[int]
    """...and which row of that step's tokens each takes."""
    windowed: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    """Each further KV cache group's ``block_tables`` and ``slot_mapping`` (none for a model with one group)."""

    def to(self, device: torch.device) -> FlatBatch:
        """The batch with its tensors on ``device``, copied without waiting for the device to be idle."""
        return attrs.evolve(
            self,
            input_ids=host_to_device(self.input_ids, device),
            positions=host_to_device(self.positions, device),
            slot_mapping=host_to_device(self.slot_mapping, device),
            block_tables=host_to_device(self.block_tables, device),
            context_lens=host_to_device(self.context_lens, device),
            windowed=tuple((host_to_device(t, device), host_to_device(s, device)) for t, s in self.windowed),
        )

    @property
    def cu_query_lens(self) -> list[int]:
        """Where each sequence's tokens start in the batch, and the token count last (``cu_seqlens_q`` on the host)."""
        return _cumsum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the shape CUDA graphs are captured for."""
        return len(self.query_lens) == self.input_ids.shape[0]


class InputBatch:
    """The state that outlives a step on the input side: token histories, and the last step's sampled tokens.

    ``histories`` by sequence; ``last_tokens`` the tokens the last step
    launched sampled (on the device), ``last_rows`` each sampling sequence's
    row of them. ``kv_cache_windows``: the KV cache groups; ``null_block``
    the page that a sliding group's entries out of the window name, once the
    cache is allocated.
    """

    def __init__(
        self,
        *,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        kv_cache_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.kv_cache_windows = kv_cache_windows
        self.null_block: int | None = None
        self.histories: dict[int, SeqHistory] = {}
        self.last_tokens = torch.empty(0, dtype=torch.long, device=device)
        self.last_rows: dict[int, int] = {}

    def record(self, chunks: list[SeqChunk]) -> None:
        """Extend each sequence's token history; a (re)started sequence brings its prefix.

        Every chunk is checked before any history changes, so a rejected plan
        leaves the runner as it was.
        """
        if len({c.seq_id for c in chunks}) != len(chunks):
            raise ValueError("a plan holds at most one chunk per sequence")
        updates = []
        histories = self.histories
        for chunk in chunks:
            self._check_chunk(chunk)
            history = histories.get(chunk.seq_id)
            if history is None or chunk.start_pos == 0 or chunk.prefix_token_ids is not None:
                prefix = chunk.prefix_token_ids or []
                if len(prefix) != chunk.start_pos:
                    raise ValueError(
                        f"sequence {chunk.seq_id} starts at position {chunk.start_pos} but the runner has "
                        f"{len(prefix)} tokens of its history (send prefix_token_ids the first time)"
                    )
                history = SeqHistory(chunk.prompt_len)
                history.extend(prefix)
            else:
                length = len(history)
                if not length - history.num_drafts <= chunk.start_pos <= length:
                    raise ValueError(
                        f"sequence {chunk.seq_id}: chunk starts at {chunk.start_pos} but {length} tokens came before"
                    )
            updates.append((chunk, history))
        for chunk, history in updates:
            histories[chunk.seq_id] = history
            if history.num_drafts and len(history) > chunk.start_pos:  # the drafts from there on were rejected
                history.truncate(chunk.start_pos)
            history.extend(chunk.token_ids)
            history.num_drafts = chunk.num_draft_tokens

    def _check_chunk(self, chunk: SeqChunk) -> None:
        end = chunk.end_pos
        if not chunk.token_ids:
            raise ValueError(f"sequence {chunk.seq_id}: a chunk must carry at least one token")
        if end > self.max_model_len:
            raise ValueError(f"sequence {chunk.seq_id}: position {end - 1} is past max_model_len {self.max_model_len}")
        num_groups = len(self.kv_cache_windows)
        if len(chunk.block_table) // num_groups * self.block_size < end or len(chunk.block_table) % num_groups:
            raise ValueError(
                f"sequence {chunk.seq_id}: {len(chunk.block_table)} blocks of {self.block_size} "
                f"for {num_groups} KV cache groups cannot hold {end} tokens"
            )
        if chunk.sample and chunk.sampling_params is None:
            raise ValueError(f"sequence {chunk.seq_id}: sample=True needs sampling_params")
        if chunk.num_draft_tokens and (
            not chunk.sample or chunk.num_draft_tokens >= len(chunk.token_ids) or chunk.start_pos < chunk.prompt_len - 1
        ):
            raise ValueError(f"sequence {chunk.seq_id}: drafts follow a known token of a sampling chunk past the prompt")
        if chunk.token_ids[0] == PREVIOUS_TOKEN and (
            len(chunk.token_ids) != 1 or chunk.seq_id not in self.last_rows or chunk.prefix_token_ids is not None
        ):
            raise ValueError(
                f"sequence {chunk.seq_id}: PREVIOUS_TOKEN stands only for the token a decode chunk's sequence "
                "sampled in the step launched just before"
            )

    def prepare(self, chunks: list[SeqChunk]) -> FlatBatch:
        """The flat batch, on the host: every chunk's tokens back to back, and where their KV lives."""
        num_seqs = len(chunks)
        query_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=num_seqs)
        start_pos = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=num_seqs)
        context_lens = start_pos + query_lens
        num_tokens = int(query_lens.sum())
        if num_tokens == num_seqs:  # decode only, the steady state: one token per sequence
            input_ids = np.fromiter((c.token_ids[0] for c in chunks), dtype=np.int64, count=num_seqs)
            positions = start_pos
            seq_of_token = np.arange(num_seqs)
        else:
            input_ids = np.fromiter(
                chain.from_iterable(c.token_ids for c in chunks), dtype=np.int64, count=num_tokens
            )
            seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
            first_token = np.cumsum(query_lens) - query_lens
            positions = np.arange(num_tokens) - np.repeat(first_token - start_pos, query_lens)
        # A decode chunk's PREVIOUS_TOKEN (only ever a chunk's one token) is filled in on the device
        # (see `feed_previous_tokens`).
        feed_rows = np.flatnonzero(input_ids == PREVIOUS_TOKEN)
        input_ids[feed_rows] = 0
        block_tables = self.block_tables(chunks)
        windowed = ()
        if len(self.kv_cache_windows) > 1:
            block_tables, windowed = self._split_groups(block_tables, start_pos, seq_of_token, positions)
        slot_mapping = (
            block_tables[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )
        last_rows = self.last_rows
        return FlatBatch(
            input_ids=torch.from_numpy(input_ids),
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slot_mapping),
            block_tables=torch.from_numpy(block_tables),
            context_lens=torch.from_numpy(context_lens.astype(np.int32)),
            query_lens=query_lens.tolist(),
            context_lens_host=context_lens.tolist(),
            feed_rows=feed_rows.tolist(),
            feed_sources=[last_rows[chunks[i].seq_id] for i in seq_of_token[feed_rows].tolist()],
            windowed=windowed,
        )

    def _split_groups(
        self, tables: np.ndarray, starts: np.ndarray, seq_of_token: np.ndarray, positions: np.ndarray
    ) -> tuple[np.ndarray, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        """The first group's block tables, and each further group's tables and slots, from the interleaved tables.

        A sliding group's entries before the window of a chunk's first token
        become the null page: the scheduler releases those blocks, and a
        table the peer holds may still name them (the wire sends a table's
        growth only), so they must not be read.
        """
        size = self.block_size
        by_group = tables.reshape(tables.shape[0], -1, len(self.kv_cache_windows)).transpose(2, 0, 1)
        columns = np.arange(by_group.shape[2])
        windowed = []
        for group, window in enumerate(self.kv_cache_windows[1:], start=1):
            table = np.ascontiguousarray(by_group[group])
            if self.null_block is not None:
                first = np.maximum(starts - window + 1, 0) // size
                table[columns[None, :] < first[:, None]] = self.null_block
            slots = table[seq_of_token, positions // size].astype(np.int64) * size + positions % size
            windowed.append((torch.from_numpy(table), torch.from_numpy(slots)))
        return np.ascontiguousarray(by_group[0]), tuple(windowed)

    def table_for_groups(self, blocks: list[int]) -> list[int]:
        """A chunk's table that gives every KV cache group ``blocks`` (for warm-up steps, whose KV is thrown away)."""
        num_groups = len(self.kv_cache_windows)
        return blocks if num_groups == 1 else [block for block in blocks for _ in range(num_groups)]

    @staticmethod
    def block_tables(chunks: list[SeqChunk]) -> np.ndarray:
        """``[num_seqs, max_blocks]`` int32: each chunk's block table, padded with block 0.

        One pass over all the tables' ids (`np.fromiter`) and one masked store:
        a row at a time cost ~10 µs per sequence with a 1k-token context.
        """
        num_seqs = len(chunks)
        lengths = np.fromiter((len(c.block_table) for c in chunks), dtype=np.int64, count=num_seqs)
        ids = np.fromiter(chain.from_iterable(c.block_table for c in chunks), dtype=np.int32, count=int(lengths.sum()))
        tables = np.zeros((num_seqs, int(lengths.max())), dtype=np.int32)
        tables[np.arange(tables.shape[1]) < lengths[:, None]] = ids
        return tables

    def feed_previous_tokens(self, batch: FlatBatch) -> FlatBatch:
        """Write into ``batch.input_ids`` (on the device) the tokens its `PREVIOUS_TOKEN` chunks stand for."""
        if batch.feed_rows:
            rows = host_to_device(torch.tensor(batch.feed_rows), self.device)
            sources = host_to_device(torch.tensor(batch.feed_sources), self.device)
            batch.input_ids.index_copy_(0, rows, self.last_tokens.index_select(0, sources))
        return batch

    def sample_requests(self, sampled: list[SeqChunk]) -> list[SampleRequest]:
        """What the sampler needs of each sampling row: its parameters and its sequence's history.

        A chunk with ``j`` drafts has ``j + 1`` rows, the first predicting
        from before the drafts, each next one from after one more of them.
        """
        requests = []
        for chunk in sampled:
            history = self.histories[chunk.seq_id]
            output = history.output
            prompt = history.prompt_ids()
            for unverified in range(chunk.num_draft_tokens, 0, -1):
                requests.append(SampleRequest(chunk.sampling_params, prompt, output[: len(output) - unverified]))
            requests.append(SampleRequest(chunk.sampling_params, prompt, output))
        return requests

    def keep_sampled(self, tokens: torch.Tensor, sampled: list[SeqChunk]) -> None:
        """``tokens`` (on the device, one per chunk of ``sampled``) feed the next plan's `PREVIOUS_TOKEN` chunks."""
        self.last_tokens = tokens
        self.last_rows = {c.seq_id: i for i, c in enumerate(sampled)}

    def fill(self, seq_ids: list[int], positions: list[int], tokens: list[int]) -> None:
        """Sampled tokens read on the host, each replacing the `PREVIOUS_TOKEN` that stood for it in a history."""
        histories = self.histories
        for seq_id, position, token in zip(seq_ids, positions, tokens):
            history = histories.get(seq_id)
            if history is not None:
                history.fill(position, token)

    def forget(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self.histories.pop(seq_id, None)

    def clear(self) -> None:
        self.histories.clear()
        self.last_tokens, self.last_rows = torch.empty(0), {}


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
