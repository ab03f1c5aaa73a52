"""atom_trio: a fast LLM inference engine and OpenAI-compatible server on trio structured concurrency.

Embedding it in a trio program::

    async with atom_trio.open_engine(model="...") as engine:
        async for out in engine.generate("Hello", atom_trio.SamplingParams(max_tokens=32)):
            print(out.outputs[0].text, end="")

From synchronous code: ``atom_trio.LLM(model="...").generate(prompts, params)``.
"""

from __future__ import annotations

import importlib.metadata

from atom_trio import _logging
from atom_trio.config import EngineConfig as EngineConfig
from atom_trio.config import SpeculativeConfig as SpeculativeConfig
from atom_trio.engine import LLM as LLM
from atom_trio.engine import AsyncEngine as AsyncEngine
from atom_trio.engine import open_engine as open_engine
from atom_trio.errors import AtomTrioError as AtomTrioError
from atom_trio.errors import ContextLengthExceeded as ContextLengthExceeded
from atom_trio.errors import EngineDeadError as EngineDeadError
from atom_trio.errors import EngineOverloaded as EngineOverloaded
from atom_trio.errors import InvalidConfig as InvalidConfig
from atom_trio.errors import InvalidRequest as InvalidRequest
from atom_trio.errors import ModelLoadError as ModelLoadError
from atom_trio.errors import WorkerDied as WorkerDied
from atom_trio.outputs import CompletionOutput as CompletionOutput
from atom_trio.outputs import EngineStats as EngineStats
from atom_trio.outputs import RequestOutput as RequestOutput
from atom_trio.sampling_params import SamplingParams as SamplingParams
from atom_trio.sampling_params import StructuredOutputsParams as StructuredOutputsParams

try:  # pyproject.toml's version, as installed
    __version__ = importlib.metadata.version("atom-trio")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_logging.install_default_handler()  # start-up progress for library users (see atom_trio._logging)
