"""Kimi-K2: DeepSeek-V3's architecture under its own ``model_type``, with a tiktoken tokenizer that is checkpoint code.

A tiny checkpoint in Kimi's layout (`atom_trio.testing.write_tiny_kimi_k2`: Kimi-K2-Instruct's structural
config values, ``rope_scaling`` as Kimi's config.json spells it, ``auto_map`` naming model code that fails
if run, ``tokenization_kimi.py``) runs through the whole engine with ``trust_remote_code``: its config reads
as DeepSeek-V3's, its chat template applies, and greedy decoding equals transformers' DeepSeek-V3 in fp32.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from atom_trio import LLM, SamplingParams
from atom_trio.loader.hf_config import read_hf_config
from atom_trio.models import DeepseekV3ForCausalLM, get_model_class
from atom_trio.testing import KIMI_K2_STRUCTURE, transformers_greedy, write_tiny_kimi_k2

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好。",
    "It's 12345 + 678, they'd said.",
    "In the beginning the tokens were bytes",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    return write_tiny_kimi_k2(tmp_path_factory.mktemp("kimi") / "tiny-kimi-k2")


@pytest.fixture(scope="module")
def kimi_llm(kimi_dir):
    with LLM(
        model=str(kimi_dir), trust_remote_code=True, dtype="float32", num_kv_blocks=64, block_size=4,
        max_num_batched_tokens=16,
    ) as llm:
        yield llm


def test_the_config_reads_as_deepseek_v3_with_kimis_values(kimi_dir):
    config = read_hf_config(kimi_dir)
    assert isinstance(config, transformers.DeepseekV3Config)
    assert get_model_class(config) is DeepseekV3ForCausalLM
    scaling = KIMI_K2_STRUCTURE["rope_scaling"]
    assert config.rope_parameters["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        assert config.rope_parameters[key] == scaling[key]
    for key in ("topk_method", "scoring_func", "n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace"):
        assert getattr(config, key) == KIMI_K2_STRUCTURE[key]


def test_the_chat_template_renders_kimis_turns(kimi_llm):
    tokenizer = kimi_llm.tokenizer
    text = "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hello, world!<|im_end|>"
    text += "<|im_assistant|>assistant<|im_middle|>"
    (out,) = kimi_llm.generate([CHAT], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert out.prompt_token_ids == tokenizer.encode(text)
    special = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_system|>", "<|im_user|>", "<|im_middle|>")}
    assert special <= set(out.prompt_token_ids) and len(special) == 3


def test_greedy_through_the_engine_matches_transformers_deepseek_v3(kimi_dir, kimi_llm):
    """Batched and chunked (16 tokens a step), text and chat prompts; the model code the checkpoint ships never ran."""
    assert (kimi_dir / "modeling_deepseek.py").read_text().startswith("raise")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        kimi_dir, config=read_hf_config(kimi_dir), dtype=torch.float32
    ).eval()
    prompts = [*PROMPTS, CHAT]
    outputs = kimi_llm.generate(prompts, GREEDY, use_tqdm=False)
    distinct = set()
    for out in outputs:
        expected = transformers_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        assert out.outputs[0].token_ids[: len(expected)] == expected
        distinct.update(expected)
    assert len(distinct) > 2 * len(prompts), "a degenerate reference would hardly test the model"
