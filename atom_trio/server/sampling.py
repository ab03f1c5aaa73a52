"""From an API request to the engine's inputs: prompts and `SamplingParams`.

Both APIs share these fields, with two differences that clients rely on:
completions default to 16 new tokens (OpenAI's and vLLM's default) while chat
runs to the end of the context, and completions ask for ``logprobs: N`` where
chat asks for ``logprobs: true, top_logprobs: N``.

Completions with ``echo`` and ``logprobs: N`` (how lm-evaluation-harness scores
log-likelihoods) also get the prompt's logprobs, as in vLLM: the engine is asked
for ``prompt_logprobs=N``. ``echo`` with ``max_tokens: 0`` returns the prompt
alone: the engine cannot generate zero tokens, and prefill samples one anyway,
so it generates one that the response leaves out (vLLM does the same).
"""

from __future__ import annotations

from typing import Any

from ..sampling_params import SamplingParams
from .errors import bad_request
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    try:
        return {int(token): bias for token, bias in raw.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


def _common(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
    fields: dict[str, Any] = dict(
        n=req.n,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
    )
    # None means "the engine's default"; max_tokens=None is meaningful (to the end of the context).
    kwargs = {name: value for name, value in fields.items() if value is not None}
    return {**kwargs, "max_tokens": max_tokens}


def echo_only(req: CompletionRequest) -> bool:
    """Whether the response is the echoed prompt alone (``echo`` with ``max_tokens: 0``)."""
    return bool(req.echo) and req.max_tokens == 0


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if echo_only(req):
        max_tokens = 1
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo and req.logprobs is not None:
        prompt_logprobs = req.logprobs
    return SamplingParams(
        **_common(req, max_tokens=max_tokens, logprobs=req.logprobs), prompt_logprobs=prompt_logprobs
    )


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return SamplingParams(**_common(req, max_tokens=max_tokens, logprobs=logprobs))


def chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, str]]:
    """Messages as chat templates expect them. ``developer`` is OpenAI's new name for ``system``."""
    out = []
    for message in req.messages:
        item = {"role": "system" if message.role == "developer" else message.role, "content": message.content or ""}
        if message.name is not None:
            item["name"] = message.name
        out.append(item)
    if not out:
        raise bad_request("messages must not be empty", param="messages")
    return out
