"""Model loading: where a model comes from, its config, tokenizer and weights.

``resolve_model`` turns ``EngineConfig.model`` (nothing, a local Hugging Face
directory, a ``.gguf`` file or a hub id) into a ``ResolvedModel``; the runner
then builds the architecture from ``hf_config`` and fills it from
``iter_weights`` (random but seeded for ``--load-format dummy``), and the engine tokenizes with
``load_tokenizer``.
"""

from __future__ import annotations

from atom_trio.loader.default_model import default_gguf_path, default_model_path
from atom_trio.loader.resolve import ResolvedModel, resolve_model
from atom_trio.loader.tokenizer import load_tokenizer
from atom_trio.loader.weights import iter_dummy_weights, iter_weights

__all__ = [
    "ResolvedModel",
    "default_gguf_path",
    "default_model_path",
    "iter_dummy_weights",
    "iter_weights",
    "load_tokenizer",
    "resolve_model",
]
