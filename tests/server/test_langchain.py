"""LangChain's OpenAI chat model (``langchain-openai``) against the real server (the default model, float32):
``bind_tools`` returns tool calls and ``with_structured_output`` returns an instance, as agent frameworks use
them. ``tool_choice`` makes the small model call a tool (a grammar enforces it); without it the default,
``auto``, would need ``--enable-auto-tool-choice``."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from atom_trio.config import DEFAULT_MODEL_NAME
from atom_trio.testing import ServerProcess, server_process

QUESTION = "What is the weather like in Paris?"
PERSON = "Give a JSON object with the name and age of a person."


class GetWeather(BaseModel):
    """The weather forecast of a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class GetTime(BaseModel):
    """The current time in a timezone."""

    timezone: Literal["UTC", "CET"]


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    temperature: int = Field(ge=-30, le=45)
    sunny: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("langchain") / "server.log"
    with server_process(["--dtype", "float32", "--max-model-len", "512"], log_path=log) as proc:
        yield proc


@pytest.fixture
def llm(server: ServerProcess) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key="none", model=DEFAULT_MODEL_NAME, temperature=0,
                      max_tokens=64, max_retries=0, timeout=300)


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any", "required"])
def test_bind_tools_returns_tool_calls(llm: ChatOpenAI, tool_choice: str) -> None:
    bound = llm.bind_tools([GetWeather, GetTime], tool_choice=tool_choice, parallel_tool_calls=False)
    answer = bound.invoke(QUESTION)
    assert isinstance(answer, AIMessage) and not answer.invalid_tool_calls
    [call] = answer.tool_calls
    model = {"GetWeather": GetWeather, "GetTime": GetTime}[call["name"]]
    model.model_validate(call["args"])
    if tool_choice == "GetWeather":
        assert call["name"] == "GetWeather"
    assert answer.response_metadata["finish_reason"] == "tool_calls"


def test_a_tool_result_continues_the_conversation(llm: ChatOpenAI) -> None:
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    first = bound.invoke(QUESTION)
    [call] = first.tool_calls
    result = ToolMessage(content="Sunny, 24 degrees.", tool_call_id=call["id"])
    answer = llm.bind_tools([GetWeather], tool_choice="none").invoke([HumanMessage(QUESTION), first, result])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


def test_streamed_tool_calls_are_reassembled(llm: ChatOpenAI) -> None:
    bound = llm.bind_tools([GetWeather, GetTime], tool_choice="GetTime")
    chunks = list(bound.stream(QUESTION))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    [call] = merged.tool_calls
    assert call["name"] == "GetTime"
    GetTime.model_validate(call["args"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_an_instance(llm: ChatOpenAI, method: str) -> None:
    forecast = llm.with_structured_output(Forecast, method=method).invoke(QUESTION)
    assert isinstance(forecast, Forecast)


def test_json_mode_returns_an_object(llm: ChatOpenAI) -> None:
    answer = llm.with_structured_output(method="json_mode").invoke(PERSON)
    assert isinstance(answer, dict) and answer
