"""``--trust-remote-code``: a checkpoint's tokenizer code runs only when allowed; its config and model code never do.

The checkpoint is a tiny one in Kimi-K2's layout (`atom_trio.testing.write_tiny_kimi_k2`): a tiktoken
tokenizer in ``tokenization_kimi.py`` named by tokenizer_config.json's ``auto_map``, and config and model
code named by config.json's ``auto_map`` that raises if anything imports it.
"""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio import EngineConfig, open_engine
from atom_trio.errors import ModelLoadError
from atom_trio.loader import load_tokenizer
from atom_trio.loader.hf_config import read_hf_config
from atom_trio.loader.resolve import resolve_model
from atom_trio.options import parse_args
from atom_trio.testing import write_tiny_kimi_k2

REFUSAL = r"tokenization_kimi\.TikTokenTokenizer.*pass --trust-remote-code"


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    return write_tiny_kimi_k2(tmp_path_factory.mktemp("kimi") / "tiny-kimi-k2")


@pytest.fixture(scope="module")
def tokenizers(kimi_dir):
    """Ours (fast, rebuilt from the encoding) and the checkpoint's own (slow, over tiktoken)."""
    ours = load_tokenizer(EngineConfig(model=str(kimi_dir), trust_remote_code=True))
    theirs = transformers.AutoTokenizer.from_pretrained(kimi_dir, config=read_hf_config(kimi_dir), trust_remote_code=True)
    return ours, theirs


def test_without_the_flag_the_tokenizer_is_refused_by_name(kimi_dir):
    with pytest.raises(ModelLoadError, match=REFUSAL):
        load_tokenizer(EngineConfig(model=str(kimi_dir)))


async def test_the_engine_refuses_it_when_it_starts_not_at_the_first_request(kimi_dir):
    with pytest.raises(ModelLoadError, match=REFUSAL):
        async with open_engine(model=str(kimi_dir), dtype="float32", num_kv_blocks=8):
            pytest.fail("the engine started")


def test_the_flag_and_its_environment_variable():
    assert parse_args(["--trust-remote-code"], command="generate")[0].trust_remote_code
    assert parse_args([], {"ATOM_TRIO_TRUST_REMOTE_CODE": "1"})[0].trust_remote_code
    assert not parse_args([])[0].trust_remote_code


def test_with_the_flag_a_fast_tokenizer_with_the_checkpoints_special_tokens(tokenizers):
    ours, theirs = tokenizers
    assert ours.is_fast and not theirs.is_fast
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.convert_tokens_to_ids(ours.all_special_tokens) == theirs.convert_tokens_to_ids(theirs.all_special_tokens)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.chat_template == theirs.chat_template


# Pieces where the split pattern decides: cases, Han next to Latin, contractions, digit runs, whitespace runs,
# punctuation, whole words the ranks know, special tokens inside text.
def test_the_checkpoints_own_chat_rendering_stays_in_use(tokenizers):
    """Its ``apply_chat_template`` sorts the keys of tool definitions before the template shows them (Kimi-K2's)."""
    ours, theirs = tokenizers
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    messages = [{"role": "user", "content": "Hi"}]
    text = ours.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert '{"description": "d", "name": "f", "parameters"' in text  # sorted, not as given
    # under transformers' signature, whose parameters (chat_template...) the engine keeps from callers' variables
    assert "chat_template" in inspect.signature(ours.apply_chat_template).parameters


_PIECES = st.sampled_from(
    list("abcXYZ éÜ你好世界 \n\t\r0123'.,!?")
    + ["'s", "'LL", "<|im_end|>", "[BOS]", "the", " there", "  ", "Hello", "World", "Kimi"]
)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_PIECES, max_size=40))
def test_it_encodes_and_decodes_as_the_checkpoints_tiktoken_encoding(tokenizers, parts):
    ours, theirs = tokenizers
    text = "".join(parts)
    ids = theirs.model.encode(text, allowed_special="all")
    assert ours.encode(text) == ids
    assert ours.decode(ids) == theirs.model.decode(ids) == text


def test_config_and_model_code_never_run_even_with_the_flag(kimi_dir, tmp_path):
    """A config transformers cannot read without the checkpoint's own code is refused, flag or not; Kimi-K2's
    reads as DeepSeek-V3's (the code its auto_map names would raise if imported)."""
    assert resolve_model(EngineConfig(model=str(kimi_dir), trust_remote_code=True)).hf_config.model_type == "deepseek_v3"
    custom = tmp_path / "custom"
    shutil.copytree(kimi_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "my_own_model"}))
    for load in (resolve_model, load_tokenizer):
        with pytest.raises(ModelLoadError, match="never runs a checkpoint's config or model code"):
            load(EngineConfig(model=str(custom), trust_remote_code=True))
