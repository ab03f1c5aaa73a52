"""The GGUF reader against transformers' own GGUF loading of the same file."""

from __future__ import annotations

import itertools
import json

import attrs
import numpy as np
import pytest
import safetensors
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.config import EngineConfig
from atom_trio.loader import default_gguf_path, default_model_path, load_tokenizer
from atom_trio.loader.resolve import resolve_model
from atom_trio.loader.weights import iter_weights
from atom_trio.loader.gguf_file import hf_tensor_name
from atom_trio.loader.weights import unpermute_rows

TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "emoji 🤖🎉 and CJK 你好，世界 こんにちは 안녕하세요",
    "  leading spaces, tabs\tand\nnewlines  ",
    "<|endoftext|><repo_name>x<file_sep>",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour 🎨."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "另一个？"},
]


@pytest.fixture(scope="module")
def gguf_path(default_model_dir):
    # default_model_dir first: it fetches (and caches) the GGUF too.
    return default_gguf_path()


@pytest.fixture(scope="module")
def transformers_state_dict(gguf_path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.state_dict()


@pytest.fixture(scope="module")
def resolved_gguf(gguf_path):
    return resolve_model(EngineConfig(model=str(gguf_path)))


@pytest.fixture(scope="module")
def gguf_weights(resolved_gguf) -> dict[str, torch.Tensor]:
    return dict(iter_weights(attrs.evolve(resolved_gguf, dtype=torch.float32)))


def test_resolve_gguf_file(gguf_path, resolved_gguf):
    resolved = resolved_gguf
    assert resolved.load_format == "gguf"
    assert resolved.path == gguf_path
    assert resolved.hf_config.model_type == "llama"
    assert resolved.hf_config.num_hidden_layers == 30
    assert resolved.hf_config.tie_word_embeddings  # the file has no output.weight
    assert resolved.dtype == torch.bfloat16
    assert resolved.generation_config["eos_token_id"] == 2


def test_gguf_tensors_equal_transformers(gguf_weights, transformers_state_dict):
    # transformers lists the tied lm_head too; the file (and we) do not.
    assert set(transformers_state_dict) - set(gguf_weights) == {"lm_head.weight"}
    assert set(gguf_weights) <= set(transformers_state_dict)
    for name, tensor in gguf_weights.items():
        expected = transformers_state_dict[name]
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected), name


def test_gguf_in_bfloat16_is_the_float32_tensors_rounded(resolved_gguf, gguf_weights):
    assert resolved_gguf.dtype == torch.bfloat16
    # The first layer's tensors are enough: every tensor takes the same path.
    for name, tensor in itertools.islice(iter_weights(resolved_gguf), 12):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, gguf_weights[name].to(torch.bfloat16)), name


def test_default_model_dir_holds_the_gguf_tensors_in_its_config_dtype(default_model_dir, gguf_weights):
    resolved = resolve_model(EngineConfig(dtype="float32"))
    assert resolved.path == default_model_dir
    converted = dict(iter_weights(resolved))
    assert converted.keys() == gguf_weights.keys()
    for name, tensor in converted.items():
        assert torch.equal(tensor, gguf_weights[name].to(torch.bfloat16).float()), name
    with safetensors.safe_open(default_model_dir / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


@pytest.mark.slow
def test_a_fresh_cache_converts_the_gguf_in_its_config_dtype(tmp_path, monkeypatch, gguf_path, gguf_weights):
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path))
    (tmp_path / gguf_path.name).symlink_to(gguf_path)  # the download is not what this test is about
    converted_dir = default_model_path()
    assert converted_dir == tmp_path / "SmolLM2-135M-Instruct"
    assert json.loads((converted_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safetensors.safe_open(converted_dir / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == gguf_weights.keys()
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), gguf_weights[name].to(torch.bfloat16)), name


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@given(
    heads=st.integers(1, 6),
    half_head_dim=st.integers(1, 8),
    cols=st.integers(1, 5),
    bias=st.booleans(),
)
def test_unpermute_inverts_llama_cpp_permute(heads, half_head_dim, cols, bias):
    rows = heads * 2 * half_head_dim
    shape = (rows,) if bias else (rows, cols)
    original = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = llama_cpp_permute(original, heads, heads)
    restored = unpermute_rows(torch.from_numpy(permuted), heads)
    assert torch.equal(restored, torch.from_numpy(original))


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.bias", "model.layers.12.self_attn.k_proj.bias"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("blk.7.ffn_gate.weight", "model.layers.7.mlp.gate_proj.weight"),
        ("blk.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight"),
    ],
)
def test_tensor_names(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


def test_unknown_tensor_name_is_refused():
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.mark.parametrize("source", ["gguf", "converted"])
def test_tokenizer_matches_transformers_gguf_tokenizer(source, gguf_path, transformers_gguf_tokenizer):
    reference = transformers_gguf_tokenizer
    tokenizer = load_tokenizer(EngineConfig(model=str(gguf_path)) if source == "gguf" else EngineConfig())
    assert tokenizer.is_fast
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>")[0] == 1
    assert tokenizer.eos_token_id == reference.eos_token_id == 2
    assert tokenizer.all_special_ids == reference.all_special_ids
    assert tokenizer.chat_template
    for add_generation_prompt in (True, False):
        rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
    # The template's built-in system prompt appears when the chat has none.
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.apply_chat_template(
        MESSAGES[1:2], tokenize=False
    )
