"""The input processor's guards on a client's chat input, on the default model's real tokenizer and template:
the sandbox, the template variables a caller may set, the bounds, and which work leaves the event loop."""

from __future__ import annotations

import inspect
import threading

import pytest
import transformers
import trio

from atom_trio.core.scheduler import Scheduler
from atom_trio.engine.input_processor import (
    INLINE_MESSAGES,
    MAX_CHAT_MESSAGES,
    MAX_TEMPLATE_KWARGS_CHARS,
    MAX_TEMPLATE_KWARGS_ITEMS,
    PROMPT_CHARS_PER_TOKEN,
    InputProcessor,
    python_lane,
)
from atom_trio.errors import ContextLengthExceeded, InvalidRequest
from atom_trio.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def make_processor(tokenizer, max_model_len: int = MAX_MODEL_LEN) -> InputProcessor:
    scheduler = Scheduler(num_blocks=1024, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                          max_model_len=max_model_len)
    return InputProcessor(tokenizer, scheduler, vocab_size=65536, max_logprobs=5, max_queued_requests=4,
                          check_alive=lambda: None)


async def encode(processor, prompt, **kwargs):
    return await processor.encode_prompt(prompt, add_generation_prompt=True, add_special_tokens=None,
                                         chat_template_kwargs=kwargs)


# ---- the sandbox: transformers renders in jinja2's ImmutableSandboxedEnvironment ----------------------

@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__.os.popen('echo owned').read() }}",  # the classic escape
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ namespace.__init__.__globals__ }}",
        "{% set _ = messages.append({'role': 'system', 'content': 'injected'}) %}{{ messages }}",  # immutable
    ],
)
async def test_a_template_cannot_reach_python_internals(default_model_dir, template: str) -> None:
    # An operator's template (the tokenizer's own): a client can never supply one.
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = template
    with pytest.raises(InvalidRequest, match="cannot apply the chat template: access to attribute .* is unsafe"):
        await encode(make_processor(tokenizer), HI)


async def test_an_unsafe_attribute_renders_as_nothing(default_model_dir) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = "[{{ messages.__class__ }}{{ raise_exception.__globals__ }}]"
    text, _ = await encode(make_processor(tokenizer), HI)
    assert text == "[]"


# ---- chat_template_kwargs: plain data under names that replace nothing ---------------------------------

def reserved_names(tokenizer) -> list[str]:
    """apply_chat_template's own parameters, read from its signature, and what the template is already given."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    own = [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [*own, "messages", *tokenizer.special_tokens_map, "raise_exception", "strftime_now", "range", "namespace"]


async def test_every_name_that_would_replace_the_template_or_its_inputs_is_refused(tokenizer) -> None:
    processor = make_processor(tokenizer)
    names = reserved_names(tokenizer)
    assert {"chat_template", "tools", "documents", "tokenize", "return_dict", "add_generation_prompt",
            "continue_final_message", "tokenizer_kwargs", "bos_token", "eos_token"} <= set(names)
    for name in names:
        with pytest.raises(InvalidRequest, match=f"chat_template_kwargs.{name} may not be set") as error:
            await encode(processor, HI, **{name: "{{ 7 * 7 }}"})
        assert error.value.param == f"chat_template_kwargs.{name}"


@pytest.mark.parametrize("name", ["_private", "not-a-name", "1st", ""])
async def test_a_variable_must_be_a_plain_identifier(tokenizer, name: str) -> None:
    with pytest.raises(InvalidRequest, match="must be an identifier") as error:
        await encode(make_processor(tokenizer), HI, **{name: True})
    assert error.value.param == "chat_template_kwargs"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda: None, "only JSON data, not function"),
        ({1: "x"}, "object keys must be strings"),
        ("x" * (MAX_TEMPLATE_KWARGS_CHARS + 1), f"at most {MAX_TEMPLATE_KWARGS_CHARS} characters"),
        (list(range(MAX_TEMPLATE_KWARGS_ITEMS)), f"at most {MAX_TEMPLATE_KWARGS_ITEMS} values"),
        ([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], "nested at most"),
    ],
)
async def test_values_are_bounded_json_data(tokenizer, value, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as error:
        await encode(make_processor(tokenizer), HI, custom=value)
    assert error.value.param == "chat_template_kwargs"


async def test_plain_data_reaches_the_template(default_model_dir) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = "{{ enable_thinking }}|{{ tags | join(',') }}|{{ meta.lang }}"
    text, _ = await encode(make_processor(tokenizer), HI, enable_thinking=False, tags=["a", "b"], meta={"lang": "fr"})
    assert text == "False|a,b|fr"


# ---- bounds checked before the work --------------------------------------------------------------------

async def test_too_many_messages_are_refused_before_rendering(tokenizer) -> None:
    processor = make_processor(tokenizer)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_CHAT_MESSAGES} messages, not {MAX_CHAT_MESSAGES + 1}"):
        await encode(processor, [{"role": "user", "content": ""}] * (MAX_CHAT_MESSAGES + 1))


async def test_prompts_that_could_never_fit_are_refused_before_tokenizing(tokenizer) -> None:
    processor = make_processor(tokenizer)
    limit = PROMPT_CHARS_PER_TOKEN * MAX_MODEL_LEN
    with pytest.raises(InvalidRequest, match=f"more than any prompt .* could \\({limit}") as text_error:
        await encode(processor, "x" * (limit + 1))
    assert text_error.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="the prompt has") as content_error:
        await encode(processor, [{"role": "user", "content": "x" * (limit + 1)}])
    assert content_error.value.param == "messages"
    # Within the bound before rendering, over it after: the template's own text counts too.
    many = [{"role": "user", "content": "x"}] * (limit // 8)
    with pytest.raises(InvalidRequest, match="the rendered chat has"):
        await encode(processor, many)
    # At the bound itself a text is tokenized (and /tokenize may count past the context).
    assert len((await encode(processor, "x" * limit))[1]) > 0


async def test_detokenize_takes_at_most_a_context_of_known_ids(tokenizer) -> None:
    processor = make_processor(tokenizer)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_MODEL_LEN} ids") as error:
        await processor.detokenize([1] * (MAX_MODEL_LEN + 1))
    assert error.value.param == "tokens"
    for ids in ([1] * 100 + [len(tokenizer)], [1] * 2000 + [-1]):  # checked inline, and in the lane
        with pytest.raises(InvalidRequest, match="outside"):
            await make_processor(tokenizer, max_model_len=4096).detokenize(ids)
    # An echoed prompt's ids were checked by admission (against the model's larger vocabulary): not again.
    assert await processor.detokenize([1] * 1000 + [len(tokenizer)], check_ids=False) == tokenizer.decode([1] * 1000)


async def test_token_ids_longer_than_the_context_are_refused_unread(tokenizer) -> None:
    processor = make_processor(tokenizer)
    prompt = [1] * 10_000_000 + ["not an id"]  # never scanned: the length alone refuses it
    with pytest.raises(ContextLengthExceeded) as error:
        await processor.process(prompt, SamplingParams(), request_id=None, add_generation_prompt=True,
                                chat_template_kwargs={})
    assert error.value.prompt_tokens == len(prompt)


# ---- what leaves the event loop ------------------------------------------------------------------------

async def test_large_work_runs_on_worker_threads_and_python_work_in_one_lane(tokenizer, monkeypatch) -> None:
    processor = make_processor(tokenizer, max_model_len=4096)
    threads: list[tuple[str, str]] = []
    render, decode = processor._render_chat, processor._decode

    def recording_render(*args, **kwargs):
        threads.append(("render", threading.current_thread().name))
        return render(*args, **kwargs)

    def recording_decode(ids):
        threads.append(("decode", threading.current_thread().name))
        return decode(ids)

    monkeypatch.setattr(processor, "_render_chat", recording_render)
    monkeypatch.setattr(processor, "_decode", recording_decode)
    main = threading.current_thread().name
    await encode(processor, HI)
    await encode(processor, [{"role": "user", "content": "hi"}] * (INLINE_MESSAGES + 1))
    ids = tokenizer.encode("hello world " * 600)
    assert await processor.detokenize(ids[:10]) == tokenizer.decode(ids[:10])
    assert await processor.detokenize(ids) == tokenizer.decode(ids)
    assert threads == [("render", main), ("render", "atom-trio python lane"), ("decode", main),
                       ("decode", "atom-trio detokenize")]
    assert python_lane().total_tokens == 1


async def test_the_python_lane_is_one_thread_for_all_requests(tokenizer) -> None:
    processor = make_processor(tokenizer)
    running = []
    peak = 0
    render = processor._render_chat

    def counting_render(*args, **kwargs):
        nonlocal peak
        assert threading.current_thread().name == "atom-trio python lane"
        running.append(None)
        peak = max(peak, len(running))
        try:
            return render(*args, **kwargs)
        finally:
            running.pop()

    processor._render_chat = counting_render
    chat = [{"role": "user", "content": "hi"}] * 200
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(encode, processor, chat)
    assert peak == 1


async def test_token_texts_for_logprobs_are_decode_s_and_remembered(tokenizer) -> None:
    processor = make_processor(tokenizer)
    ids = tokenizer.encode("Hello, wörld! 日本")
    assert [processor.token_text(t) for t in ids] == [tokenizer.decode([t]) for t in ids]
    assert set(processor._token_texts) == set(ids)
