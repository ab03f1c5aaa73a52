"""What the engine and its worker subprocesses say to each other: one attrs class per message.

Apart from the bytes (``codec.py``) and the frames (``framing.py``), so that
the conversation reads in one place. The conversation, per rank::

    engine                         worker
    Init(config, rank, ...)  --->
                             <---  InitDone(model facts)  | Error
    Execute(plan)            --->
                             <---  Result(result) (rank 0) | Ack (others) | Error
    Launch(plan)             --->
                             <---  the answer to the step launched before, if any
    Flush                    --->
                             <---  the answer to the last step launched
    ProfileStart(prefix)     --->  (no step launched: every answer is read)
                             <---  Profiled(trace path) | Profiled(error)
    ProfileStop              --->
                             <---  Profiled(trace path, written) | Profiled(error)
    ...
    Shutdown                 --->  (exits 0)
"""

from __future__ import annotations

from typing import Union

import attrs

# Imported at run time, not only for type checking: cattrs resolves the annotations below.
from atom_trio.config import EngineConfig
from atom_trio.core.facts import ModelFacts
from atom_trio.core.plan import StepPlan, StepResult


class ProtocolError(Exception):
    """A frame could not be read or decoded (bad length, unknown tag, garbage), or came out of turn."""


@attrs.frozen(kw_only=True)
class Init:
    """Build a model runner. ``master_addr``/``master_port`` are torch.distributed's rendezvous."""

    config: EngineConfig
    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0


@attrs.frozen(kw_only=True)
class InitDone:
    """The runner is ready; the engine sizes its scheduler from ``facts``."""

    facts: ModelFacts


@attrs.frozen(kw_only=True)
class Execute:
    plan: StepPlan


@attrs.frozen(kw_only=True)
class Result:
    result: StepResult


@attrs.frozen(kw_only=True)
class Ack:
    """A rank other than 0 finished the step; an answer is required so that a dead rank is noticed."""

    step_id: int


@attrs.frozen
class Shutdown:
    """Release the runner and exit 0."""


@attrs.frozen
class Flush:
    """Send the result of the last step launched: no further plan comes before the engine needs it."""


@attrs.frozen(kw_only=True)
class Launch:
    """Start ``plan``'s step and answer the one launched before it, if any; this one's answer waits for
    the next `Launch`, `Execute` or `Flush`. Its plan is one of the stream of plans that `Execute` carries."""

    plan: StepPlan


@attrs.frozen(kw_only=True)
class Error:
    """The worker failed; it exits non-zero right after sending this."""

    type_name: str
    message: str
    traceback: str


@attrs.frozen(kw_only=True)
class ProfileStart:
    """Start the torch profiler on the thread that runs the steps; the trace will be
    ``{trace_prefix}-rank{rank}.trace.json``."""

    trace_prefix: str


@attrs.frozen
class ProfileStop:
    """Stop the profiler and write its trace."""


@attrs.frozen(kw_only=True)
class Profiled:
    """The answer to `ProfileStart` or `ProfileStop`: the trace's path, or why the profiler failed.

    A failed profiler is no failed worker: it goes on serving steps.
    """

    trace: str | None = None
    error: str | None = None


Message = Union[
    Init, InitDone, Execute, Result, Ack, Shutdown, Error, Flush, Launch, ProfileStart, ProfileStop, Profiled
]

MESSAGE_TYPES: tuple[type, ...] = (
    Init, InitDone, Execute, Result, Ack, Shutdown, Error, Flush, Launch, ProfileStart, ProfileStop, Profiled
)
"""A message's tag on the wire is its place here: a new message goes at the end, so that the others keep theirs."""
