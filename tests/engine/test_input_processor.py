"""The input processor on the default model's tokenizer and a real scheduler, without a model: every admission check."""

from __future__ import annotations

import threading

import pytest

from atom_trio.core.scheduler import Scheduler
from atom_trio.engine.input_processor import InputProcessor
from atom_trio.errors import ContextLengthExceeded, EngineDeadError, EngineOverloaded, InvalidRequest
from atom_trio.sampling_params import SamplingParams

VOCAB = 65536  # the model's vocabulary, padded beyond the tokenizer's 49152 tokens


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def make_scheduler(**fields) -> Scheduler:
    return Scheduler(
        **{"num_blocks": 64, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 128,
           **fields}
    )


def make_processor(tokenizer, scheduler=None, *, check_alive=lambda: None, **fields) -> InputProcessor:
    return InputProcessor(
        tokenizer,
        scheduler or make_scheduler(),
        **{"vocab_size": VOCAB, "max_logprobs": 5, "max_queued_requests": 4, "check_alive": check_alive, **fields},
    )


async def admit(processor, prompt, params=None, request_id=None):
    return await processor.process(
        prompt, params or SamplingParams(), request_id=request_id, add_generation_prompt=True, chat_template_kwargs={}
    )


async def test_text_token_ids_and_chat_are_admitted_under_fresh_keys(tokenizer) -> None:
    processor = make_processor(tokenizer)
    text = await admit(processor, "Hello there", request_id="same")
    ids = await admit(processor, [5, 6, 7], request_id="same")
    messages = [{"role": "user", "content": "Hi"}]
    chat = await admit(processor, messages)
    assert (text.prompt, text.prompt_token_ids) == ("Hello there", tokenizer.encode("Hello there"))
    assert (ids.prompt, ids.prompt_token_ids) == (None, [5, 6, 7])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.prompt == rendered
    assert chat.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    # The scheduler never sees a request id twice, whatever the callers' ids say.
    assert len({text.key, ids.key, chat.key}) == 3
    assert text.request_id == ids.request_id == "same" and chat.request_id == chat.key


async def test_long_prompts_are_tokenized_on_a_thread(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    processor = make_processor(tokenizer, make_scheduler(max_model_len=4096, num_blocks=1024))
    threads = []
    encode = processor._encode

    def recording(text, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(text, **kwargs)

    monkeypatch.setattr(processor, "_encode", recording)
    long_text = "word " * 1000
    admitted = await admit(processor, long_text)
    await admit(processor, "short")
    assert admitted.prompt_token_ids == tokenizer.encode(long_text)
    assert threads == ["atom-trio tokenize", threading.current_thread().name]


@pytest.mark.parametrize(
    ("prompt", "params", "param", "message"),
    [
        ("hi", SamplingParams(temperature=-1.0), "temperature", "temperature must be in"),
        ("hi", SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids", rf"outside \[0, {VOCAB}\)"),
        ("hi", SamplingParams(logit_bias={-1: 1.0}), "logit_bias", rf"outside \[0, {VOCAB}\)"),
        ("hi", SamplingParams(logprobs=6), "logprobs", r"logprobs must be in \[0, 5\]"),
        ("hi", SamplingParams(prompt_logprobs=6), "prompt_logprobs", r"must be in \[0, 5\]"),
        ([], None, "prompt", "the prompt must not be empty"),
        # the vocabulary check: the runner trusts every prompt token id it is given
        ([1, 2, VOCAB], None, "prompt", rf"prompt token ids must be in \[0, {VOCAB}\)"),
        ([-1, 2], None, "prompt", rf"prompt token ids must be in \[0, {VOCAB}\)"),
        (3.5, None, "prompt", "a string, a list of token ids or a list of chat messages"),
        ([{"role": "user", "content": "hi"}, "stray"], None, "prompt", "a list of chat messages"),
    ],
)
async def test_bad_requests_raise_typed_errors(tokenizer, prompt, params, param, message) -> None:
    scheduler = make_scheduler()
    processor = make_processor(tokenizer, scheduler)
    with pytest.raises(InvalidRequest, match=message) as error:
        await admit(processor, prompt, params)
    assert error.value.param == param
    assert not scheduler.has_unfinished()


async def test_a_chat_template_that_fails_is_an_invalid_request(tokenizer) -> None:
    processor = make_processor(tokenizer)
    messages = [{"role": "user", "content": 5}]  # the template adds it to a string
    with pytest.raises(InvalidRequest, match="cannot apply the chat template") as error:
        await processor.encode_prompt(messages, add_generation_prompt=True, add_special_tokens=None,
                                      chat_template_kwargs={})
    assert error.value.param == "messages"


async def test_context_length_is_the_kv_capped_one(tokenizer) -> None:
    small = make_scheduler(num_blocks=2, block_size=4, max_model_len=100)
    processor = make_processor(tokenizer, small)
    assert small.max_model_len == 8
    with pytest.raises(ContextLengthExceeded) as too_long:
        await admit(processor, [1] * 8)
    assert (too_long.value.prompt_tokens, too_long.value.max_model_len, too_long.value.param) == (8, 8, "input_tokens")
    with pytest.raises(ContextLengthExceeded) as too_many:
        await admit(processor, [1] * 4, SamplingParams(max_tokens=5))
    assert too_many.value.param == "max_tokens" and "(5 > 8 - 4)" in str(too_many.value)
    assert (await admit(processor, [1] * 4, SamplingParams(max_tokens=4))).prompt_token_ids == [1] * 4
    assert (await admit(processor, [1] * 7, SamplingParams(max_tokens=None))).prompt_token_ids == [1] * 7


async def test_a_full_queue_and_a_dead_engine_refuse(tokenizer) -> None:
    scheduler = make_scheduler()
    processor = make_processor(tokenizer, scheduler, max_queued_requests=1)
    first = await admit(processor, [1, 2])
    scheduler.add_request(first.key, first.prompt_token_ids, first.params)
    with pytest.raises(EngineOverloaded, match=r"1 requests are waiting \(max_queued_requests=1\)"):
        await admit(processor, [1, 2])

    def dead() -> None:
        raise EngineDeadError("the engine has shut down")

    with pytest.raises(EngineDeadError):
        await admit(make_processor(tokenizer, check_alive=dead), [1, 2])


async def test_liveness_is_checked_again_after_tokenizing(tokenizer) -> None:
    calls = []

    def dies_while_tokenizing() -> None:
        calls.append(None)
        if len(calls) > 1:
            raise EngineDeadError("the engine has shut down")

    processor = make_processor(tokenizer, make_scheduler(max_model_len=4096, num_blocks=1024),
                               check_alive=dies_while_tokenizing)
    with pytest.raises(EngineDeadError):
        await admit(processor, "word " * 1000)
    assert len(calls) == 2


async def test_detokenize_takes_only_ids_the_tokenizer_knows(tokenizer) -> None:
    processor = make_processor(tokenizer)
    ids = tokenizer.encode("Hello there")
    assert await processor.detokenize(ids) == tokenizer.decode(ids)
    with pytest.raises(InvalidRequest, match=rf"tokens holds a token id outside \[0, {len(tokenizer)}\)") as error:
        await processor.detokenize([1, len(tokenizer)])
    assert error.value.param == "tokens"
