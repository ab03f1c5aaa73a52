"""The request-body decoder: `loads_stepwise` is `json.loads` a bounded piece at a time, refusing the same
documents plus what the server cannot use; `dumps_stepwise` is `json.dumps`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.server import json_body
from atom_trio.server.json_body import BodyError, TooManyItems, decode, dumps_stepwise, fits_inline, loads_stepwise

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=12) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=60,
)
#: Window sizes small enough that every piece boundary (inside escapes, between surrogates) gets hit.
WINDOWS = [(7, 9), (8, 17), (13, 32), (json_body.CHUNK, json_body.RUN_CHUNK)]


@contextlib.contextmanager
def windows(chunk: int, run_chunk: int) -> Iterator[None]:
    saved = json_body.CHUNK, json_body.RUN_CHUNK, json_body.RUN_ITEMS
    json_body.CHUNK, json_body.RUN_CHUNK, json_body.RUN_ITEMS = chunk, run_chunk, 3
    try:
        yield
    finally:
        json_body.CHUNK, json_body.RUN_CHUNK, json_body.RUN_ITEMS = saved


@settings(max_examples=300, deadline=None)
@given(value=JSON, ascii=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_stepwise_decodes_what_json_loads_decodes(value, ascii: bool, indent) -> None:
    text = json.dumps(value, ensure_ascii=ascii, indent=indent)
    for chunk, run_chunk in WINDOWS:
        with windows(chunk, run_chunk):
            assert loads_stepwise(text) == json.loads(text)
            assert dumps_stepwise(value) == json.dumps(value, ensure_ascii=False).encode()


@settings(max_examples=500, deadline=None)
@given(value=JSON, data=st.data())
def test_stepwise_refuses_what_json_loads_refuses(value, data) -> None:
    text = json.dumps(value)
    position = data.draw(st.integers(0, len(text)))
    insert = data.draw(st.sampled_from(['"', "\\", ",", ":", "[", "]", "{", "}", "0", "-", ".", "e", "\x01", "u", ""]))
    cut = data.draw(st.integers(0, 2))
    mutated = text[:position] + insert + text[position + cut :]
    try:
        expected = json.loads(mutated)
    except ValueError:
        expected = ValueError
    for chunk, run_chunk in WINDOWS:
        with windows(chunk, run_chunk):
            if expected is ValueError:
                with pytest.raises(ValueError):
                    loads_stepwise(mutated)
            else:
                try:
                    assert loads_stepwise(mutated) == expected
                except BodyError as refused:  # only for what the server refuses beyond JSON
                    assert "surrogate" in str(refused) or "digits" in str(refused)


REFUSED = [
    ("[NaN]", "NaN is not a JSON value"),
    ('{"t": -Infinity}', "-Infinity is not a JSON value"),
    ('"\\ud800"', "lone UTF-16 surrogate"),
    ('["\\udc00x"]', "lone UTF-16 surrogate"),
    ("1" * 4301, "4300 digits"),
    ("[" * 129 + "]" * 129, "nested more than 128 deep"),
    ("[" + "[]," * 100_001 + "[]]", "more than 100000 arrays and objects"),
    ('{"a": 1} x', "Extra data"),
    ('"abc', "Unterminated string"),
]


@pytest.mark.parametrize(
    ("body", "message"),
    # each document as it is (decoded inline where it fits) and padded past the inline size (stepwise)
    [(document.encode(), message) for document, message in REFUSED if fits_inline(document.encode())]
    + [(b" " * json_body.INLINE_MAX_BYTES + document.encode(), message) for document, message in REFUSED],
)
def test_both_paths_refuse_the_same(body: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        decode(body)


def test_a_valid_surrogate_pair_and_other_encodings_pass() -> None:
    assert decode(b'"\\ud83d\\ude00"') == "\U0001f600"
    assert decode(json.dumps({"a": "\U0001f600" * 3}).encode("utf-16")) == {"a": "\U0001f600" * 3}
    long = "é\U0001f600" * json_body.INLINE_MAX_BYTES
    assert decode(json.dumps(long).encode()) == long


def test_an_oversized_array_is_refused_before_the_rest_is_read() -> None:
    messages = [{"role": "user", "content": ""}] * 11
    for body in (json.dumps({"messages": messages}), json.dumps({"messages": messages, "pad": " " * 70_000})):
        with pytest.raises(TooManyItems) as error:
            decode(body.encode(), limits={"messages": 10})
        assert (error.value.key, error.value.limit) == ("messages", 10)
    # The stepwise decoder stops at the item past the limit: what follows it is never read.
    broken = '{"messages": [' + '{"role": "user"},' * 11 + "garbage"
    with pytest.raises(TooManyItems):
        loads_stepwise(broken, limits={"messages": 10})
    assert decode(json.dumps({"messages": messages[:10]}).encode(), limits={"messages": 10})["messages"] == messages[:10]


def test_small_bodies_stay_inline() -> None:
    assert fits_inline(json.dumps({"messages": [{"role": "user", "content": "x" * 1000}] * 20}).encode())
    assert not fits_inline(b"[" * 200)
    assert not fits_inline(json.dumps([1.5] * 3000).encode())  # floats are slow to parse: 2,000 take 0.5 ms
    assert not fits_inline(b" " * (json_body.INLINE_MAX_BYTES + 1))
    assert not fits_inline("{}".encode("utf-16"))
