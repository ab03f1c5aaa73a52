"""The trio engine: the nursery that admits requests, drives steps through an executor and streams outputs.

No torch here: the model runs behind `atom_trio.executor`, and scheduling is `atom_trio.core`'s.
Requests come in through the `InputProcessor` and go out through the `OutputProcessor`.
"""

from __future__ import annotations

from atom_trio.engine.engine import AsyncEngine as AsyncEngine
from atom_trio.engine.engine import open_engine as open_engine
from atom_trio.engine.input_processor import EngineRequest as EngineRequest
from atom_trio.engine.input_processor import InputProcessor as InputProcessor
from atom_trio.engine.input_processor import Prompt as Prompt
from atom_trio.engine.llm import LLM as LLM
from atom_trio.engine.output_processor import OutputProcessor as OutputProcessor
