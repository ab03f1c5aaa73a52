"""Fuzz the real server: schemathesis from ``/openapi.json``, then hostile bodies from hypothesis.

One ``atom-trio serve`` (the default model on the CPU, a 64-token context so that every generation a case
starts is short, the API key on) takes every case. Whatever a client sends, the server must answer below
500 within the per-request timeout, and afterwards be healthy with every KV block free. CI runs a bit over
a thousand cases in all; ``ATOM_TRIO_RELIABILITY=full`` runs the scale docs/reliability.md records.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from atom_trio.server import create_app
from atom_trio.server.openapi import openapi_document
from atom_trio.server.routes import guarded
from atom_trio.server.schemas import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from atom_trio.testing import ServerProcess, server_process
from atom_trio.testing.reliability import FULL_SCALE, scale, wait_drained

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 64
REQUEST_TIMEOUT = 120.0
"""An answer later than this is a hang: the longest legitimate cases (128 samples, 64 prompts) took up to 40 s
on the loaded 2-core box."""
CLIENTS = 8

BODIES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    args = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256",
            "--max-num-seqs", "32", "--api-key", KEY, "--shutdown-timeout", "10"]
    with server_process(args, log_path=log) as proc:
        yield proc


def assert_recovered(server: ServerProcess) -> None:
    """Healthy, nothing running or waiting, every KV block free, and a plain request still answered."""
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200, server.log()[-3000:]
    wait_drained(server.url)
    answer = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=REQUEST_TIMEOUT,
                        json={"prompt": "Hello", "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


# ---- the OpenAPI document -------------------------------------------------------------------------------

def test_openapi_document_describes_every_route_and_field(server: ServerProcess) -> None:
    served = httpx.get(server.url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == json.loads(json.dumps(openapi_document(guarded)))
    document = served.json()
    assert document["openapi"].startswith("3.")
    app_routes = {(method.lower(), rule.rule) for rule in create_app().url_map.iter_rules()
                  for method in rule.methods - {"HEAD", "OPTIONS"} if rule.endpoint != "static"}
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == app_routes - {("get", "/openapi.json")}
    for path, item in document["paths"].items():  # the key guards exactly the operations that say so
        for operation in item.values():
            method = "POST" if "requestBody" in operation else "GET"
            refused = httpx.request(method, server.url + path, timeout=10)
            assert (refused.status_code == 401) == ("security" in operation), (path, refused.status_code)
    schemas = document["components"]["schemas"]
    for path, cls in BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = schemas[body["$ref"].rsplit("/", 1)[1]]
        assert set(schema["properties"]) == {f.name for f in attrs.fields(cls)}
        assert set(schema.get("required", ())) == {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}
        assert schema["additionalProperties"] is False
        assert not set(schema["properties"]) & set(UNSUPPORTED.get(cls, ()))


# ---- schemathesis -----------------------------------------------------------------------------------------

def test_schemathesis_finds_no_server_error_and_no_hang(server: ServerProcess, tmp_path: Path) -> None:
    """Every phase schemathesis has (examples, the coverage of each keyword's boundaries, fuzzing, with and
    without the key) and every check except "schema-valid data is accepted": the document gives types, and
    the server also refuses values out of range (a temperature of 500, 10^30 tokens) with a 400."""
    report = tmp_path / "schemathesis.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
        "--header", f"Authorization: Bearer {KEY}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--continue-on-failure",
        "--max-examples", str(scale(25, 1500)), "--workers", "4",
        "--request-timeout", str(REQUEST_TIMEOUT), "--max-response-time", str(REQUEST_TIMEOUT),
        "--suppress-health-check", "all",
        "--report", "json", "--report-json-path", str(report), "--no-color",
    ]
    if not FULL_SCALE:
        command += ["--seed", "16"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=scale(600, 3600))
    assert report.exists(), run.stdout[-5000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    print(f"schemathesis: {result['test_cases']} in {result['running_time']:.0f} s, seed {result['seed']}")
    assert result["operations"]["tested"] == len(openapi_document(guarded)["paths"])
    assert not result["failures"] and not result["errors"], run.stdout[-8000:]
    assert run.returncode == 0, run.stdout[-8000:]
    assert result["test_cases"]["generated"] >= scale(700, 5000)
    assert_recovered(server)


# ---- hostile bodies ---------------------------------------------------------------------------------------

BASES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "Hello there", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "Hello there"},
    "/detokenize": {"tokens": [1, 2, 3]},
}
KNOWN_FIELDS = sorted({f.name for cls in BODIES.values() for f in attrs.fields(cls)}
                      | {name for checks in UNSUPPORTED.values() for name in checks})


class Raw(str):
    """JSON text to splice in as it is: values ``json.dumps`` cannot write (NaN, 5000-digit integers, nesting
    past Python's recursion limit, lone surrogates)."""


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
HUGE = [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**6, 10**30]
huge_numbers = st.sampled_from([*HUGE, 2**53 + 1, -(2**63) - 1, -(10**30), 10**400, 1e308, -1e308, 5e-324, -0.0, 1.5]) | st.sampled_from([Raw(t) for t in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "1.0e-99999")])
deep_nesting = st.sampled_from([10, 100, 1000, 10_000, 200_000]).flatmap(
    lambda depth: st.sampled_from([Raw("[" * depth + "]" * depth), Raw('{"a": ' * depth + "1" + "}" * depth)]))
odd_strings = st.sampled_from([
    Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'), Raw('"\\u0000"'), "\x00", "\u202e", "\ufeff", "<|im_start|>",
    "<|endoftext|>", "{{ 7*7 }}", "a" * 100_000, "😀" * 10_000, "\n" * 5000,
])
giant_lists = st.sampled_from([
    [0] * 100_000, [49151] * 10_000, [-1], [2**40], ["x"] * 20_000, [[1]] * 2000, [None] * 1000, [{}] * 1000,
])
hostile_values = json_values | huge_numbers | deep_nesting | odd_strings | giant_lists

GIANT: dict[str, list[int]] = {
    "n": [-1, 0, 129, *HUGE],
    "max_tokens": [-1, 0, MAX_MODEL_LEN, *HUGE],
    "max_completion_tokens": [-1, 0, MAX_MODEL_LEN, *HUGE],
    "min_tokens": [-1, MAX_MODEL_LEN, *HUGE],
    "logprobs": [-1, 21, *HUGE],
    "top_logprobs": [-1, 21, *HUGE],
    "prompt_logprobs": [-1, 21, *HUGE],
    "top_k": [-2, 10**6, *HUGE],
    "seed": [-(2**63) - 1, -(2**63), 2**64, 2**64 + 1, 10**30],
}
"""Counts just past each limit (21 logprobs, 129 samples, the whole context) and far past it. The largest
valid counts are explicit examples instead: each is seconds of generation on this box."""
LARGEST_VALID = [
    ("/v1/completions", dumps({"prompt": "Hello there", "max_tokens": 1, "n": 128})),
    ("/v1/completions", dumps({"prompt": "Hello there", "max_tokens": 2, "logprobs": 20, "echo": True})),
    ("/v1/chat/completions", dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                    "logprobs": True, "top_logprobs": 20, "n": 4, "stream": True})),
]


@st.composite
def field_overrides(draw: st.DrawFn) -> tuple[str, str]:
    """A valid body with some fields set to hostile values (known fields, unsupported ones, made-up ones)."""
    path = draw(st.sampled_from(sorted(BASES)))
    body: dict[str, Any] = dict(BASES[path])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(KNOWN_FIELDS) | st.text(min_size=1, max_size=12))
        body[name] = draw(hostile_values)
    return path, dumps(body)


@st.composite
def giant_counts(draw: st.DrawFn) -> tuple[str, str]:
    """Generation requests asking for a great many of something."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = dict(BASES[path])
    names = [name for name in GIANT if name in {f.name for f in attrs.fields(BODIES[path])}]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        body[name] = draw(st.sampled_from(GIANT[name]))
    if chat and "top_logprobs" in body:
        body["logprobs"] = True
    body["stream"] = draw(st.booleans())
    return path, dumps(body)


@st.composite
def many_items(draw: st.DrawFn) -> tuple[str, str]:
    """Thousands of messages, prompts or stop strings."""
    count = draw(st.sampled_from([100, 1000, 5000, 20_000]))
    kind = draw(st.sampled_from(["messages", "tokenize-messages", "prompts", "stop", "stop_token_ids"]))
    content = draw(st.sampled_from(["", "hi", "{{ x }}", "<|im_end|>"]))
    if kind in ("messages", "tokenize-messages"):
        messages = [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(count)]
        path = "/v1/chat/completions" if kind == "messages" else "/tokenize"
        return path, dumps({**({"max_tokens": 1} if kind == "messages" else {}), "messages": messages})
    body: dict[str, Any] = dict(BASES["/v1/completions"], max_tokens=1)
    if kind == "prompts":
        body["prompt"] = [content or "a"] * min(count, 32)  # each prompt is a generation: this many take seconds
    elif kind == "stop":
        body["stop"] = [f"s{i}" for i in range(count)]
    else:
        body["stop_token_ids"] = list(range(count))
    return "/v1/completions", dumps(body)


@st.composite
def template_kwargs(draw: st.DrawFn) -> tuple[str, str]:
    """Chat template keyword arguments a client must not be able to turn into code or a different result."""
    kwargs = draw(st.sampled_from([
        {"chat_template": "{{ 7*7 }}"},
        {"chat_template": "{% for i in range(300000) %}{% for j in range(1) %}{% endfor %}{% endfor %}"},
        {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
        {"tokenize": True}, {"return_dict": True}, {"return_assistant_tokens_mask": True},
        {"continue_final_message": True}, {"add_generation_prompt": "yes"}, {"messages": []},
        {"conversation": [{"role": "user", "content": "x"}]}, {"tools": [{"type": "function"}]},
        {"documents": [{"title": "x"}]}, {"padding": True, "truncation": True, "max_length": 1},
        {"enable_thinking": True}, {"x" * 1000: 1},
    ]))
    path = draw(st.sampled_from(["/v1/chat/completions", "/tokenize"]))
    return path, dumps({**BASES[path], "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": kwargs})


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bodies that are not a JSON object: invalid UTF-8, other encodings, truncated text, other JSON values."""
    path = draw(st.sampled_from(sorted(BASES)))
    valid = json.dumps(BASES[path])
    body = draw(st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b"null", b"[]", b"0", b'"x"', b"{", b"{}", b"\xff\xfe", b"\xef\xbb\xbf" + valid.encode(),
                         valid.encode("utf-16"), valid.encode("utf-32"), valid.encode()[:-1],
                         valid.encode().replace(b"Hello", b"\xc3\x28\xa0\xa1"), valid.encode() + b" trailing"]),
    ))
    return path, body


hostile_requests = st.one_of(field_overrides(), giant_counts(), many_items(), template_kwargs(), raw_bodies())


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:2000]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], error
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-2000:]
        errors = [event["error"] for event in map(json.loads, events[:-1]) if "error" in event]
        assert all(error["type"] != "server_error" for error in errors), errors


def test_hostile_bodies_get_client_errors_and_leave_the_server_clean(server: ServerProcess) -> None:
    """Hypothesis draws the cases; a pool of clients sends them, so that generation cases share the engine's
    batches as real clients' do. A failing case is reported as it was sent (no shrinking: a hang would be
    replayed for minutes, and every case is small enough to read as it is)."""
    answered: list[tuple[float, int, str, str | bytes]] = []
    problems: list[str] = []
    in_flight = threading.Semaphore(CLIENTS)

    def send(http: httpx.Client, path: str, body: str | bytes) -> None:
        start = time.monotonic()
        try:
            response = http.post(path, content=body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body)
            check_answer(response)
            answered.append((time.monotonic() - start, response.status_code, path, body[:100]))
        except httpx.TimeoutException:
            problems.append(f"no answer within {REQUEST_TIMEOUT} s (a hang) to POST {path} {body[:500]!r}")
        except (AssertionError, httpx.HTTPError, ValueError, KeyError) as exc:
            problems.append(f"POST {path} {body[:500]!r}: {type(exc).__name__}: {exc}")
        finally:
            in_flight.release()

    with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=REQUEST_TIMEOUT, limits=httpx.Limits(max_connections=CLIENTS)) as http, \
            concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:

        @settings(max_examples=scale(300, 5000), deadline=None, derandomize=not FULL_SCALE, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(hostile_requests)
        @example(LARGEST_VALID[0])
        @example(LARGEST_VALID[1])
        @example(LARGEST_VALID[2])
        def submit(request: tuple[str, str | bytes]) -> None:
            in_flight.acquire()
            pool.submit(send, http, *request)

        submit()
    statuses = collections.Counter(status for _, status, _, _ in answered)
    print(f"hostile bodies: {len(answered)} answered, statuses {dict(statuses)}; slowest:",
          *sorted(answered, key=lambda a: a[0], reverse=True)[:5], sep="\n  ")
    assert not problems, "\n".join(problems)
    assert len(answered) >= scale(300, 5000)
    assert_recovered(server)
