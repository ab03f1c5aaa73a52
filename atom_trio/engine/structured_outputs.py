"""Grammar-constrained decoding, the engine's side: compiled grammars, one matcher per sequence, the masks.

A request with ``structured_outputs`` is admitted with a grammar compiled by
xgrammar for the engine's tokenizer, its vocabulary as wide as the model's
logits (a model may have more rows than its tokenizer has tokens; those are
never allowed). Compiling runs on a worker thread, never on the event loop
(a large schema takes tens of milliseconds), and is cached by kind and
canonical spec (the JSON schema re-serialized without whitespace, so two
spellings of one schema share an entry; keys keep their order, which
decides the order of the generated properties). Concurrent requests for the
same spec wait for the one compilation in progress. What the grammar engine
refuses (a schema feature it does not support, a bad regex or EBNF) is an
`InvalidRequest` with its message, raised before anything is scheduled.

Each sequence gets its own ``GrammarMatcher``, which the scheduler advances
with every token it appends (`atom_trio.core.scheduler`). For each plan with
constrained rows the step loop fills their bitmask (`fill`) before the plan
is launched. Filling is left on the event loop: for 32 rows of a mid-size
JSON schema it takes tens to a few hundred microseconds (the figures are in
docs/structured-outputs.md), less than a thread hop would cost.

JSON schemas are compiled for compact output (no free whitespace between
tokens): a small model given the choice can emit whitespace until
``max_tokens``, and the compact form is still exactly the JSON the schema
describes. ``json_object`` is the schema ``{"type": "object"}``, as in vLLM
(OpenAI's JSON mode promises an object; xgrammar's built-in JSON grammar
also takes an array), ``choice`` a grammar of its literal alternatives.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import trio

from atom_trio.errors import InvalidRequest
from atom_trio.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from atom_trio.core.plan import TokenBitmask
    from atom_trio.core.sequence import Grammar

CACHE_SIZE = 256
"""Compiled grammars kept, least recently used dropped first (a JSON schema's is tens to hundreds of KiB)."""

_ANY_OBJECT = '{"type": "object"}'

_LOCATION = re.compile(r"^\s*\[[^\]]*\]\s*[^\s:]+:\d+:\s*")
"""The time and C++ source location xgrammar's errors start with; the client needs only the rest."""


def cache_key(spec: StructuredOutputsParams) -> tuple[str, Hashable]:
    """``(kind, canonical spec)``: equal for specs that compile to the same grammar."""
    kind = spec.kind
    if kind == "json":
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        return kind, json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if kind == "json_object":
        return kind, None
    return kind, getattr(spec, kind)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar (xgrammar's) whose sentences are exactly ``choices``: JSON escapes are its literals'."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class StructuredOutputs:
    """Compiles and caches grammars for one engine's tokenizer, and fills the plans' token bitmasks.

    Args:
        tokenizer: the engine's Hugging Face tokenizer.
        vocab_size: the width of the model's logits.
        eos_token_ids: the tokens that end a sequence; a grammar's output ends
            with one of them, which the scheduler then treats as EOS.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._compiler_lock = trio.Lock()
        self._cache: collections.OrderedDict[tuple[str, Hashable], xgrammar.CompiledGrammar] = (
            collections.OrderedDict()
        )
        self._compiling: dict[tuple[str, Hashable], trio.Event] = {}
        self.num_compilations = 0
        """Grammars compiled so far (cache misses), for tests and benchmarks."""

    async def matcher_factory(self, spec: StructuredOutputsParams) -> Callable[[], Grammar]:
        """What makes a fresh matcher for ``spec`` (one per sequence), compiling its grammar if need be.

        Raises:
            InvalidRequest: the grammar engine refused ``spec`` (``param="structured_outputs"``).
        """
        compiled = await self._compiled(spec)
        import xgrammar  # only now: the compiler's thread has imported it (a second or two), off the event loop

        return functools.partial(xgrammar.GrammarMatcher, compiled)

    def fill(self, bitmask: TokenBitmask) -> None:
        """Fill ``bitmask.words`` from its rows' matchers: the tokens each may sample next."""
        # Imported here, as xgrammar is: importing the engine starts no BLAS threads (a worker process
        # imports the package before it blocks the signal that only its watchdog may receive).
        import numpy as np

        words = np.empty((len(bitmask.rows), -(-self.vocab_size // 32)), dtype=np.int32)
        for i, matcher in enumerate(bitmask.grammars):
            matcher.fill_next_token_bitmask(words, i)
        bitmask.words = words

    async def _compiled(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        key = cache_key(spec)
        compiler = await self._get_compiler()  # before the loop: no checkpoint between its check and the claim
        while True:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            in_progress = self._compiling.get(key)
            if in_progress is None:
                break
            await in_progress.wait()  # then from the cache, or (it failed) compile to get the error
        done = self._compiling[key] = trio.Event()
        try:
            compiled = await trio.to_thread.run_sync(
                _compile, compiler, spec, thread_name="atom-trio grammar compile"
            )
        except RuntimeError as error:  # xgrammar's errors, its parse errors included
            message = _LOCATION.sub("", str(error)).strip()
            raise InvalidRequest(f"structured_outputs: {message}", param="structured_outputs") from None
        finally:
            del self._compiling[key]
            done.set()
        self.num_compilations += 1
        self._cache[key] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    async def _get_compiler(self) -> xgrammar.GrammarCompiler:
        """The compiler, built on first use on a thread (importing xgrammar and reading the vocabulary take a while)."""
        async with self._compiler_lock:
            if self._compiler is None:
                self._compiler = await trio.to_thread.run_sync(
                    self._make_compiler, thread_name="atom-trio grammar compiler"
                )
        return self._compiler

    def _make_compiler(self) -> xgrammar.GrammarCompiler:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._eos_token_ids or None
        )
        # Our cache bounds what is kept; xgrammar's own would keep every grammar ever compiled.
        return xgrammar.GrammarCompiler(info, cache_enabled=False)


def _compile(compiler: xgrammar.GrammarCompiler, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
    kind = spec.kind
    if kind == "json":
        schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
        return compiler.compile_json_schema(schema, any_whitespace=False)
    if kind == "json_object":
        return compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(spec.regex)
    if kind == "choice":
        return compiler.compile_grammar(choice_grammar(spec.choice))
    return compiler.compile_grammar(spec.grammar)
