"""Start-up: the phases that take a runner from a config to its first step, and the clock that times them.

Build the model, load its weights, compile the forward (``level`` 1-3, see
`atom_trio.runner.compile`), profile the largest step and capture the largest
decode graph once (on CUDA: both are subtracted from the KV cache's budget,
see `atom_trio.runner.kv_cache`), allocate the KV cache, warm the kernels up
and capture the decode graphs (CUDA). `ModelRunner.__init__` runs them in
that order; one log line reports the seconds of each at the end.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.distributed import TensorParallelGroup, use_tp_group
from atom_trio.errors import ModelLoadError
from atom_trio.layers import take_kv_scales
from atom_trio.layers.moe import use_expert_parallel
from atom_trio.layers.quantization import finish_quantized_layers, quantize_linear_layers, use_quant_config
from atom_trio.layers.sampler import SampleRequest, Sampler
from atom_trio.loader.weights import draw_dummy_quantized, iter_weights
from atom_trio.models import get_model_class
from atom_trio.ops import KernelBackend, use_backend
from atom_trio.runner.compile import freezes_weights, steps_within, warmup_steps
from atom_trio.runner.cpu_threads import CpuThreads
from atom_trio.runner.cuda_graphs import DecodeGraphs, decode_batch_sizes
from atom_trio.runner.kv_cache import cpu_budget, gpu_budget
from atom_trio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from atom_trio.loader.resolve import ResolvedModel
    from atom_trio.runner.model_runner import ModelRunner

logger = logging.getLogger("atom_trio.runner")


class StartupClock:
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
        if now - self._last > 1.0:  # a long phase says so as it ends, not only in the summary
            logger.info("%s took %.1f s", phase, now - self._last)
        self._last = now

    def __str__(self) -> str:
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())
        return f"{self._last - self._start:.1f} s: {phases}"


# -- the model ----------------------------------------------------------------------------------------


def pick_device(name: str, tp_group: TensorParallelGroup) -> torch.device:
    """The device ``name`` names for this rank ("auto": CUDA when there is one); one GPU per rank."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if tp_group.size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", tp_group.rank)
    if device.type == "cuda":
        # A GPU step's host work is small tensors: torch's intra-op threads would only spin against each
        # other and against the other ranks' workers (docs/performance.md, tensor parallelism).
        torch.set_num_threads(1)
    return device


def cpu_threads(
    config: EngineConfig, device: torch.device, tp_group: TensorParallelGroup, companions: tuple[int, ...]
) -> CpuThreads | None:
    """Fix torch's threads for a CPU model, or the governor that moves them with the free cores (``cpu_threads=0``).

    Under tensor parallelism each rank keeps its share of the cores (`init_distributed`): moving one rank's
    threads would need its sibling ranks' CPU time too.
    """
    if device.type != "cpu":
        return None
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
        return None
    return CpuThreads.for_this_process(companions=companions) if tp_group.size == 1 else None


def eos_token_ids(hf_config, generation_config: dict) -> frozenset[int]:
    ids: set[int] = set()
    for value in (generation_config.get("eos_token_id"), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def max_model_len(config: EngineConfig, hf_config) -> int:
    limit = hf_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {limit}")
    return config.max_model_len


def build_model(
    resolved: ResolvedModel,
    device: torch.device,
    backend: KernelBackend,
    *,
    level: int,
    tp_group: TensorParallelGroup,
    expert_parallel: bool,
) -> torch.nn.Module:
    """The model's modules on ``device`` in the model's dtype, weights not loaded yet."""
    model_class = get_model_class(resolved.hf_config)
    # Layers of a model torch.compile traces call their elementwise kernels as ops dynamo does not trace into.
    layer_ops = backend.traced() if level > 0 else backend
    try:
        with (
            _default_dtype(resolved.dtype),
            device,
            use_backend(layer_ops),
            use_tp_group(tp_group),
            use_expert_parallel(expert_parallel),
            use_quant_config(resolved.quant_config),
        ):
            model = model_class(resolved.hf_config)
            quantize_linear_layers(model, resolved.quant_config)
            return model
    except ValueError as exc:  # a config feature the implementation lacks (rope type, activation, a TP split...)
        raise ModelLoadError(f"cannot build {model_class.__name__} from {resolved.path}: {exc}") from exc


def load_weights(
    model: torch.nn.Module, resolved: ResolvedModel, *, seed: int, device: torch.device, level: int, progress: bool
) -> None:
    """Load the weights and put the model in eval mode, its weights laid out for the kernels that read them.

    ``progress``: show a progress bar on a terminal (one rank's).
    """
    with torch.no_grad():
        keep = getattr(model, "keep_in_float32", ())
        weights = iter_weights(resolved, seed=seed, device=device, keep_in_float32=keep, progress=progress)
        with dummy_quantized(model, resolved, seed) as weights_filter:
            weights = filter(weights_filter, weights)
            model.load_weights(take_kv_scales(model, weights))  # the FP8 KV cache's scales go to the attention layers
        finish_quantized_layers(model)  # into the kernels' layout, or dequantized
    model.eval()
    if not freezes_weights(device, level):  # Inductor packs frozen weights itself
        for module in model.modules():  # e.g. CPU matmul weight packing
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()


@contextlib.contextmanager
def dummy_quantized(
    model: torch.nn.Module, resolved: ResolvedModel, seed: int
) -> Iterator[Callable[[tuple[str, torch.Tensor]], bool]]:
    """Dummy weights for a quantized model: which dense dummy tensors to load, while the quantized ones are drawn.

    The quantized parameters get their contents in place (`draw_dummy_quantized`) and are set aside while
    the model loads, so that its check that every parameter was loaded does not count them; the dense
    checkpoint's tensors of layers held quantized (whose dense weight is no parameter here) are left out.
    Any other model loads every tensor, as from a real checkpoint.
    """
    if resolved.load_format != "dummy" or resolved.quant_config is None:
        yield lambda item: True
        return
    set_aside = []
    for name in draw_dummy_quantized(model, seed=seed):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        set_aside.append((module, leaf, module._parameters.pop(leaf)))
    params = dict(model.named_parameters())

    def fits(item: tuple[str, torch.Tensor]) -> bool:
        target = model.checkpoint_target(item[0])
        return target is None or target[0] in params

    try:
        yield fits
    finally:
        for module, leaf, param in set_aside:
            module._parameters[leaf] = param


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# -- compiling, KV sizing, warm-up and CUDA graphs -------------------------------------------------------


@torch.inference_mode()
def compile_forward(runner: ModelRunner) -> None:
    """Trace and compile the runner's forward now, not at the first request.

    A 2-token step compiles the graph for any token count, a 1-token step
    Dynamo's specialization for it; both write to and read from a
    temporary one-block KV cache.
    """
    runner.kv_layout.allocate(1)
    try:
        with runner.compiled.tracing():
            for n in (2, 1):
                chunk = SeqChunk(
                    seq_id=0,
                    token_ids=[0] * n,
                    start_pos=0,
                    block_table=runner.inputs.table_for_groups([0] * n),
                    prompt_len=n,
                    sample=False,
                )
                runner.run_model(runner.inputs.prepare([chunk]))
    finally:
        runner.kv_layout.unbind()


def size_kv_cache(runner: ModelRunner, clock: StartupClock) -> tuple[int, int]:
    """KV blocks from ``num_kv_blocks``, else from the memory budget of the device; and the graphs' bytes set aside.

    On a GPU the budget leaves out the peak of the largest step (measured by
    running it) and the decode CUDA graphs (measured by capturing the largest).
    """
    config = runner.config
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks, 0
    graph_bytes = 0
    if runner.device.type == "cuda":
        peak = profile_peak_memory(runner)
        clock.lap("profiling")
        if uses_decode_graphs(runner):
            graph_bytes = measure_graph_memory(runner)
            clock.lap("graph capture")
        budget, where = gpu_budget(config, runner.device, peak=peak, graph_bytes=graph_bytes)
    else:
        budget, where = cpu_budget(config)
    return runner.kv_layout.blocks_within(budget, where), graph_bytes


@torch.inference_mode()
def profile_peak_memory(runner: ModelRunner) -> int:
    """Peak bytes allocated (weights included) while running the largest step the scheduler may plan.

    That step is ``max_num_batched_tokens`` prompt tokens (split into
    sequences of at most ``max_model_len``), sampling ``max_num_seqs`` rows
    with top-k/top-p (the sampler's widest temporaries). It also compiles
    the prefill kernels before the first request.
    """
    config, device, block_size = runner.config, runner.device, runner.block_size
    lengths = []
    remaining = config.max_num_batched_tokens
    while remaining > 0:
        lengths.append(min(remaining, runner.max_model_len))
        remaining -= lengths[-1]
    chunks, first_block = [], 0
    for i, length in enumerate(lengths):
        num_blocks = -(-length // block_size)
        table = list(range(first_block, first_block + num_blocks))
        chunks.append(
            SeqChunk(
                seq_id=i,
                token_ids=[0] * length,
                start_pos=0,
                block_table=runner.inputs.table_for_groups(table),
                prompt_len=length,
                sample=False,
            )
        )
        first_block += num_blocks
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner.kv_layout.allocate(first_block)
    num_rows = min(config.max_num_seqs, config.max_num_batched_tokens)
    hidden = runner.run_model(runner.inputs.prepare(chunks))
    logits = runner.logits(hidden, [i % sum(lengths) for i in range(num_rows)])
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    Sampler(runner.eos_token_ids, backend=runner.backend)(logits, [SampleRequest(params, [], [])] * num_rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, logits
    runner.kv_layout.unbind()
    torch.cuda.empty_cache()
    logger.info(
        "profiled a %d-token step in %.1f s: peak %.2f GiB allocated (weights and activations)",
        sum(lengths),
        time.perf_counter() - start,
        peak / 2**30,
    )
    return peak


CPU_WARMUP_STEPS = [[(4, 4)], [(1, 5), (1, 8)]]
"""A prompt, then decodes: every CPU kernel runs once (the first builds or loads the compiled library)."""


def warm_up(runner: ModelRunner) -> None:
    """Run warm-up steps, so that the kernels' first-use compiles happen now rather than in a request.

    On CUDA `warmup_steps`, one per Triton kernel variant; on the CPU
    `CPU_WARMUP_STEPS`. Every step's sequences read and write block 0 only
    (their block tables repeat it), so any KV cache of one block or more
    will do; the runner forgets the sequences afterwards.
    """
    layer = runner.kv_layout.layers[0]
    limits = dict(
        max_model_len=runner.max_model_len,
        max_num_seqs=runner.config.max_num_seqs,
        max_num_batched_tokens=runner.config.max_num_batched_tokens,
    )
    if runner.device.type != "cuda":
        steps = steps_within(CPU_WARMUP_STEPS, **limits)
    else:
        steps = warmup_steps(
            block_size=runner.block_size,
            query_group=layer.num_heads // layer.num_kv_heads,
            decodes=not uses_decode_graphs(runner),
            **limits,
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
                    block_table=runner.inputs.table_for_groups([0] * -(-context_len // runner.block_size)),
                    prompt_len=context_len,
                    sample=True,
                    sampling_params=random if i % 2 else greedy,
                    prefix_token_ids=[0] * start if start else None,
                )
            )
        finished += [c.seq_id for c in chunks]
        runner.execute(StepPlan(step_id=step_id, chunks=chunks))
    runner.execute(StepPlan(step_id=len(steps), chunks=[], finished_seq_ids=finished))


def uses_decode_graphs(runner: ModelRunner) -> bool:
    """Graphs at levels 1-3 on CUDA, with a backend whose steps can be captured (`KernelBackend.supports_cuda_graphs`),
    unless a drafter reads the target's hidden states (a graph keeps none, so its steps never run one)."""
    reads_hidden = runner.drafter is not None and runner.drafter.hidden_window > 0
    return runner.device.type == "cuda" and runner.backend.supports_cuda_graphs and runner.level > 0 and not reads_hidden


def measure_graph_memory(runner: ModelRunner) -> int:
    """Bytes the decode graphs will hold: the largest batch size captured once, against a one-block KV cache.

    Every size shares the largest one's memory pool and output buffer, so
    that is what they hold together (the log of the real capture says).
    """
    runner.kv_layout.allocate(1)
    largest = decode_batch_sizes(runner.config.max_num_seqs)[-1]
    graphs, used = capture_decode_graphs(runner, [largest])
    del graphs
    runner.kv_layout.unbind()
    torch.cuda.empty_cache()
    logger.info(
        "decode CUDA graphs: %.3f GiB at batch %d, set aside from the KV cache's budget",
        used / 2**30,
        largest,
    )
    return used


@torch.inference_mode()
def capture_decode_graphs(runner: ModelRunner, batch_sizes: list[int]) -> tuple[DecodeGraphs, int]:
    """Graphs of ``runner``'s decode step at ``batch_sizes``, and the device memory they hold."""
    device = runner.device
    torch.cuda.synchronize(device)
    # Garbage left in reference cycles (an earlier runner in this process, say) would otherwise be
    # collected during the capture and its freed blocks reused, hiding the graphs' memory from the count.
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    graphs = DecodeGraphs(
        runner.model,
        runner.model_forward,
        runner.backend,
        batch_sizes=batch_sizes,
        max_model_len=runner.max_model_len,
        block_size=runner.block_size,
        vocab_size=runner.vocab_size,
        device=device,
        num_kv_groups=len(runner.kv_layout.windows),
    )
    graphs.capture()
    torch.cuda.empty_cache()  # the warm-up steps' temporaries; what stays is the graphs' own
    return graphs, torch.cuda.memory_reserved(device) - before


def log_ready(runner: ModelRunner, clock: StartupClock) -> None:
    """The two lines that end start-up: what runs where, and the seconds of each phase."""
    logger.info(
        "model runner on %s: %s %s, kernels %s, level %d, %d KV blocks of %d tokens, max_model_len %d",
        runner.device,
        type(runner.model).__name__,
        runner.dtype,
        runner.backend.name,
        runner.level,
        runner.num_kv_blocks,
        runner.block_size,
        runner.max_model_len,
    )
    logger.info("start-up took %s", clock)
    if runner.device.type == "cpu" and runner.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # Without avx512_bf16 or AMX every bfloat16 matmul converts in software: on a 2-core AVX2 box float32
        # prefilled 4.4x and decoded a batch of 32 3x faster (batch 1 decodes 1.7x slower: twice the bytes).
        logger.warning(
            "this CPU has no native bfloat16 matmul: --dtype float32 serves batches and prefills several times "
            "faster here (at twice the memory)"
        )
