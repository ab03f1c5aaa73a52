"""EAGLE speculative decoding on a tiny random Llama with tiny EAGLE heads written in the published layout.

The heads are `atom_trio.testing.eagle`'s: a random one, whose drafts are
mostly rejected, and the copy head on a target that mostly repeats itself,
whose drafts are mostly accepted. Either way greedy outputs must be the
plain engine's, and seeded sampled requests must not depend on their batch
mates; the head itself must compute what transformers' Llama layer does in
EAGLE's arrangement. (The distribution test is the runner's, in
tests/runner/test_spec_distribution.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.errors import InvalidConfig, ModelLoadError
from atom_trio.runner import ModelRunner
from atom_trio.runner.drafter import DraftRequest
from atom_trio.testing import write_echo_target, write_tiny_eagle_head

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "seed": 0}
PROMPTS = ["The quick brown fox jumps over", "Once upon a time there was a", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def targets(tiny_llama_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """By head: (target, head). The copy head drafts for a target that repeats itself often."""
    root = tmp_path_factory.mktemp("eagle")
    echo = write_echo_target(tiny_llama_dir, root / "echo")
    return {
        "random": (tiny_llama_dir, write_tiny_eagle_head(tiny_llama_dir, root / "random")),
        "copy": (echo, write_tiny_eagle_head(echo, root / "copy", copy=True)),
    }


def _eagle(model_dir: Path, head: Path, k: int = 3, **fields) -> LLM:
    spec = {"method": "eagle", "num_speculative_tokens": k, "draft_model": str(head)}
    return LLM(str(model_dir), speculative_config=spec, **ENGINE, **fields)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("head", ["random", "copy"])
def test_greedy_outputs_equal_the_plain_engine(targets, head) -> None:
    target, draft = targets[head]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    with LLM(str(target), **ENGINE) as plain:
        expected = _tokens(plain, PROMPTS, params)
    with _eagle(target, draft) as spec:
        assert _tokens(spec, PROMPTS, params) == expected
        stats = spec.stats()
    assert stats.spec_num_drafts > 0
    if head == "copy":
        assert stats.spec_num_accepted_tokens > 0


def test_asynchronous_scheduling_carries_the_drafts_and_their_hidden_states(targets) -> None:
    target, draft = targets["copy"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(str(target), **ENGINE) as plain:
        expected = _tokens(plain, PROMPTS, params)
    with _eagle(target, draft, async_scheduling=True) as spec:
        assert _tokens(spec, PROMPTS, params) == expected
        assert spec.stats().spec_num_accepted_tokens > 0


def test_seeded_sampling_reproduces_whatever_the_batch_mates(targets) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    mates = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    with _eagle(*targets["copy"]) as spec:
        alone = _tokens(spec, PROMPTS[:1], seeded)[0]
        crowded = spec.generate(PROMPTS + PROMPTS[:1], [mates, seeded, mates, seeded], use_tqdm=False)
        assert crowded[3].outputs[0].token_ids == alone
        assert spec.stats().spec_num_accepted_tokens > 0


def test_a_draft_model_is_required_and_checked(tiny_llama_dir, tmp_path) -> None:
    with pytest.raises(InvalidConfig, match="needs a draft model"):
        EngineConfig(speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(InvalidConfig, match="drafts on one rank"):
        EngineConfig(
            speculative_config={"method": "eagle", "num_speculative_tokens": 2, "model": "x"}, tensor_parallel_size=2
        )
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    wrong = write_tiny_eagle_head(tiny_llama_dir, tmp_path / "wrong")
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1, "vocab_size": 77}))
    with pytest.raises(ModelLoadError, match="vocab_size 77 differs"):
        _eagle(tiny_llama_dir, wrong)


def _reference_drafts(target_dir: Path, head_dir: Path, tokens: list[int], hidden: torch.Tensor, k: int) -> list[int]:
    """Greedy EAGLE drafting written with transformers' Llama layer, recomputing the whole window each step."""
    import transformers
    from transformers.models.llama import modeling_llama

    config = transformers.LlamaConfig(**{
        key: value for key, value in json.loads((head_dir / "config.json").read_text()).items() if key != "architectures"
    })
    config._attn_implementation = "sdpa"
    weights = safetensors.torch.load_file(head_dir / "model.safetensors")
    target = safetensors.torch.load_file(target_dir / "model.safetensors")
    layer = modeling_llama.LlamaDecoderLayer(config, 0).eval()
    layer.input_layernorm = torch.nn.Identity()
    layer.load_state_dict({n.removeprefix("layers.0."): w for n, w in weights.items() if n.startswith("layers.0.")},
                          strict=False)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    embed, lm_head = target["model.embed_tokens.weight"], target["lm_head.weight"]
    start = len(tokens) - 1 - len(hidden)  # hidden[i] is position start + i's, read with token start + i + 1
    ids, features = list(tokens[start + 1 :]), hidden
    drafts = []
    with torch.no_grad():
        for _ in range(k):
            x = torch.cat([embed[ids], features], -1) @ weights["fc.weight"].T
            positions = torch.arange(start, start + len(ids))[None]
            out = layer(x[None], position_embeddings=rotary(x[None], positions))[0]
            drafts.append(int((out[-1] @ lm_head.T).argmax()))
            ids.append(drafts[-1])
            features = torch.cat([features, out[-1:]])
    return drafts


def test_the_head_drafts_what_transformers_layers_compute(targets) -> None:
    target, head = targets["random"]
    runner = ModelRunner(EngineConfig(
        model=str(target), dtype="float32", num_kv_blocks=16, max_model_len=128, seed=0,
        speculative_config={"method": "eagle", "num_speculative_tokens": 4, "draft_model": str(head)},
    ))
    try:
        generator = torch.Generator().manual_seed(5)
        context = torch.randint(0, runner.vocab_size, (12,), generator=generator).tolist()
        hidden = torch.randn(9, 64, generator=generator)
        greedy = SamplingParams(temperature=0.0)
        proposal = runner.drafter.propose([DraftRequest(0, context[:9], 9, greedy, hidden[:6])])
        assert proposal.token_ids == [_reference_drafts(target, head, context[:9], hidden[:6], 4)]
        # The window continues: three more hidden states for three more tokens.
        proposal = runner.drafter.propose([DraftRequest(0, context, 10, greedy, hidden[6:])])
        assert proposal.token_ids == [_reference_drafts(target, head, context, hidden, 4)]
        assert proposal.draft_probs == [None]
    finally:
        runner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", [0, 3], ids=["eager", "compiled-with-graphs"])
def test_greedy_outputs_equal_the_plain_engine_on_the_gpu(targets, level) -> None:
    """On the GPU (Triton kernels, and at level 3 decode graphs beside the eager verify steps), in float32."""
    target, draft = targets["copy"]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    fields = {**ENGINE, "device": "cuda", "level": level}
    with LLM(str(target), **fields) as plain:
        expected = _tokens(plain, PROMPTS, params)
    spec = {"method": "eagle", "num_speculative_tokens": 3, "draft_model": str(draft)}
    with LLM(str(target), speculative_config=spec, **fields) as eagle:
        assert _tokens(eagle, PROMPTS, params) == expected
        assert eagle.stats().spec_num_accepted_tokens > 0
