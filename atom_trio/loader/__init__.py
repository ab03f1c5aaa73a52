"""Model loading: where a model comes from, its config, tokenizer and weights.

``locate`` finds a model's files (nothing means the built-in default model, else
a local Hugging Face directory, a ``.gguf`` file or a hub id) and
``load_tokenizer`` reads its tokenizer: both without torch, for the engine.
The runner's side imports torch and lives in submodules:
`atom_trio.loader.resolve.resolve_model` turns ``EngineConfig.model`` into a
``ResolvedModel`` (config, dtype, format), and `atom_trio.loader.weights.iter_weights`
yields its tensors (random but seeded for ``--load-format dummy``).
"""

from __future__ import annotations

from atom_trio.loader.default_model import default_gguf_path as default_gguf_path
from atom_trio.loader.default_model import default_model_path as default_model_path
from atom_trio.loader.locate import locate as locate
from atom_trio.loader.tokenizer import load_tokenizer as load_tokenizer
