"""The model runner: one model on one device, its paged KV cache, and one step at a time.

``execute(plan)`` turns the scheduler's `StepPlan` into the flat batch every
backend consumes (``input_ids``, ``positions``, ``slot_mapping``,
``cu_seqlens_q``, ``context_lens``, ``block_tables``), runs the model, and
samples one token for each chunk that asks for it. The runner keeps each live
sequence's token history (prompt and output, for the sampler's penalties and
seeds) from the tokens the plans carry, and forgets it when the plan lists
the sequence as finished.

``execute`` is `launch` then `collect`, and the two may be apart: `launch`
queues the step on the device and returns at once, its sampled tokens still
on the device; `collect` waits for them and reads them. Between the two the
next plan can be launched, its decode chunks carrying `PREVIOUS_TOKEN` where
the host does not know a token yet: those take the token this runner sampled
for their sequence in the step launched just before, on the device (under
tensor parallelism rank 0 broadcasts it). So the host plans and prepares step
N+1 while the device computes step N. Host-to-device copies go through pinned
memory without waiting for the device; what still waits is a request for
logprobs (they come back as lists) and a penalty on a token not read yet.

Prompt logprobs (``SamplingParams.prompt_logprobs``) come from the hidden
states of every prompt position of a chunk. Position ``p`` predicts token
``p + 1``, so a chunk's last position predicts the first token of the *next*
chunk, which the runner does not know yet: its hidden state is kept until
that chunk arrives, which makes a prompt split over several steps give the
values of one step.

Start-up runs in phases, whose seconds one log line reports at the end: build
the model, load its weights, compile the forward (``level`` 1-3, see
`atom_trio.runner.compile`), profile the largest step and capture the largest
decode graph once (on CUDA: both are subtracted from the KV cache's budget),
allocate the KV cache, warm the kernels up (CUDA) and capture the decode graphs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain

import attrs
import torch

from atom_trio.config import EngineConfig
from atom_trio.distributed import TensorParallelGroup, destroy_distributed, init_distributed, use_tp_group
from atom_trio.errors import ModelLoadError
from atom_trio.core.facts import ModelFacts
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk, StepPlan, StepResult, TokenLogprobs
from atom_trio.sampling_params import SamplingParams
from atom_trio.layers import Attention, ForwardContext, forward_context
from atom_trio._device import host_to_device
from atom_trio.layers.sampler import SampleRequest, Sampler
from atom_trio.loader.resolve import resolve_model
from atom_trio.loader.weights import iter_weights
from atom_trio.models import get_model_class
from atom_trio.ops import AttentionMetadata, get_backend, use_backend
from atom_trio.runner.compile import (
    CompiledForward,
    TracedOps,
    effective_level,
    freezes_weights,
    use_compile_cache,
    warmup_steps,
)
from atom_trio.runner.cuda_graphs import DecodeGraphs, decode_batch_sizes

logger = logging.getLogger("atom_trio.runner")

# Prompt positions whose logits are materialised at once: bounds the [rows, vocab] float32 temporaries.
_PROMPT_LOGPROBS_ROWS = 512


class _SeqHistory:
    """A sequence's tokens so far, split at the prompt's end."""

    __slots__ = ("prompt_len", "prompt", "output")

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.prompt: list[int] = []
        self.output: list[int] = []

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


@attrs.define(kw_only=True)
class LaunchedStep:
    """A step queued on the device; `ModelRunner.collect` reads its sampled tokens."""

    step_id: int
    seq_ids: list[int]
    """The sequences that sample, in plan order (not their chunks, which the wire decoder may then reuse)..."""
    positions: list[int]
    """...and the position each sampled token takes."""
    tokens: torch.Tensor
    """Their tokens on the device (rank 0; other ranks hold them only to feed the next step)."""
    host_tokens: torch.Tensor
    """The same tokens, copied to (pinned) host memory once ``ready``."""
    ready: torch.cuda.Event | None
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None
    token_ids: list[int] | None = None
    """The tokens as a list, once read."""


class ModelRunner:
    """Runs a model's forward passes and sampling for the scheduler's step plans.

    Attributes that the engine sizes its scheduler from: ``num_kv_blocks``,
    ``block_size``, ``max_model_len``, ``vocab_size``, ``eos_token_ids``.
    """

    def __init__(self, config: EngineConfig, *, rank: int = 0, world_size: int = 1) -> None:
        clock = _StartupClock()
        self.config = config
        self.rank = rank
        self.tp_group = TensorParallelGroup(rank=rank, size=world_size)
        self.device = _pick_device(config.device)
        if world_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", rank)  # one GPU per rank
        clock.device = self.device  # phases end when the device has finished their work
        if self.device.type == "cuda":
            # A GPU step's host work is small tensors: torch's intra-op threads would only spin against each
            # other and against the other ranks' workers (a batch-64 decode step at TP=2: 25 ms, 10 ms with one).
            torch.set_num_threads(1)
        resolved = resolve_model(config)
        self.hf_config = resolved.hf_config
        self.dtype = resolved.dtype
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = _eos_token_ids(self.hf_config, resolved.generation_config)
        self.max_model_len = _max_model_len(config, self.hf_config)
        self.block_size = config.block_size
        self.backend = get_backend(config.kernel_backend, self.device)
        self.level = effective_level(config, self.device)
        torch.manual_seed(config.seed)

        model_class = get_model_class(self.hf_config)
        # Layers of a model torch.compile traces call their elementwise kernels as ops dynamo does not trace into.
        layer_ops = TracedOps(self.backend) if self.level > 0 else self.backend
        try:
            with _default_dtype(self.dtype), self.device, use_backend(layer_ops), use_tp_group(self.tp_group):
                self.model = model_class(self.hf_config)
        except ValueError as exc:  # a config feature the implementation lacks (rope type, activation, a TP split...)
            raise ModelLoadError(f"cannot build {model_class.__name__} from {resolved.path}: {exc}") from exc
        # Only now: a model that cannot be split fails on every rank at once instead of in the rendezvous.
        init_distributed(self.tp_group, self.device, timeout_s=config.worker_timeout)
        clock.lap("model build")
        with torch.no_grad():
            self.model.load_weights(iter_weights(resolved, seed=config.seed, device=self.device))
        self.model.eval()
        if not freezes_weights(self.device, self.level):  # Inductor packs frozen weights itself
            for module in self.model.modules():  # e.g. CPU matmul weight packing
                if hasattr(module, "process_weights_after_loading"):
                    module.process_weights_after_loading()
        clock.lap("weight load")

        self._attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(self.eos_token_ids)
        self._histories: dict[int, _SeqHistory] = {}
        self._prompt_tails: dict[int, torch.Tensor] = {}
        """Hidden state of the last position of a prompt-logprobs sequence's previous chunk, by sequence."""
        self._unread: deque[LaunchedStep] = deque()
        """Launched steps whose tokens the host has not read, oldest first."""
        self._last_tokens = torch.empty(0, dtype=torch.long, device=self.device)
        self._last_rows: dict[int, int] = {}
        """The tokens sampled by the last step launched, and each sampling sequence's row of them."""
        self._fault: BaseException | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.graph_bytes_budgeted = self.graph_bytes = 0
        """Device memory set aside for the decode graphs before sizing the KV cache, and what they hold."""
        self.compiled: CompiledForward | None = None
        self._model_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.model
        use_compile_cache()  # before anything compiles: Inductor, and the backend's Triton kernels
        if self.level > 0:
            self.compiled = self._model_forward = CompiledForward(
                self.model, self.level, freeze=freezes_weights(self.device, self.level)
            )
            self._compile()
            clock.lap("compile")
        self.num_kv_blocks = self._num_kv_blocks(clock)
        self.kv_cache = self._allocate_kv_cache(self.num_kv_blocks)
        clock.lap("KV allocation")
        if self.device.type == "cuda":
            self.warm_up()
            clock.lap("warm-up")
        if self._uses_decode_graphs():
            self.decode_graphs, self.graph_bytes = self._capture_decode_graphs(decode_batch_sizes(config.max_num_seqs))
            logger.info(
                "decode CUDA graphs hold %.3f GiB (%.3f GiB was set aside)",
                self.graph_bytes / 2**30,
                self.graph_bytes_budgeted / 2**30,
            )
            clock.lap("graph capture")
        self.startup_seconds = clock.seconds
        """Seconds spent in each start-up phase (also logged)."""
        logger.info(
            "model runner on %s: %s %s, kernels %s, level %d, %d KV blocks of %d tokens, max_model_len %d",
            self.device,
            type(self.model).__name__,
            self.dtype,
            self.backend.name,
            self.level,
            self.num_kv_blocks,
            self.block_size,
            self.max_model_len,
        )
        logger.info("start-up took %s", clock)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def facts(self) -> ModelFacts:
        """What the engine sizes its scheduler from."""
        return ModelFacts(
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=frozenset(self.eos_token_ids),
        )

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step; returns one sampled token per chunk with ``sample=True``, in plan order.

        Under tensor parallelism every rank runs the forward (the collectives
        need them all) but only rank 0 samples and answers; the others return
        an empty result, which their worker does not send.
        """
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue one step on the device; its tokens stay there until `collect`."""
        if self._fault is not None:
            fault, self._fault = self._fault, None
            raise fault
        logits, prompt_logprobs = self._forward(plan)
        sampled = [c for c in plan.chunks if c.sample]
        logprobs: list = [None] * len(sampled)
        top_logprobs: list = [None] * len(sampled)
        if self.rank == 0 and sampled:
            if any(c.token_ids[0] == PREVIOUS_TOKEN and c.sampling_params.penalized for c in sampled):
                for step in list(self._unread):  # penalties count the values of the tokens fed back
                    self._read(step)
            requests = []
            for chunk in sampled:
                history = self._histories[chunk.seq_id]
                requests.append(SampleRequest(chunk.sampling_params, history.prompt, history.output))
            tokens, logprobs, top_logprobs = self.sampler.sample_on_device(logits, requests)
        else:
            tokens = torch.zeros(len(sampled), dtype=torch.long, device=self.device)  # filled by a broadcast if fed back
        self._last_tokens = tokens
        self._last_rows = {c.seq_id: i for i, c in enumerate(sampled)}
        ready = None
        host_tokens = tokens
        if self.rank == 0 and tokens.is_cuda:
            host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host_tokens.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        step = LaunchedStep(
            step_id=plan.step_id,
            seq_ids=[c.seq_id for c in sampled],
            positions=[c.end_pos for c in sampled],
            tokens=tokens,
            host_tokens=host_tokens,
            ready=ready,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        self._unread.append(step)
        return step

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for ``step``'s tokens (on rank 0; the other ranks return an empty result at once)."""
        if self.rank != 0:
            self._unread.remove(step)
            return StepResult(
                step_id=step.step_id, token_ids=[], logprobs=[], top_logprobs=[], prompt_logprobs=step.prompt_logprobs
            )
        return StepResult(
            step_id=step.step_id,
            token_ids=self._read(step),
            logprobs=step.logprobs,
            top_logprobs=step.top_logprobs,
            prompt_logprobs=step.prompt_logprobs,
        )

    def _read(self, step: LaunchedStep) -> list[int]:
        """``step``'s tokens on the host; each also replaces the `PREVIOUS_TOKEN` that stood for it in a history."""
        if step.token_ids is None:
            if step.ready is not None:
                step.ready.synchronize()
            step.token_ids = step.host_tokens.tolist()
            histories = self._histories
            for seq_id, position, token in zip(step.seq_ids, step.positions, step.token_ids):
                history = histories.get(seq_id)
                if history is not None:
                    history.fill(position, token)
            self._unread.remove(step)
        return step.token_ids

    @torch.inference_mode()
    def compute_logits(self, plan: StepPlan) -> torch.Tensor:
        """Run one step (KV cache writes included) and return float32 logits, one row per sampled chunk."""
        return self._forward(plan)[0].clone()  # a graph's output buffer is overwritten by the next step

    def inject_fault(self, exc: BaseException) -> None:
        """Test hook: the next `execute` raises ``exc`` instead of running."""
        self._fault = exc

    def close(self) -> None:
        """Free the model and the KV cache (idempotent); the runner is unusable afterwards."""
        self.model = self.kv_cache = self.decode_graphs = self.compiled = self._model_forward = None
        self._attention_layers = []
        self._histories.clear()
        self._prompt_tails.clear()
        self._unread.clear()
        self._last_tokens, self._last_rows = torch.empty(0), {}
        if self.tp_group.size > 1:
            destroy_distributed()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one step -----------------------------------------------------------------------------------

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[list[TokenLogprobs | None] | None] | None]:
        """Logits of the sampled chunks, and the prompt logprobs column (``None`` when no chunk asks).

        The logits come from a captured graph for a decode-only batch, else
        eagerly; they may be a view of a graph's output buffer, valid until the next step.
        """
        for seq_id in plan.finished_seq_ids:
            self._histories.pop(seq_id, None)
            self._prompt_tails.pop(seq_id, None)
        if not plan.chunks:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device), None
        self._record_tokens(plan.chunks)
        batch = self._prepare_inputs(plan.chunks)
        if batch.feed_rows and self.tp_group.size > 1:  # every rank runs this plan, so every rank takes part
            self.tp_group.broadcast(self._last_tokens, src=0)
        sampled = [i for i, chunk in enumerate(plan.chunks) if chunk.sample]
        wants_prompt = any(_wants_prompt_logprobs(chunk) for chunk in plan.chunks)
        graphs = self.decode_graphs
        if (
            graphs is not None
            and batch.is_decode
            and not wants_prompt
            and len(plan.chunks) <= graphs.max_batch_size
        ):
            logits = graphs.run(
                batch.input_ids,
                batch.positions,
                batch.slot_mapping,
                batch.context_lens,
                batch.block_tables,
                feed_rows=batch.feed_rows,
                feed_sources=batch.feed_sources,
                previous_tokens=self._last_tokens,
            )
            return (logits if len(sampled) == len(plan.chunks) else logits[sampled]), None
        batch = self._feed_previous_tokens(batch.to(self.device))
        ends = _cumsum(batch.query_lens)[1:]
        hidden = self._run_model(batch)
        logits = self._logits(hidden, [ends[i] - 1 for i in sampled])
        if not wants_prompt:
            return logits, None
        prompt_logprobs = [
            self._prompt_logprobs(chunk, hidden[end - len(chunk.token_ids) : end])
            if _wants_prompt_logprobs(chunk)
            else None
            for chunk, end in zip(plan.chunks, ends)
        ]
        return logits, prompt_logprobs

    def _prompt_logprobs(self, chunk: SeqChunk, hidden: torch.Tensor) -> list[TokenLogprobs | None]:
        """Each prompt token of ``chunk`` with its logprob given the tokens before it, and the top alternatives.

        ``hidden`` holds the chunk's rows. The first entry is ``None`` for the
        prompt's first token, and also when the position before the chunk was
        never run through this runner (served from a prefix cache: the
        scheduler does not do that for requests asking for prompt logprobs).
        """
        seq_id, num_top = chunk.seq_id, chunk.sampling_params.prompt_logprobs
        num_prompt = min(chunk.end_pos, chunk.prompt_len) - chunk.start_pos
        tail = self._prompt_tails.pop(seq_id, None)
        if chunk.end_pos < chunk.prompt_len:
            self._prompt_tails[seq_id] = hidden[-1:].clone()
        if chunk.start_pos > 0 and tail is not None and chunk.prefix_token_ids is None:
            predictors = torch.cat([tail, hidden[: num_prompt - 1]])
            return self._token_logprobs(predictors, chunk.token_ids[:num_prompt], num_top)
        entries: list[TokenLogprobs | None] = [None]
        entries.extend(self._token_logprobs(hidden[: num_prompt - 1], chunk.token_ids[1:num_prompt], num_top))
        return entries

    def _token_logprobs(self, hidden: torch.Tensor, targets: list[int], num_top: int) -> list[TokenLogprobs]:
        """For each row of ``hidden``: ``targets[i]``'s logprob under it, then the ``num_top`` most likely tokens."""
        entries: list[TokenLogprobs] = []
        num_top = min(num_top, self.vocab_size)
        for lo in range(0, len(targets), _PROMPT_LOGPROBS_ROWS):
            rows = targets[lo : lo + _PROMPT_LOGPROBS_ROWS]
            logprobs = self.model.compute_logits(hidden[lo : lo + len(rows)]).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, torch.tensor(rows, device=self.device).unsqueeze(1)).squeeze(1).tolist()
            if num_top:
                values, indices = logprobs.topk(num_top, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            else:
                tops = [[] for _ in rows]
            entries.extend([(token, logprob), *top] for token, logprob, top in zip(rows, chosen, tops))
        return entries

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        # int64 spelled out: a step of unsampled prefill chunks selects no rows, and [] would be float
        hidden = hidden.index_select(0, host_to_device(torch.tensor(rows, dtype=torch.long), self.device))
        return self.model.compute_logits(hidden).float()

    def _run_model(self, batch: _Batch) -> torch.Tensor:
        """The model on ``batch``: the last layer's hidden state of every token."""
        device = self.device
        metadata = AttentionMetadata(
            cu_seqlens_q=host_to_device(torch.tensor(_cumsum(batch.query_lens), dtype=torch.int32), device),
            context_lens=batch.context_lens.to(device),
            block_tables=batch.block_tables.to(device),
            slot_mapping=batch.slot_mapping.to(device),
            query_lens_host=batch.query_lens,
            context_lens_host=batch.context_lens_host,
            block_size=self.block_size,
        )
        context = ForwardContext(metadata=metadata, attn_plan=self.backend.plan_attention(metadata))
        with forward_context(context):
            return self._model_forward(batch.input_ids.to(device), batch.positions.to(device))

    def _check_chunk(self, chunk: SeqChunk) -> None:
        end = chunk.end_pos
        if not chunk.token_ids:
            raise ValueError(f"sequence {chunk.seq_id}: a chunk must carry at least one token")
        if end > self.max_model_len:
            raise ValueError(f"sequence {chunk.seq_id}: position {end - 1} is past max_model_len {self.max_model_len}")
        if len(chunk.block_table) * self.block_size < end:
            raise ValueError(
                f"sequence {chunk.seq_id}: {len(chunk.block_table)} blocks of {self.block_size} "
                f"cannot hold {end} tokens"
            )
        if chunk.sample and chunk.sampling_params is None:
            raise ValueError(f"sequence {chunk.seq_id}: sample=True needs sampling_params")
        if chunk.token_ids[0] == PREVIOUS_TOKEN and (
            len(chunk.token_ids) != 1 or chunk.seq_id not in self._last_rows or chunk.prefix_token_ids is not None
        ):
            raise ValueError(
                f"sequence {chunk.seq_id}: PREVIOUS_TOKEN stands only for the token a decode chunk's sequence "
                "sampled in the step launched just before"
            )

    def _record_tokens(self, chunks: list[SeqChunk]) -> None:
        """Extend each sequence's token history; a (re)started sequence brings its prefix.

        Every chunk is checked before any history changes, so a rejected plan
        leaves the runner as it was.
        """
        if len({c.seq_id for c in chunks}) != len(chunks):
            raise ValueError("a plan holds at most one chunk per sequence")
        updates = []
        for chunk in chunks:
            self._check_chunk(chunk)
            history = self._histories.get(chunk.seq_id)
            if history is None or chunk.start_pos == 0 or chunk.prefix_token_ids is not None:
                prefix = chunk.prefix_token_ids or []
                if len(prefix) != chunk.start_pos:
                    raise ValueError(
                        f"sequence {chunk.seq_id} starts at position {chunk.start_pos} but the runner has "
                        f"{len(prefix)} tokens of its history (send prefix_token_ids the first time)"
                    )
                history = _SeqHistory(chunk.prompt_len)
                history.extend(prefix)
            elif len(history) != chunk.start_pos:
                raise ValueError(
                    f"sequence {chunk.seq_id}: chunk starts at {chunk.start_pos} but {len(history)} tokens came before"
                )
            updates.append((chunk, history))
        for chunk, history in updates:
            self._histories[chunk.seq_id] = history
            history.extend(chunk.token_ids)

    def _prepare_inputs(self, chunks: list[SeqChunk]) -> _Batch:
        """The flat batch, on the host: every chunk's tokens back to back, and where their KV lives."""
        query_lens = [len(c.token_ids) for c in chunks]
        context_lens = [c.start_pos + n for c, n in zip(chunks, query_lens)]
        max_blocks = max(len(c.block_table) for c in chunks)
        input_ids = torch.tensor(list(chain.from_iterable(c.token_ids for c in chunks)), dtype=torch.long)
        # A decode chunk's PREVIOUS_TOKEN is filled in on the device (see `_feed_previous_tokens`).
        fed = [i for i, c in enumerate(chunks) if c.token_ids[0] == PREVIOUS_TOKEN]
        starts = _cumsum(query_lens) if fed else []
        feed_rows = [starts[i] for i in fed]
        input_ids[feed_rows] = 0
        lowest, highest = (int(v) for v in torch.aminmax(input_ids))
        if lowest < 0 or highest >= self.vocab_size:
            raise ValueError(f"token id {highest if highest >= self.vocab_size else lowest} is outside the vocabulary")
        positions = torch.tensor(
            list(chain.from_iterable(range(c.start_pos, ctx) for c, ctx in zip(chunks, context_lens))),
            dtype=torch.long,
        )
        block_tables = torch.tensor(
            [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks], dtype=torch.int32
        )
        seq_of_token = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(query_lens))
        slot_mapping = (
            block_tables[seq_of_token, positions // self.block_size].long() * self.block_size
            + positions % self.block_size
        )
        return _Batch(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            query_lens=query_lens,
            context_lens_host=context_lens,
            feed_rows=feed_rows,
            feed_sources=[self._last_rows[chunks[i].seq_id] for i in fed],
        )

    def _feed_previous_tokens(self, batch: _Batch) -> _Batch:
        """Write into ``batch.input_ids`` (on the device) the tokens its `PREVIOUS_TOKEN` chunks stand for."""
        if batch.feed_rows:
            rows = host_to_device(torch.tensor(batch.feed_rows), self.device)
            sources = host_to_device(torch.tensor(batch.feed_sources), self.device)
            batch.input_ids.index_copy_(0, rows, self._last_tokens.index_select(0, sources))
        return batch

    # -- KV cache -----------------------------------------------------------------------------------

    def _kv_block_bytes(self) -> int:
        layer = self._attention_layers[0]
        element = torch.empty(0, dtype=self._kv_dtype()).element_size()
        return 2 * len(self._attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim * element

    def _kv_dtype(self) -> torch.dtype:
        if self.config.kv_cache_dtype not in ("auto", str(self.dtype).removeprefix("torch.")):
            raise ValueError(f"kv_cache_dtype {self.config.kv_cache_dtype!r} is not supported; use 'auto'")
        return self.dtype

    def _num_kv_blocks(self, clock: _StartupClock) -> int:
        """Blocks from ``num_kv_blocks``, else from the memory budget of the device.

        On a GPU the budget is ``gpu_memory_utilization`` of the card less
        everything else: the weights, the peak activations of the largest step
        (measured by running it), the decode CUDA graphs (measured by
        capturing the largest), and memory other processes and libraries hold.
        """
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            peak = self._profile_peak_memory()
            clock.lap("profiling")
            if self._uses_decode_graphs():
                self.graph_bytes_budgeted = self._measure_graph_memory()
                clock.lap("graph capture")
            free, total = torch.cuda.mem_get_info(self.device)
            not_torch = total - free - torch.cuda.memory_reserved(self.device)
            budget = total * self.config.gpu_memory_utilization - peak - not_torch - self.graph_bytes_budgeted
            where = f"gpu_memory_utilization={self.config.gpu_memory_utilization} of {total / 2**30:.1f} GiB"
        else:
            budget = self.config.cpu_kv_cache_space_gb * 2**30
            where = f"cpu_kv_cache_space_gb={self.config.cpu_kv_cache_space_gb}"
        blocks = int(budget // self._kv_block_bytes())
        if blocks < 1:
            raise ValueError(f"no memory left for the KV cache with {where}; raise it or set num_kv_blocks")
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB) with %s",
            blocks,
            self.block_size,
            blocks * self.block_size,
            blocks * self._kv_block_bytes() / 2**30,
            where,
        )
        return blocks

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes allocated (weights included) while running the largest step the scheduler may plan.

        That step is ``max_num_batched_tokens`` prompt tokens (split into
        sequences of at most ``max_model_len``), sampling ``max_num_seqs`` rows
        with top-k/top-p (the sampler's widest temporaries). It also compiles
        the prefill kernels before the first request.
        """
        lengths = []
        remaining = self.config.max_num_batched_tokens
        while remaining > 0:
            lengths.append(min(remaining, self.max_model_len))
            remaining -= lengths[-1]
        chunks, first_block = [], 0
        for i, length in enumerate(lengths):
            num_blocks = -(-length // self.block_size)
            table = list(range(first_block, first_block + num_blocks))
            chunks.append(
                SeqChunk(
                    seq_id=i, token_ids=[0] * length, start_pos=0, block_table=table, prompt_len=length, sample=False
                )
            )
            first_block += num_blocks
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self._allocate_kv_cache(first_block)
        num_rows = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        hidden = self._run_model(self._prepare_inputs(chunks))
        logits = self._logits(hidden, [i % sum(lengths) for i in range(num_rows)])
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        Sampler(self.eos_token_ids)(logits, [SampleRequest(params, [], [])] * num_rows)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden, logits
        self._unbind_kv_cache()
        torch.cuda.empty_cache()
        logger.info(
            "profiled a %d-token step in %.1f s: peak %.2f GiB allocated (weights and activations)",
            sum(lengths),
            time.perf_counter() - start,
            peak / 2**30,
        )
        return peak

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """One tensor ``[2, layers, *backend layout]``; each layer gets views of its K and V.

        Zeroed, because the decode path reads whole blocks, and a never-written
        slot must be finite for its (masked, zero-weight) value row to vanish.
        """
        layer = self._attention_layers[0]
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        kv = torch.zeros(2, len(self._attention_layers), *shape, dtype=self._kv_dtype(), device=self.device)
        for i, attn in enumerate(self._attention_layers):
            attn.k_cache, attn.v_cache = kv[0, i], kv[1, i]
        return kv

    def _unbind_kv_cache(self) -> None:
        for attn in self._attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)

    # -- compiling, warm-up and CUDA graphs --------------------------------------------------------

    @torch.inference_mode()
    def _compile(self) -> None:
        """Trace and compile the forward now, not at the first request.

        A 2-token step compiles the graph for any token count, a 1-token step
        Dynamo's specialization for it; both write to and read from a
        temporary one-block KV cache.
        """
        self._allocate_kv_cache(1)
        try:
            with self.compiled.tracing():
                for n in (2, 1):
                    chunk = SeqChunk(
                        seq_id=0, token_ids=[0] * n, start_pos=0, block_table=[0] * n, prompt_len=n, sample=False
                    )
                    self._run_model(self._prepare_inputs([chunk]))
        finally:
            self._unbind_kv_cache()

    def warm_up(self) -> None:
        """Run `warmup_steps`, so that the kernels' first-use compiles happen now rather than in a request.

        Every step's sequences read and write block 0 only (their block
        tables repeat it), so any KV cache of one block or more will do; the
        runner forgets the sequences afterwards. On CUDA the runner calls this
        at start, before it captures graphs (which warm up their own steps).
        """
        layer = self._attention_layers[0]
        steps = warmup_steps(
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            query_group=layer.num_heads // layer.num_kv_heads,
            decodes=not self._uses_decode_graphs(),
        )
        greedy = SamplingParams(temperature=0.0)
        random = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        seq_ids = itertools.count()
        finished = []
        for step_id, step in enumerate(steps):
            chunks = []
            for i, (query_len, context_len) in enumerate(step):
                start = context_len - query_len
                chunks.append(
                    SeqChunk(
                        seq_id=next(seq_ids),
                        token_ids=[0] * query_len,
                        start_pos=start,
                        block_table=[0] * -(-context_len // self.block_size),
                        prompt_len=context_len,
                        sample=True,
                        sampling_params=random if i % 2 else greedy,
                        prefix_token_ids=[0] * start if start else None,
                    )
                )
            finished += [c.seq_id for c in chunks]
            self.execute(StepPlan(step_id=step_id, chunks=chunks))
        self.execute(StepPlan(step_id=len(steps), chunks=[], finished_seq_ids=finished))

    def _uses_decode_graphs(self) -> bool:
        """Graphs at levels 1-3 on CUDA, with the Triton backend: the torch reference plans from device values."""
        return self.device.type == "cuda" and self.backend.name == "triton" and self.level > 0

    def _measure_graph_memory(self) -> int:
        """Bytes the decode graphs will hold: the largest batch size captured once, against a one-block KV cache.

        Every size shares the largest one's memory pool and output buffer, so
        that is what they hold together (the log of the real capture says).
        """
        self._allocate_kv_cache(1)
        largest = decode_batch_sizes(self.config.max_num_seqs)[-1]
        graphs, used = self._capture_decode_graphs([largest])
        del graphs
        self._unbind_kv_cache()
        torch.cuda.empty_cache()
        logger.info(
            "decode CUDA graphs: %.3f GiB at batch %d, set aside from the KV cache's budget",
            used / 2**30,
            largest,
        )
        return used

    @torch.inference_mode()
    def _capture_decode_graphs(self, batch_sizes: list[int]) -> tuple[DecodeGraphs, int]:
        """Graphs of the decode step at ``batch_sizes``, and the device memory they hold."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        graphs = DecodeGraphs(
            self.model,
            self._model_forward,
            self.backend,
            batch_sizes=batch_sizes,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            vocab_size=self.vocab_size,
            device=self.device,
        )
        graphs.capture()
        torch.cuda.empty_cache()  # the warm-up steps' temporaries; what stays is the graphs' own
        return graphs, torch.cuda.memory_reserved(self.device) - before


class _StartupClock:
    """Seconds per start-up phase: each `lap` charges the time since the previous one to a phase."""

    PHASES = ("model build", "weight load", "compile", "profiling", "KV allocation", "warm-up", "graph capture")

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._start = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the phase's device work counts as the phase's
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def __str__(self) -> str:
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())
        return f"{self._last - self._start:.1f} s: {phases}"


@attrs.frozen(kw_only=True)
class _Batch:
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

    def to(self, device: torch.device) -> _Batch:
        """The batch with its tensors on ``device``, copied without waiting for the device to be idle."""
        return attrs.evolve(
            self,
            input_ids=host_to_device(self.input_ids, device),
            positions=host_to_device(self.positions, device),
            slot_mapping=host_to_device(self.slot_mapping, device),
            block_tables=host_to_device(self.block_tables, device),
            context_lens=host_to_device(self.context_lens, device),
        )

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the shape CUDA graphs are captured for."""
        return len(self.query_lens) == self.input_ids.shape[0]


def _wants_prompt_logprobs(chunk: SeqChunk) -> bool:
    params = chunk.sampling_params
    return params is not None and params.prompt_logprobs is not None and chunk.start_pos < chunk.prompt_len


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _eos_token_ids(hf_config, generation_config: dict) -> frozenset[int]:
    ids: set[int] = set()
    for value in (generation_config.get("eos_token_id"), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def _max_model_len(config: EngineConfig, hf_config) -> int:
    limit = hf_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {limit}")
    return config.max_model_len


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
