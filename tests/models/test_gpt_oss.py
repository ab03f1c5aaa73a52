"""GPT-OSS against transformers, in float32 on the CPU (the cpu backend and the torch reference).

The tiny model is written by transformers' ``save_pretrained`` with every parameter transformers
initialises to zero drawn at random (sinks, attention and expert biases, the router's bias), the
router sharpened as `ROUTER_GAIN` says, a sliding window shorter than every prompt, and a SwiGLU
clamp low enough that tiny activations reach it (both sides of ``up``, the top of ``gate``).
"""

from __future__ import annotations

import json
import random
import shutil

import attrs
import pytest
import safetensors.torch
import torch
import transformers
from test_models import check_mixed_step_logits

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.core import Scheduler
from atom_trio.errors import ModelLoadError
from atom_trio.models import GptOssForCausalLM
from atom_trio.runner import ModelRunner
from atom_trio.testing import ROUTER_GAIN, transformers_greedy

WINDOW = 5
TINY_GPT_OSS = dict(
    architectures=["GptOssForCausalLM"],
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=WINDOW,
    swiglu_limit=0.1,
    max_position_embeddings=256,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=4.0,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_max_position_embeddings=64,
    ),
)
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=2.0, ignore_eos=True)
BACKENDS = ["cpu", "torch"]


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory, default_model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    config = transformers.GptOssConfig(
        **TINY_GPT_OSS, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, dtype="float32"
    )
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0.0, 1.0 if name.endswith("sinks") else 0.05)
            if name.endswith("router.weight"):
                param.mul_(ROUTER_GAIN)
    out = tmp_path_factory.mktemp("tiny-gpt-oss") / "gpt_oss"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(gpt_oss_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(gpt_oss_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    """Six prompts longer than the window; four share a prefix of three blocks (12 tokens)."""
    rng = random.Random(7)
    shared = [rng.randrange(1, 49152) for _ in range(12)]
    tails = [[rng.randrange(1, 49152) for _ in range(n)] for n in (3, 9, 18, 1)]
    return [shared + tail for tail in tails] + [[rng.randrange(1, 49152) for _ in range(n)] for n in (7, 23)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(gpt_oss_dir, backend):
    check_mixed_step_logits(gpt_oss_dir, block_size=4, kernel_backend=backend)


def check_greedy_batched_chunked_and_prefix_cached(model_dir, expected, prompts, backend):
    """All prompts at once in chunks of at most 16 tokens, then again: the second time from the prefix cache."""
    with LLM(
        model=str(model_dir),
        dtype="float32",
        kernel_backend=backend,
        num_kv_blocks=128,
        block_size=4,
        max_num_batched_tokens=16,
    ) as llm:
        first = llm.generate(prompts, GREEDY, use_tqdm=False)
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
    for outputs in (first, again):
        assert [out.outputs[0].token_ids[: len(want)] for out, want in zip(outputs, expected)] == expected
    assert all(out.num_cached_tokens >= 12 for out in again[:4])
    assert len({t for tokens in expected for t in tokens}) > 3 * len(prompts), "a degenerate reference tests little"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_batched_chunked_and_prefix_cached_matches_transformers_generate(
    gpt_oss_dir, reference, prompts, backend
):
    expected = [transformers_greedy(reference, prompt, MAX_TOKENS, GREEDY.repetition_penalty) for prompt in prompts]
    check_greedy_batched_chunked_and_prefix_cached(gpt_oss_dir, expected, prompts, backend)


def test_sliding_window_blocks_are_released_as_generation_goes_on(gpt_oss_dir, reference, prompts):
    """The scheduler and the runner, step by step: a sequence holds at most ``ceil(W / block) + 1`` blocks of the
    sliding layers' group while it decodes, its full group one per 4 tokens, and the tokens stay transformers'."""
    runner = ModelRunner(
        EngineConfig(model=str(gpt_oss_dir), dtype="float32", kernel_backend="cpu", num_kv_blocks=64, block_size=4)
    )
    facts = runner.facts
    assert facts.kv_cache_windows == (None, WINDOW)
    scheduler = Scheduler(
        num_blocks=facts.num_kv_blocks,
        block_size=facts.block_size,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        max_model_len=facts.max_model_len,
        eos_token_ids=facts.eos_token_ids,
        kv_cache_windows=facts.kv_cache_windows,
    )
    manager = scheduler.block_manager
    long_run = attrs.evolve(GREEDY, max_tokens=20)
    for i, prompt in enumerate(prompts[4:]):
        scheduler.add_request(str(i), prompt, long_run)
    outputs = {"0": [], "1": []}
    most_sliding = most_full = 0
    try:
        while scheduler.has_unfinished():
            plan = scheduler.schedule()
            for seq in scheduler.running:
                full, sliding = (sum(b != manager.null_block for b in table) for table in seq.block_tables)
                assert full == len(seq.block_table) == -(-seq.num_computed_tokens // 4)
                if seq.num_computed_tokens > seq.prompt_len:  # decoding
                    assert sliding <= min(full, -(-WINDOW // 4) + 1)
                    most_sliding, most_full = max(most_sliding, sliding), max(most_full, full)
            for out in scheduler.update(plan, runner.execute(plan)):
                outputs[out.request_id] += out.new_token_ids
    finally:
        runner.close()
    # the window of a decode token spans at most ceil((W - 1) / block) + 1 blocks, all the sequence keeps
    assert most_sliding == -(-(WINDOW - 1) // 4) + 1 and most_full == -(-(23 + 20 - 1) // 4)
    assert manager.num_free_blocks == manager.num_blocks
    for i, prompt in enumerate(prompts[4:]):
        assert outputs[str(i)] == transformers_greedy(reference, prompt, 20, GREEDY.repetition_penalty)


def test_experts_load_split_and_transposed(gpt_oss_dir, reference):
    """Checkpoint layout: gate and up interleaved in the last dimension; ours: gate rows, then up rows."""
    files = safetensors.torch.load_file(gpt_oss_dir / "model.safetensors")
    config = transformers.AutoConfig.from_pretrained(gpt_oss_dir)
    model = GptOssForCausalLM(config)
    model.load_weights(files.items())
    experts = model.model.layers[1].mlp.experts
    gate_up = files["model.layers.1.mlp.experts.gate_up_proj"]  # [E, hidden, 2I]
    inter = experts.intermediate_size
    assert torch.equal(experts.w13_weight[5, :inter], gate_up[5, :, 0::2].T)
    assert torch.equal(experts.w13_weight[5, inter:], gate_up[5, :, 1::2].T)
    assert torch.equal(experts.w13_bias[5, inter:], files["model.layers.1.mlp.experts.gate_up_proj_bias"][5, 1::2])
    assert torch.equal(experts.w2_weight[2], files["model.layers.1.mlp.experts.down_proj"][2].T)
    assert torch.equal(model.model.layers[3].self_attn.attn.sinks, files["model.layers.3.self_attn.sinks"])
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [layer.self_attn.sliding_window for layer in reference.model.layers] == [WINDOW, None] * 2


def test_tensor_and_expert_parallel_give_the_tokens_of_one_rank(gpt_oss_dir, prompts):
    """Over gloo: TP=2 splits heads (and sinks) and every expert (the down bias added once); EP=2 whole experts."""

    def greedy(**fields):
        with LLM(model=str(gpt_oss_dir), dtype="float32", num_kv_blocks=96, block_size=4, **fields) as llm:
            return [out.outputs[0].token_ids for out in llm.generate(prompts[3:], GREEDY, use_tqdm=False)]

    single = greedy()
    assert greedy(tensor_parallel_size=2) == single
    assert greedy(tensor_parallel_size=2, enable_expert_parallel=True) == single


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types .* is not supported"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok 9 does not fit 8 experts"),
        (dict(swiglu_limit=0.0), "swiglu_limit 0.0 is not supported"),
        (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope type 'dynamic'"),
    ],
)
def test_what_the_model_does_not_handle_is_a_model_load_error(gpt_oss_dir, tmp_path, change, message):
    model_dir = tmp_path / "gpt_oss"
    shutil.copytree(gpt_oss_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4))


@pytest.mark.parametrize(("layers", "experts"), [(24, 32), (36, 128)], ids=["gpt-oss-20b", "gpt-oss-120b"])
def test_real_shapes_build_with_transformers_parameter_count(layers, experts):
    """The released shapes (on the meta device): our model holds what transformers' does."""
    config = transformers.GptOssConfig(num_hidden_layers=layers, num_local_experts=experts)
    with torch.device("meta"):
        reference = transformers.GptOssForCausalLM(config)
        ours = GptOssForCausalLM(config)
    assert sum(t.numel() for t in ours.state_dict().values()) == sum(t.numel() for t in reference.state_dict().values())
