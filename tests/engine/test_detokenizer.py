"""The incremental detokenizer on the default model's real tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.engine.detokenizer import Detokenizer
from atom_trio.sampling_params import SamplingParams

MULTIBYTE = "Hello 😀 world 你好吗 ok 🦀🦀 日本語のテキスト"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def stream(tokenizer, token_ids, params=None, *, chunk=1, stop_token=False):
    """Feed ``token_ids`` ``chunk`` at a time; return the deltas and the stop string."""
    detok = Detokenizer(tokenizer, params or SamplingParams())
    deltas, used = [], 0
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start : start + chunk]
        last = start + chunk >= len(token_ids)
        delta = detok.update(piece, finished=last, stop_token=stop_token and last)
        deltas.append(delta.text)
        used += delta.num_tokens
        if delta.stop_string is not None:
            return deltas, used, delta.stop_string
    return deltas, used, None


def test_characters_split_across_tokens_stream_intact(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    # The test means something only if some character really is split: a
    # lone token of the emoji decodes to the replacement character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas, used, stop = stream(tokenizer, ids)
    assert "".join(deltas) == MULTIBYTE
    assert used == len(ids) and stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token that ended mid-character produced no text yet


def test_feeding_several_tokens_at_once_gives_the_same_text(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    for chunk in (2, 3, 5, len(ids)):
        assert "".join(stream(tokenizer, ids, chunk=chunk)[0]) == MULTIBYTE


def test_completion_ending_inside_a_character_shows_what_decode_shows(tokenizer):
    ids = tokenizer.encode("ok 😀")
    cut = ids[:-1]  # drop the emoji's last byte token
    assert "".join(stream(tokenizer, cut)[0]) == tokenizer.decode(cut)
    assert tokenizer.decode(cut).endswith("\ufffd")


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("The answer is forty-two. Done")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[3:6] == [" forty", "-", "two"]  # "ty-tw" starts mid-token and spans three tokens
    deltas, used, stop = stream(tokenizer, ids, SamplingParams(stop=["ty-tw"]))
    assert "".join(deltas) == "The answer is for"
    assert stop == "ty-tw"
    assert used == 6  # the token that completed the match is the last one kept
    # "ty" was held back as soon as it appeared, so no delta ever showed it
    assert all("ty" not in d for d in deltas)

    deltas, used, stop = stream(tokenizer, ids, SamplingParams(stop=["ty-tw"], include_stop_str_in_output=True))
    assert "".join(deltas) == "The answer is forty-tw"
    assert (used, stop) == (6, "ty-tw")


def test_partial_match_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("The answer is forty-two. Done")
    detok = Detokenizer(tokenizer, SamplingParams(stop=["forty-three"]))
    texts = [detok.update([i]).text for i in ids[:5]]
    assert "".join(texts) == "The answer is "  # "forty-" could still become the stop string
    assert detok.update([ids[5]]).text == "forty-two"  # "forty-tw" cannot: released
    assert detok.update(ids[6:], finished=True).text == ". Done"


def test_earliest_ending_stop_string_wins(tokenizer):
    ids = tokenizer.encode("The answer is forty-two. Done")
    deltas, used, stop = stream(tokenizer, ids, SamplingParams(stop=["two. Done", "forty-two", "is"]), chunk=len(ids))
    assert ("".join(deltas), stop, used) == ("The answer ", "is", 3)


def test_stop_strings_count_only_after_min_tokens(tokenizer):
    ids = tokenizer.encode("one, two, three, two, one")
    params = SamplingParams(stop=["two"], min_tokens=5, max_tokens=20)
    deltas, used, stop = stream(tokenizer, ids, params)
    assert "".join(deltas) == "one, two, three, "
    assert stop == "two"


def test_stop_token_text_left_out_unless_asked(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hi there") + [eos]
    assert "".join(stream(tokenizer, ids, stop_token=True)[0]) == "Hi there"
    shown = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    assert "".join(stream(tokenizer, ids, shown, stop_token=True)[0]) == "Hi there" + tokenizer.eos_token
    # A stop token that is plain text is left out as well.
    ids = tokenizer.encode("Hi there.")
    assert "".join(stream(tokenizer, ids, stop_token=True)[0]) == "Hi there"


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert "".join(stream(tokenizer, ids)[0]) == "user\nhi"
    kept = "".join(stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))[0])
    assert kept == "<|im_start|>user\nhi<|im_end|>"


def test_prompt_context_does_not_leak_into_the_output(tokenizer):
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(" hello 😀")
    detok = Detokenizer(tokenizer, SamplingParams(), prompt)
    assert "".join(detok.update([i]).text for i in ids) + detok.update([], finished=True).text == " hello 😀"


def test_feeding_a_finished_completion_is_an_error(tokenizer):
    detok = Detokenizer(tokenizer, SamplingParams())
    detok.update(tokenizer.encode("x"), finished=True)
    with pytest.raises(RuntimeError):
        detok.update(tokenizer.encode("y"))


PIECES = ["a", "b", " ", "ab", "-", "😀", "你好", "é", "\n", "🦀", "stop", "."]


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(st.sampled_from(PIECES), min_size=1, max_size=25).map("".join),
    stops=st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join), max_size=3),
    chunk=st.integers(1, 4),
    include=st.booleans(),
)
def test_streamed_text_matches_a_whole_text_reference(tokenizer, text, stops, chunk, include):
    """Whatever the chunking, the streamed result is the full decode cut at the earliest-ending stop string."""
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    deltas, used, stop = stream(tokenizer, ids, params, chunk=chunk)
    matches = [(full.find(s) + len(s), -len(s), s) for s in stops if s in full]
    if not matches:
        assert ("".join(deltas), used, stop) == (full, len(ids), None)
        return
    end, _, expected_stop = min(matches)
    assert stop == expected_stop
    assert "".join(deltas) == (full[:end] if include else full[: end - len(expected_stop)])
    # the kept tokens reach the stop string (a token may end mid-character, so
    # the stop can complete a token or two after its bytes first appear)
    assert tokenizer.decode(ids[:used]).startswith(full[:end])
