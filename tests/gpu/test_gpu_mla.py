"""Latent attention on a GPU: the Triton decode kernel at DeepSeek-V3's head shapes, and DeepSeek models end to end.

Skipped without CUDA.

- The kernel (`atom_trio.ops.triton.mla.mla_decode`) against the torch reference computed in float32, at
  128 heads over a latent of 512 + rope 64 (DeepSeek-V3, Kimi-K2), batch 1 to 256, contexts up to 32k,
  in bf16; and a decode step (store + attention) captured in a CUDA graph and replayed with new lengths.
- The tiny DeepSeek models (``TINY_MLA_CONFIGS``) on the Triton backend, compiled with decode CUDA graphs,
  against the torch backend run eagerly with the same weights, step by step (mixed prefill and decode steps,
  a prefill chunk over cached latent context, pure decode steps replayed from graphs with a padding row);
  both against transformers in float32.
"""

from __future__ import annotations

import random

import attrs
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from atom_trio.config import EngineConfig  # noqa: E402
from atom_trio.core.plan import SeqChunk, StepPlan  # noqa: E402
from atom_trio.ops import AttentionMetadata, TorchRefBackend  # noqa: E402
from atom_trio.runner import ModelRunner  # noqa: E402
from atom_trio.sampling_params import SamplingParams  # noqa: E402
from atom_trio.testing import TINY_MLA_CONFIGS, sharpen_routers, transformers_config  # noqa: E402

HEADS, LATENT, ROPE = 128, 512, 64
SCALE = (128 + ROPE) ** -0.5
REF = TorchRefBackend()


def paged_latent_cache(context_lens: list[int], block_size: int, seed: int):
    """A random bf16 latent cache holding ``context_lens`` on shuffled blocks, and the decode step's metadata."""
    rng = random.Random(seed)
    counts = [max(1, -(-n // block_size)) for n in context_lens]
    physical = list(range(sum(counts) + 1))
    rng.shuffle(physical)
    tables = [[physical.pop() for _ in range(c)] for c in counts]
    gen = torch.Generator("cuda").manual_seed(seed)
    cache = torch.randn(sum(counts) + 1, block_size, LATENT + ROPE, device="cuda", generator=gen).bfloat16()
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.arange(len(context_lens) + 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([t + [0] * (max(counts) - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        slot_mapping=torch.tensor(
            [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for n, t in zip(context_lens, tables)],
            device="cuda",
        ),
        query_lens_host=[1] * len(context_lens),
        context_lens_host=context_lens,
        block_size=block_size,
    )
    return cache, metadata


def reference_decode(query: torch.Tensor, cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
    """`TorchRefBackend.mla_decode` in float32, 16 sequences at a time (its gathered context and scores are large)."""
    out = []
    for first in range(0, metadata.num_seqs, 16):
        rows = slice(first, first + 16)
        lens = metadata.context_lens_host[rows]
        part = AttentionMetadata(
            cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"),
            context_lens=metadata.context_lens[rows],
            block_tables=metadata.block_tables[rows],
            slot_mapping=metadata.slot_mapping[rows],
            query_lens_host=[1] * len(lens),
            context_lens_host=lens,
            block_size=metadata.block_size,
        )
        plan = REF.plan_attention(part)
        used = plan.decode_block_tables.flatten().unique()
        # Only the blocks these rows read, in float32, renumbered.
        renumber = torch.zeros(cache.shape[0], dtype=torch.int32, device="cuda")
        renumber[used] = torch.arange(used.numel(), dtype=torch.int32, device="cuda")
        part = attrs.evolve(part, block_tables=renumber[part.block_tables.long()])
        out.append(REF.mla_decode(query[rows].float(), cache[used].float(), REF.plan_attention(part), SCALE, LATENT))
    return torch.cat(out)


def check_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Each sequence's output within bf16 rounding of the float32 reference, relative to its own size.

    Over long contexts the outputs average many random vectors and shrink toward zero, where a fixed
    absolute tolerance would pass anything."""
    error = (out.float() - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert float(error.max()) < 1e-2, f"sequence {int(error.argmax())}: relative error {float(error.max()):.4f}"


@pytest.mark.parametrize(
    ("context_lens", "block_size"),
    [
        ([32768], 16),
        ([1, 4097, 32000], 16),
        ([4096] * 64, 16),
        ([4096] * 64, 64),
        (None, 16),  # 256 sequences, random lengths up to 32k
    ],
    ids=["b1-32k", "b3-mixed", "b64-4k", "b64-4k-block64", "b256-random"],
)
def test_decode_kernel_at_deepseek_v3_shapes(context_lens, block_size):
    from atom_trio.ops.triton import TritonBackend

    if context_lens is None:
        rng = random.Random(7)
        context_lens = [rng.randint(1, 32768) for _ in range(256)]
    cache, metadata = paged_latent_cache(context_lens, block_size, seed=len(context_lens))
    gen = torch.Generator("cuda").manual_seed(1)
    query = torch.randn(len(context_lens), HEADS, LATENT + ROPE, device="cuda", generator=gen).bfloat16()
    backend = TritonBackend("cuda")
    out = backend.mla_decode(query, cache, backend.plan_attention(metadata), SCALE, LATENT)
    check_close(out, reference_decode(query, cache, metadata))


def test_decode_step_replays_in_a_cuda_graph():
    """Store + latent decode captured once for the longest context, replayed with other lengths, tables and slots."""
    from atom_trio.ops.triton import TritonBackend

    backend = TritonBackend("cuda")
    batch, block_size, max_len = 8, 16, 8192
    cache, metadata = paged_latent_cache([max_len] * batch, block_size, seed=0)
    static = {name: getattr(metadata, name).clone() for name in ("context_lens", "block_tables", "slot_mapping")}
    static_meta = AttentionMetadata(
        cu_seqlens_q=metadata.cu_seqlens_q, **static, query_lens_host=[1] * batch, context_lens_host=[max_len] * batch,
        block_size=block_size,
    )
    plan = backend.plan_attention(static_meta)
    query = torch.zeros(batch, HEADS, LATENT + ROPE, dtype=torch.bfloat16, device="cuda")
    latent = torch.zeros(batch, LATENT + ROPE, dtype=torch.bfloat16, device="cuda")

    def step():
        backend.store_latent(latent, cache, static["slot_mapping"])
        return backend.mla_decode(query, cache, plan, SCALE, LATENT)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed, lens in ((1, [5, 300, 8192, 17, 1, 4000, 129, 2048]), (2, [8000, 64, 3, 1000, 7000, 16, 4096, 512])):
        _, replay = paged_latent_cache(lens, block_size, seed=seed)
        for name, tensor in static.items():
            tensor.zero_()
            tensor[..., : getattr(replay, name).shape[-1]].copy_(getattr(replay, name))
        query.copy_(torch.randn_like(query, dtype=torch.float32))
        latent.copy_(torch.randn_like(latent, dtype=torch.float32))
        graph.replay()
        expected_cache = cache.clone()
        REF.store_latent(latent, expected_cache, replay.slot_mapping)
        assert torch.equal(cache, expected_cache)
        check_close(out, reference_decode(query, cache, replay))


# -- tiny DeepSeek models end to end ---------------------------------------------------------------

BLOCK_SIZE = 16
STEPS = 24
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def hf_model(name: str, dtype: torch.dtype):
    import transformers

    config = transformers_config(dict(TINY_MLA_CONFIGS[name], vocab_size=8192), bos_token_id=1, eos_token_id=2,
                                 dtype="float32")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = sharpen_routers(getattr(transformers, config.architectures[0])(config)).eval().to(dtype)
        # `to` rounded the rotary frequencies too, which loading a checkpoint never does: rebuild them in fp32.
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model


def start_runner(model_dir, reference, **options) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", block_size=BLOCK_SIZE, num_kv_blocks=64,
        max_num_seqs=4, **options,
    )
    runner = ModelRunner(config)
    with torch.no_grad():  # in place: the compiled forward and the captured graphs read these very tensors
        runner.model.load_weights(reference.state_dict().items())
    return runner


def script(runner: ModelRunner, prompts: list[list[int]], forced: list[list[int]] | None):
    """Mixed steps, then decodes. Sequence 0 prefills in two chunks (the second over its cached latents, beside
    sequence 1's first decode); sequence 2 joins at step 2 (a fresh prefill beside decodes); then all three decode
    (a graph of 4 rows with one padding row). Returns each step's picks and logits (host), in sequence order."""
    tables = [list(range(1 + 16 * i, 17 + 16 * i)) for i in range(3)]

    def prefill(i, start, end, sample):
        return SeqChunk(seq_id=i, token_ids=prompts[i][start:end], start_pos=start, block_table=tables[i],
                        prompt_len=len(prompts[i]), sample=sample, sampling_params=GREEDY)

    live = {1: prefill(1, 0, None, True)}
    pending = {0: prefill(0, 0, 20, False)}
    picks, logits = [], []
    for step in range(STEPS):
        if step == 1:
            pending[0] = prefill(0, 20, None, True)
        if step == 2:
            pending[2] = prefill(2, 0, None, True)
        chunks = sorted([*live.values(), *pending.values()], key=lambda c: c.seq_id)
        step_logits = runner.compute_logits(StepPlan(step_id=step, chunks=chunks)).float().cpu()
        sampled = [c for c in chunks if c.sample]
        row = {c.seq_id: step_logits[i] for i, c in enumerate(sampled)}
        logits.append(row)
        picked = {i: int(v.argmax()) for i, v in row.items()}
        picks.append(picked)
        feed = picked if forced is None else forced[step]
        live = {c.seq_id: c.next_decode(feed[c.seq_id]) for c in sampled}
        pending = {i: c for i, c in pending.items() if not c.sample}
    runner.execute(StepPlan(step_id=STEPS, chunks=[], finished_seq_ids=[0, 1, 2]))
    return picks, logits


@torch.inference_mode()
def hf_logits(model, prompts, picks) -> list[dict[int, torch.Tensor]]:
    """transformers' logits where each step's picks were made (sequence ``i``'s prompt then its picks)."""
    out = [dict() for _ in picks]
    for i, prompt in enumerate(prompts):
        steps = [s for s, row in enumerate(picks) if i in row]
        ids = prompt + [picks[s][i] for s in steps[:-1]]
        full = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        for k, s in enumerate(steps):
            out[s][i] = full[len(prompt) - 1 + k]
    return out


def stacked(rows: list[dict[int, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([v for row in rows for _, v in sorted(row.items())])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(TINY_MLA_CONFIGS))
def test_tiny_deepseek_on_triton_with_graphs_matches_the_torch_backend(name, tmp_path, monkeypatch):
    reference = hf_model(name, torch.bfloat16)
    reference.config.save_pretrained(tmp_path)
    triton_runner = start_runner(tmp_path, reference)
    torch_runner = start_runner(tmp_path, reference, kernel_backend="torch", enforce_eager=True)
    try:
        assert triton_runner.backend.name == "triton" and triton_runner.decode_graphs is not None
        replays = []
        run = triton_runner.decode_graphs.run
        monkeypatch.setattr(
            triton_runner.decode_graphs, "run", lambda *a, **kw: replays.append(a[0].shape[0]) or run(*a, **kw)
        )
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 8192) for _ in range(n)] for n in (45, 30, 60)]
        picks, ours = script(triton_runner, prompts, None)
        assert replays == [3] * (STEPS - 3)  # every step after the mixed ones replayed a graph
        _, theirs = script(torch_runner, prompts, picks)  # teacher-forced on the Triton run's picks
    finally:
        triton_runner.close()
        torch_runner.close()
    truth = stacked(hf_logits(reference.float(), prompts, picks))
    ours, theirs = stacked(ours), stacked(theirs)
    triton_error, torch_error = relative_error(ours, truth), relative_error(theirs, truth)
    print(f"{name}: relative error vs transformers fp32: triton {triton_error:.4f}, torch {torch_error:.4f}")
    assert relative_error(ours, theirs) < 3e-2
    assert triton_error <= 2 * torch_error + 1e-3
    # Each pick is transformers' argmax or a near-tie: within 5x the row's RMS difference of its best logit
    # (bf16 rounding flips near-ties of random weights; a wrong kernel's picks trail by far more).
    gap = truth.max(-1).values - truth.gather(-1, ours.argmax(-1, keepdim=True)).squeeze(-1)
    assert (gap <= 5 * (ours - truth).pow(2).mean(-1).sqrt()).all()
