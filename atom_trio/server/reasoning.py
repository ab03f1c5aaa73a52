"""Reasoning parsers: a model's ``<think>…</think>`` block to ``reasoning_content``, the rest to ``content``.

Chosen by name with ``--reasoning-parser`` (vLLM's names). Whether the output begins inside a reasoning
block depends on the prompt: Qwen3's hybrid template leaves the model to write ``<think>`` itself, its
``enable_thinking=False`` form closes an empty block in the prompt, and the thinking-only templates (Qwen3
2507 Thinking, DeepSeek-R1's current one) open ``<think>`` in the prompt so that only ``</think>``
appears in the output. The caller says which with ``open_at_start`` (`ReasoningParser.open_after` reads it
off the rendered prompt); left ``None``, each parser assumes what its model family does.

The split trims what the templates add around the markers, as Qwen3's template does when it renders a
reply back into history: newlines at both ends of the reasoning and at the start of the content after
``</think>``. An output without a reasoning block is content, verbatim.

`ReasoningParser.extract` is one stream fed the whole text, so streaming and batch split alike.
"""

from __future__ import annotations

from ._registry import instantiate
from .harmony import HarmonyStream

START = "<think>"
END = "</think>"


def _split(reasoning: str, content: str) -> tuple[str | None, str | None]:
    return reasoning or None, content or None


class ReasoningParser:
    """``<think>…</think>`` splitting; subclasses set ``assume_open``, what an unknown prompt did.

    ``assume_open`` is ``True`` (the output starts inside reasoning), or ``None``: undecided until the
    output shows it, by a leading ``<think>`` or a ``</think>``; an output with neither is content.
    """

    assume_open: bool | None = True
    keeps_special_tokens = False
    """Whether the model's markers are special tokens, which the output's text must keep for this parser."""

    def extract(self, text: str, *, open_at_start: bool | None = None) -> tuple[str | None, str | None]:
        """``(reasoning, content)`` of a whole output, each ``None`` when empty."""
        stream = self.stream(open_at_start=open_at_start)
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        return _split((reasoning or "") + (more_reasoning or ""), (content or "") + (more_content or ""))

    def stream(self, *, open_at_start: bool | None = None) -> ReasoningStream:
        """A splitter for one output arriving in pieces."""
        return ReasoningStream(self.assume_open if open_at_start is None else open_at_start)

    @staticmethod
    def open_after(prompt: str) -> bool | None:
        """Whether a rendered prompt leaves a reasoning block open (``None``: it has no think markers)."""
        opened, closed = prompt.rfind(START), prompt.rfind(END)
        if opened < 0 and closed < 0:
            return None
        return opened > closed


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 and its hybrid template: reasoning only where the output shows it.

    A leading ``<think>`` opens reasoning; without one, a ``</think>`` means the prompt opened it (the
    thinking-only templates) and everything before it is reasoning; an output with neither marker is all
    content (thinking was off). With ``open_at_start`` unknown a streamed output without ``<think>`` is
    held back until ``</think>`` or the end shows which it is, so pass it when the prompt is at hand.
    """

    assume_open = None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the template opens ``<think>`` in the prompt, so the output starts in reasoning.

    As in vLLM, text before ``</think>`` is reasoning, and an output with no ``</think>`` at all (cut
    off while thinking) is all reasoning, batch and streamed alike. A leading ``<think>`` the model
    writes itself is dropped.
    """


class GptOssReasoningParser(ReasoningParser):
    """GPT-OSS's harmony channels (`harmony`): ``analysis`` is reasoning, ``final`` content, calls go to the
    ``openai`` tool parser. vLLM's name, ``openai_gptoss``."""

    keeps_special_tokens = True

    def stream(self, *, open_at_start: bool | None = None) -> HarmonyStream:
        return HarmonyStream()


class ReasoningStream:
    """One output fed in pieces: `feed` and `finish` return ``(reasoning_delta, content_delta)``, ``None`` when empty."""

    def __init__(self, open_at_start: bool | None) -> None:
        self._open_at_start = open_at_start
        self._pending = ""
        self._state = "start"  # start -> reasoning | undecided | content (verbatim) | after_end (trimmed)
        self._reasoning_started = False
        self._content_started = False

    def feed(self, delta_text: str) -> tuple[str | None, str | None]:
        return self._scan(delta_text, final=False)

    def finish(self) -> tuple[str | None, str | None]:
        return self._scan("", final=True)

    def _scan(self, delta_text: str, *, final: bool) -> tuple[str | None, str | None]:
        text = self._pending + delta_text
        self._pending = ""
        if self._state == "start":
            lead = text.lstrip()
            if not final and START.startswith(lead):  # may still become a leading <think>
                self._pending = text
                return None, None
            if lead.startswith(START):
                text = lead[len(START) :]
                self._state = "reasoning"
            else:
                self._state = {True: "reasoning", False: "content", None: "undecided"}[self._open_at_start]
        if self._state == "undecided":
            if END not in text:
                if final:
                    return None, text or None
                self._pending = text
                return None, None
            self._state = "reasoning"
        reasoning = ""
        if self._state == "reasoning":
            end = text.find(END)
            if end < 0:
                if final:
                    return _split(self._reasoning(text, last=True), "")
                # Hold back what may begin </think>, and the newlines that would then end the reasoning.
                keep = text[: len(text) - _partial_end(text)].rstrip("\n")
                self._pending = text[len(keep) :]
                return _split(self._reasoning(keep, last=False), "")
            reasoning = self._reasoning(text[:end], last=True)
            text = text[end + len(END) :]
            self._state = "after_end"
        if self._state == "after_end" and not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return _split(reasoning, text)

    def _reasoning(self, text: str, *, last: bool) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            self._reasoning_started = bool(text)
        return text.rstrip("\n") if last else text


def _partial_end(text: str) -> int:
    """How many characters at the end of ``text`` begin ``</think>``."""
    for length in range(min(len(END) - 1, len(text)), 0, -1):
        if text.endswith(END[:length]):
            return length
    return 0


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "openai_gptoss": GptOssReasoningParser,
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser registered as ``name``; an unknown name is an `InvalidConfig` listing the choices."""
    return instantiate(REASONING_PARSERS, name, what="reasoning parser", option="reasoning_parser")
