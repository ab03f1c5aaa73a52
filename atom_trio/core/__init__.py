"""The torch-free core: sequences, paged KV block accounting with the prefix cache, the scheduler, step plans.

Plain Python, importable without torch, so the engine process stays light and the
scheduler can be tested exhaustively.
"""

from __future__ import annotations

from atom_trio.core.block_manager import BlockManager as BlockManager
from atom_trio.core.facts import ModelFacts as ModelFacts
from atom_trio.core.plan import PREVIOUS_TOKEN as PREVIOUS_TOKEN
from atom_trio.core.plan import SeqChunk as SeqChunk
from atom_trio.core.plan import StepPlan as StepPlan
from atom_trio.core.plan import StepResult as StepResult
from atom_trio.core.plan import TokenBitmask as TokenBitmask
from atom_trio.core.plan import TokenLogprobs as TokenLogprobs
from atom_trio.core.scheduler import Scheduler as Scheduler
from atom_trio.core.sequence import FinishReason as FinishReason
from atom_trio.core.sequence import Grammar as Grammar
from atom_trio.core.sequence import Sequence as Sequence
from atom_trio.core.sequence import SeqOutput as SeqOutput
from atom_trio.core.sequence import SequenceStatus as SequenceStatus
