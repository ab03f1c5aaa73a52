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
import torch

from atom_trio._device import host_to_device
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk
from atom_trio.layers.sampler import SampleRequest


class SeqHistory:
    """A sequence's tokens so far, split at the prompt's end; ``num_drafts`` of the last ones are unverified drafts."""

    __slots__ = ("prompt_len", "prompt", "output", "num_drafts")

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.num_drafts = 0

    def truncate(self, length: int) -> None:
        """Drop the tokens from position ``length`` on: drafts that were rejected (always output tokens)."""
        del self.output[length - self.prompt_len :]

    def tokens(self, length: int) -> list[int]:
        """The first ``length`` tokens, prompt first."""
        return self.prompt[:length] + self.output[: max(0, length - self.prompt_len)]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def extend(self, tokens: list[int]) -> None:
        in_prompt = max(0, min(len(tokens), self.prompt_len - len(self)))
        self.prompt.extend(tokens[:in_prompt])
        self.output.extend(tokens[in_prompt:])

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
        for chunk in chunks:
            self._check_chunk(chunk)
            history = self.histories.get(chunk.seq_id)
            if history is None or chunk.start_pos == 0 or chunk.prefix_token_ids is not None:
                prefix = chunk.prefix_token_ids or []
                if len(prefix) != chunk.start_pos:
                    raise ValueError(
                        f"sequence {chunk.seq_id} starts at position {chunk.start_pos} but the runner has "
                        f"{len(prefix)} tokens of its history (send prefix_token_ids the first time)"
                    )
                history = SeqHistory(chunk.prompt_len)
                history.extend(prefix)
            elif not len(history) - history.num_drafts <= chunk.start_pos <= len(history):
                raise ValueError(
                    f"sequence {chunk.seq_id}: chunk starts at {chunk.start_pos} but {len(history)} tokens came before"
                )
            updates.append((chunk, history))
        for chunk, history in updates:
            self.histories[chunk.seq_id] = history
            if len(history) > chunk.start_pos:  # the drafts from that position on were rejected
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
        query_lens = [len(c.token_ids) for c in chunks]
        context_lens = [c.start_pos + n for c, n in zip(chunks, query_lens)]
        max_blocks = max(len(c.block_table) for c in chunks)
        input_ids = torch.tensor(list(chain.from_iterable(c.token_ids for c in chunks)), dtype=torch.long)
        # A decode chunk's PREVIOUS_TOKEN is filled in on the device (see `feed_previous_tokens`).
        fed = [i for i, c in enumerate(chunks) if c.token_ids[0] == PREVIOUS_TOKEN]
        starts = _cumsum(query_lens) if fed else []
        feed_rows = [starts[i] for i in fed]
        input_ids[feed_rows] = 0
        positions = torch.tensor(
            list(chain.from_iterable(range(c.start_pos, ctx) for c, ctx in zip(chunks, context_lens))),
            dtype=torch.long,
        )
        block_tables = torch.tensor(
            [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks], dtype=torch.int32
        )
        seq_of_token = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(query_lens))
        windowed = ()
        if len(self.kv_cache_windows) > 1:
            starts = [c.start_pos for c in chunks]
            block_tables, windowed = self._split_groups(block_tables, starts, seq_of_token, positions)
        slot_mapping = (
            block_tables[seq_of_token, positions // self.block_size].long() * self.block_size
            + positions % self.block_size
        )
        return FlatBatch(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            query_lens=query_lens,
            context_lens_host=context_lens,
            feed_rows=feed_rows,
            feed_sources=[self.last_rows[chunks[i].seq_id] for i in fed],
            windowed=windowed,
        )

    def _split_groups(
        self, tables: torch.Tensor, starts: list[int], seq_of_token: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        """The first group's block tables, and each further group's tables and slots, from the interleaved tables.

        A sliding group's entries before the window of a chunk's first token
        become the null page: the scheduler releases those blocks, and a
        table the peer holds may still name them (the wire sends a table's
        growth only), so they must not be read.
        """
        size = self.block_size
        by_group = tables.view(tables.shape[0], -1, len(self.kv_cache_windows)).permute(2, 0, 1)
        columns = torch.arange(by_group.shape[2])
        windowed = []
        for group, window in enumerate(self.kv_cache_windows[1:], start=1):
            table = by_group[group].contiguous()
            if self.null_block is not None:
                first = (torch.tensor(starts) - window + 1).clamp_(min=0) // size
                table.masked_fill_(columns[None, :] < first[:, None], self.null_block)
            slots = table[seq_of_token, positions // size].long() * size + positions % size
            windowed.append((table, slots))
        return by_group[0].contiguous(), tuple(windowed)

    def table_for_groups(self, blocks: list[int]) -> list[int]:
        """A chunk's table that gives every KV cache group ``blocks`` (for warm-up steps, whose KV is thrown away)."""
        num_groups = len(self.kv_cache_windows)
        return blocks if num_groups == 1 else [block for block in blocks for _ in range(num_groups)]

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
            for unverified in range(chunk.num_draft_tokens, 0, -1):
                requests.append(SampleRequest(chunk.sampling_params, history.prompt, output[: len(output) - unverified]))
            requests.append(SampleRequest(chunk.sampling_params, history.prompt, output))
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
