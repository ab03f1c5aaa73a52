"""The model runner: one model on one device, its paged KV cache, and one step at a time.

``execute(plan)`` turns the scheduler's `StepPlan` into the flat batch every
backend consumes (`atom_trio.runner.input_batch`), runs the model, and
samples one token for each chunk that asks for it; prompt logprobs come
from the same hidden states (`atom_trio.runner.prompt_logprobs`).

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

Start-up (build, load, compile, KV sizing and allocation, warm-up, decode
graphs) is `atom_trio.runner.startup`, in the order ``__init__`` reads.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import attrs
import torch

from atom_trio._device import host_to_device
from atom_trio._phase_timers import PhaseTimers
from atom_trio.config import EngineConfig
from atom_trio.core.facts import ModelFacts
from atom_trio.core.plan import PREVIOUS_TOKEN, StepPlan, StepResult, TokenLogprobs
from atom_trio.distributed import TensorParallelGroup, destroy_distributed, init_distributed
from atom_trio.layers import CachedAttention, ForwardContext, forward_context
from atom_trio.layers.rejection_sampler import RejectionSampler, first_rows, num_accepted
from atom_trio.layers.sampler import Sampler
from atom_trio.loader.resolve import resolve_model
from atom_trio.ops import AttentionMetadata, get_backend
from atom_trio.runner import startup
from atom_trio.runner.compile import CompiledForward, effective_level, freezes_weights, use_compile_cache
from atom_trio.runner.cuda_graphs import DecodeGraphs, decode_batch_sizes
from atom_trio.runner.drafter import Drafter, DraftRequest, hidden_rows, make_drafter
from atom_trio.runner.input_batch import FlatBatch, InputBatch
from atom_trio.runner.kv_cache import KVCacheLayout, kv_cache_dtype
from atom_trio.runner.profiling import RUNNER_PHASES
from atom_trio.runner.prompt_logprobs import PromptLogprobs, wants_prompt_logprobs

logger = logging.getLogger("atom_trio.runner")


@attrs.define(kw_only=True)
class LaunchedStep:
    """A step queued on the device; `ModelRunner.collect` reads its sampled tokens."""

    step_id: int
    seq_ids: list[int]
    """The sequences that sample, in plan order (not their chunks, which the wire decoder may then reuse)..."""
    positions: list[int]
    """...the position each one's first sampled token takes..."""
    draft_token_ids: list[list[int]] | None
    """...the drafts each verifies (``None`` when no chunk has any: one token each)..."""
    propose: list[bool] | None
    """...and whether each asks for drafts (``None`` when none does)..."""
    sampling_params: list | None
    """...with its sampling parameters (``None`` when none asks)."""
    tokens: torch.Tensor
    """Their tokens on the device, one per row (rank 0; other ranks hold them only to feed the next step)."""
    host_tokens: torch.Tensor
    """The same tokens, copied to (pinned) host memory once ``ready``."""
    ready: torch.cuda.Event | None
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None
    token_ids: list[int] | None = None
    """The tokens as a list, once read."""
    hidden: tuple[torch.Tensor, list[int]] | None = None
    """The target's hidden states a drafter reads (`hidden_rows`), and how many rows each sampling chunk has."""


class ModelRunner:
    """Runs a model's forward passes and sampling for the scheduler's step plans.

    Attributes that the engine sizes its scheduler from: ``num_kv_blocks``,
    ``block_size``, ``max_model_len``, ``vocab_size``, ``eos_token_ids``.
    """

    def __init__(
        self, config: EngineConfig, *, rank: int = 0, world_size: int = 1, companion_pids: tuple[int, ...] = ()
    ) -> None:
        """``companion_pids``: processes whose CPU time counts as this runner's when it sizes its CPU threads
        (a worker's engine: `CpuThreads`)."""
        clock = startup.StartupClock()
        self.config = config
        self.rank = rank
        self.tp_group = TensorParallelGroup(rank=rank, size=world_size)
        self.device = startup.pick_device(config.device, self.tp_group)
        clock.device = self.device  # phases end when the device has finished their work
        resolved = resolve_model(config)
        self.hf_config = resolved.hf_config
        self.dtype = resolved.dtype
        kv_dtype = kv_cache_dtype(config, self.dtype)  # before the build: a mismatch costs no weight load
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = startup.eos_token_ids(self.hf_config, resolved.generation_config)
        self.max_model_len = startup.max_model_len(config, self.hf_config)
        self.block_size = config.block_size
        self.backend = get_backend(config.kernel_backend, self.device)
        self.level = effective_level(config, self.device)
        torch.manual_seed(config.seed)

        self.model = startup.build_model(
            resolved,
            self.device,
            self.backend,
            level=self.level,
            tp_group=self.tp_group,
            expert_parallel=config.enable_expert_parallel,
        )
        # Only now: a model that cannot be split fails on every rank at once instead of in the rendezvous.
        init_distributed(self.tp_group, self.device, timeout_s=config.worker_timeout)
        self.cpu_threads = startup.cpu_threads(config, self.device, self.tp_group, companion_pids)
        """Moves torch's threads with the cores other processes leave free; None off the CPU or with a fixed count."""
        clock.lap("model build")
        startup.load_weights(
            self.model, resolved, seed=config.seed, device=self.device, level=self.level, progress=rank == 0
        )
        clock.lap("weight load")

        self.sampler = Sampler(self.eos_token_ids, backend=self.backend)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.drafter: Drafter | None = None if config.speculative_config is None else make_drafter(self)
        """Proposes the drafts sequences ask for (`SeqChunk.propose_drafts`); None without speculative decoding."""
        self._draft_probs: dict[int, torch.Tensor] = {}
        """The distribution each sequence's pending drafts were drawn from, where its drafter has one."""
        self._step_hidden: tuple[torch.Tensor, list[int]] | None = None
        self._taps: torch.Tensor | None = None
        """The last forward's tapped layer inputs, where the drafter has the model return them (EAGLE-3)."""
        self._prompt_logprobs = PromptLogprobs(vocab_size=self.vocab_size, device=self.device)
        self._unread: deque[LaunchedStep] = deque()
        """Launched steps whose tokens the host has not read, oldest first."""
        self.phases = PhaseTimers(RUNNER_PHASES)
        """Host time of each step's phases (`RUNNER_PHASES`), always on."""
        self.kv_layout = KVCacheLayout(
            layers=[m for m in self.model.modules() if isinstance(m, CachedAttention)],
            block_size=self.block_size,
            dtype=kv_dtype,
            device=self.device,
        )
        self.inputs = InputBatch(
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            device=self.device,
            kv_cache_windows=self.kv_layout.windows,
        )
        self.decode_graphs: DecodeGraphs | None = None
        self.compiled: CompiledForward | None = None
        self.model_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.model
        """The model's forward as steps run it: compiled at ``level`` 1-3."""
        use_compile_cache()  # before anything compiles: Inductor, and the backend's Triton kernels
        if self.level > 0:
            self.compiled = self.model_forward = CompiledForward(
                self.model, self.level, freeze=freezes_weights(self.device, self.level)
            )
            startup.compile_forward(self)
            clock.lap("compile")
        self.num_kv_blocks, self.graph_bytes_budgeted = startup.size_kv_cache(self, clock)
        self.kv_cache = self.kv_layout.allocate(self.num_kv_blocks)
        self.inputs.null_block = self.num_kv_blocks  # the page past the pool (several KV cache groups only)
        self.kv_layout.log_groups(self.num_kv_blocks, self.max_model_len)
        clock.lap("KV allocation")
        self.warm_up()
        clock.lap("warm-up")
        self.graph_bytes = 0
        """Device memory the decode graphs hold (``graph_bytes_budgeted``: what sizing the KV cache set aside)."""
        if startup.uses_decode_graphs(self):
            sizes = decode_batch_sizes(config.max_num_seqs)
            self.decode_graphs, self.graph_bytes = startup.capture_decode_graphs(self, sizes)
            logger.info(
                "decode CUDA graphs hold %.3f GiB (%.3f GiB was set aside)",
                self.graph_bytes / 2**30,
                self.graph_bytes_budgeted / 2**30,
            )
            clock.lap("graph capture")
        self.phases.clear()  # the warm-up's and the captures' steps are no steps of the engine's
        self.startup_seconds = clock.seconds
        """Seconds spent in each start-up phase (also logged)."""
        startup.log_ready(self, clock)

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
            kv_cache_windows=self.kv_layout.windows,
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
        if self.cpu_threads is not None:
            self.cpu_threads.adjust()
        started = time.perf_counter_ns()
        logits, prompt_logprobs = self._forward(plan)
        started = self.phases.since("forward", started)
        sampled = [c for c in plan.chunks if c.sample]
        drafts = _drafts(sampled)
        num_rows = len(sampled) if drafts is None else len(sampled) + sum(map(len, drafts))
        logprobs: list = [None] * num_rows
        top_logprobs: list = [None] * num_rows
        if self.rank == 0 and sampled:
            if any(c.token_ids[0] == PREVIOUS_TOKEN and c.sampling_params.penalized for c in sampled):
                for step in list(self._unread):  # penalties count the values of the tokens fed back
                    self._read(step)
            requests = self.inputs.sample_requests(sampled)
            if drafts is None:
                tokens, logprobs, top_logprobs = self.sampler.sample_on_device(logits, requests, plan.token_bitmask)
            else:
                probs = [self._draft_probs.pop(c.seq_id, None) for c in sampled]
                tokens, logprobs, top_logprobs = self.rejection_sampler.sample(
                    logits, requests, drafts, plan.token_bitmask, probs
                )
            self.phases.since("sample", started)
        else:
            tokens = torch.zeros(num_rows, dtype=torch.long, device=self.device)  # filled by a broadcast if fed back
        # The next plan's PREVIOUS_TOKEN chunks take a chunk's first token (a verifying sequence is never one of them).
        firsts = tokens if drafts is None else tokens[host_to_device(torch.tensor(first_rows(drafts)), self.device)]
        self.inputs.keep_sampled(firsts, sampled)
        host_tokens, ready = self._copy_to_host(tokens)
        step = LaunchedStep(
            step_id=plan.step_id,
            seq_ids=[c.seq_id for c in sampled],
            positions=[c.end_pos - c.num_draft_tokens for c in sampled],
            draft_token_ids=drafts,
            propose=[c.propose_drafts for c in sampled] if any(c.propose_drafts for c in sampled) else None,
            sampling_params=[c.sampling_params for c in sampled] if any(c.propose_drafts for c in sampled) else None,
            tokens=tokens,
            host_tokens=host_tokens,
            ready=ready,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
            hidden=self._step_hidden,
        )
        self._unread.append(step)
        return step

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for ``step``'s tokens (on rank 0; the other ranks return an empty result at once).

        With drafts, each verifying chunk keeps the target's tokens up to the
        first that differs from its draft (`num_accepted`). Then the drafter
        proposes for the chunks that ask.
        """
        if self.rank != 0:
            self._unread.remove(step)
            return StepResult(
                step_id=step.step_id, token_ids=[], logprobs=[], top_logprobs=[], prompt_logprobs=step.prompt_logprobs
            )
        token_ids, logprobs, top_logprobs, num_tokens = self._read(step), step.logprobs, step.top_logprobs, None
        if step.draft_token_ids is not None:
            kept: list[int] = []
            num_tokens = []
            row = 0
            for drafts in step.draft_token_ids:
                num_tokens.append(1 + num_accepted(token_ids[row : row + len(drafts)], drafts))
                kept.extend(range(row, row + num_tokens[-1]))
                row += len(drafts) + 1
            token_ids = [token_ids[i] for i in kept]
            logprobs = [logprobs[i] for i in kept]
            top_logprobs = [top_logprobs[i] for i in kept]
        return StepResult(
            step_id=step.step_id,
            token_ids=token_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=step.prompt_logprobs,
            num_tokens=num_tokens,
            draft_token_ids=None if step.propose is None else self._propose(step, token_ids, num_tokens),
        )

    def _propose(self, step: LaunchedStep, token_ids: list[int], num_tokens: list[int] | None) -> list[list[int]]:
        """The drafter's proposals for the sampling chunks of ``step`` that ask, given the tokens they produced."""
        histories = self.inputs.histories
        asking: list[int] = []
        requests: list[DraftRequest] = []
        start = row = 0
        for i, (seq_id, position) in enumerate(zip(step.seq_ids, step.positions)):
            count = 1 if num_tokens is None else num_tokens[i]
            history = histories.get(seq_id)
            num_drafts = 0 if step.draft_token_ids is None else len(step.draft_token_ids[i])
            hidden = None
            if step.hidden is not None:  # the rows of the positions that produced the kept tokens
                num_rows = step.hidden[1][i]
                hidden = step.hidden[0][row : row + max(0, num_rows - num_drafts - 1 + count)]
                row += num_rows
            # A sequence that asks is in no later plan, so its history ends with this chunk.
            if step.propose[i] and history is not None and len(history) == position + num_drafts:
                asking.append(i)
                context = history.tokens(position) + token_ids[start : start + count]
                requests.append(DraftRequest(seq_id, context, history.prompt_len, step.sampling_params[i], hidden))
            start += count
        proposals: list[list[int]] = [[] for _ in step.seq_ids]
        if asking and self.drafter is not None:
            proposal = self.drafter.propose(requests)
            for i, drafts, probs in zip(asking, proposal.token_ids, proposal.draft_probs):
                proposals[i] = drafts
                if probs is None:
                    self._draft_probs.pop(step.seq_ids[i], None)
                else:
                    self._draft_probs[step.seq_ids[i]] = probs
        return proposals

    @torch.inference_mode()
    def compute_logits(self, plan: StepPlan) -> torch.Tensor:
        """Run one step (KV cache writes included) and return float32 logits, one row per sampled chunk."""
        return self._forward(plan)[0].clone()  # a graph's output buffer is overwritten by the next step

    def warm_up(self) -> None:
        """Run the start-up warm-up steps (see `atom_trio.runner.startup.warm_up`); the runner forgets them after.

        The runner calls this at start, before it captures graphs (which warm
        up their own steps).
        """
        startup.warm_up(self)

    def close(self) -> None:
        """Free the model and the KV cache (idempotent); the runner is unusable afterwards."""
        self.model = self.kv_cache = self.decode_graphs = self.compiled = self.model_forward = self.drafter = None
        self.kv_layout.layers = []
        self.inputs.clear()
        self._prompt_logprobs.clear()
        self._unread.clear()
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
        self.inputs.forget(plan.finished_seq_ids)
        self._prompt_logprobs.forget(plan.finished_seq_ids)
        self._step_hidden = None
        if self.drafter is not None:
            self.drafter.forget(plan.finished_seq_ids)
            for seq_id in plan.finished_seq_ids:
                self._draft_probs.pop(seq_id, None)
        if not plan.chunks:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device), None
        started = time.perf_counter_ns()
        self.inputs.record(plan.chunks)
        batch = self.inputs.prepare(plan.chunks)
        self.phases.since("inputs", started)
        if batch.feed_rows and self.tp_group.size > 1:  # every rank runs this plan, so every rank takes part
            self.tp_group.broadcast(self.inputs.last_tokens, src=0)
        sampled = [i for i, chunk in enumerate(plan.chunks) if chunk.sample]
        wants_prompt = any(wants_prompt_logprobs(chunk) for chunk in plan.chunks)
        graphs = self.decode_graphs
        window = 0 if self.drafter is None else self.drafter.hidden_window
        if (
            graphs is not None
            and not window  # a graph keeps no hidden states for the drafter
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
                previous_tokens=self.inputs.last_tokens,
                windowed=batch.windowed,
            )
            return (logits if len(sampled) == len(plan.chunks) else logits[sampled]), None
        batch = self.inputs.feed_previous_tokens(batch.to(self.device))
        ends = batch.cu_query_lens[1:]
        hidden = self.run_model(batch)
        if window:
            kept, counts = hidden_rows(plan.chunks, batch.cu_query_lens, window)
            kept = host_to_device(torch.tensor(kept, dtype=torch.long), self.device)
            features = hidden if self._taps is None else self._taps
            self._step_hidden = features.index_select(0, kept), counts
        # A chunk with j drafts samples at its last j + 1 positions (verify steps run eagerly: graphs hold decodes).
        chunks = plan.chunks
        rows = [row for i in sampled for row in range(ends[i] - 1 - chunks[i].num_draft_tokens, ends[i])]
        logits = self.logits(hidden, rows)
        if not wants_prompt:
            return logits, None
        return logits, self._prompt_logprobs.column(self.model.compute_logits, plan.chunks, hidden, ends)

    def run_model(self, batch: FlatBatch) -> torch.Tensor:
        """The model on ``batch``: the last layer's hidden state of every token (the taps a drafter asked for: ``_taps``)."""
        device = self.device
        metadata = AttentionMetadata(
            cu_seqlens_q=host_to_device(torch.tensor(batch.cu_query_lens, dtype=torch.int32), device),
            context_lens=batch.context_lens.to(device),
            block_tables=batch.block_tables.to(device),
            slot_mapping=batch.slot_mapping.to(device),
            query_lens_host=batch.query_lens,
            context_lens_host=batch.context_lens_host,
            block_size=self.block_size,
        )
        windowed = []
        for block_tables, slot_mapping in batch.windowed:  # further KV cache groups: their own tables and slots
            group = attrs.evolve(metadata, block_tables=block_tables.to(device), slot_mapping=slot_mapping.to(device))
            windowed.append(ForwardContext(metadata=group, attn_plan=self.backend.plan_attention(group)))
        plan = self.backend.plan_attention(metadata)
        context = ForwardContext(metadata=metadata, attn_plan=plan, windowed=tuple(windowed))
        with forward_context(context):
            out = self.model_forward(batch.input_ids.to(device), batch.positions.to(device))
        hidden, self._taps = out if isinstance(out, tuple) else (out, None)
        return hidden

    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Float32 logits of ``hidden``'s ``rows``."""
        # int64 spelled out: a step of unsampled prefill chunks selects no rows, and [] would be float
        hidden = hidden.index_select(0, host_to_device(torch.tensor(rows, dtype=torch.long), self.device))
        return self.model.compute_logits(hidden).float()

    def _copy_to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``tokens`` on their way to pinned host memory (rank 0 on CUDA), and the event that marks them there."""
        if self.rank != 0 or not tokens.is_cuda:
            return tokens, None
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host_tokens, ready

    def _read(self, step: LaunchedStep) -> list[int]:
        """``step``'s tokens on the host; each also replaces the `PREVIOUS_TOKEN` that stood for it in a history."""
        if step.token_ids is None:
            if step.ready is not None:
                started = time.perf_counter_ns()
                step.ready.synchronize()
                self.phases.since("wait", started)
            step.token_ids = step.host_tokens.tolist()
            drafts = step.draft_token_ids
            firsts = step.token_ids if drafts is None else [step.token_ids[row] for row in first_rows(drafts)]
            self.inputs.fill(step.seq_ids, step.positions, firsts)
            self._unread.remove(step)
        return step.token_ids


def _drafts(sampled: list) -> list[list[int]] | None:
    """The drafts of each sampling chunk (the last ``num_draft_tokens`` of its tokens); None when none has any."""
    if not any(c.num_draft_tokens for c in sampled):
        return None
    return [c.token_ids[len(c.token_ids) - c.num_draft_tokens :] for c in sampled]
