"""CUDA graphs for decode steps: the whole forward (attention included) replayed from one launch.

A decode step of a small model, or of any model at small batch, is bound by
the host: hundreds of kernel launches, each costing microseconds of Python and
driver time, for a few milliseconds of GPU work. Capturing the step once per
batch size and replaying it removes all of that. A batch of ``n`` sequences
runs the graph of the next captured size ``B >= n``; the ``B - n`` padding
rows write no KV (slot -1) and attend to nothing (context length 0), as
backends that support graphs (`KernelBackend.supports_cuda_graphs`) promise.
Each size's attention plan is made at capture for every row at
``max_model_len``, the longest context it will replay.

A step's inputs reach a graph in one host-to-device copy plus one for the
block tables: each captured size reads its token ids, positions, slots and
context lengths from one buffer of its own (packed on the host, padding rows
included, beside the rows that take the previous step's sampled tokens), and
the prefix ``[:B]`` of one block table tensor. (Copying each input on its
own, then padding it on the device, was 16 copies and 4 kernels a step.)
Every graph writes the prefix of one logits buffer, and all graphs share one
memory pool (captured largest first, each freeing its temporaries before the
next), so the graphs together cost about one largest-size step: the runner
captures that size once before it sizes the KV cache, to set the memory aside.

At levels 1-3 the captured step is the torch.compile'd forward (Inductor's
kernels between the attention calls), so its kernels run without Python.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import attrs
import torch

from atom_trio.layers import ForwardContext, forward_context
from atom_trio.ops import AttentionMetadata

logger = logging.getLogger("atom_trio.runner")


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including ``max_num_seqs``.

    Steps of 8 keep the padding waste of a batch under 8 rows (under 1/3 at
    batch 16 and shrinking after), while the graph count grows only linearly.
    """
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += range(16, max_num_seqs, 8)
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captured decode steps (``input_ids``/``positions`` to float32 logits) for a fixed set of batch sizes.

    ``forward(input_ids, positions)`` is the model's forward as the runner
    runs it (compiled or not); ``model`` gives the logits and the attention
    layers' shapes. The graphs hold pointers to the model's weights, its KV
    cache and the static tensors here: the KV cache must not be reallocated
    while they live. Build it under ``torch.inference_mode()``, like the
    steps that will run it, so a compiled forward sees the same kind of
    tensors (a plain one would be a guard failure and a recompile).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        backend,
        *,
        batch_sizes: list[int],
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        device: torch.device,
        num_kv_groups: int = 1,
    ) -> None:
        self.model = model
        self.forward = forward
        self.backend = backend
        self.batch_sizes = sorted(batch_sizes)
        self.max_model_len = max_model_len
        self.block_size = block_size
        largest = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self._inputs = {size: _PackedInputs(size, device) for size in self.batch_sizes}
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        # Further KV cache groups (sliding-window layers beside full ones): their own tables and slots.
        self.group_tables = torch.zeros(num_kv_groups - 1, largest, max_blocks, dtype=torch.int32, device=device)
        self.group_slots = torch.full((num_kv_groups - 1, largest), -1, dtype=torch.long, device=device)
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        # One output buffer for every size: a graph's own output would stay allocated in the pool.
        self.logits = torch.empty(largest, vocab_size, dtype=torch.float32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, num_seqs: int) -> int:
        """The captured size a batch of ``num_seqs`` decodes at (``num_seqs`` must not exceed the largest)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (JIT kernels compile at their first launch) and capture every size, largest first."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.batch_sizes):
            context = self._context(size)
            with forward_context(context):
                self._step(size)  # warm-up, outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(size)
            pool = graph.pool() if pool is None else pool
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self._graphs),
            _ranges(self.batch_sizes),
            time.perf_counter() - start,
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        *,
        feed_rows: Sequence[int] = (),
        feed_sources: Sequence[int] = (),
        previous_tokens: torch.Tensor | None = None,
        windowed: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> torch.Tensor:
        """Replay the step for ``n`` decode tokens given on the host; float32 logits ``[n, vocab]``.

        Rows ``feed_rows`` of ``input_ids`` take ``previous_tokens[feed_sources]``
        on the device (the previous step's sampled tokens, not on the host yet).
        ``windowed``: each further KV cache group's block tables and slots.
        The result is a view of the graph's output: the next replay overwrites it.
        """
        n = input_ids.shape[0]
        size = self.padded_size(n)
        inputs = self._inputs[size]
        host = inputs.pack(input_ids, positions, slot_mapping, context_lens, feed_rows, feed_sources)
        inputs.buffer[: host.shape[0]].copy_(host.pin_memory(), non_blocking=True)
        # Columns past a row's context are never read, so only the used ones are copied.
        tables = block_tables[:, : self.block_tables.shape[1]]
        self.block_tables[:n, : tables.shape[1]].copy_(tables.contiguous().pin_memory(), non_blocking=True)
        for group, (group_tables, group_slots) in enumerate(windowed):
            tables = group_tables[:, : self.block_tables.shape[1]]
            self.group_tables[group, :n, : tables.shape[1]].copy_(tables.contiguous().pin_memory(), non_blocking=True)
            slots = torch.full((size,), -1, dtype=torch.long)  # padding rows store nothing
            slots[:n] = group_slots
            self.group_slots[group, :size].copy_(slots.pin_memory(), non_blocking=True)
        if feed_rows:
            rows, sources = inputs.feed_indices(len(feed_rows))
            inputs.input_ids.index_copy_(0, rows, previous_tokens.index_select(0, sources))
        self._graphs[size].replay()
        return self.logits[:n]

    def _context(self, size: int) -> ForwardContext:
        inputs = self._inputs[size]
        metadata = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            context_lens=inputs.context_lens,
            block_tables=self.block_tables[:size],
            slot_mapping=inputs.slot_mapping,
            query_lens_host=[1] * size,
            context_lens_host=[self.max_model_len] * size,
            block_size=self.block_size,
        )
        windowed = []
        for tables, slots in zip(self.group_tables, self.group_slots):
            group = attrs.evolve(metadata, block_tables=tables[:size], slot_mapping=slots[:size])
            windowed.append(ForwardContext(metadata=group, attn_plan=self.backend.plan_attention(group)))
        plan = self.backend.plan_attention(metadata)
        return ForwardContext(metadata=metadata, attn_plan=plan, windowed=tuple(windowed))

    def _step(self, size: int) -> None:
        inputs = self._inputs[size]
        hidden = self.forward(inputs.input_ids, inputs.positions)
        self.logits[:size].copy_(self.model.compute_logits(hidden))  # the float32 cast, into the shared buffer


class _PackedInputs:
    """One captured size's per-token inputs in one int64 device buffer, so that a step fills them with one copy.

    ``[input ids | positions | slots | context lengths (int32, two to an element) | feed rows | feed sources]``,
    ``size`` elements each; the graph reads the first four as views.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.buffer = torch.zeros(6 * size, dtype=torch.long, device=device)
        self.buffer[2 * size : 3 * size] = -1  # no KV write before the first step fills the slots in
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self._views(self.buffer)

    def _views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = self.size
        ids, positions, slots, lens = buffer[: 4 * size].split(size)
        return ids, positions, slots, lens.view(torch.int32)[:size]

    def pack(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        feed_rows: Sequence[int],
        feed_sources: Sequence[int],
    ) -> torch.Tensor:
        """The host image of the buffer's used prefix. Padding rows: token 0 at position 0, no slot, no context."""
        n, size = input_ids.shape[0], self.size
        host = torch.zeros(4 * size + 2 * len(feed_rows), dtype=torch.long)
        ids, host_positions, slots, lens = self._views(host)
        ids[:n] = input_ids
        host_positions[:n] = positions
        slots.fill_(-1)
        slots[:n] = slot_mapping
        lens[:n] = context_lens
        host[4 * size :] = torch.tensor([*feed_rows, *feed_sources], dtype=torch.long)
        return host

    def feed_indices(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The feed rows and sources `pack` wrote for ``count`` fed rows, on the device."""
        start = 4 * self.size
        return self.buffer[start : start + count], self.buffer[start + count : start + 2 * count]


def _ranges(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else f"{', '.join(map(str, sizes[:5]))} ... {sizes[-1]}"
