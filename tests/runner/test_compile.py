"""torch.compile levels on the CPU: the compiled forward decodes the same greedy tokens as eager.

Each compiled runner sees a prefill, then decode steps at batch 1 and batch
3, so both the token-count-1 graph and the dynamic one run. Compiling takes
tens of seconds on two cores, so each level compiles once: levels 1-3 on a
tiny Llama in float32, and level 3 on the default model in bfloat16 (where
oneDNN's packed weights come in). All of this module's runners compile into
one fresh cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.sampling_params import SamplingParams
from atom_trio.loader import load_tokenizer
from atom_trio.ops import TracedOps
from atom_trio.runner import ModelRunner
from atom_trio.runner.compile import PiecewiseBackend, compile_cache_dir, warmup_steps

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
STEPS = 4


def greedy_tokens(runner: ModelRunner, prompts: list[list[int]], first_seq_id: int) -> list[list[int]]:
    """``STEPS`` greedy tokens for each prompt, decoded together as one batch (sequence ids not used before)."""
    blocks_per_seq = -(-(max(map(len, prompts)) + STEPS) // runner.block_size)
    seq_ids = range(first_seq_id, first_seq_id + len(prompts))
    tables = {s: list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i, s in enumerate(seq_ids)}
    outputs: list[list[int]] = [[] for _ in prompts]
    tokens, starts = prompts, [0] * len(prompts)
    for step in range(STEPS):
        chunks = [
            SeqChunk(
                seq_id=s,
                token_ids=t,
                start_pos=start,
                block_table=tables[s],
                prompt_len=len(p),
                sample=True,
                sampling_params=GREEDY,
            )
            for s, t, start, p in zip(seq_ids, tokens, starts, prompts)
        ]
        result = runner.execute(StepPlan(step_id=step, chunks=chunks, finished_seq_ids=[]))
        starts = [start + len(t) for start, t in zip(starts, tokens)]
        tokens = [[t] for t in result.token_ids]
        for out, t in zip(outputs, result.token_ids):
            out.append(t)
    return outputs


def decode(runner: ModelRunner, prompts: list[list[int]]) -> list[list[list[int]]]:
    """One prompt alone (batch-1 decode), then all three together."""
    return [greedy_tokens(runner, prompts[:1], 0), greedy_tokens(runner, prompts, 1)]


def start_runner(model: Path, level: int, dtype: str = "float32") -> ModelRunner:
    """float32 for the tiny random model, whose flat logits have near-ties that bfloat16 rounding may flip."""
    return ModelRunner(EngineConfig(model=str(model), dtype=dtype, num_kv_blocks=32, block_size=16, level=level))


def cached_kernels() -> set[Path]:
    """The C++ kernels Inductor generated and compiled (source and library) in the cache directory.

    On the CPU Inductor freezes the weights and packs them for oneDNN, and
    its whole-graph cache refuses packed weights (they do not pickle): what a
    second start reuses is these, the slow part (a C++ compile each).
    """
    root = compile_cache_dir() / "inductor"
    return {p.relative_to(root) for p in root.rglob("*") if p.suffix in (".cpp", ".so")}


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_cache(tmp_path_factory, tiny_llama_dir):
    """The module's runners compile into an empty atom_trio cache (models are passed by path, already made).

    A compiling runner points Inductor and Triton at it through the
    environment; their previous settings come back afterwards.
    """
    names = ("ATOM_TRIO_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["ATOM_TRIO_CACHE"] = str(tmp_path_factory.mktemp("atom_trio_cache"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def tiny_prompts(tiny_llama_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(EngineConfig(model=str(tiny_llama_dir)))
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_eager_tokens(tiny_llama_dir, tiny_prompts) -> list[list[list[int]]]:
    runner = start_runner(tiny_llama_dir, 0)
    try:
        return decode(runner, tiny_prompts)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def tiny_level3(tiny_llama_dir) -> tuple[ModelRunner, set[Path]]:
    """A level-3 runner on the tiny Llama, and the kernels in the cache right after its (first) start."""
    runner = start_runner(tiny_llama_dir, 3)
    yield runner, cached_kernels()
    runner.close()


def test_default_level_on_cpu_is_eager(default_model_dir) -> None:
    config = EngineConfig(model=str(default_model_dir), load_format="dummy", num_kv_blocks=8, block_size=16)
    runner = ModelRunner(config)
    try:
        assert runner.level == 0
        assert runner.compiled is None
        assert runner.model.model.norm.ops is runner.backend
    finally:
        runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("level", [1, 2])
def test_compiled_greedy_tokens_match_eager(level, tiny_llama_dir, tiny_prompts, tiny_eager_tokens) -> None:
    runner = start_runner(tiny_llama_dir, level)
    try:
        assert isinstance(runner.model.model.norm.ops, TracedOps)
        assert decode(runner, tiny_prompts) == tiny_eager_tokens
    finally:
        runner.close()


@pytest.mark.slow
def test_piecewise_splits_at_attention_and_matches_eager(tiny_level3, tiny_prompts, tiny_eager_tokens) -> None:
    runner, _ = tiny_level3
    backend = runner.compiled.backend
    assert isinstance(backend, PiecewiseBackend)
    layers = runner.hf_config.num_hidden_layers
    # Compiled at start: the graph for any token count and the one for a single token, each in layers + 1 pieces.
    assert backend.pieces == [layers + 1] * 2
    assert decode(runner, tiny_prompts) == tiny_eager_tokens
    assert backend.pieces == [layers + 1] * 2  # no step compiled again


@pytest.mark.slow
def test_second_start_reuses_the_compile_cache(tiny_level3, tiny_llama_dir) -> None:
    from torch._inductor.utils import clear_caches

    _, after_first = tiny_level3
    assert any(p.suffix == ".so" for p in after_first), "the first start compiled no kernel into the cache"
    clear_caches()  # forget what this process loaded: the next start finds only the files
    runner = start_runner(tiny_llama_dir, 3)
    try:
        # Every kernel the second start needed was already on disk: it compiled nothing new.
        assert cached_kernels() == after_first
        assert runner.compiled.backend.pieces == [runner.hf_config.num_hidden_layers + 1] * 2
    finally:
        runner.close()


@pytest.mark.slow
def test_default_model_level3_matches_eager(default_model_dir) -> None:
    tokenizer = load_tokenizer(EngineConfig(model=str(default_model_dir)))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    eager = start_runner(default_model_dir, 0, "bfloat16")
    try:
        expected = decode(eager, prompts)
    finally:
        eager.close()
    runner = start_runner(default_model_dir, 3, "bfloat16")
    try:
        assert runner.compiled.backend.pieces == [runner.hf_config.num_hidden_layers + 1] * 2
        assert decode(runner, prompts) == expected
        assert runner.startup_seconds["compile"] > 0
    finally:
        runner.close()


def test_warm_up_runs_and_forgets_its_sequences(tiny_llama_dir, tiny_prompts, tiny_eager_tokens) -> None:
    runner = start_runner(tiny_llama_dir, 0)
    try:
        runner.warm_up()
        # The CPU warm-up's last sequence (2) ended at position 8: it is forgotten, so it cannot go on from there.
        later = SeqChunk(seq_id=2, token_ids=[1], start_pos=8, block_table=[0], prompt_len=8, sample=False)
        with pytest.raises(ValueError, match="starts at position"):
            runner.execute(StepPlan(step_id=0, chunks=[later]))
        assert decode(runner, tiny_prompts) == tiny_eager_tokens
    finally:
        runner.close()


@given(
    block_size=st.sampled_from([1, 16, 32]),
    max_model_len=st.integers(16, 20000),
    max_num_seqs=st.integers(1, 256),
    max_num_batched_tokens=st.integers(16, 8192),
    query_group=st.sampled_from([1, 2, 4, 8, 16]),
    decodes=st.booleans(),
)
def test_warmup_steps_stay_within_the_limits(
    block_size, max_model_len, max_num_seqs, max_num_batched_tokens, query_group, decodes
) -> None:
    steps = warmup_steps(
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        query_group=query_group,
        decodes=decodes,
    )
    for step in steps:
        assert 1 <= len(step) <= max_num_seqs
        assert sum(q for q, _ in step) <= max_num_batched_tokens
        assert all(1 <= q <= context <= max_model_len for q, context in step)
    decode_only = [s for s in steps if all(q == 1 for q, _ in s)]
    assert bool(decode_only) == (decodes and max_model_len >= 20)
    if max_model_len >= 8192 and max_num_seqs >= 16 and max_num_batched_tokens >= 256:
        contexts = {c for step in steps for q, c in step if q == 2 and c > 3 * 64}
        assert contexts == {256, 512, 1024, 2048, 4096, 8192}  # every split count of the attention kernel
