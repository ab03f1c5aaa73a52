"""Messages to frame bodies and back: the per-step ones by hand, as columns; the rest through cattrs.

Messages are attrs classes (``messages.py``) turned into plain lists and
dicts and packed with msgpack; no pickle, so a frame can never run code on
the other side. Kept apart from the messages and the framing: this is the
part of the wire that costs time every step, and the only one with state.

`Execute` (or `Launch`) and `Result` cross the socket every step, so they
skip the generic converter and travel as columns: one msgpack array per
field of a plan's chunks (seq ids, token lists, positions...), which
msgpack's C code packs and unpacks whole; a step then costs a few Python
operations per column rather than a few per sequence. What a running
sequence keeps from step to step (its prompt length, sampling parameters,
and block table but for the blocks it gains) goes only when it changes
(`_SentState`), which makes `Encoder` and `Decoder` stateful, and the
decoder reuses the chunks of a steady decode batch (`_structure_plan`).
Token ids go as they are, negative ones included (-1 is async output's
stand-in for a token still on the GPU). A plan's grammar mask (`TokenBitmask`),
when it has one, goes as one more field: its rows and its words as raw bytes;
a plan without one is sent exactly as before; so do a plan's speculative-decoding
columns (each chunk's number of drafts and whether it asks for new ones) and a
result's (tokens per chunk, proposed drafts). The grammar itself
(``SamplingParams.structured_outputs``) stays with the engine, which fills
the masks: the runner needs only those. The per-step code trusts the peer
(both ends are this package) beyond checking that the columns line up and
that the sequences it names are known.
"""

from __future__ import annotations

import sys
from itertools import compress, repeat
from operator import is_, is_not, itemgetter, ne

import attrs
import cattrs
import cattrs.preconf.msgpack
import msgpack

from atom_trio.core.plan import SeqChunk, StepPlan, StepResult, TokenBitmask
from atom_trio.executor.framing import HEADER
from atom_trio.executor.messages import MESSAGE_TYPES, Execute, Launch, Message, ProtocolError, Result
from atom_trio.sampling_params import SamplingParams

_TAG = {cls: tag for tag, cls in enumerate(MESSAGE_TYPES)}

_PARAM_FIELDS = tuple(f.name for f in attrs.fields(SamplingParams) if f.name != "structured_outputs")


def _unstructure_params(params: SamplingParams | None) -> list | None:
    return None if params is None else [getattr(params, name) for name in _PARAM_FIELDS]


def _structure_params(values: list | None) -> SamplingParams | None:
    # Through __init__ so that the converters rebuild tuples from msgpack's lists.
    return None if values is None else SamplingParams(**dict(zip(_PARAM_FIELDS, values, strict=True)))


@attrs.define
class _SentState:
    """What the other end already holds for each sequence of the previous plan.

    A running sequence's block table only grows at its end (by one block in
    16 steps of decoding), and its prompt length and sampling parameters
    never change, yet they are most of a plan's bytes and decoding time (~64
    block ids and one 19-field attrs object per sequence at 1k tokens of
    context). So a plan *introduces* each
    sequence the peer does not hold (new, resumed, or reintroduced by the
    scheduler) with its prompt length and whole block table, and otherwise
    carries only the blocks appended since the previous plan and the
    parameters whose object changed; every other sequence takes its facts
    from here. State covers only the sequences of the previous plan, so it
    stays bounded by the batch size and needs no cleanup protocol; both ends
    update it the same way from the same stream of plans, which is why one
    encoder may feed several ranks.

    Kept as the previous plan's columns, one list per fact (the encoder's:
    table lengths and parameters; the decoder's: tables, prompt lengths and
    parameters), so that a steady decode batch (the same sequences in the
    same order) takes them over as they are. The decoder also keeps the
    chunks of recent plans, to reuse (see `_structure_plan`).
    """

    seq_ids: list[int]
    columns: list[list]
    spares: tuple[tuple[list[int], list[SeqChunk]], ...] = ()
    """The chunks of the last two plain plans (most recent first), each with its seq ids, in lists of our own."""
    verified: frozenset[int] = frozenset()
    """The encoder's: sequences whose chunk verified drafts. The scheduler shrinks their block tables
    after the step (rejected drafts), so a table of the same length may end in other blocks: the next
    plan sends their whole tables."""

    def held(self, seq_ids: list[int]) -> tuple[bool, list[list]]:
        """Whether ``seq_ids`` are the held sequences in the same order, and each column's values for them.

        A sequence not held gets None in every column.
        """
        if seq_ids == self.seq_ids:
            return True, [column[:] for column in self.columns]
        stranger = len(self.seq_ids)  # the row of the None that each column gets past its end
        index = dict(zip(self.seq_ids, range(stranger)))
        # Two spare rows: itemgetter picks a tuple only from two rows or more (a plan may have one, or none).
        pick = itemgetter(*map(index.get, seq_ids, repeat(stranger)), stranger, stranger)
        return False, [list(pick(column + [None])[:-2]) for column in self.columns]


def _unstructure_plan(plan: StepPlan, sent: _SentState) -> tuple[list, _SentState]:
    """The wire form of ``plan`` and the state to commit once it is sure to be sent.

    Block tables are compared by length alone, on the scheduler's invariant
    (vLLM's too): between two introductions of a sequence to the runner (the
    chunk that carries ``prefix_token_ids``, after admission or preemption)
    its block table only grows at the end. Preemption frees the whole table,
    and the sequence's next chunk introduces it again. A known sequence's
    table is then what the peer holds plus what lies past its length;
    comparing whole tables instead cost a
    noticeable share of a 256-sequence step (docs/distributed.md). Where the invariant visibly fails (a
    shorter table) the sequence is introduced again, whole table and all.
    The prompt length is a sequence's for life, so it too goes only with an
    introduction.
    """
    chunks = plan.chunks
    n = len(chunks)
    rows = range(n)
    seq_ids = [c.seq_id for c in chunks]
    lens = [len(c.block_table) for c in chunks]
    prefixes = [c.prefix_token_ids for c in chunks]
    samples = [c.sample for c in chunks]
    new_params = [c.sampling_params for c in chunks]
    # Both state columns start as what the peer holds, then take this plan's changes.
    _, (held_lens, params) = sent.held(seq_ids)
    if sent.verified:
        for i in rows:
            if seq_ids[i] in sent.verified:
                held_lens[i] = None
    introducing = prefixes.count(None) != n
    if introducing:
        for i in compress(rows, map(is_not, prefixes, repeat(None))):
            held_lens[i] = None  # introduced: its table need not extend any the peer holds
    introductions = []
    appends = []
    for i in compress(rows, map(ne, lens, held_lens)):
        held_len = held_lens[i]
        if held_len is None or held_len > lens[i]:
            introductions.append([i, chunks[i].prompt_len, chunks[i].block_table])
        else:
            appends.append([i, held_len, chunks[i].block_table[held_len:]])
    param_changes = []
    if new_params != params:  # the same objects, as a steady batch has, compare by identity: cheap
        for i in compress(rows, map(is_not, new_params, params)):
            param_changes.append([i, _unstructure_params(new_params[i])])
    token_ids = [c.token_ids for c in chunks]
    # A plain decode plan (every chunk samples one token, none is introduced) goes with one flat
    # column of tokens instead of 256 lists, and without the columns of what it implies.
    plain = not introducing and samples.count(True) == n
    if plain:
        try:
            token_ids = [token for token, in token_ids]
        except ValueError:  # a chunk of several tokens
            plain = False
    payload = [
        plan.step_id,
        seq_ids,
        token_ids,
        [c.start_pos for c in chunks],
        None if plain else [samples, prefixes],
        introductions,
        appends,
        param_changes,
        plan.finished_seq_ids,
    ]
    bitmask = plan.token_bitmask
    num_drafts = [c.num_draft_tokens for c in chunks]
    propose = [c.propose_drafts for c in chunks]
    speculative = any(num_drafts) or any(propose)
    if bitmask is not None or speculative:  # rare: a plan without either sends fields less
        payload.append(None if bitmask is None else [bitmask.rows, bitmask.words.shape[1], bitmask.words.tobytes()])
    if speculative:
        payload.append([num_drafts, propose])
    verified = frozenset(compress(seq_ids, num_drafts)) if any(num_drafts) else frozenset()
    return payload, _SentState(seq_ids, [lens, new_params if param_changes else params], verified=verified)


_SOLE_REFERENCE = next(map(sys.getrefcount, [object()]))
"""What `sys.getrefcount` says, mapped over a list, of an object that only the list holds."""


def _unshared(chunks: list[SeqChunk]) -> bool:
    """Whether nothing but the list ``chunks`` refers to any of its chunks."""
    return not any(map(ne, map(sys.getrefcount, chunks), repeat(_SOLE_REFERENCE)))


def _structure_plan(payload: list, sent: _SentState) -> tuple[StepPlan, _SentState]:
    """The plan in a wire form from `_unstructure_plan`, and the state that it leaves.

    Building the chunks, mostly the calls, is over half of decoding a steady
    256-sequence plan (docs/distributed.md); setting their fields that may
    change costs a third of that. So a plain decode plan (see `_unstructure_plan`)
    whose sequences, in the same order, are those of one of the last two
    plain plans reuses that plan's chunks. Only if nothing but our own list
    still refers to any of them, though: then no one can see them change.
    The worker drops each plan before it decodes the next, which makes the
    previous plan's chunks free; a runner that holds the step it launched
    until the next one is decoded leaves those of the plan before. Wherever
    plans are kept longer (a test), fresh chunks are built instead.
    """
    step_id, seq_ids, token_ids, start_pos, samples_and_prefixes, introductions, appends, param_changes, finished = (
        payload[:9]
    )
    bitmask = _structure_bitmask(payload[9]) if len(payload) > 9 and payload[9] is not None else None
    n = len(seq_ids)
    num_drafts, propose = payload[10] if len(payload) > 10 else (None, None)
    plain = samples_and_prefixes is None and num_drafts is None  # spare chunks hold no speculative fields
    samples, prefixes = ([True] * n, [None] * n) if samples_and_prefixes is None else samples_and_prefixes
    if not n == len(token_ids) == len(start_pos) == len(samples) == len(prefixes):
        raise ProtocolError("a plan's columns differ in length")
    steady, (tables, prompt_lens, params) = sent.held(seq_ids)
    for i, prompt_len, table in introductions:
        prompt_lens[i] = prompt_len
        tables[i] = table
    if not steady and any(map(is_, tables, repeat(None))):
        raise ProtocolError("a plan names a sequence that it neither introduces nor held before")
    for i, held_len, blocks in appends:
        table = tables[i]
        if table is None or len(table) != held_len:
            raise ProtocolError(f"appends to {held_len} blocks of sequence {seq_ids[i]}, which holds {table}")
        tables[i] = table + blocks  # a new list: the previous plan's chunk keeps its own
    for i, values in param_changes:
        params[i] = _structure_params(values)
    spares = sent.spares
    chunks = None
    if plain:
        for spare_seq_ids, spare in spares:
            if spare_seq_ids == seq_ids and _unshared(spare):
                chunks = spare  # of a plain plan too: their ``sample`` and ``prefix_token_ids`` are right
                for chunk, token, start, table, prompt_len, sampling_params in zip(
                    chunks, token_ids, start_pos, tables, prompt_lens, params
                ):
                    chunk.token_ids = [token]
                    chunk.start_pos = start
                    chunk.block_table = table
                    chunk.prompt_len = prompt_len
                    chunk.sampling_params = sampling_params
                break
    if chunks is None:
        if samples_and_prefixes is None and type(token_ids[0] if token_ids else None) is int:
            token_ids = [[token] for token in token_ids]
        # Positional, in SeqChunk's field order: the fast constructor (see SeqChunk).
        columns = [seq_ids, token_ids, start_pos, tables, prompt_lens, samples, params, prefixes]
        if num_drafts is not None:
            if not n == len(num_drafts) == len(propose):
                raise ProtocolError("a plan's columns differ in length")
            columns += [num_drafts, propose]
        chunks = list(map(SeqChunk, *columns))
    if plain:
        spares = ((seq_ids, chunks), *[spare for spare in spares if spare[1] is not chunks][:1])
    # The plan gets a list of its own: ours must not be one that a kept plan holds.
    plan = StepPlan(step_id=step_id, chunks=chunks[:], finished_seq_ids=finished, token_bitmask=bitmask)
    return plan, _SentState(seq_ids, [tables, prompt_lens, params], spares)


def _structure_bitmask(fields: list) -> TokenBitmask:
    # Imported here: numpy starts its BLAS threads on import, and the worker imports this module before it
    # blocks the parent-death signal that only its watchdog thread may receive (see worker.exit_with_parent).
    import numpy as np

    rows, num_words, words = fields
    # A copy: the sampler hands it to torch, which wants memory it may write.
    array = np.frombuffer(words, dtype=np.int32).reshape(len(rows), num_words).copy()
    return TokenBitmask(rows, words=array)


def _none_column(values: list) -> list | int:
    """``values``, or only its length when it holds nothing but None (a step that asked for no logprobs)."""
    return len(values) if values.count(None) == len(values) else values


def _pairs(pairs: list | None) -> list[tuple[int, float]] | None:
    # msgpack has no tuples: rebuild the (token_id, logprob) pairs.
    return None if pairs is None else list(map(tuple, pairs))


def _unstructure_result(result: StepResult) -> list:
    data = [result.step_id, result.token_ids, _none_column(result.logprobs), _none_column(result.top_logprobs)]
    optional = [result.prompt_logprobs, result.num_tokens, result.draft_token_ids]
    while optional and optional[-1] is None:  # rare fields: a step without them sends fields less
        optional.pop()
    return data + optional


def _structure_result(data: list) -> StepResult:
    step_id, token_ids, logprobs, top, *optional = data
    prompt, num_tokens, drafts = (optional + [None, None, None])[:3]
    prompt = [prompt] if prompt is not None else []
    return StepResult(
        step_id=step_id,
        token_ids=token_ids,
        logprobs=[None] * logprobs if type(logprobs) is int else logprobs,
        top_logprobs=[None] * top if type(top) is int else list(map(_pairs, top)),
        prompt_logprobs=(
            [None if chunk is None else list(map(_pairs, chunk)) for chunk in prompt[0]] if prompt else None
        ),
        num_tokens=num_tokens,
        draft_token_ids=drafts,
    )


converter = cattrs.preconf.msgpack.make_converter()  # sets become lists, etc.
"""Turns the rare messages (all but `Execute`, `Launch` and `Result`) into msgpack-ready data."""


class Encoder:
    """Turns messages into frames for one stream of plans.

    Stateful (see `_SentState`): every frame it makes must reach the peer's
    `Decoder`, in order. Sending the same frames to several ranks is fine.
    """

    def __init__(self) -> None:
        self._sent = _SentState([], [[], []])
        # surrogatepass: any Python str (a stop string from JSON may hold a lone surrogate) crosses intact.
        self._pack = msgpack.Packer(unicode_errors="surrogatepass").pack

    def encode(self, message: Message) -> bytes:
        """One frame (header included) holding ``message``."""
        cls = type(message)
        if cls is Execute or cls is Launch:
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
        self._sent = _SentState([], [[], [], []])

    def decode(self, body: bytes | bytearray | memoryview) -> Message:
        """The message in a frame body (the bytes after the header).

        Raises:
            ProtocolError: the body is not a frame of this protocol.
        """
        try:
            tag, payload = msgpack.unpackb(body, strict_map_key=False, unicode_errors="surrogatepass")
            cls = MESSAGE_TYPES[tag]
            if cls is Execute or cls is Launch:
                plan, self._sent = _structure_plan(payload, self._sent)
                return cls(plan=plan)
            if cls is Result:
                return Result(result=_structure_result(payload))
            return converter.structure(payload, cls)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"undecodable frame of {len(body)} bytes: {exc!r}") from exc
