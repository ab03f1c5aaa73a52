"""Tools, structured outputs and reasoning against the real server (``atom-trio serve``, the default model in
float32) through the real ``openai`` client.

The model is the default one with a chat template in Qwen3's manner (tools in a system block, calls in
``<tool_call>`` tags with their arguments written ``| tojson``, ``<think>`` closed in the prompt when
``enable_thinking`` is false, and a line for ``reasoning_effort``), served with ``--enable-auto-tool-choice
--tool-call-parser hermes --reasoning-parser qwen3``. The small model never writes a tool call or a
``<think>`` block of its own accord, so where a test needs one it constrains the output with a regex: the
grammar makes the model write it, and the server's parsers read it back, as they would a larger model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from atom_trio.testing import ServerProcess, server_process

MODEL = "tool-model"
MAX_MODEL_LEN = 1024
HI = [{"role": "user", "content": "What is the weather like in Paris?"}]

TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}
{% endif %}{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast of a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                      "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
#: A hermes tool call, as the regex that makes the model write one.
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'
               r"\n</tool_call>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> ServerProcess:
    model = tmp_path_factory.mktemp("tool-model")
    for item in default_model_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (model / item.name).symlink_to(item)
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TEMPLATE}))
    log = model.parent / "server.log"
    args = ["--model", str(model), "--served-model-name", MODEL, "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--reasoning-parser", "qwen3"]
    with server_process(args, log_path=log) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture
def http(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=300)


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


async def streamed_calls(stream: openai.AsyncStream) -> tuple[list[dict], str, str | None]:
    """A streamed choice's tool calls reassembled from their deltas (checking OpenAI's shape on the way), its
    content, and its finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    async for chunk in stream:
        [choice] = chunk.choices
        delta = choice.delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # a call's first delta: id, type and name, empty arguments
                assert piece.id and piece.type == "function" and piece.function.name
                assert piece.function.arguments == ""
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments
        finish = choice.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))  # one index per call, from 0
    return [calls[i] for i in sorted(calls)], content, finish


# ---- structured outputs ---------------------------------------------------------------------------------

class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    temperature: int = Field(ge=-30, le=45)
    sunny: bool
    summary: str = Field(max_length=24)


async def test_parse_returns_a_pydantic_object(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model=MODEL, messages=HI, response_format=Forecast, max_completion_tokens=128, temperature=0)
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Forecast)
    assert choice.message.parsed == Forecast.model_validate_json(choice.message.content)


SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120}, "admin": {"type": "boolean"},
            "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 1000,
                                                                  "maximum": 9999}},
                        "required": ["zip"], "additionalProperties": False}},
            "required": ["age", "admin", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False,
    },
    "arrays with bounds": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                                  "minItems": 2, "maxItems": 4}},
        "required": ["scores"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "integer range": {"type": "integer", "minimum": 10, "maximum": 20},
    "anyOf": {
        "type": "object",
        "properties": {"answer": {"anyOf": [
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 5}},
             "required": ["n"], "additionalProperties": False},
            {"type": "boolean"}]}},
        "required": ["answer"], "additionalProperties": False,
    },
    "$ref": {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                             "y": {"type": "integer", "minimum": -5, "maximum": 5}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/Point"}, "end": {"$ref": "#/$defs/Point"}},
        "required": ["start", "end"], "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
async def test_json_schema_outputs_validate(client: openai.AsyncOpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me some JSON."}], max_completion_tokens=160,
        temperature=1.0, seed=7, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


async def test_json_object_and_vllms_fields_on_both_apis(client: openai.AsyncOpenAI) -> None:
    person = [{"role": "user", "content": "Give a JSON object with the name and age of a person."}]
    chat = await client.chat.completions.create(model=MODEL, messages=person, max_completion_tokens=64,
                                                temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    chat = await client.chat.completions.create(
        model=MODEL, messages=HI, max_completion_tokens=64, temperature=0,
        extra_body={"guided_choice": ["sunny", "cloudy", "rainy"]})
    assert chat.choices[0].message.content in ("sunny", "cloudy", "rainy")
    completion = await client.completions.create(
        model=MODEL, prompt="The weather in Paris is", max_tokens=16, temperature=1.0, seed=3, n=3,
        extra_body={"structured_outputs": {"regex": "(sunny|cloudy), [0-9]{2} degrees"}})
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert choice.text.split(",")[0] in ("sunny", "cloudy") and choice.text.endswith(" degrees")
    grammar = 'root ::= "It is " ("warm" | "cold") "."'
    completion = await client.completions.create(model=MODEL, prompt="Paris:", max_tokens=16, temperature=0,
                                                 extra_body={"guided_grammar": grammar})
    assert completion.choices[0].text in ("It is warm.", "It is cold.")


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
      "tool_choice": "required"}, "tools"),
])
async def test_a_schema_or_grammar_the_engine_refuses_is_a_400_naming_its_field(
    http: httpx.AsyncClient, body: dict, param: str
) -> None:
    response = await http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# ---- tool calls -------------------------------------------------------------------------------------------

async def test_a_named_tool_calls_arguments_validate(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=HI, tools=TOOLS, tool_choice=named("get_weather"), max_completion_tokens=64,
        temperature=1.0, seed=1, n=3)
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


async def test_a_returned_message_goes_back_into_the_history(client: openai.AsyncOpenAI) -> None:
    """As OpenAI's docs do it: the response's message object itself, then the tool's result."""
    first = await client.chat.completions.create(model=MODEL, messages=HI, tools=TOOLS,
                                                 tool_choice=named("get_weather"), max_completion_tokens=64)
    message = first.choices[0].message
    history = [*HI, message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny."}]
    answer = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                                  max_completion_tokens=4)
    assert answer.choices[0].message.content


async def test_a_named_tool_calls_arguments_validate_when_streamed(client: openai.AsyncOpenAI) -> None:
    for seed in range(3):
        stream = await client.chat.completions.create(
            model=MODEL, messages=HI, tools=TOOLS, tool_choice=named("get_time"), max_completion_tokens=64,
            temperature=1.0, seed=seed, stream=True)
        [call], content, finish = await streamed_calls(stream)
        assert call["name"] == "get_time" and finish == "tool_calls" and content == ""
        jsonschema.validate(json.loads(call["arguments"]), TIME_PARAMETERS)


async def test_required_always_calls_a_tool(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=HI, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_completion_tokens=64, temperature=1.0, seed=11, n=4)
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


async def test_required_may_call_several_tools(client: openai.AsyncOpenAI) -> None:
    """Parallel calls (OpenAI's default): at least one, each complete call valid; a small model may repeat
    calls until ``max_tokens``, and then only the last one may be cut short."""
    for seed in range(2):
        stream = await client.chat.completions.create(
            model=MODEL, messages=HI, tools=TOOLS, tool_choice="required", max_completion_tokens=96,
            temperature=1.0, seed=seed, stream=True)
        calls, content, finish = await streamed_calls(stream)
        assert calls and content == "" and finish in ("tool_calls", "length")
        complete = calls if finish == "tool_calls" else calls[:-1]
        for call in complete:
            jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


async def test_auto_tool_choice_parses_the_models_calls(client: openai.AsyncOpenAI) -> None:
    forced = {"structured_outputs": {"regex": HERMES_CALL}}
    completion = await client.chat.completions.create(
        model=MODEL, messages=HI, tools=TOOLS, max_completion_tokens=64, temperature=0, extra_body=forced)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    stream = await client.chat.completions.create(
        model=MODEL, messages=HI, tools=TOOLS, tool_choice="auto", max_completion_tokens=64, temperature=0,
        extra_body=forced, stream=True)
    [streamed], content, finish = await streamed_calls(stream)
    assert (streamed["name"], json.loads(streamed["arguments"]), content, finish) == (
        "get_weather", arguments, "", "tool_calls")


async def test_auto_tool_choice_without_a_call_is_content(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=HI, tools=TOOLS, tool_choice="auto", max_completion_tokens=12, temperature=0)
    [choice] = completion.choices
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


async def test_tools_and_tool_history_reach_the_template(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    history = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees."},
    ]
    tokens = (await http.post("/tokenize", json={"messages": history, "tools": TOOLS})).json()["tokens"]
    prompt = (await http.post("/detokenize", json={"tokens": tokens})).json()["prompt"]
    assert json.dumps(TOOLS[0]) in prompt  # each tool, as the template wrote it
    # the call's arguments reached the template as an object (a string would be quoted by tojson)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\nSunny, 24 degrees.\n</tool_response>" in prompt
    completion = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                                      tool_choice="none", max_completion_tokens=8, temperature=0)
    assert completion.choices[0].message.content and completion.choices[0].message.tool_calls is None
    assert completion.usage.prompt_tokens == len(tokens)


# ---- reasoning ---------------------------------------------------------------------------------------------

THINKING = r"<think>[a-z]{2,8}( [a-z]{2,8}){0,2}</think>[A-Z][a-z]{2,8}\."


async def test_reasoning_is_split_from_the_answer(client: openai.AsyncOpenAI) -> None:
    body = {"structured_outputs": {"regex": THINKING}}
    completion = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=48,
                                                      temperature=0, extra_body=body)
    message = completion.choices[0].message
    reasoning, content = message.reasoning_content, message.content
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert content and content[0].isupper() and content.endswith(".")
    stream = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=48,
                                                  temperature=0, extra_body=body, stream=True)
    streamed_reasoning, streamed_content = "", ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        streamed_reasoning += getattr(delta, "reasoning_content", None) or ""
        streamed_content += delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    hidden = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=48,
                                                  temperature=0, extra_body={**body, "include_reasoning": False})
    assert hidden.choices[0].message.content == content
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


async def test_enable_thinking_false_reaches_the_template(client: openai.AsyncOpenAI) -> None:
    """With thinking off the template closes the reasoning block in the prompt, so the whole output is the
    answer, even text that looks like the end of reasoning."""
    body = {"structured_outputs": {"regex": r"[a-z]{2,6}</think>[a-z]{2,6}"}}
    thinking = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=32,
                                                    temperature=0, extra_body=body)
    assert thinking.choices[0].message.reasoning_content and thinking.choices[0].message.content
    off = await client.chat.completions.create(
        model=MODEL, messages=HI, max_completion_tokens=32, temperature=0,
        extra_body={**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > thinking.usage.prompt_tokens
    assert off.choices[0].message.reasoning_content is None
    assert "</think>" in off.choices[0].message.content


async def test_reasoning_effort_reaches_a_template_that_reads_it(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=2)
    effort = await client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=2,
                                                  reasoning_effort="high")
    assert effort.usage.prompt_tokens > plain.usage.prompt_tokens
