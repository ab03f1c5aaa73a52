"""Per-request sampling parameters, with vLLM's field names and defaults."""

from __future__ import annotations

import json as jsonlib

import attrs

from .errors import InvalidRequest


def _tuple_of_str(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _tuple_of_int(value: list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    return () if value is None else tuple(value)


def _bias(value: dict[int, float] | None) -> dict[int, float] | None:
    if not value:
        return None
    return {int(k): float(b) for k, b in value.items()}


_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _choice(value: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class StructuredOutputsParams:
    """A grammar the sampler enforces on the output: exactly one of the fields is set.

    ``json`` is a JSON schema (a dict or its JSON text), ``json_object`` any
    JSON object, ``regex`` a regular expression, ``choice`` one of the given
    strings, ``grammar`` an EBNF grammar (xgrammar's / GBNF syntax). The
    shape is vLLM's, so its clients' ``structured_outputs`` maps one to one.
    The grammar itself is compiled and checked by the engine, which raises
    `InvalidRequest` with the grammar engine's message; this class checks
    only what needs no grammar engine, so a bad request fails where it is built.
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = attrs.field(default=None, converter=_choice)
    grammar: str | None = None

    def __attrs_post_init__(self) -> None:
        def bad(why: str) -> InvalidRequest:
            return InvalidRequest(f"structured_outputs{why}", param="structured_outputs")

        chosen = [name for name in _KINDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise bad(f" needs exactly one of {', '.join(_KINDS)}; got {', '.join(chosen) or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = jsonlib.loads(schema)
                except ValueError as error:
                    raise bad(f".json is not valid JSON: {error}") from None
            if not isinstance(schema, dict):
                raise bad(".json must be a JSON schema object")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise bad(".choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise bad(f".{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        """The field that is set: ``json``, ``json_object``, ``regex``, ``choice`` or ``grammar``."""
        return next(name for name in _KINDS if getattr(self, name) not in (None, False))


_INT32_LIMIT = 2**31
_MAX_N = 128


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature=0`` is greedy. ``top_k=0`` (or -1) and ``top_p=1`` disable
    those filters. ``seed`` makes a request's samples reproducible whatever
    else shares its batch. ``logprobs=N`` returns the sampled token's logprob
    and the N most likely alternatives; ``prompt_logprobs=N`` does the same
    for every prompt token (given the tokens before it), which log-likelihood
    evaluations need. ``structured_outputs`` constrains the output to a
    grammar (a JSON schema, regex, choice or EBNF), enforced in the sampler.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_int)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = attrs.field(default=None, converter=_bias)
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        """Whether sampling reads the values of the tokens so far (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def validate(self, *, vocab_size: int | None = None, max_logprobs: int = 20) -> None:
        """Raise `InvalidRequest` naming the first parameter that is out of range."""

        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        # Every integer crosses the worker wire (msgpack) and becomes a tensor
        # index: bound them so one bad request can't overflow either.
        for param in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, param)
            if value is not None and abs(value) >= _INT32_LIMIT:
                raise bad(param, f"must be below {_INT32_LIMIT}")
        if not 1 <= self.n <= _MAX_N:
            raise bad("n", f"must be in [1, {_MAX_N}] (OpenAI's limit)")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 or 0 (disabled) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise bad("logprobs", f"must be in [0, {max_logprobs}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= max_logprobs:
            raise bad("prompt_logprobs", f"must be in [0, {max_logprobs}]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "must fit in 64 bits")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", param="stop")
        ids = list(self.stop_token_ids) + list(self.logit_bias or ())
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            param = "stop_token_ids" if any(not 0 <= t < vocab_size for t in self.stop_token_ids) else "logit_bias"
            raise InvalidRequest(f"{param} holds a token id outside [0, {vocab_size})", param=param)
        if self.logit_bias and any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise InvalidRequest("logit_bias values must be in [-100, 100]", param="logit_bias")
