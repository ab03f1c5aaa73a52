"""Incremental detokenization of one completion, with stop strings.

Token ids arrive a step at a time; text must stream as it is produced, yet
never show half a character (an emoji is often three or four byte-level
tokens) and never show the beginning of a stop string that may still
complete. The tokenizers library's `DecodeStream` does the first part: it
returns ``None`` until the tokens fed so far decode to whole characters.
This module does the second: it searches the not-yet-sent text for stop
strings and holds back any tail that could be the start of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from tokenizers.decoders import DecodeStream

from atom_trio.sampling_params import SamplingParams

# How many prompt tokens prime the decoder, so that the first generated
# token decodes as it would continue the prompt (a sentencepiece "▁word"
# becomes " word", not "word").
_PROMPT_CONTEXT_TOKENS = 4


@attrs.frozen
class TextDelta:
    """The outcome of feeding tokens to a `Detokenizer`.

    Attributes:
        text: text that is now safe to send.
        num_tokens: how many of the fed tokens belong to the output: all of
            them, unless a stop string was completed by an earlier one.
        stop_string: the stop string that ended the completion, if one did.
    """

    text: str
    num_tokens: int
    stop_string: str | None = None


_NO_TEXT = TextDelta("", 1)


class Detokenizer:
    """Turns one completion's token ids into text deltas and finds its stop strings.

    Stop strings count only once the completion has at least
    ``params.min_tokens`` tokens, and only where they end in newly decoded
    text. The earliest-ending match wins; with ``include_stop_str_in_output``
    the text ends after the stop string, otherwise before it.

    Args:
        tokenizer: a transformers fast tokenizer (its ``backend_tokenizer``
            does the decoding) or a ``tokenizers.Tokenizer``.
        params: the request's sampling parameters.
        prompt_token_ids: the prompt, whose last few tokens give the decoder context.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._stream = DecodeStream(context or None, skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._unsent = ""
        self._undecoded: list[int] = []  # tokens fed since the decoder last produced text
        self.finished = False

    def update(self, token_ids: Sequence[int], *, finished: bool = False, stop_token: bool = False) -> TextDelta:
        """Feed the next tokens and return the text that may be sent now.

        Args:
            token_ids: the completion's new tokens, in order.
            finished: the completion ends with these tokens (EOS, a stop token,
                length or abort): everything held back is released.
            stop_token: the last token is the EOS or stop token that ended the
                completion; its text is left out unless ``include_stop_str_in_output``.
        """
        if self.finished:
            raise RuntimeError("this completion has already finished")
        if len(token_ids) == 1 and not (finished or stop_token or self._stops):
            return self._step(token_ids[0])  # the common step: one token, nothing to hold back
        decode_until = len(token_ids) - 1 if stop_token and not self._include_stop else len(token_ids)
        for i, token_id in enumerate(token_ids):
            self._num_tokens += 1
            if i >= decode_until:
                continue
            chunk = self._stream.step(self._tokenizer, token_id)
            if chunk is None:
                self._undecoded.append(token_id)
                continue
            self._undecoded.clear()
            self._unsent += chunk
            if self._stops and self._num_tokens >= self._min_tokens:
                stop = self._find_stop(len(chunk))
                if stop is not None:
                    self.finished = True
                    return TextDelta(self._take(len(self._unsent)), i + 1, stop)
        if finished:
            self.finished = True
            if self._undecoded:  # the completion ends inside a character: show what `decode` would
                self._unsent += self._tokenizer.decode(self._undecoded, skip_special_tokens=self._skip_special_tokens)
            return TextDelta(self._take(len(self._unsent)), len(token_ids))
        return TextDelta(self._take(len(self._unsent) - self._held_back()), len(token_ids))

    def _step(self, token_id: int) -> TextDelta:
        """`update` with one token and no stop strings, so no text is ever held back (nothing stays unsent)."""
        self._num_tokens += 1
        chunk = self._stream.step(self._tokenizer, token_id)
        if chunk is None:
            self._undecoded.append(token_id)
            return _NO_TEXT
        self._undecoded.clear()
        return TextDelta(chunk, 1)

    def _find_stop(self, new_chars: int) -> str | None:
        """Find the stop string that ends first in the last ``new_chars`` characters; truncate the text there."""
        text = self._unsent
        best: tuple[int, int, str] | None = None  # (end, -len, stop): earliest end, then longest
        for stop in self._stops:
            start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, _, stop = best
        self._unsent = text[:end] if self._include_stop else text[: end - len(stop)]
        return stop

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that could begin a stop string."""
        text = self._unsent
        for length in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _take(self, length: int) -> str:
        text, self._unsent = self._unsent[:length], self._unsent[length:]
        return text
