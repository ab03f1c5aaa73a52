"""The tokenizer of a model: from its directory, its GGUF metadata, or ``--tokenizer``."""

from __future__ import annotations

import transformers

from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.loader.gguf_file import load_gguf_tokenizer
from atom_trio.loader.locate import locate


def load_tokenizer(config: EngineConfig) -> transformers.PreTrainedTokenizerBase:
    """A fast (Rust ``tokenizers``) tokenizer with its chat template and special tokens."""
    path = locate(config.tokenizer or config.model, revision=config.revision, with_weights=False)
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a tokenizer directory")
            tokenizer = load_gguf_tokenizer(path)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ModelLoadError(f"the tokenizer of {path} has no fast (tokenizers) version; atom_trio needs one")
    return tokenizer
