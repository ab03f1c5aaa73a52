"""Our model implementations against transformers' on the same weights (fp32, CPU).

Logits come from the model runner driving mixed steps: whole prompts, a
prompt split across two steps (its second chunk attends to cached context),
and decode tokens, all in the same plans.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import safetensors.torch
import torch
import transformers

from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.sampling_params import SamplingParams
from atom_trio.models import LlamaForCausalLM, Qwen3ForCausalLM, get_model_class
from atom_trio.runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0)


def chunk(seq_id, tokens, start, *, prompt_len, sample, block_size=4, blocks_offset=0, num_kv_groups=1):
    """A chunk whose sequence owns the contiguous blocks from ``blocks_offset`` on (enough for the chunk).

    With several KV cache groups, group ``g`` owns them ``g * 8`` blocks further on, interleaved as the scheduler does.
    """
    nblocks = -(-(start + len(tokens)) // block_size)
    return SeqChunk(
        seq_id=seq_id,
        token_ids=list(tokens),
        start_pos=start,
        block_table=[blocks_offset + i + g * 8 for i in range(nblocks) for g in range(num_kv_groups)],
        prompt_len=prompt_len,
        sample=sample,
        sampling_params=GREEDY if sample else None,
    )


def check_mixed_step_logits(model_dir, *, block_size, reference=None, **fields):
    """Our logits over mixed steps against ``reference`` (default: transformers' model of ``model_dir``), in fp32."""
    hf = reference or transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(
        EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=block_size, **fields)
    )
    try:
        rng = random.Random(0)
        vocab = runner.vocab_size
        p1, p2, p3 = ([rng.randrange(vocab) for _ in range(n)] for n in (13, 21, 6))
        x, y = rng.randrange(vocab), rng.randrange(vocab)

        def c(seq_id, tokens, start, prompt, sample):
            return chunk(
                seq_id,
                tokens,
                start,
                prompt_len=len(prompt),
                sample=sample,
                block_size=block_size,
                blocks_offset=seq_id * 20,
                num_kv_groups=len(runner.kv_layout.windows),
            )

        step0 = StepPlan(step_id=0, chunks=[c(0, p1, 0, p1, True), c(1, p2[:8], 0, p2, False), c(2, p3, 0, p3, True)])
        step1 = StepPlan(step_id=1, chunks=[c(0, [x], 13, p1, True), c(1, p2[8:], 8, p2, True), c(2, [y], 6, p3, True)])
        got = torch.cat([runner.compute_logits(step0), runner.compute_logits(step1)])
        with torch.no_grad():
            want = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in (p1, p3, p1 + [x], p2, p3 + [y])])
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)
    finally:
        runner.close()


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen3"])
def test_tiny_model_logits_match_transformers(tiny_model_dirs, arch):
    check_mixed_step_logits(tiny_model_dirs[arch], block_size=4)


def test_default_model_logits_match_transformers(default_model_dir):
    check_mixed_step_logits(default_model_dir, block_size=16)


def test_registry_maps_architectures(tiny_model_dirs):
    config = transformers.AutoConfig.from_pretrained(tiny_model_dirs["qwen3"])
    assert get_model_class(config) is Qwen3ForCausalLM
    config.architectures = ["MistralForCausalLM", "LlamaForCausalLM"]
    assert get_model_class(config) is LlamaForCausalLM
    config.architectures = []  # as configs read from GGUF metadata may come
    assert get_model_class(config) is Qwen3ForCausalLM
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported"):
        get_model_class(config)


def test_load_weights_stacks_packed_shards(tiny_llama_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    weights = safetensors.torch.load_file(tiny_llama_dir / "model.safetensors")
    model = LlamaForCausalLM(config)
    model.load_weights(weights.items())
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.split(attn.qkv_proj.weight.T)
    assert torch.equal(k.T, weights["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v.T, weights["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(up, weights["model.layers.0.mlp.up_proj.weight"])
    assert not model.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])


def test_load_weights_rejects_incomplete_or_foreign_checkpoints(tiny_llama_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    weights = safetensors.torch.load_file(tiny_llama_dir / "model.safetensors")
    missing_v = {n: t for n, t in weights.items() if n != "model.layers.0.self_attn.v_proj.weight"}
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors.*qkv_proj.weight\[v\]"):
        LlamaForCausalLM(config).load_weights(missing_v.items())
    with pytest.raises(ModelLoadError, match="matches no parameter"):
        LlamaForCausalLM(config).load_weights([*weights.items(), ("model.layers.0.mlp.extra.weight", torch.zeros(1))])
    wrong_shape = dict(weights, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        LlamaForCausalLM(config).load_weights(wrong_shape.items())


def test_unsupported_config_feature_is_a_model_load_error(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "dynamic-rope"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="rope type 'dynamic' is not supported"):
        ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4))
