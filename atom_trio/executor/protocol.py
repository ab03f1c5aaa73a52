"""The wire protocol between the engine and its worker subprocesses.

A connection is one ``socketpair`` per rank, so there is no listening socket
to secure and nothing to clean up. Each message is one frame: a 4-byte
big-endian length, then a msgpack body ``[tag, payload]``. Messages are attrs
classes turned into plain lists and dicts by one cattrs converter; no pickle,
so a frame can never run code on the other side.

The conversation, per rank::

    engine                         worker
    Init(config, rank, ...)  --->
                             <---  InitDone(model facts)  | Error
    Execute(plan)            --->
                             <---  Result(result) (rank 0) | Ack (others) | Error
    ...
    Shutdown                 --->  (exits 0)

`Execute` and `Result` cross the socket every step, so they skip the generic
converter: chunks travel as positional arrays, token lists go through
untouched (no per-element conversion), and a running sequence's block table
and sampling parameters are sent only when they change (`_PlanCodecState`),
which makes `Encoder` and `Decoder` stateful. The per-step code trusts the
peer: both ends are this package.

This module is plain blocking Python (no trio) so that the worker can import
it without an event loop; the engine's async framing is in ``process.py``.
"""

from __future__ import annotations

import socket
import struct
from typing import Union

import attrs
import cattrs
import cattrs.preconf.msgpack
import msgpack

from ..config import EngineConfig
from ..engine.plan import SeqChunk, StepPlan, StepResult
from ..engine.sampling_params import SamplingParams

HEADER = struct.Struct("!I")
"""Frame header: the body's length in bytes, network order."""

MAX_FRAME_BYTES = 256 << 20
"""Largest body accepted; a larger length means a corrupt stream, not a big plan."""


class ProtocolError(Exception):
    """A frame could not be read or decoded (bad length, unknown tag, garbage)."""


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
    """The facts about the loaded model that the engine needs before scheduling."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]


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


@attrs.frozen(kw_only=True)
class Error:
    """The worker failed; it exits non-zero right after sending this."""

    type_name: str
    message: str
    traceback: str


Message = Union[Init, InitDone, Execute, Result, Ack, Shutdown, Error]

_TYPES: tuple[type, ...] = (Init, InitDone, Execute, Result, Ack, Shutdown, Error)
_TAG = {cls: tag for tag, cls in enumerate(_TYPES)}

# -- hand-written hooks for the per-step types ------------------------------------------

_PARAM_FIELDS = tuple(f.name for f in attrs.fields(SamplingParams))


def _unstructure_params(params: SamplingParams) -> list:
    return [getattr(params, name) for name in _PARAM_FIELDS]


def _structure_params(values: list) -> SamplingParams:
    # Through __init__ so that the converters rebuild tuples from msgpack's lists.
    return SamplingParams(**dict(zip(_PARAM_FIELDS, values)))


@attrs.define
class _PlanCodecState:
    """What the other end already holds for each sequence of the previous plan.

    A running sequence's block table grows by at most one block per step and
    its sampling parameters never change, yet together they are most of a
    plan's bytes and decoding time (~70 block ids and one 19-field attrs object
    per sequence at 1k tokens of context). So a chunk carries only the blocks
    appended since the previous plan and a "same parameters" marker; anything
    else (a new, resumed or rearranged sequence) is sent whole. State covers
    only the sequences of the previous plan, so it stays bounded by the batch
    size and needs no cleanup protocol; both ends update it the same way from
    the same stream of plans, which is why one encoder may feed several ranks.
    """

    tables: dict[int, tuple[list[int], SamplingParams | None]] = attrs.Factory(dict)


_NOTHING_SENT: tuple[list[int], None] = ([], None)


def _unstructure_plan(plan: StepPlan, state: _PlanCodecState) -> tuple[list, dict]:
    """The wire form of ``plan`` and the state to commit once it is sure to be sent."""
    sent = state.tables.get
    current: dict[int, tuple[list[int], SamplingParams | None]] = {}
    chunks = []
    for c in plan.chunks:
        table = c.block_table
        params = c.sampling_params
        sent_table, sent_params = sent(c.seq_id, _NOTHING_SENT)
        keep = len(sent_table)
        if keep and (table != sent_table if len(table) == keep else table[:keep] != sent_table):
            keep = 0
        if params is None:
            wire_params = None
        elif params is sent_params:
            wire_params = True
        else:
            wire_params = _unstructure_params(params)
        # Copy: the scheduler may append to its list in place before the next plan.
        current[c.seq_id] = (table[:], params)
        chunks.append(
            [c.seq_id, c.token_ids, c.start_pos, c.prompt_len, c.sample, c.prefix_token_ids, keep,
             table[keep:] if keep else table, wire_params]
        )
    return [plan.step_id, chunks, plan.finished_seq_ids], current


def _structure_plan(data: list, state: _PlanCodecState) -> StepPlan:
    step_id, wire_chunks, finished = data
    sent = state.tables.get
    current: dict[int, tuple[list[int], SamplingParams | None]] = {}
    chunks: list[SeqChunk] = []
    append = chunks.append
    for seq_id, token_ids, start_pos, prompt_len, sample, prefix, keep, blocks, wire_params in wire_chunks:
        sent_table, sent_params = sent(seq_id, _NOTHING_SENT)
        if not keep:
            table = blocks
        elif blocks or keep != len(sent_table):
            table = sent_table[:keep] + blocks
        else:
            table = sent_table  # unchanged: share the list (plans are read-only)
        if wire_params is True:
            params = sent_params
        elif wire_params is None:
            params = None
        else:
            params = _structure_params(wire_params)
        current[seq_id] = (table, params)
        append(
            SeqChunk(
                seq_id=seq_id,
                token_ids=token_ids,
                start_pos=start_pos,
                block_table=table,
                prompt_len=prompt_len,
                sample=sample,
                sampling_params=params,
                prefix_token_ids=prefix,
            )
        )
    state.tables = current
    return StepPlan(step_id=step_id, chunks=chunks, finished_seq_ids=finished)


def _unstructure_result(result: StepResult) -> list:
    data = [result.step_id, result.token_ids, result.logprobs, result.top_logprobs]
    if result.prompt_logprobs is not None:  # rare: a step without them sends what it always sent
        data.append(result.prompt_logprobs)
    return data


def _pairs(pairs: list | None) -> list[tuple[int, float]] | None:
    # msgpack has no tuples: rebuild the (token_id, logprob) pairs.
    return None if pairs is None else [tuple(p) for p in pairs]


def _structure_result(data: list, _: type = StepResult) -> StepResult:
    step_id, token_ids, logprobs, top, *prompt = data
    return StepResult(
        step_id=step_id,
        token_ids=token_ids,
        logprobs=logprobs,
        top_logprobs=[_pairs(pairs) for pairs in top],
        prompt_logprobs=(
            [None if chunk is None else [_pairs(entry) for entry in chunk] for chunk in prompt[0]] if prompt else None
        ),
    )


def _make_converter() -> cattrs.Converter:
    converter = cattrs.preconf.msgpack.make_converter()  # sets become lists, etc.
    converter.register_unstructure_hook(StepResult, _unstructure_result)
    converter.register_structure_hook(StepResult, _structure_result)
    converter.register_unstructure_hook(Result, lambda m: _unstructure_result(m.result))
    converter.register_structure_hook(Result, lambda d, _: Result(result=_structure_result(d)))
    return converter


converter = _make_converter()
"""Turns every message but `Execute` (which needs the codec's state) into msgpack-ready data."""


class Encoder:
    """Turns messages into frames for one stream of plans.

    Stateful (see `_PlanCodecState`): every frame it makes must reach the
    peer's `Decoder`, in order. Sending the same frames to several ranks is fine.
    """

    def __init__(self) -> None:
        self._state = _PlanCodecState()
        # surrogatepass: any Python str (a stop string from JSON may hold a lone surrogate) crosses intact.
        self._packer = msgpack.Packer(unicode_errors="surrogatepass")

    def encode(self, message: Message) -> bytes:
        """One frame (header included) holding ``message``."""
        cls = type(message)
        if cls is Execute:
            payload, tables = _unstructure_plan(message.plan, self._state)
            body = self._packer.pack([_TAG[cls], payload])
            self._state.tables = tables  # only now: a plan that failed to pack never reaches the peer
        else:
            body = self._packer.pack([_TAG[cls], converter.unstructure(message, cls)])
        return HEADER.pack(len(body)) + body


class Decoder:
    """Turns frame bodies from one peer's `Encoder` back into messages."""

    def __init__(self) -> None:
        self._state = _PlanCodecState()

    def decode(self, body: bytes | bytearray | memoryview) -> Message:
        """The message in a frame body (the bytes after the header)."""
        try:
            tag, payload = msgpack.unpackb(body, strict_map_key=False, unicode_errors="surrogatepass")
            cls = _TYPES[tag]
            if cls is Execute:
                return Execute(plan=_structure_plan(payload, self._state))
            return converter.structure(payload, cls)
        except Exception as exc:
            raise ProtocolError(f"undecodable frame of {len(body)} bytes: {exc!r}") from exc


def check_length(length: int) -> int:
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return length


# -- blocking framing, for the worker ------------------------------------------------


def _receive_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the connection")
        got += k
    return buf


def receive_frame(sock: socket.socket) -> bytearray:
    """The next frame's body; `EOFError` when the peer has closed its end."""
    (length,) = HEADER.unpack(_receive_exactly(sock, HEADER.size))
    return _receive_exactly(sock, check_length(length))
