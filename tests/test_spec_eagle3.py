"""The EAGLE-3 head on a tiny random Llama, written in the published layout (`atom_trio.testing.eagle`).

The head drafts from half the vocabulary (``d2t`` maps it). The target's
taps must be the inputs of the layers named, as transformers computes them;
the head must draft what transformers' Llama pieces compute in EAGLE-3's
arrangement, and sample only from its draft vocabulary; bad configs and
heads must be refused by name. (Whole engine runs are test_spec_heads.py's;
the distribution test is the runner's, in tests/runner/test_spec_distribution.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk
from atom_trio.errors import InvalidConfig, ModelLoadError
from atom_trio.runner import ModelRunner
from atom_trio.runner.drafter import DraftRequest
from atom_trio.testing import greedy_window_drafts, write_tiny_eagle3_head

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "seed": 0}


@pytest.fixture(scope="module")
def head(tiny_llama_dir, tmp_path_factory) -> Path:
    """A random EAGLE-3 head for the tiny Llama, tapping the inputs of its layers 0, 1 and 1."""
    return write_tiny_eagle3_head(tiny_llama_dir, tmp_path_factory.mktemp("eagle3") / "random")


def _spec(head: Path, k: int = 3) -> dict:
    return {"method": "eagle3", "num_speculative_tokens": k, "draft_model": str(head)}


def test_the_config_and_the_head_are_checked(tiny_llama_dir, tmp_path) -> None:
    with pytest.raises(InvalidConfig, match="needs a draft model"):
        EngineConfig(speculative_config={"method": "eagle3", "num_speculative_tokens": 2})
    head = write_tiny_eagle3_head(tiny_llama_dir, tmp_path / "head")
    config = json.loads((head / "config.json").read_text())
    # Without named taps the target's default choice applies: layers 2, 1 and -1 of a 2-layer model do not exist.
    (head / "config.json").write_text(json.dumps({**config, "eagle_aux_hidden_state_layer_ids": None}))
    with pytest.raises(ModelLoadError, match=r"eagle_aux_hidden_state_layer_ids \[2, 1, -1\]"):
        LLM(str(tiny_llama_dir), speculative_config=_spec(head), **ENGINE)
    # A draft vocabulary needs the head's own LM head.
    weights = safetensors.torch.load_file(head / "model.safetensors")
    del weights["lm_head.weight"]
    safetensors.torch.save_file(weights, head / "model.safetensors")
    (head / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="draft_vocab_size"):
        LLM(str(tiny_llama_dir), speculative_config=_spec(head), **ENGINE)


@pytest.fixture(scope="module")
def runner(tiny_llama_dir, head):
    model_runner = ModelRunner(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, max_model_len=128, seed=0, speculative_config=_spec(head, 4)
    ))
    yield model_runner
    model_runner.close()


@torch.inference_mode()
def test_the_target_returns_the_inputs_of_the_tapped_layers(runner, tiny_llama_dir) -> None:
    import transformers

    target = tiny_llama_dir
    ids = [5, 900, 17, 4242, 8, 31]
    chunk = SeqChunk(seq_id=0, token_ids=ids, start_pos=0, block_table=[0], prompt_len=len(ids), sample=False)
    runner.run_model(runner.inputs.prepare([chunk]))
    taps = runner._taps
    model = transformers.LlamaForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    states = model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [i]: layer i's input
    torch.testing.assert_close(taps, torch.cat([states[0][0], states[1][0], states[1][0]], -1), atol=1e-5, rtol=1e-5)


def _reference_drafts(target_dir: Path, head_dir: Path, tokens: list[int], taps: torch.Tensor, k: int) -> list[int]:
    """Greedy EAGLE-3 drafting written with transformers' Llama pieces, recomputing the whole window each step."""
    from transformers.models.llama import modeling_llama

    values = json.loads((head_dir / "config.json").read_text())
    config = modeling_llama.LlamaConfig(**{key: v for key, v in values.items() if key != "architectures"})
    config._attn_implementation = "sdpa"
    weights = safetensors.torch.load_file(head_dir / "model.safetensors")
    target = safetensors.torch.load_file(target_dir / "model.safetensors")
    hidden = config.hidden_size
    attention = modeling_llama.LlamaAttention(config, 0).eval()
    for name in ("q_proj", "k_proj", "v_proj"):  # EAGLE-3's attention reads [embedding, hidden]
        setattr(attention, name, torch.nn.Linear(2 * hidden, getattr(attention, name).out_features, bias=False))
    attention.load_state_dict({n.removeprefix("midlayer.self_attn."): w for n, w in weights.items()
                               if n.startswith("midlayer.self_attn.")})
    mlp = modeling_llama.LlamaMLP(config).eval()
    mlp.load_state_dict({n.removeprefix("midlayer.mlp."): w for n, w in weights.items() if n.startswith("midlayer.mlp.")})

    def norm(name: str) -> modeling_llama.LlamaRMSNorm:
        module = modeling_llama.LlamaRMSNorm(hidden, config.rms_norm_eps)
        module.weight.data = weights[name]
        return module

    input_norm, hidden_norm = norm("midlayer.input_layernorm.weight"), norm("midlayer.hidden_norm.weight")
    post_norm, final_norm = norm("midlayer.post_attention_layernorm.weight"), norm("norm.weight")
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    embed = target["model.embed_tokens.weight"]
    start = len(tokens) - 1 - len(taps)  # taps[i] are position start + i's, read with token start + i + 1
    ids, features = list(tokens[start + 1 :]), taps @ weights["fc.weight"].T
    drafts = []
    with torch.no_grad():
        for _ in range(k):
            x = torch.cat([input_norm(embed[ids]), hidden_norm(features)], -1)[None]
            positions = torch.arange(start, start + len(ids))[None]
            attended = attention(x, position_embeddings=rotary(x, positions), attention_mask=None)[0][0]
            residual = attended + (hidden_norm(features) if values.get("norm_before_residual") else features)
            out = mlp(post_norm(residual)) + residual
            draft = int((final_norm(out[-1]) @ weights["lm_head.weight"].T).argmax())
            drafts.append(draft + int(weights["d2t"][draft]))
            ids.append(drafts[-1])
            features = torch.cat([features, out[-1:]])
    return drafts


def test_a_head_that_norms_before_its_residual_drafts_what_transformers_layers_compute(tiny_llama_dir, tmp_path) -> None:
    head = write_tiny_eagle3_head(tiny_llama_dir, tmp_path / "head", seed=2)
    config = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**config, "norm_before_residual": True}))
    runner = ModelRunner(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, max_model_len=128, seed=0,
        speculative_config=_spec(head, 4),
    ))
    try:
        for context, taps, drafts in greedy_window_drafts(runner.drafter, runner.vocab_size, 3 * 64):
            assert drafts == _reference_drafts(tiny_llama_dir, head, context, taps, 4)
    finally:
        runner.close()


def test_the_head_drafts_what_transformers_layers_compute(runner, tiny_llama_dir, head) -> None:
    target = tiny_llama_dir
    for context, taps, drafts in greedy_window_drafts(runner.drafter, runner.vocab_size, 3 * 64):
        assert drafts == _reference_drafts(target, head, context, taps, 4)
    # Sampled drafts come from the draft vocabulary, with q zero outside it.
    hot = SamplingParams(temperature=1.0, seed=3)
    proposal = runner.drafter.propose([DraftRequest(1, context, 10, hot, taps)])
    weights = safetensors.torch.load_file(head / "model.safetensors")
    in_draft_vocab = weights["t2d"]
    assert all(in_draft_vocab[t] for t in proposal.token_ids[0])
    q = proposal.draft_probs[0]
    assert q.shape == (4, runner.vocab_size) and float(q[:, ~in_draft_vocab].abs().max()) == 0.0
    torch.testing.assert_close(q.sum(-1), torch.ones(4))
