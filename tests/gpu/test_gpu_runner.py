"""The model runner on a GPU (Triton kernels, CUDA graphs, compile levels, KV sizing) against transformers.

Skipped without CUDA. Weights are random but not vLLM's tiny dummy range:
transformers initialises its model (normal, std 0.02), and the runner copies
those very tensors through its own loader, so both sides compute with the same
bf16 weights and the logits have real margins between candidates.

- Qwen3-0.6B shapes, whole model.
- Llama-3.1-8B shapes with 4 of its 32 layers (every matrix at full size, the
  llama3 rope, 128k vocabulary; fewer layers keep the test inside a minute).
- The tiny mixture-of-experts models (Qwen3-MoE, Mixtral, GLM-4-MoE with its
  partial rotary and shared expert), routers sharpened so that bf16 rounding
  does not swap a token's experts: the fused-MoE kernel and the MoE layers
  inside the compiled model and its graphs.

The runners under test: level 3 (the default: piecewise Inductor, decode
CUDA graphs), ``enforce_eager`` (no compile, no graphs), and levels 1 and 2.
"""

from __future__ import annotations

import logging
import os
import random

import attrs
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from atom_trio.config import EngineConfig  # noqa: E402
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk, StepPlan  # noqa: E402
from atom_trio.sampling_params import SamplingParams  # noqa: E402
from atom_trio.runner import ModelRunner  # noqa: E402
from atom_trio.testing import LLAMA_3_1_8B, QWEN3_0_6B, sharpen_routers, transformers_config  # noqa: E402
from atom_trio.testing.models import TINY_MOE_CONFIGS  # noqa: E402

SHAPES = {
    "qwen3-0.6b": QWEN3_0_6B,
    "llama-3.1-8b-4-layers": dict(LLAMA_3_1_8B, num_hidden_layers=4),
    **{f"tiny-{name}": dict(config, vocab_size=8192) for name, config in TINY_MOE_CONFIGS.items()},
}
BLOCK_SIZE = 16
PROMPT_LENS = (37, 100, 255)  # three sequences: the decode graph of size 4 runs with one padding row
STEPS = 64
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=STEPS)


def hf_model(shape: str, dtype: torch.dtype):
    import transformers

    config = transformers_config(SHAPES[shape], bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = sharpen_routers(getattr(transformers, config.architectures[0])(config))
    return exact_rotary(model.to(dtype).eval())


def exact_rotary(model):
    """``model`` with its rotary frequencies rebuilt in fp32 (returned for chaining).

    ``Module.to(dtype)`` rounds the ``inv_freq`` buffer as well, which
    transformers never does when it loads a checkpoint in bf16; rounded
    frequencies alone put its bf16 logits 10-50% away from fp32's.
    """
    with torch.device("cuda"):
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model


@attrs.frozen
class Models:
    reference: torch.nn.Module  # transformers in bf16
    exact: torch.nn.Module  # transformers in fp32, the same weights
    graphed: ModelRunner  # level 3 with decode CUDA graphs
    eager: ModelRunner  # enforce_eager
    model_dir: object


def start_runner(model_dir, reference, **options) -> ModelRunner:
    """A runner on ``model_dir`` computing with ``reference``'s weights."""
    config = EngineConfig(
        model=str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        num_kv_blocks=80,
        max_num_seqs=8,
        **options,
    )
    runner = ModelRunner(config)
    with torch.no_grad():  # in place: the compiled forward and the captured graphs read these very tensors
        runner.model.load_weights(reference.state_dict().items())
    return runner


@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    shape = request.param
    reference = hf_model(shape, torch.bfloat16)
    model_dir = tmp_path_factory.mktemp(shape)
    reference.config.save_pretrained(model_dir)
    graphed = start_runner(model_dir, reference)
    eager = start_runner(model_dir, reference, enforce_eager=True)
    exact = hf_model(shape, torch.float32)
    exact.load_state_dict(reference.state_dict())
    yield Models(reference=reference, exact=exact, graphed=graphed, eager=eager, model_dir=model_dir)
    graphed.close()
    eager.close()
    del reference, exact
    torch.cuda.empty_cache()


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in PROMPT_LENS]


def tables(prompt_lens) -> list[list[int]]:
    """Disjoint block tables, leaving block 0 and the last blocks unused (to see stray writes)."""
    out, next_block = [], 1
    for n in prompt_lens:
        count = -(-(n + STEPS) // BLOCK_SIZE)
        out.append(list(range(next_block, next_block + count)))
        next_block += count
    return out


def prefill_chunks(prompt_ids: list[list[int]], *, seq_base: int) -> list[SeqChunk]:
    block_tables = tables(len(p) for p in prompt_ids)
    return [
        SeqChunk(
            seq_id=seq_base + i,
            token_ids=p,
            start_pos=0,
            block_table=block_tables[i],
            prompt_len=len(p),
            sample=True,
            sampling_params=GREEDY,
        )
        for i, p in enumerate(prompt_ids)
    ]


def run_script(runner: ModelRunner, prompt_ids: list[list[int]], forced: list[list[int]] | None, *, seq_base: int):
    """Prefill all prompts in one step, then decode them together for `STEPS` steps.

    With ``forced`` the decode inputs are those tokens (teacher forcing);
    without, each step feeds back the runner's greedy pick. Returns (the
    tokens each step produced ``[STEPS][seqs]``, the logits of every step
    ``[STEPS, seqs, vocab]`` on the host).
    """
    chunks = prefill_chunks(prompt_ids, seq_base=seq_base)
    tokens, logits = [], []
    for step in range(STEPS):
        plan = StepPlan(step_id=step, chunks=chunks)
        step_logits = runner.compute_logits(plan)
        logits.append(step_logits.cpu())
        picked = [int(t) for t in step_logits.argmax(-1)]
        tokens.append(picked)
        feed = picked if forced is None else [forced[step][i] for i in range(len(chunks))]
        chunks = [c.next_decode(t) for c, t in zip(chunks, feed)]
    runner.execute(StepPlan(step_id=STEPS, chunks=[], finished_seq_ids=[c.seq_id for c in chunks]))
    return tokens, torch.stack(logits)


@torch.inference_mode()
def hf_logits(model, prompt_ids: list[list[int]], tokens: list[list[int]]) -> torch.Tensor:
    """transformers' logits at the positions that predicted each step's token ``[STEPS, seqs, vocab]`` (fp32, host)."""
    out = []
    for i, prompt in enumerate(prompt_ids):
        ids = prompt + [tokens[step][i] for step in range(STEPS - 1)]
        full = model(torch.tensor([ids], device="cuda")).logits[0].float()
        out.append(full[len(prompt) - 1 :].cpu())
    return torch.stack(out, dim=1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_picks(reference: torch.Tensor, ours: torch.Tensor, *, what: str) -> float:
    """Each greedy pick of ``ours`` is the reference's argmax, or a near-tie within the measured noise.

    Random weights give near-ties now and then, and bf16 rounding may flip
    them. A pick may trail the reference's best logit by up to 5x the
    row's RMS difference between the two (any argmax pick is within 2x the
    row's *largest* difference, about 9x the RMS over a 128k-150k vocabulary,
    so this still catches picks that are wrong). Returns the share of exact picks.
    """
    picks = ours.argmax(-1, keepdim=True)
    gap = reference.max(-1).values - reference.gather(-1, picks).squeeze(-1)
    noise = (ours - reference).pow(2).mean(-1).sqrt()
    print(f"{what}: largest gap {float((gap / noise.clamp_min(1e-12)).max()):.2f}x the RMS difference")
    assert (gap <= 5 * noise).all(), f"{what}: a pick trails the best logit by {float((gap / noise).max()):.1f}x noise"
    return float((gap == 0).float().mean())


def pick_reference(models, prompt_ids, tokens, eager_logits: torch.Tensor) -> torch.Tensor:
    """The logits a variant's greedy picks are judged against: the eager runner's, or for a mixture-of-experts
    model the fp32 model's. bf16 rounding that differs between two runners can swap one token's expert,
    which moves that token's logits by more than rounding (both runs are checked against fp32 as a whole)."""
    if not getattr(models.reference.config, "num_experts_per_tok", None):
        return eager_logits
    return hf_logits(models.exact, prompt_ids, tokens)


def test_prefill_and_decode_logits_match_transformers(models):
    reference, exact, runner = models.reference, models.exact, models.graphed
    prompt_ids = prompts(runner.vocab_size)
    tokens, ours = run_script(runner, prompt_ids, None, seq_base=100)
    theirs = hf_logits(reference, prompt_ids, tokens)
    check_within_bf16_rounding(ours, theirs, hf_logits(exact, prompt_ids, tokens))


def test_one_sequence_decode_matches_transformers(models):
    """Batch 1, the shape whose layers run the one-row GEMVs with add + RMSNorm in their prologue.

    The other tests decode three sequences (a graph of 4 rows: cuBLAS), so
    this is the one that checks the batch-1 kernels against transformers.
    """
    reference, exact, runner = models.reference, models.exact, models.graphed
    prompt_ids = prompts(runner.vocab_size)[1:2]
    tokens, ours = run_script(runner, prompt_ids, None, seq_base=800)
    truth = hf_logits(exact, prompt_ids, tokens)
    check_within_bf16_rounding(ours, hf_logits(reference, prompt_ids, tokens), truth)
    assert check_picks(truth, ours, what="batch 1 vs transformers fp32") >= 0.9


def check_within_bf16_rounding(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor) -> None:
    """Prefill and decode logits no further from the fp32 ``truth`` than transformers' bf16 run (with slack)."""
    for name, rows in (("prefill", slice(0, 1)), ("decode", slice(1, None))):
        ours_error = relative_error(ours[rows], truth[rows])
        theirs_error = relative_error(theirs[rows], truth[rows])
        print(f"{name}: relative error vs fp32 {ours_error:.4f} (transformers bf16 {theirs_error:.4f})")
        assert ours_error <= 2 * theirs_error + 1e-3, name


def test_greedy_tokens_match_transformers_for_64_steps(models):
    # transformers in fp32 is the reference: its bf16 run drifts further from it than the runner does
    # (Llama-3.1 shapes: 10% against the runner's 2% relative error).
    exact, runner = models.exact, models.graphed
    prompt_ids = prompts(runner.vocab_size)
    tokens, ours = run_script(runner, prompt_ids, None, seq_base=200)
    exact_share = check_picks(hf_logits(exact, prompt_ids, tokens), ours, what="runner vs transformers")
    print(f"greedy picks equal to transformers' argmax: {exact_share:.1%}")
    assert exact_share >= 0.9


def test_outputs_equal_with_graphs_on_and_off(models, monkeypatch):
    graphed, eager = models.graphed, models.eager
    assert eager.decode_graphs is None and eager.compiled is None
    assert graphed.level == 3 and graphed.compiled.backend.pieces  # piecewise Inductor under the graphs
    assert graphed.decode_graphs.batch_sizes == [1, 2, 4, 8]
    replays = []
    run = graphed.decode_graphs.run
    monkeypatch.setattr(
        graphed.decode_graphs, "run", lambda *a, **kw: replays.append(a[0].shape[0]) or run(*a, **kw)
    )
    prompt_ids = prompts(graphed.vocab_size)
    tokens, with_graphs = run_script(graphed, prompt_ids, None, seq_base=300)
    assert replays == [len(prompt_ids)] * (STEPS - 1)  # every decode step replayed a graph
    eager_tokens, without = run_script(eager, prompt_ids, tokens, seq_base=300)
    assert eager_tokens[0] == tokens[0]  # the prefill runs eagerly in both
    # Not bit-equal (the graph's split count, padded matmul shapes and Inductor's fused elementwise
    # ops round differently), but within bf16 rounding: each run is about 1-2% from the fp32 model.
    assert relative_error(with_graphs, without) < 2e-2
    exact_share = check_picks(pick_reference(models, prompt_ids, tokens, without), with_graphs, what="graphs vs eager")
    assert exact_share >= 0.95


@pytest.mark.parametrize("count", [1, 3], ids=["batch1", "batch3-padded"])
def test_tokens_fed_back_on_the_device_through_the_graphs(models, count):
    """Async scheduling's pattern: step N+1 is launched, its tokens `PREVIOUS_TOKEN`, before step N is read.

    The graph's own input buffer takes the fed tokens; the picks must be the
    synchronous run's, where the host feeds each token itself (3 sequences
    replay the graph of 4, so a padding row rides along).
    """
    runner = models.graphed
    prompt_ids = prompts(runner.vocab_size)[:count]
    expected, _ = run_script(runner, prompt_ids, None, seq_base=600)
    chunks = prefill_chunks(prompt_ids, seq_base=700)
    in_flight = runner.launch(StepPlan(step_id=0, chunks=chunks))
    picks = []
    for step in range(1, STEPS):
        chunks = [c.next_decode(PREVIOUS_TOKEN) for c in chunks]
        launched = runner.launch(StepPlan(step_id=step, chunks=chunks))
        picks.append(runner.collect(in_flight).token_ids)
        in_flight = launched
    picks.append(runner.collect(in_flight).token_ids)
    runner.execute(StepPlan(step_id=STEPS, chunks=[], finished_seq_ids=[c.seq_id for c in chunks]))
    assert picks == expected


@pytest.mark.parametrize("level", [1, 2])
def test_outputs_equal_at_every_level(models, level):
    """Levels 1 and 2 against eager (level 3 is the graphed runner above), teacher-forced on the level's picks."""
    runner = start_runner(models.model_dir, models.reference, level=level)
    try:
        assert runner.level == level and runner.decode_graphs is not None
        prompt_ids = prompts(runner.vocab_size)
        tokens, ours = run_script(runner, prompt_ids, None, seq_base=500)
        eager_tokens, eager_logits = run_script(models.eager, prompt_ids, tokens, seq_base=500)
        assert eager_tokens[0] == tokens[0]
        # Level and eager differ by their own bf16 roundings (~2%): each must be within bf16 rounding of fp32.
        truth = hf_logits(models.exact, prompt_ids, tokens)
        bf16_error = relative_error(hf_logits(models.reference, prompt_ids, tokens), truth)
        for name, logits in ((f"level {level}", ours), ("eager", eager_logits)):
            error = relative_error(logits, truth)
            print(f"{name}: relative error vs fp32 {error:.4f} (transformers bf16 {bf16_error:.4f})")
            assert error <= 2 * bf16_error + 1e-3, name
        assert check_picks(pick_reference(models, prompt_ids, tokens, eager_logits), ours,
                           what=f"level {level} vs eager") >= 0.95
    finally:
        runner.close()


def test_graph_padding_rows_write_no_kv(models):
    runner = models.graphed
    runner.kv_cache.zero_()
    prompt_ids = prompts(runner.vocab_size)
    run_script(runner, prompt_ids, None, seq_base=400)
    used = sorted(b for table in tables(len(p) for p in prompt_ids) for b in table)
    unused = [b for b in range(runner.num_kv_blocks) if b not in used]
    assert 0 in unused and len(unused) > 1
    assert runner.kv_cache[:, :, unused].abs().sum() == 0
    assert runner.kv_cache[:, :, used].abs().sum() > 0


def test_kv_cache_sized_from_gpu_memory_utilization(tmp_path, caplog):
    reference = hf_model("qwen3-0.6b", torch.bfloat16)
    reference.config.save_pretrained(tmp_path)
    del reference
    torch.cuda.empty_cache()
    utilization = 0.5
    config = EngineConfig(
        model=str(tmp_path),
        load_format="dummy",
        dtype="bfloat16",
        gpu_memory_utilization=utilization,
        max_num_seqs=512,  # graphs worth ~0.5 GiB (512 rows of float32 logits alone are 0.3 GiB)
        max_num_batched_tokens=1024,
    )
    with caplog.at_level(logging.INFO, logger="atom_trio.runner"):
        runner = ModelRunner(config)
    try:
        free, total = torch.cuda.mem_get_info()
        used = total - free
        block_bytes = runner.kv_cache[0, 0, 0].numel() * 2 * 2 * runner.hf_config.num_hidden_layers
        assert runner.kv_cache.shape[2] == runner.num_kv_blocks
        # The graphs' memory was measured before the KV cache took the rest, and the measure holds.
        assert runner.graph_bytes > 2**28
        assert runner.graph_bytes <= runner.graph_bytes_budgeted + 2**26
        # The KV cache fills the budget up to the profiled activations and the graphs.
        assert used <= utilization * total + 2**27
        assert used >= utilization * total - 2**31
        logged = f"KV cache: {runner.num_kv_blocks} blocks of 16 tokens = {runner.num_kv_blocks * 16} tokens"
        assert logged in caplog.text
        assert "set aside from the KV cache's budget" in caplog.text
        assert "start-up took" in caplog.text
        assert runner.startup_seconds["compile"] > 0 and runner.startup_seconds["graph capture"] > 0
        assert runner.num_kv_blocks * block_bytes > 2**30
        # and the sized runner decodes through its graphs
        prompt = SeqChunk(
            seq_id=0, token_ids=[1, 2, 3], start_pos=0, block_table=[0], prompt_len=3, sample=True, sampling_params=GREEDY
        )
        first = runner.execute(StepPlan(step_id=0, chunks=[prompt])).token_ids
        decode = attrs.evolve(prompt, token_ids=first, start_pos=3)
        assert len(runner.execute(StepPlan(step_id=1, chunks=[decode])).token_ids) == 1
    finally:
        runner.close()


def test_second_start_hits_the_compile_cache(tmp_path, monkeypatch):
    """A second runner on the same cache directory takes every Inductor graph from it (none compiled anew)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import clear_caches

    model_dir = tmp_path / "model"
    transformers_config(QWEN3_0_6B, num_hidden_layers=2, bos_token_id=1, eos_token_id=2).save_pretrained(model_dir)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # the runner sets them; put them back after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path / "cache"))
    engine_config = EngineConfig(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", num_kv_blocks=16, max_num_seqs=4
    )
    starts = []
    for _ in range(2):
        clear_caches()  # what this process loaded: each start finds only the files
        counters.clear()
        runner = ModelRunner(engine_config)
        runner.close()
        starts.append((counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]))
    (first_misses, _), (second_misses, second_hits) = starts
    assert first_misses > 0
    assert second_misses == 0 and second_hits >= first_misses
    assert (tmp_path / "cache" / "torch_compile" / "inductor").is_dir()
