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
converter and travel as columns: one msgpack array per field of a plan's
chunks (seq ids, token lists, positions...), which msgpack's C code packs
and unpacks whole, and which the worker turns back into chunks with one
``map``; a step then costs a few Python operations per column rather than a
few per sequence (encoding and decoding a 256-sequence decode plan went
from ~0.7 ms to ~0.15 ms on a 2-core CPU box). A running sequence's block
table and sampling parameters are sent only when they change
(`_SentState`), which makes `Encoder` and `Decoder` stateful. The per-step
code trusts the peer (both ends are this package) beyond checking that the
columns line up.

This module is plain blocking Python (no trio) so that the worker can import
it without an event loop; the engine's async framing is in ``process.py``.
"""

from __future__ import annotations

import socket
import struct
from itertools import compress
from operator import is_not, ne
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

# -- the per-step messages, by hand ---------------------------------------------------

_PARAM_FIELDS = tuple(f.name for f in attrs.fields(SamplingParams))


def _unstructure_params(params: SamplingParams | None) -> list | None:
    return None if params is None else [getattr(params, name) for name in _PARAM_FIELDS]


def _structure_params(values: list | None) -> SamplingParams | None:
    # Through __init__ so that the converters rebuild tuples from msgpack's lists.
    return None if values is None else SamplingParams(**dict(zip(_PARAM_FIELDS, values, strict=True)))


@attrs.define
class _SentState:
    """What the other end already holds for each sequence of the previous plan.

    A running sequence's block table grows by at most one block per step and
    its sampling parameters never change, yet together they are most of a
    plan's bytes and decoding time (~64 block ids and one 19-field attrs object
    per sequence at 1k tokens of context). So a plan carries, for the few
    sequences whose table changed, the blocks appended since the previous
    plan (or the whole table of a new, resumed or rearranged sequence), and
    the parameters of those whose parameters object changed; every other
    sequence takes both from here. State covers only the sequences of the
    previous plan, so it stays bounded by the batch size and needs no cleanup
    protocol; both ends update it the same way from the same stream of plans,
    which is why one encoder may feed several ranks.

    Kept as the previous plan's columns: a steady decode batch (the same
    sequences in the same order) then takes them over as they are.
    """

    seq_ids: list[int] = attrs.Factory(list)
    tables: list[list[int] | None] = attrs.Factory(list)
    params: list[SamplingParams | None] = attrs.Factory(list)

    def held(self, seq_ids: list[int]) -> tuple[list[list[int] | None], list[SamplingParams | None]]:
        """The block table and parameters the peer holds for each of ``seq_ids`` (None for a stranger)."""
        if seq_ids == self.seq_ids:
            return self.tables[:], self.params[:]
        tables = dict(zip(self.seq_ids, self.tables))
        params = dict(zip(self.seq_ids, self.params))
        return list(map(tables.get, seq_ids)), list(map(params.get, seq_ids))


def _unstructure_plan(plan: StepPlan, sent: _SentState) -> tuple[list, _SentState]:
    """The wire form of ``plan`` and the state to commit once it is sure to be sent."""
    chunks = plan.chunks
    seq_ids = [c.seq_id for c in chunks]
    rows = range(len(chunks))
    # Both columns start as what the peer holds, then take this plan's changes.
    tables, params = sent.held(seq_ids)
    table_changes = []
    # Whole tables compared, not just their lengths: the encoder's largest cost (~20 µs for
    # 256 tables of 64 blocks), and what guarantees that the worker reads the right KV blocks.
    for i in compress(rows, map(ne, [c.block_table for c in chunks], tables)):
        table, old = chunks[i].block_table, tables[i]
        keep = len(old) if old and table[: len(old)] == old else 0
        table_changes.append([i, keep, table[keep:]])
        tables[i] = table[:]  # our own copy: the scheduler may change its list in place
    param_changes = []
    for i in compress(rows, map(is_not, [c.sampling_params for c in chunks], params)):
        params[i] = chunks[i].sampling_params
        param_changes.append([i, _unstructure_params(params[i])])
    payload = [
        plan.step_id,
        seq_ids,
        [c.token_ids for c in chunks],
        [c.start_pos for c in chunks],
        [c.prompt_len for c in chunks],
        [c.sample for c in chunks],
        [c.prefix_token_ids for c in chunks],
        table_changes,
        param_changes,
        plan.finished_seq_ids,
    ]
    return payload, _SentState(seq_ids, tables, params)


def _structure_plan(payload: list, sent: _SentState) -> tuple[StepPlan, _SentState]:
    """The plan in a wire form from `_unstructure_plan`, and the state that it leaves."""
    step_id, seq_ids, token_ids, start_pos, prompt_lens, samples, prefixes, table_changes, param_changes, finished = (
        payload
    )
    if not len(seq_ids) == len(token_ids) == len(start_pos) == len(prompt_lens) == len(samples) == len(prefixes):
        raise ProtocolError("a plan's columns differ in length")
    tables, params = sent.held(seq_ids)
    for i, keep, blocks in table_changes:
        if keep:
            old = tables[i]
            if keep > len(old):
                raise ProtocolError(f"keeps {keep} blocks of a {len(old)}-block table")
            blocks = old[:keep] + blocks
        tables[i] = blocks
    for i, values in param_changes:
        params[i] = _structure_params(values)
    # Positional, in SeqChunk's field order: the fast constructor (see SeqChunk).
    chunks = list(map(SeqChunk, seq_ids, token_ids, start_pos, tables, prompt_lens, samples, params, prefixes))
    plan = StepPlan(step_id=step_id, chunks=chunks, finished_seq_ids=finished)
    return plan, _SentState(seq_ids, tables, params)


def _none_column(values: list) -> list | int:
    """``values``, or only its length when it holds nothing but None (a step that asked for no logprobs)."""
    return len(values) if values.count(None) == len(values) else values


def _pairs(pairs: list | None) -> list[tuple[int, float]] | None:
    # msgpack has no tuples: rebuild the (token_id, logprob) pairs.
    return None if pairs is None else list(map(tuple, pairs))


def _unstructure_result(result: StepResult) -> list:
    data = [result.step_id, result.token_ids, _none_column(result.logprobs), _none_column(result.top_logprobs)]
    if result.prompt_logprobs is not None:  # rare: a step without them sends one field less
        data.append(result.prompt_logprobs)
    return data


def _structure_result(data: list) -> StepResult:
    step_id, token_ids, logprobs, top, *prompt = data
    return StepResult(
        step_id=step_id,
        token_ids=token_ids,
        logprobs=[None] * logprobs if type(logprobs) is int else logprobs,
        top_logprobs=[None] * top if type(top) is int else list(map(_pairs, top)),
        prompt_logprobs=(
            [None if chunk is None else list(map(_pairs, chunk)) for chunk in prompt[0]] if prompt else None
        ),
    )


converter = cattrs.preconf.msgpack.make_converter()  # sets become lists, etc.
"""Turns the rare messages (all but `Execute` and `Result`) into msgpack-ready data."""


class Encoder:
    """Turns messages into frames for one stream of plans.

    Stateful (see `_SentState`): every frame it makes must reach the peer's
    `Decoder`, in order. Sending the same frames to several ranks is fine.
    """

    def __init__(self) -> None:
        self._sent = _SentState()
        # surrogatepass: any Python str (a stop string from JSON may hold a lone surrogate) crosses intact.
        self._pack = msgpack.Packer(unicode_errors="surrogatepass").pack

    def encode(self, message: Message) -> bytes:
        """One frame (header included) holding ``message``."""
        cls = type(message)
        if cls is Execute:
            payload, sent = _unstructure_plan(message.plan, self._sent)
            body = self._pack([_TAG[cls], payload])
            self._sent = sent  # only now: a plan that failed to pack never reaches the peer
        elif cls is Result:
            body = self._pack([_TAG[cls], _unstructure_result(message.result)])
        else:
            body = self._pack([_TAG[cls], converter.unstructure(message, cls)])
        return HEADER.pack(len(body)) + body


class Decoder:
    """Turns frame bodies from one peer's `Encoder` back into messages."""

    def __init__(self) -> None:
        self._sent = _SentState()

    def decode(self, body: bytes | bytearray | memoryview) -> Message:
        """The message in a frame body (the bytes after the header).

        Raises:
            ProtocolError: the body is not a frame of this protocol.
        """
        try:
            tag, payload = msgpack.unpackb(body, strict_map_key=False, unicode_errors="surrogatepass")
            cls = _TYPES[tag]
            if cls is Execute:
                plan, self._sent = _structure_plan(payload, self._sent)
                return Execute(plan=plan)
            if cls is Result:
                return Result(result=_structure_result(payload))
            return converter.structure(payload, cls)
        except ProtocolError:
            raise
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
