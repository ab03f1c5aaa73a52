"""GPT-OSS with MXFP4 experts, as gpt-oss-20b ships them, against transformers' own MXFP4 loading, in fp32.

The tiny model of `test_gpt_oss` has its experts quantized by the OCP rule
(`quantize_mxfp4`) into the checkpoint's tensors: ``gate_up_proj_blocks`` uint8
``[E, 2I, H / 32, 16]`` (gate and up rows interleaved, as the bf16 tensor's
columns are), ``gate_up_proj_scales`` e8m0 ``[E, 2I, H / 32]``, and the same for
``down_proj`` ``[E, H, I / 32, ...]``, with gpt-oss's ``quantization_config``.
The reference is transformers reading that checkpoint itself
(``Mxfp4Config(dequantize=True)``), so the layout is checked against its
reader, not only against our writer. The CPU backend dequantizes at load;
the torch reference keeps the experts in MXFP4 and dequantizes on every call.
"""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
import transformers
from test_gpt_oss import (  # noqa: F401  (fixtures)
    BACKENDS,
    GREEDY,
    MAX_TOKENS,
    check_greedy_batched_chunked_and_prefix_cached,
    gpt_oss_dir,
    prompts,
)
from test_models import check_mixed_step_logits

from atom_trio import LLM
from atom_trio.config import EngineConfig
from atom_trio.distributed import SINGLE
from atom_trio.loader.resolve import resolve_model
from atom_trio.ops import CpuBackend, TorchRefBackend
from atom_trio.ops.quant_experts import dequantize_experts, dequantize_mxfp4
from atom_trio.runner.startup import build_model, load_weights
from atom_trio.testing import transformers_greedy
from atom_trio.testing.quantize import quantize_mxfp4

GPT_OSS_MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}
"""gpt-oss-20b's ``quantization_config``: everything but the experts stays in bf16."""


@pytest.fixture(scope="module")
def mxfp4_dir(gpt_oss_dir, tmp_path_factory):  # noqa: F811
    """The tiny GPT-OSS with its experts' weights in MXFP4 (biases stay, as in gpt-oss)."""
    out = tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4") / "gpt_oss"
    out.mkdir()
    tensors = {}
    for name, tensor in safetensors.torch.load_file(gpt_oss_dir / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> blocks of [E, out, in]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(tensor.transpose(1, 2))
        else:
            tensors[name] = tensor
    for file in gpt_oss_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": GPT_OSS_MXFP4_CONFIG}))
    safetensors.torch.save_file(tensors, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def reference(mxfp4_dir):
    mxfp4 = transformers.Mxfp4Config(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(mxfp4_dir, dtype=torch.float32, quantization_config=mxfp4)


def test_transformers_reads_the_checkpoint_as_its_format_says(mxfp4_dir, reference):
    """The writer follows the format: transformers' reader gets e2m1 * 2 ** (s - 127), gate/up interleaved."""
    files = safetensors.torch.load_file(mxfp4_dir / "model.safetensors")
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"):
        ours = dequantize_mxfp4(files[f"{name}_blocks"], files[f"{name}_scales"]).transpose(1, 2)
        assert torch.equal(reference.get_parameter(name), ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(mxfp4_dir, reference, backend):
    check_mixed_step_logits(mxfp4_dir, block_size=4, reference=reference, kernel_backend=backend)


def test_experts_load_as_mxfp4_or_dequantized(mxfp4_dir, reference):
    """The torch reference keeps the blocks and scales in the kernel layout (gate rows, then up rows); the CPU
    dequantizes them once, to what transformers computes with."""
    resolved = resolve_model(EngineConfig(model=str(mxfp4_dir), dtype="float32"))

    def experts(backend):
        model = build_model(resolved, torch.device("cpu"), backend, level=0, tp_group=SINGLE, expert_parallel=False)
        load_weights(model, resolved, seed=0, device=torch.device("cpu"), level=0, progress=False)
        return model.model.layers[1].mlp.experts

    kept, dense = experts(TorchRefBackend()), experts(CpuBackend())
    assert kept.quant.kind == "mxfp4" and kept.w13_weight.dtype == torch.uint8 and dense.quant is None
    gate_up = reference.get_parameter("model.layers.1.mlp.experts.gate_up_proj")  # [E, hidden, 2I] interleaved
    inter = dense.intermediate_size
    assert torch.equal(dense.w13_weight[:, :inter], gate_up[..., 0::2].transpose(1, 2))
    assert torch.equal(dense.w13_weight[:, inter:], gate_up[..., 1::2].transpose(1, 2))
    assert torch.equal(dequantize_experts(kept.w2_weight, kept.w2_scale, None, kept.quant), dense.w2_weight)


@pytest.fixture(scope="module")
def expected(reference, prompts):  # noqa: F811
    return [transformers_greedy(reference, prompt, MAX_TOKENS, GREEDY.repetition_penalty) for prompt in prompts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_batched_chunked_and_prefix_cached_matches_transformers(mxfp4_dir, expected, prompts, backend):  # noqa: F811
    check_greedy_batched_chunked_and_prefix_cached(mxfp4_dir, expected, prompts, backend)


@pytest.mark.slow
def test_expert_parallel_ranks_hold_whole_mxfp4_experts(mxfp4_dir, expected, prompts):  # noqa: F811
    """EP=2 over gloo: each rank loads half the experts' blocks and scales."""
    with LLM(
        model=str(mxfp4_dir),
        dtype="float32",
        num_kv_blocks=96,
        block_size=4,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
    ) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [out.outputs[0].token_ids[: len(want)] for out, want in zip(outputs, expected)] == expected
