"""GPT-OSS's harmony format: an output's messages by channel, as reasoning, content and tool-call blocks.

After the prompt's ``<|start|>assistant`` a GPT-OSS model writes messages, each a header, ``<|message|>``
and a body ended by ``<|end|>`` (``<|call|>`` and ``<|return|>`` end the turn, and are its stop tokens):

    <|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

- ``analysis`` bodies are the reasoning (``reasoning_content``);
- a message with a recipient (``to=functions.NAME``, in its channel part or its role part) is a tool
  call, passed on to the content as one canonical block,
  ``<|channel|>commentary to=NAME<|message|>ARGUMENTS<|call|>``, which the ``openai`` tool parser reads;
- ``final`` bodies, and ``commentary`` without a recipient (a preamble the user may see), are content.

The markers are special tokens: the server keeps them in the text for this format
(``keeps_special_tokens`` of `reasoning.GptOssReasoningParser`, the parser this stream serves). An
output that does not begin with a harmony header is content, verbatim. The split holds back only what
may still become a marker, so a stream split anywhere gives what the whole text gives.
"""

from __future__ import annotations

import re

MESSAGE = "<|message|>"
STARTS = ("<|channel|>", "<|start|>", " to=")
ENDS = ("<|end|>", "<|call|>", "<|return|>")
NEXT = "<|start|>"  # a new message begins: the one before it is over even if its <|end|> is missing
_CHANNEL = re.compile(r"<\|channel\|>(\w+)")
_RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")


class HarmonyStream:
    """One output fed in pieces, as `reasoning.ReasoningStream`: `feed` and `finish` return
    ``(reasoning_delta, content_delta)``, ``None`` when empty."""

    def __init__(self) -> None:
        self._pending = ""
        self._mode = "start"  # start -> plain (not harmony) | header <-> body
        self._kind = ""  # of the message in the body: "reasoning", "content" or "call"

    def feed(self, delta_text: str) -> tuple[str | None, str | None]:
        return self._scan(delta_text, final=False)

    def finish(self) -> tuple[str | None, str | None]:
        return self._scan("", final=True)

    def _scan(self, delta_text: str, *, final: bool) -> tuple[str | None, str | None]:
        text = self._pending + delta_text
        self._pending = ""
        out = {"reasoning": "", "content": ""}
        pos = 0
        if self._mode == "start":
            if not final and any(start.startswith(text) for start in STARTS):
                self._pending = text
                return None, None
            self._mode = "header" if text.startswith(STARTS) else "plain"
        if self._mode == "plain":
            return None, text or None
        while pos < len(text):
            if self._mode == "header":
                body = text.find(MESSAGE, pos)
                if body < 0:
                    break  # a header without its body yet (or ever, at the end: nothing to show)
                self._open(text[pos:body], out)
                pos = body + len(MESSAGE)
            end, marker = _first_end(text, pos)
            if end < 0:
                keep = len(text) if final else len(text) - _partial_end(text, pos)
                self._add(out, text[pos:keep])
                pos = keep
                break
            self._add(out, text[pos:end])
            if self._kind == "call":
                out["content"] += "<|call|>"
            pos = end if marker == NEXT else end + len(marker)
            self._mode = "header"
        self._pending = "" if final else text[pos:]
        return out["reasoning"] or None, out["content"] or None

    def _open(self, header: str, out: dict[str, str]) -> None:
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        if recipient is not None:
            self._kind = "call"
            out["content"] += f"<|channel|>commentary to={recipient[1]}{MESSAGE}"
        else:
            self._kind = "reasoning" if channel is not None and channel[1] == "analysis" else "content"
        self._mode = "body"

    def _add(self, out: dict[str, str], text: str) -> None:
        out["reasoning" if self._kind == "reasoning" else "content"] += text


def _first_end(text: str, pos: int) -> tuple[int, str]:
    """The first marker at or after ``pos`` that ends a message body, ``(-1, "")`` if none."""
    found = [(index, marker) for marker in (*ENDS, NEXT) if (index := text.find(marker, pos)) >= 0]
    return min(found) if found else (-1, "")


def _partial_end(text: str, pos: int) -> int:
    """How many characters at the end of ``text`` (after ``pos``) may begin a marker that ends a body."""
    for length in range(min(max(map(len, (*ENDS, NEXT))) - 1, len(text) - pos), 0, -1):
        if any(marker.startswith(text[-length:]) for marker in (*ENDS, NEXT)):
            return length
    return 0
