"""The tokenizer of a model: from its directory, its GGUF metadata, or ``--tokenizer``.

The engine needs a fast (Rust ``tokenizers``) tokenizer: intake encodes and the detokenizer decodes
through it, off the GIL. A checkpoint whose tokenizer is code it ships (``auto_map`` in
tokenizer_config.json, e.g. Kimi-K2's tiktoken tokenizer) loads only with ``trust_remote_code``; that
code runs once, here, and a slow tokenizer over a ``tiktoken.Encoding`` is then rebuilt as a fast one
from the encoding itself (its ranks, split pattern and special tokens), checked to encode alike; a chat
rendering of the tokenizer's own (``apply_chat_template``) stays in use.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import transformers
from transformers.convert_slow_tokenizer import TikTokenConverter

from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.loader.gguf_file import load_gguf_tokenizer
from atom_trio.loader.hf_config import read_hf_config
from atom_trio.loader.locate import locate

# What a rebuilt tokenizer must encode as its original does: letters of several cases and scripts (Han
# apart), contractions, digits, runs of spaces and newlines, punctuation, and special tokens in the text.
_PROBE = "Hello, World! It's 2024: 12345 apples.\n\n  Tabs\there — 你好，世界。Ünïcödé ÀÉÎ ok?!  \r\n end "


def load_tokenizer(config: EngineConfig) -> transformers.PreTrainedTokenizerBase:
    """A fast (Rust ``tokenizers``) tokenizer with its chat template and special tokens.

    Raises:
        ModelLoadError: no tokenizer could be read, its code needs ``--trust-remote-code``, or it has
            no fast version.
    """
    path = locate(config.tokenizer or config.model, revision=config.revision, with_weights=False)
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a tokenizer directory")
            tokenizer = load_gguf_tokenizer(path)
        else:
            tokenizer = _from_directory(path, config.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if not tokenizer.is_fast:
        encoding = _tiktoken_encoding(tokenizer)
        if encoding is None:
            raise ModelLoadError(f"the tokenizer of {path} has no fast (tokenizers) version; atom_trio needs one")
        tokenizer = _fast_from_tiktoken(tokenizer, encoding, path)
    return tokenizer


def _from_directory(path: Path, trust_remote_code: bool) -> transformers.PreTrainedTokenizerBase:
    """transformers' tokenizer of ``path``, given the model config read without its code (see `read_hf_config`):
    left to itself, ``AutoTokenizer`` would read the config with the checkpoint's config code too."""
    model_config = read_hf_config(path) if (path / "config.json").is_file() else None
    try:
        return transformers.AutoTokenizer.from_pretrained(
            path, config=model_config, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        code = _tokenizer_code(path)
        if trust_remote_code or code is None:
            raise
        raise ModelLoadError(
            f"the tokenizer of {path} is code the checkpoint ships ({code}, named by tokenizer_config.json's "
            "auto_map); pass --trust-remote-code (trust_remote_code=True) to run it. Only tokenizer code runs: "
            "the model is always atom_trio's own implementation"
        ) from exc


def _tokenizer_code(path: Path) -> str | None:
    """The tokenizer class ``path``'s tokenizer_config.json names in its ``auto_map``, if it names one."""
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    auto_map = json.loads(config_file.read_text()).get("auto_map") or {}
    classes = auto_map if isinstance(auto_map, list) else auto_map.get("AutoTokenizer") or []
    return next((name for name in classes if name), None)


def _tiktoken_encoding(tokenizer: Any) -> Any:
    """The ``tiktoken.Encoding`` a slow tokenizer wraps as ``model`` (Kimi's layout), if it wraps one."""
    try:
        import tiktoken
    except ImportError:
        return None
    encoding = getattr(tokenizer, "model", None)
    return encoding if isinstance(encoding, tiktoken.Encoding) else None


class _EncodingConverter(TikTokenConverter):
    """transformers' tiktoken converter, fed the ranks of a loaded encoding instead of a file's."""

    def __init__(self, encoding: Any, special_tokens: list[str]) -> None:
        super().__init__(pattern=encoding._pat_str, extra_special_tokens=special_tokens)
        self._ranks = encoding._mergeable_ranks

    def load_tiktoken_bpe(self, tiktoken_url: str | None) -> dict[bytes, int]:
        return self._ranks


def _rendering_of(slow: Any, fast: Any) -> Any:
    """``slow.apply_chat_template`` under the signature of transformers' own, ``fast``'s: the engine reads the
    parameters there to keep callers' template variables from taking their names (``chat_template``...)."""

    @functools.wraps(fast.apply_chat_template)
    def apply_chat_template(*args: Any, **kwargs: Any) -> Any:
        return slow.apply_chat_template(*args, **kwargs)

    return apply_chat_template


def _fast_from_tiktoken(slow: Any, encoding: Any, path: Path) -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer that encodes and decodes as ``encoding`` does, with ``slow``'s special tokens and chat template.

    The special tokens must follow the ranks without a gap (Kimi's do): the Rust tokenizer appends them in order.
    """
    specials = sorted(encoding._special_tokens.items(), key=lambda item: item[1])
    first = len(encoding._mergeable_ranks)
    if [token_id for _, token_id in specials] != list(range(first, first + len(specials))):
        raise ModelLoadError(
            f"the tiktoken tokenizer of {path} has special tokens that do not follow its {first} ranks in one run; "
            "atom_trio cannot rebuild it as a fast tokenizer"
        )
    backend = _EncodingConverter(encoding, [token for token, _ in specials]).converted()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=slow.chat_template,
        model_max_length=slow.model_max_length,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=slow.extra_special_tokens,
        **slow.special_tokens_map,
    )
    if type(slow).apply_chat_template is not transformers.PreTrainedTokenizer.apply_chat_template:
        fast.apply_chat_template = _rendering_of(slow, fast)  # its own (Kimi's reworks tool definitions)
    probe = _PROBE + "".join(token for token, _ in specials[:8])
    if fast.encode(probe) != encoding.encode(probe, allowed_special="all"):
        raise ModelLoadError(
            f"the tiktoken tokenizer of {path}, rebuilt as a fast tokenizer, splits text differently from the "
            "original (its split pattern reads differently to the Rust regex engine)"
        )
    return fast
