"""``--kv-cache-dtype fp8`` end to end: configuration, sizing, checkpoint scales, and what the model computes.

- The engine's logits with an FP8 cache are transformers' with its keys and values rounded through FP8
  with the same per-layer scales (float32, tight): the cache changes nothing but that rounding, in the
  prefill and in every decode step. Against a full-precision cache they stay as far as the rounding
  moves transformers itself (the per-layer bound is derived and checked in
  ``tests/ops/test_fp8_kv_cache_ops.py``); a latent cache (MLA) within one e4m3 rounding of the logits.
- The default model with an FP8 cache still answers, through chunked prefill and prefix-cache hits.
- The same memory holds twice the blocks of a 16-bit cache.
- Scales come from the checkpoint under each name checkpoints use, else 1.0 with one warning; a bad
  scale, a bad ``kv_cache_dtype`` and a backend without an FP8 cache are typed errors.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from atom_trio import EngineConfig, InvalidConfig, ModelLoadError
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.engine import LLM
from atom_trio.layers import Attention, CachedAttention, RotaryEmbedding
from atom_trio.loader.quant_config import detect_quantization
from atom_trio.ops import TorchRefBackend, use_backend
from atom_trio.ops.quant_ref import quantize_fp8_static
from atom_trio.runner import ModelRunner
from atom_trio.runner.kv_cache import KVCacheLayout
from atom_trio.sampling_params import SamplingParams

PROMPT = [5, 917, 23, 4410, 88, 3021, 17, 640, 1234, 9, 77]
CONTINUATION = [310, 42, 2718, 1, 999, 64, 12]
# Each spelling checkpoints use, on the tiny llama's two layers
CHECKPOINT_SCALES = {
    "model.layers.0.self_attn.k_scale": 0.021,
    "model.layers.0.self_attn.v_scale": 0.0037,
    "model.layers.1.self_attn.attn.k_scale": 0.017,  # vLLM's own layer name
    "model.layers.1.self_attn.v_proj.output_scale": 0.0052,  # older compressed-tensors
}
EXPECTED_SCALES = {0: (0.021, 0.0037), 1: (0.017, 0.0052)}


def _chunk(tokens, start, prompt_len):
    return SeqChunk(
        seq_id=0,
        token_ids=tokens,
        start_pos=start,
        block_table=[3, 0, 5, 1, 6],
        prompt_len=prompt_len,
        sample=True,
        sampling_params=SamplingParams(temperature=0.0),
    )


def _runner_logits(model_dir, **fields):
    """float32 logits of the prompt's last position, then of each continuation token fed as a decode step."""
    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=8, block_size=4, **fields))
    try:
        rows = [runner.compute_logits(StepPlan(step_id=0, chunks=[_chunk(PROMPT, 0, len(PROMPT))]))[0]]
        for i, token in enumerate(CONTINUATION[:-1]):
            plan = StepPlan(step_id=i + 1, chunks=[_chunk([token], len(PROMPT) + i, len(PROMPT))])
            rows.append(runner.compute_logits(plan)[0])
        layers = [m for m in runner.model.modules() if isinstance(m, CachedAttention)]
        scales = [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers]
    finally:
        runner.close()
    return torch.stack(rows), scales


def _transformers_logits(model_dir, scales=None):
    """transformers' logits at the same positions; with ``scales`` (per layer), keys and values rounded through FP8."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = (torch.tensor([s]) for s in scales[module.layer_idx])
        key, value = (quantize_fp8_static(x, s).float() * s for x, s in ((key, k_scale), (value, v_scale)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fp8_rounded_kv", attention)
    implementation = "sdpa" if scales is None else "fp8_rounded_kv"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=implementation
    ).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + CONTINUATION[:-1]])).logits[0]
    return logits[len(PROMPT) - 1 :]


@pytest.fixture(scope="module")
def scaled_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with KV cache scales in its checkpoint, one of each spelling."""
    out = tmp_path_factory.mktemp("scaled") / "llama"
    shutil.copytree(tiny_llama_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors.update({name: torch.tensor(value) for name, value in CHECKPOINT_SCALES.items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("checkpoint", ["no-scales", "checkpoint-scales"])
def test_fp8_logits_are_transformers_with_fp8_rounded_keys_and_values(
    tiny_llama_dir, scaled_llama_dir, checkpoint, caplog
):
    model_dir = tiny_llama_dir if checkpoint == "no-scales" else scaled_llama_dir
    with caplog.at_level(logging.WARNING, logger="atom_trio.runner"):
        fp8, scales = _runner_logits(model_dir, kv_cache_dtype="fp8")
    warnings = [r.getMessage() for r in caplog.records if "k_scale/v_scale" in r.getMessage()]
    if checkpoint == "no-scales":
        assert scales == [(1.0, 1.0)] * 2
        assert len(warnings) == 1 and "2 of 2 attention layers" in warnings[0]
    else:
        assert [s for pair in scales for s in pair] == pytest.approx([*EXPECTED_SCALES[0], *EXPECTED_SCALES[1]])
        assert not warnings
    rounded = _transformers_logits(model_dir, dict(enumerate(scales)))
    torch.testing.assert_close(fp8, rounded, atol=2e-4, rtol=1e-4)

    # Against full precision: no farther off than the rounding moves transformers. (Not the top token: a random
    # tiny model's logits are near-ties that any rounding may reorder; the default model's answer is checked below.)
    full, _ = _runner_logits(model_dir)
    unrounded = _transformers_logits(model_dir)
    assert (fp8 - full).abs().max() <= (rounded - unrounded).abs().max() + 1e-3
    assert (fp8 - full).abs().max() > 0  # the cache did round


def test_the_default_model_answers_with_an_fp8_cache(default_model_dir):
    """Greedy, through prefills of 16-token chunks, and again from the prefix cache: the same answer."""
    with LLM(
        model=str(default_model_dir), kv_cache_dtype="fp8", num_kv_blocks=32, max_num_batched_tokens=16,
        enable_prefix_caching=True,
    ) as llm:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of Japan?"}], add_generation_prompt=True, tokenize=False
        )
        params = SamplingParams(temperature=0.0, max_tokens=12)
        first = llm.generate([prompt], params, use_tqdm=False)[0]
        again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert "Tokyo" in first.outputs[0].text
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_an_fp8_latent_cache_is_within_a_rounding_of_full_precision(tiny_model_dirs_mla):
    """Multi-head latent attention (the tiny DeepSeek-V2): the latent cache in FP8 against float32.

    Each cached latent moves by at most one e4m3 rounding (2**-4 of itself); the logits, by that much of
    their largest. Per-layer bounds in ``tests/ops``; here the model as a whole through prefill and decode.
    """
    fp8, _ = _runner_logits(tiny_model_dirs_mla, kv_cache_dtype="fp8")
    full, _ = _runner_logits(tiny_model_dirs_mla)
    error = (fp8 - full).abs().max()
    assert 0 < error <= 2.0**-4 * full.abs().max(), (error, full.abs().max())


@pytest.fixture(scope="module")
def tiny_model_dirs_mla(tmp_path_factory, default_model_dir):
    from atom_trio.testing import write_tiny_model_dir

    return write_tiny_model_dir("deepseek_v2", tmp_path_factory.mktemp("mla"), default_model_dir)


def test_the_same_memory_holds_twice_the_blocks(tiny_llama_dir, caplog):
    fields = dict(model=str(tiny_llama_dir), dtype="bfloat16", load_format="dummy", cpu_kv_cache_space_gb=0.001)
    blocks = {}
    for kv in ("auto", "fp8"):
        with caplog.at_level(logging.INFO, logger="atom_trio.runner"):
            runner = ModelRunner(EngineConfig(kv_cache_dtype=kv, **fields))
        try:
            blocks[kv] = runner.num_kv_blocks
            assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
        finally:
            runner.close()
    # 2 (K and V) x 2 layers x 16 tokens x 2 KV heads x 16 dims: 2 bytes an element, then 1
    assert blocks == {"auto": int(0.001 * 2**30) // 4096, "fp8": int(0.001 * 2**30) // 2048}
    assert blocks["fp8"] == 2 * blocks["auto"]
    assert any("float8_e4m3fn: 1 bytes an element" in r.getMessage() for r in caplog.records)


def test_a_bad_checkpoint_scale_is_a_model_load_error(tiny_llama_dir, tmp_path):
    out = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor([-0.5])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.kv_scale.*positive finite"):
        ModelRunner(EngineConfig(model=str(out), dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=4))


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3")


@settings(max_examples=40, deadline=None)
@given(
    kv=st.one_of(st.sampled_from([*KV_CACHE_DTYPES, "fp8_e5m2", "int8", "FP8", "e4m3"]), st.text(max_size=8)),
    dtype=st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
)
def test_kv_cache_dtype_is_checked_when_the_config_is_made(kv, dtype):
    """A name out of the set, e5m2 (with why), or a 16/32-bit cache that is not the model's: `InvalidConfig`."""
    fits = kv in KV_CACHE_DTYPES and (dtype == "auto" or kv in ("auto", dtype, "fp8", "fp8_e4m3"))
    if fits:
        assert EngineConfig(kv_cache_dtype=kv, dtype=dtype).kv_cache_dtype == kv
        return
    with pytest.raises(InvalidConfig) as info:
        EngineConfig(kv_cache_dtype=kv, dtype=dtype)
    assert "kv_cache_dtype" in info.value.options
    if kv == "fp8_e5m2":
        assert "is not supported: the FP8 KV cache is e4m3" in str(info.value)


def test_a_backend_without_an_fp8_cache_is_refused():
    class NoFp8(TorchRefBackend):
        supports_fp8_kv_cache = False

    rope = RotaryEmbedding(torch.ones(8), 64)
    with use_backend(NoFp8()):
        layer = Attention(2, 1, 16, 0.25, rope)
    with pytest.raises(ModelLoadError, match="kernel backend torch has no FP8 KV cache"):
        KVCacheLayout(layers=[layer], block_size=4, dtype=torch.float8_e4m3fn, device=torch.device("cpu"))


def test_compressed_tensors_fp8_kv_cache_scheme_is_read():
    """llm-compressor's static per-tensor FP8 KV scheme is accepted (its k_scale/v_scale load with the weights)."""
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                          "symmetric": True, "dynamic": False},
                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                "symmetric": True, "dynamic": True}}}
    raw = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": groups,
           "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                               "symmetric": True}}
    config = transformers.PretrainedConfig(quantization_config=raw)
    assert detect_quantization(config, None).method == "compressed-tensors"
    raw["kv_cache_scheme"] = dict(raw["kv_cache_scheme"], strategy="head")
    with pytest.raises(ModelLoadError, match="kv_cache_scheme"):
        detect_quantization(transformers.PretrainedConfig(quantization_config=json.loads(json.dumps(raw))), None)


def test_every_tensor_parallel_rank_takes_the_checkpoint_scales(scaled_llama_dir):
    """Per-tensor scales do not split with the heads: each rank of two holds the whole layer's."""
    from atom_trio.distributed import TensorParallelGroup
    from atom_trio.loader.resolve import resolve_model
    from atom_trio.ops import get_backend
    from atom_trio.runner import startup

    cpu = torch.device("cpu")
    resolved = resolve_model(EngineConfig(model=str(scaled_llama_dir), dtype="float32"))
    for rank in (0, 1):
        group = TensorParallelGroup(rank=rank, size=2)
        backend = get_backend("torch", cpu)
        model = startup.build_model(resolved, cpu, backend, level=0, tp_group=group, expert_parallel=False)
        startup.load_weights(model, resolved, seed=0, device=cpu, level=0, progress=False)
        layers = [m for m in model.modules() if isinstance(m, CachedAttention)]
        assert [layer.num_kv_heads for layer in layers] == [1, 1]  # half of the two KV heads
        for i, layer in enumerate(layers):
            assert (layer.k_scale.item(), layer.v_scale.item()) == pytest.approx(EXPECTED_SCALES[i])
