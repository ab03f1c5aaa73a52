"""The FP8 KV cache on a GPU: the Triton kernels at real head shapes, CUDA graphs, and the default model.

Skipped without CUDA.

- Decode attention over an FP8 cache at Llama-3.1-8B's heads (32 query heads, 8 KV heads of 128), batch
  1 to 128, contexts to 8k (split-K): against attention over the same FP8 values in float32, and
  against the same step over a bf16 cache within the bound FP8 rounding implies (`fp8_bound`).
- The MLA decode kernel over an FP8 latent cache at DeepSeek-V3's shapes (128 heads, latent 512 + rope 64)
  against float32 attention over the same FP8 values.
- A decode step (store + attention) over an FP8 cache captured in a CUDA graph: a new scale written into
  the layer's scale tensor is what the replay uses (the scales are read, not baked into the graph).
- The default model with ``kv_cache_dtype="fp8"`` on the Triton backend with CUDA graphs, chunked prefill
  and prefix-cache hits still answers.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from atom_trio.ops import AttentionMetadata  # noqa: E402
from atom_trio.ops.quant_ref import FP8_MAX, quantize_fp8_static  # noqa: E402
from atom_trio.sampling_params import SamplingParams  # noqa: E402
from test_gpu_mla import paged_latent_cache  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
SCALE = HEAD_DIM**-0.5


def decode_step(context_lens: list[int], block_size: int, seed: int):
    """Random bf16 K/V caches (Triton layout) on the shuffled blocks of `paged_latent_cache`'s decode step."""
    latent, metadata = paged_latent_cache(context_lens, block_size, seed)
    gen = torch.Generator("cuda").manual_seed(seed)
    shape = (latent.shape[0], block_size, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, device="cuda", generator=gen).bfloat16() for _ in range(2))
    return k_cache, v_cache, metadata


def amax_scale(x: torch.Tensor) -> torch.Tensor:
    """A calibrated per-tensor scale: the largest magnitude lands on e4m3's largest value."""
    return (x.float().abs().amax() / FP8_MAX).reshape(1)


def fp8_bound(q, k, v, k_scale, v_scale) -> torch.Tensor:
    """``[heads]``: how far attention over FP8-rounded ``k``/``v`` may be from attention over them exactly.

    ``|dk| <= 2**-4 |k| + 2**-10 k_scale`` (half an e4m3 step: relative, or absolute below the normal
    range); a score moves by ``e_j <= SCALE * sum_i |q_i| |dk_ji|``; with ``eps = max_j e_j`` every
    probability moves by a factor within ``exp(+-2 eps)``, so ``|o' - o| <= (exp(2 eps) - 1) max|v| +
    max|dv|``. ``q`` ``[heads, dim]`` float32, ``k``/``v`` ``[ctx, kv_heads, dim]``.
    """
    group = HEADS // KV_HEADS
    k, v = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))  # [heads, ctx, dim]
    eps = SCALE * torch.einsum("hd,hcd->hc", q.abs(), 2.0**-4 * k.abs() + 2.0**-10 * k_scale).amax(-1)
    dv = (2.0**-4 * v.abs() + 2.0**-10 * v_scale).amax(dim=(1, 2))
    return torch.expm1(2 * eps) * v.abs().amax(dim=(1, 2)) + dv


def gather(cache: torch.Tensor, metadata: AttentionMetadata, i: int) -> torch.Tensor:
    ctx = metadata.context_lens_host[i]
    blocks = metadata.block_tables[i, : -(-ctx // metadata.block_size)].long()
    return cache[blocks].flatten(0, 1)[:ctx]


@pytest.mark.parametrize(
    "context_lens",
    [[8192], [1, 17, 4097, 8000], [4096] * 32, [1024] * 128],
    ids=["b1-8k", "b4-mixed", "b32-4k", "b128-1k"],
)
def test_fp8_decode_at_llama_8b_shapes(context_lens):
    from atom_trio.ops.triton import TritonBackend

    backend = TritonBackend("cuda")
    k_cache, v_cache, metadata = decode_step(context_lens, 16, seed=len(context_lens))
    k_scale, v_scale = amax_scale(k_cache), amax_scale(v_cache)
    k8, v8 = quantize_fp8_static(k_cache, k_scale), quantize_fp8_static(v_cache, v_scale)
    query = torch.randn(len(context_lens), HEADS, HEAD_DIM, device="cuda").bfloat16()
    plan = backend.plan_attention(metadata)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    out = backend.paged_attention(query, query, query, k8, v8, plan, SCALE, **scales).float()
    bf16 = backend.paged_attention(query, query, query, k_cache, v_cache, plan, SCALE).float()
    group = HEADS // KV_HEADS
    for i in range(len(context_lens)):
        q = query[i].float()
        k, v, k_fp8, v_fp8 = (gather(c, metadata, i) for c in (k_cache, v_cache, k8, v8))
        # Against attention over the same FP8 values in float32: bf16 rounding of the query and output only.
        k_deq, v_deq = (x.float().repeat_interleave(group, dim=1) * s for x, s in ((k_fp8, k_scale), (v_fp8, v_scale)))
        probs = (torch.einsum("hd,chd->hc", q, k_deq) * SCALE).softmax(-1)
        expected = torch.einsum("hc,chd->hd", probs, v_deq)
        error = (out[i] - expected).norm() / expected.norm()
        assert error < 1e-2, f"sequence {i}: relative error {float(error):.4f} against float32"
        # Against the bf16 cache: within FP8 rounding (bf16 outputs: plus a bf16 rounding of each side).
        bound = fp8_bound(q, k, v, k_scale.item(), v_scale.item()) + 2.0**-7 * v.float().abs().amax()
        diff = (out[i] - bf16[i]).abs().amax(-1)
        assert (diff <= bound).all(), f"sequence {i}: {float((diff / bound).max()):.3f} of the FP8 bound"


def test_fp8_latent_decode_at_deepseek_v3_shapes():
    from atom_trio.ops.triton import TritonBackend

    heads, latent, rope = 128, 512, 64
    scale = (128 + rope) ** -0.5
    context_lens = [1, 700, 4096, 32768] + [4096] * 12
    cache, metadata = paged_latent_cache(context_lens, 16, seed=3)
    cache_scale = amax_scale(cache)
    cache8 = quantize_fp8_static(cache, cache_scale)
    query = torch.randn(len(context_lens), heads, latent + rope, device="cuda").bfloat16()
    backend = TritonBackend("cuda")
    out = backend.mla_decode(query, cache8, backend.plan_attention(metadata), scale, latent, cache_scale=cache_scale)
    for i in range(len(context_lens)):
        context = gather(cache8[:, :, None], metadata, i)[:, 0].float() * cache_scale
        scores = (query[i].float() @ context.T) * scale
        expected = scores.softmax(-1) @ context[:, :latent]
        error = (out[i].float() - expected).norm() / expected.norm()
        assert error < 1e-2, f"sequence {i}: relative error {float(error):.4f}"


def test_fp8_decode_step_replays_in_a_cuda_graph_with_the_scales_it_reads():
    from atom_trio.ops.triton import TritonBackend

    backend = TritonBackend("cuda")
    batch = 8
    k_cache, v_cache, metadata = decode_step([2048] * batch, 16, seed=5)
    k_scale, v_scale = amax_scale(k_cache), amax_scale(v_cache)
    k8, v8 = quantize_fp8_static(k_cache, k_scale), quantize_fp8_static(v_cache, v_scale)
    plan = backend.plan_attention(metadata)
    query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda").bfloat16()
    key, value = (torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda").bfloat16() for _ in range(2))

    def step():
        backend.store_kv(key, value, k8, v8, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return backend.paged_attention(query, key, value, k8, v8, plan, SCALE, k_scale=k_scale, v_scale=v_scale)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    v_scale.mul_(2)  # a layer's new scale, written in place: the graph reads it at replay
    graph.replay()
    expected = step()
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    v_scale.div_(2)
    assert not torch.allclose(step(), expected, atol=2e-2, rtol=2e-2)


def test_the_default_model_answers_with_an_fp8_cache_on_the_gpu(default_model_dir):
    from atom_trio.engine import LLM

    with LLM(
        model=str(default_model_dir), device="cuda", kv_cache_dtype="fp8", max_num_batched_tokens=16,
        gpu_memory_utilization=0.3,
    ) as llm:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of Japan?"}], add_generation_prompt=True, tokenize=False
        )
        params = SamplingParams(temperature=0.0, max_tokens=12)
        first = llm.generate([prompt] * 4, params, use_tqdm=False)
        again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert all("Tokyo" in out.outputs[0].text for out in first)
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first[0].outputs[0].token_ids
