"""Quantized experts in a tiny Qwen3-MoE, loaded with no flag, against transformers on the dequantized weights.

The checkpoints are written per expert, as DeepSeek-V3, Qwen3-30B-A3B-FP8 and
the GPTQ/AWQ community models ship them: FP8 with 16 x 16 ``weight_scale_inv``
blocks, compressed-tensors' FP8 with a ``weight_scale`` per output channel and
its asymmetric pack-quantized 4-bit (written here by their spec, packed by the
library's packer: the library quantizes ``Linear`` modules, and transformers
holds the experts as stacked parameters), GPTQ (asymmetric, v1 zero points)
and AWQ 4-bit, all 4-bit formats in groups of 16. Transformers' Qwen3-MoE holds
its experts stacked (``experts.gate_up_proj``), so the reference gets the
dequantized per-expert weights stacked the same way (`stacked_like_transformers`).

The CPU backend dequantizes at load; the torch reference keeps the experts
quantized and dequantizes them on every call, as the GPU kernel does tile by
tile. Weight-only checkpoints then match in fp32; FP8 ones match on the CPU
and stay near on the reference backend, whose dense layers quantize their activations.
"""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch
import transformers
from test_detection import FP8_DYNAMIC, compressed
from test_formats import assert_fp32_equal, logits_against_reference

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, MIN_AMAX
from atom_trio.distributed import SINGLE, TensorParallelGroup
from atom_trio.loader.resolve import resolve_model
from atom_trio.ops import CpuBackend, TorchRefBackend
from atom_trio.ops.quant_experts import dequantize_experts
from atom_trio.runner.startup import build_model, load_weights
from atom_trio.testing import transformers_greedy, write_tiny_model_dir
from atom_trio.testing.quantize import is_quantized_linear, write_quantized

W4A16_ASYMMETRIC = compressed(
    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False, "dynamic": False},
    None,
    "pack-quantized",
)


def write_compressed(src, dst, quantization_config, quantize) -> dict[str, torch.Tensor]:
    """``src`` with each linear weight (experts' included, one per expert) replaced by ``quantize(name, weight)``'s
    tensors; returns the weights they stand for."""
    tensors, dequantized = {}, {}
    for name, tensor in safetensors.torch.load_file(src / "model.safetensors").items():
        if is_quantized_linear(name, tensor):
            parts, dequantized[name] = quantize(name.removesuffix(".weight"), tensor.float())
            tensors.update(parts)
        else:
            tensors[name], dequantized[name] = tensor, tensor.float()
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    safetensors.torch.save_file(tensors, dst / "model.safetensors")
    return dequantized


def fp8_per_channel(prefix: str, w: torch.Tensor):
    """compressed-tensors' FP8 W8A8 by its spec: ``weight`` float8_e4m3fn, ``weight_scale`` ``[out, 1]`` = amax / 448."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale}, q.float() * scale


def w4a16_asymmetric(prefix: str, w: torch.Tensor, group: int = 16):
    """compressed-tensors' pack-quantized asymmetric int4 in groups: signed values and zero points -8..7, packed
    by the library's own `pack_to_int32` (values along the input, zero points along the output, both plus 8)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    grouped = w.reshape(w.shape[0], -1, group)
    low, high = grouped.amin(dim=2).clamp(max=0), grouped.amax(dim=2).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=MIN_AMAX)
    zero = (torch.round(-low / scale) - 8).clamp(-8, 7)
    q = (torch.round(grouped / scale[..., None]) + zero[..., None]).clamp(-8, 7)
    parts = {
        f"{prefix}.weight_packed": pack_to_int32(q.reshape(w.shape).to(torch.int8), 4),
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_zero_point": pack_to_int32(zero.to(torch.int8), 4, packed_dim=0),
        f"{prefix}.weight_shape": torch.tensor(list(w.shape)),
    }
    return parts, ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


WRITERS = {
    "fp8-block": lambda src, dst: write_quantized(src, dst, "fp8", block_size=(16, 16)),
    "fp8-channel": lambda src, dst: write_compressed(src, dst, FP8_DYNAMIC, fp8_per_channel),
    "gptq": lambda src, dst: write_quantized(src, dst, "gptq", group_size=16, sym=False),
    "awq": lambda src, dst: write_quantized(src, dst, "awq", group_size=16),
    "ct-w4a16": lambda src, dst: write_compressed(src, dst, W4A16_ASYMMETRIC, w4a16_asymmetric),
}
WEIGHT_ONLY = {"gptq", "awq", "ct-w4a16"}
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=2.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory, default_model_dir):
    return write_tiny_model_dir("qwen3_moe", tmp_path_factory.mktemp("moe-src"), default_model_dir)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, moe_src):
    """``quantized(fmt)``: (the checkpoint's directory, transformers' model on its dequantized weights)."""
    root = tmp_path_factory.mktemp("quantized-experts")
    made = {}

    def get(fmt):
        if fmt not in made:
            dequantized = WRITERS[fmt](moe_src, root / fmt)
            reference = transformers.AutoModelForCausalLM.from_pretrained(moe_src, dtype=torch.float32).eval()
            missing, unexpected = reference.load_state_dict(stacked_like_transformers(dequantized), strict=False)
            assert not unexpected and all("rotary" in name or name == "lm_head.weight" for name in missing)
            made[fmt] = (root / fmt, reference)
        return made[fmt]

    return get


def stacked_like_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert ``experts.<e>.{gate,up,down}_proj.weight`` as transformers holds them: ``gate_up_proj`` ``[E, 2I, H]``
    (each expert's gate rows, then its up rows) and ``down_proj`` ``[E, H, I]``."""
    out, experts = {}, {}
    for name, tensor in state.items():
        if match := re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name):
            experts.setdefault(match[1], {})[int(match[2]), match[3]] = tensor
        else:
            out[name] = tensor
    for prefix, tensors in experts.items():
        count = 1 + max(expert for expert, _ in tensors)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((tensors[e, "gate"], tensors[e, "up"])) for e in range(count)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([tensors[e, "down"] for e in range(count)])
    return out


def test_stacking_gives_transformers_own_experts(moe_src):
    """The reference's conversion checked on the unquantized checkpoint: it rebuilds what transformers loads."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(moe_src, dtype=torch.float32)
    stacked = stacked_like_transformers(safetensors.torch.load_file(moe_src / "model.safetensors"))
    for name, tensor in reference.state_dict().items():
        if "experts" in name:
            assert torch.equal(stacked[name], tensor), name


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_dequantized_on_load_equals_transformers(quantized, fmt):
    model_dir, reference = quantized(fmt)
    got, want = logits_against_reference(model_dir, reference, kernel_backend="cpu")
    assert_fp32_equal(got, want)


def loaded_model(model_dir, backend, tp_group=SINGLE):
    """The model as a runner builds and loads it (no KV cache, no warm-up)."""
    resolved = resolve_model(EngineConfig(model=str(model_dir), dtype="float32"))
    options = dict(level=0, tp_group=tp_group, expert_parallel=False)
    model = build_model(resolved, torch.device("cpu"), backend, **options)
    load_weights(model, resolved, seed=0, device=torch.device("cpu"), level=0, progress=False)
    return model


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_experts_stay_quantized_where_the_backend_computes_on_them(quantized, fmt):
    model_dir, _ = quantized(fmt)
    kept = loaded_model(model_dir, TorchRefBackend()).model.layers[2].mlp.experts
    assert kept.quant.kind == ("w4a16" if fmt in WEIGHT_ONLY else "fp8")
    assert kept.w13_weight.dtype == (torch.uint8 if fmt in WEIGHT_ONLY else FP8_DTYPE)
    dense = loaded_model(model_dir, CpuBackend()).model.layers[2].mlp.experts
    assert dense.quant is None and dense.w13_weight.dtype == torch.float32
    assert torch.equal(dense.w2_weight, dequantize_experts(kept.w2_weight, kept.w2_scale, kept.w2_zeros, kept.quant))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_quantized_experts_on_the_reference_backend(quantized, fmt):
    model_dir, reference = quantized(fmt)
    got, want = logits_against_reference(model_dir, reference, kernel_backend="torch")
    if fmt in WEIGHT_ONLY:
        assert_fp32_equal(got, want)
    else:  # the experts are weight-only; the dense FP8 layers round their activations (misplaced scales: > 0.5)
        assert 0 < (got - want).abs().max().item() < 0.1 * want.abs().max().item()


@pytest.fixture(scope="module")
def prompts():
    return [[(37 * i + 11 * j) % 40000 + 5 for j in range(n)] for i, n in enumerate((7, 19, 12))]


def engine_greedy(model_dir, prompts, **fields):
    with LLM(
        model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, **fields
    ) as llm:
        return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


def assert_transformers_tokens(reference, prompts, ours):
    expected = [transformers_greedy(reference, prompt, MAX_TOKENS, GREEDY.repetition_penalty) for prompt in prompts]
    assert [tokens[: len(want)] for tokens, want in zip(ours, expected)] == expected


def test_greedy_tokens_equal_transformers(quantized, prompts):
    """FP8-block experts through the engine (batched, chunked) on the CPU: transformers' greedy tokens."""
    model_dir, reference = quantized("fp8-block")
    assert_transformers_tokens(reference, prompts, engine_greedy(model_dir, prompts))


@pytest.mark.slow
def test_tensor_parallel_slices_scales_with_their_weights(quantized, prompts):
    """TP=2 over gloo: each rank takes its half of every expert's gate/up rows and down columns, with their
    4-bit groups' scales and zero points."""
    model_dir, reference = quantized("gptq")
    assert_transformers_tokens(reference, prompts, engine_greedy(model_dir, prompts, tensor_parallel_size=2))


def test_a_split_that_cuts_a_block_is_refused(tmp_path, moe_src):
    """32 x 32 FP8 blocks over 32 intermediate features: two ranks of 16 would each hold half a block."""
    model_dir = tmp_path / "fp8-32"
    write_quantized(moe_src, model_dir, "fp8", block_size=(32, 32))
    with pytest.raises(ModelLoadError, match=r"16 a rank \(tensor_parallel_size 2\), do not divide into the FP8 blocks of 32 x 32"):
        loaded_model(model_dir, TorchRefBackend(), TensorParallelGroup(rank=1, size=2))
