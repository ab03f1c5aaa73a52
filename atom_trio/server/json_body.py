"""Decode a JSON request body (and encode a large response) without holding the GIL for more than a few ms.

The stdlib's C decoder is fast but holds the GIL for a whole document, and a
worker thread does not help: the event loop waits for the GIL as long as it
would have waited for the call. Measured here, `json.loads` held it for 190 ms
on 200,000 empty chat messages (6.6 MB) and for 210 ms on 4 million integers.
So a body is decoded one of two ways:

- a small one (at most `INLINE_MAX_BYTES`, `MAX_DEPTH` brackets and
  `INLINE_MAX_COMMAS` commas, UTF-8) by `json.loads` on the event loop:
  under a millisecond here whatever it holds (2,000 floats take 0.5 ms);
- any other by `loads_stepwise`, in a worker thread: Python walks the
  containers and each C call decodes one bounded piece (a string of at most
  `CHUNK` characters, a piece of a longer one, a run of small flat array
  items such as token ids or ``{"role": "user", "content": "hi"}`` within
  `RUN_CHUNK` characters), so the thread gives the GIL up between pieces and
  the event loop waits at most about a switch interval (5 ms) for it. It is
  slower than `json.loads` (0.1-2 s for 16 MB here, by shape), and large
  bodies take turns in their one thread, but it never holds the event loop.

A large response (``/tokenize``'s token ids, ``/detokenize``'s text, many
logprobs) is encoded the same way by `dumps_stepwise`.

Both decoders accept the same documents and refuse, with `BodyError`, what
the stdlib would refuse and also what no request can use: nesting deeper than
`MAX_DEPTH`, more than `MAX_CONTAINERS` arrays and objects (each one more for
the cyclic garbage collector to walk), lone UTF-16 surrogates (``"\\ud800"``:
no tokenizer takes them and no response can carry them), ``NaN`` and
``Infinity`` (not JSON), and numbers longer than 4300 digits (Python's limit
for integers).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from json.decoder import scanstring
from typing import Any

import attrs

#: A body of at most this many bytes and commas may be decoded by `json.loads` on the event loop.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_COMMAS = 2048
#: The deepest nesting of arrays and objects a body may have.
MAX_DEPTH = 128
#: The most arrays and objects a body may hold (each is an object the garbage collector then walks).
MAX_CONTAINERS = 100_000
#: The longest piece of a string that `loads_stepwise` decodes in one C call (about 0.1 ms here).
CHUNK = 64 * 1024
#: The most characters of small array items `loads_stepwise` matches and decodes at once (about 1 ms here).
RUN_CHUNK = 16 * 1024
#: The most array items `dumps_stepwise` encodes in one C call.
RUN_ITEMS = 4096

_MAX_DIGITS = 4300
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]{0,%d}))(\.[0-9]{1,%d})?([eE][-+]?[0-9]{1,%d})?" % ((_MAX_DIGITS,) * 3))
# A string's content: characters and escapes, up to its closing quote or the first character that is neither.
_STRING_PIECE = re.compile(r'(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def _run_pattern(item: str) -> re.Pattern[str]:
    """Items, each followed by a comma: what `_Walk.run_of_items` hands to `json.loads` at once."""
    return re.compile(r"(?:(?:%s)[ \t\n\r]*,[ \t\n\r]*)+" % item)


# Small flat array items: strings, numbers, literals, and objects or arrays of those. (The string is
# written as an unrolled loop: a repeated alternation would cost the regex engine ten times as much.)
_WSP = r"[ \t\n\r]*"
_FLAT_STRING = r'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_SCALAR = r"(?:%s|-?(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,30})?(?:[eE][-+]?[0-9]{1,5})?|true|false|null)" % _FLAT_STRING
_ENTRY = "%s%s:%s%s%s" % (_FLAT_STRING, _WSP, _WSP, _SCALAR, _WSP)
_FLAT = r"(?:%s|\{%s(?:%s(?:,%s%s)*)?\}|\[%s(?:%s%s(?:,%s%s%s)*)?\])" % (
    _SCALAR, _WSP, _ENTRY, _WSP, _ENTRY, _WSP, _SCALAR, _WSP, _WSP, _SCALAR, _WSP
)
_RUN = _run_pattern(_FLAT)
_SCALAR_RUN = _run_pattern(_SCALAR)
_CONSTANTS = {"true": True, "false": False, "null": None}


class BodyError(ValueError):
    """The body is not a JSON document this server takes; the message says where and why."""


class TooManyItems(BodyError):
    """An array under the top-level object is longer than its limit (``key`` and ``limit`` say which)."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"{key} may have at most {limit} items")
        self.key = key
        self.limit = limit


def fits_inline(body: bytes) -> bool:
    """Whether `decode` takes ``body`` in one `json.loads` call, short enough for the event loop."""
    return (
        len(body) <= INLINE_MAX_BYTES
        and body.count(b"[") + body.count(b"{") <= MAX_DEPTH
        and body.count(b",") <= INLINE_MAX_COMMAS
        and json.detect_encoding(body) == "utf-8"
    )


def decode(body: bytes, *, limits: Mapping[str, int] | None = None) -> Any:
    """The JSON document in ``body`` (UTF-8, or UTF-16/32 as `json.loads` detects them).

    ``limits`` caps, by key, the length of arrays under the top-level object
    (`TooManyItems`); a large body stops being decoded at the first item past one.

    Raises:
        BodyError: the body is not valid JSON, or holds what the module's docstring lists.
    """
    try:
        if fits_inline(body):
            value = json.loads(body, parse_constant=_refuse_constant)
            if _SURROGATE_ESCAPE.search(body):
                _check_surrogates(value)
            if isinstance(value, dict):
                for key, limit in (limits or {}).items():
                    if isinstance(value.get(key), list) and len(value[key]) > limit:
                        raise TooManyItems(key, limit)
            return value
        return loads_stepwise(_text(body), limits=limits)
    except BodyError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, Python's digit limit
        raise BodyError(str(exc)) from None


def _text(body: bytes) -> str:
    """The body as text, decoded a chunk at a time."""
    decoder = codecs.getincrementaldecoder(json.detect_encoding(body))()
    parts = [decoder.decode(body[i : i + CHUNK]) for i in range(0, len(body), CHUNK)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"{name} is not a JSON value")


def _check_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(f"a string holds a lone UTF-16 surrogate ({text[exc.start]!r})") from None


def loads_stepwise(s: str, *, limits: Mapping[str, int] | None = None) -> Any:
    """`json.loads` for a document of any size, decoding it a bounded piece at a time.

    The same result as `json.loads` where both accept a document (the last of
    repeated keys wins); it also refuses what `BodyError` lists. ``limits``
    caps the length of arrays under the top-level object, by key, so that an
    oversized array is refused before the rest of it is decoded.
    """
    return _Walk(s, limits or {}).run()


class _Walk:
    """One document's walk: the text, where it is, and the containers open around it."""

    def __init__(self, s: str, limits: Mapping[str, int]) -> None:
        self.s = s
        self.limits = limits
        # Open containers, innermost last: [container, the key its next value fills (None in an array), limit].
        self.stack: list[list[Any]] = []
        self.containers = 0

    def run(self) -> Any:
        s, n, stack = self.s, len(self.s), self.stack
        i = _WS.match(s, 0).end()
        while True:
            # A value starts at i.
            c = s[i : i + 1]
            if c == "{" or c == "[":
                i = self.open(c, _WS.match(s, i + 1).end())
                if i >= 0:
                    continue  # at the first value of a container
                value, i = self.stack.pop()[0], -i
            elif c == '"':
                value, i = _string(s, i + 1)
            else:
                value, i = _scalar(s, i)
            # A value ended at i: it fills its container, and each container it closes fills the one around it.
            while True:
                if not stack:
                    i = _WS.match(s, i).end()
                    if i != n:
                        raise json.JSONDecodeError("Extra data", s, i)
                    return value
                top = stack[-1]
                if top[1] is None:
                    top[0].append(value)
                    self.check_length(top)
                else:
                    top[0][top[1]] = value
                i = self.after_item(i)
                if i >= 0:
                    break
                value, i = stack.pop()[0], -i

    def open(self, c: str, i: int) -> int:
        """Open a container whose content starts at i: where its first value starts, or minus where it closed."""
        if len(self.stack) >= MAX_DEPTH:
            raise BodyError(f"the document is nested more than {MAX_DEPTH} deep (char {i})")
        self.containers += 1
        if self.containers > MAX_CONTAINERS:
            raise BodyError(f"the document holds more than {MAX_CONTAINERS} arrays and objects (char {i})")
        if c == "{":
            self.stack.append([{}, None, None])
            if self.s[i : i + 1] == "}":
                return -(i + 1)
            self.stack[-1][1], i = _key(self.s, i)
            return i
        parent = self.stack[-1] if len(self.stack) == 1 else None
        limit = self.limits.get(parent[1]) if parent is not None and parent[1] is not None else None
        self.stack.append([[], None, limit])
        if self.s[i : i + 1] == "]":
            return -(i + 1)
        return self.run_of_items(i)

    def after_item(self, i: int) -> int:
        """After an item of the innermost container: where the next value starts, or minus where it closed."""
        s, top = self.s, self.stack[-1]
        i = _WS.match(s, i).end()
        c = s[i : i + 1]
        if c == ",":
            i = _WS.match(s, i + 1).end()
            if isinstance(top[0], dict):
                top[1], i = _key(s, i)
                return i
            return self.run_of_items(i)
        if c == ("}" if isinstance(top[0], dict) else "]"):
            return -(i + 1)
        raise json.JSONDecodeError("Expecting ',' delimiter", s, i)

    def run_of_items(self, i: int) -> int:
        """Decode the array items from i on that are small and flat (``1``, ``"hi"``, ``{"role": "user"}``), a
        `RUN_CHUNK` at a time in one C call each; where the item after them starts."""
        s, top = self.s, self.stack[-1]
        pattern = _RUN if len(self.stack) < MAX_DEPTH else _SCALAR_RUN
        while True:
            run = pattern.match(s, i, i + RUN_CHUNK)
            if run is None:
                return i
            end = run.end()
            try:
                items = json.loads("[" + s[i : s.rindex(",", i, end)] + "]")
            except ValueError:
                return i  # a number over Python's digit limit: item by item says where
            if _SURROGATE_ESCAPE_TEXT.search(s, i, end):
                _check_surrogates(items)
            if s.find("{", i, end) >= 0 or s.find("[", i, end) >= 0:
                self.containers += sum(isinstance(item, (dict, list)) for item in items)
            if self.containers > MAX_CONTAINERS:
                raise BodyError(f"the document holds more than {MAX_CONTAINERS} arrays and objects (char {i})")
            top[0].extend(items)
            self.check_length(top)
            i = _WS.match(s, end).end()  # the window may have cut the blanks after the last comma

    def check_length(self, top: list[Any]) -> None:
        if top[2] is not None and len(top[0]) > top[2]:
            raise TooManyItems(self.stack[0][1], top[2])


def _key(s: str, i: int) -> tuple[str, int]:
    if s[i : i + 1] != '"':
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
    key, i = _string(s, i + 1)
    i = _WS.match(s, i).end()
    if s[i : i + 1] != ":":
        raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
    return key, _WS.match(s, i + 1).end()


def _string(s: str, i: int) -> tuple[str, int]:
    """The string whose content starts at i (after its opening quote), and the index after its closing quote."""
    end = s.find('"', i, i + CHUNK)
    if end >= 0 and s[end - 1] != "\\":  # it ends within CHUNK: one C call
        text, after = scanstring(s, i, True)
        if _SURROGATE_ESCAPE_TEXT.search(s, i, end):
            _check_string(text)
        return text, after
    # A long string: one C call per piece of at most CHUNK characters, cut where no escape straddles the cut.
    start, n = i - 1, len(s)
    parts: list[str] = []
    surrogates = False
    while True:
        stop = min(i + CHUNK, n)
        backslash = s.rfind("\\", stop - 6, stop) if stop < n else -1
        if backslash < 0:  # no escape can straddle the window's end
            cut = stop
        elif backslash > i and s[backslash - 1] != "\\":  # a backslash after any other character starts an escape
            cut = backslash
        else:  # inside a run of backslashes: cut after the last whole escape (a slower, regex pass)
            cut = _STRING_PIECE.match(s, i, stop).end()
            if cut == i:
                cut = min(i + 8, n)  # the error is at i: the C call below reports it
        piece = s[i:cut] + '"'
        try:
            text, after = scanstring(piece, 0, True)
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(exc.msg, s, i + exc.pos) from None
        parts.append(text)
        surrogates = surrogates or _SURROGATE_ESCAPE_TEXT.search(s, i, i + after) is not None
        if after < len(piece):  # the string closed inside the piece
            return _join(parts, surrogates), i + after
        i = cut
        if s[i : i + 1] == '"':
            return _join(parts, surrogates), i + 1
        if i >= n:
            raise json.JSONDecodeError("Unterminated string starting at", s, start)


def _join(parts: list[str], surrogates: bool) -> str:
    """A long string's decoded pieces as one; with ``surrogates``, a high one ending a piece pairs with a low one
    starting the next, and a lone one is refused."""
    if surrogates:
        for k in range(len(parts) - 1):
            a, b = parts[k], parts[k + 1]
            if a and b and "\ud800" <= a[-1] <= "\udbff" and "\udc00" <= b[0] <= "\udfff":
                pair = chr(0x10000 + ((ord(a[-1]) - 0xD800) << 10) + (ord(b[0]) - 0xDC00))
                parts[k], parts[k + 1] = a[:-1], pair + b[1:]
        for part in parts:
            _check_string(part)
    return "".join(parts)


def _scalar(s: str, i: int) -> tuple[Any, int]:
    number = _NUMBER.match(s, i)
    if number is not None:
        end = number.end()
        if s[end : end + 1].isdigit() and max(len(g or "") for g in number.groups()) > _MAX_DIGITS:
            raise BodyError(f"a number is longer than {_MAX_DIGITS} digits (char {i})")
        integer, frac, exp = number.groups()
        if frac or exp:
            return float(integer + (frac or "") + (exp or "")), end
        return int(integer), end
    for word, value in _CONSTANTS.items():
        if s.startswith(word, i):
            return value, i + len(word)
    for word in ("NaN", "Infinity", "-Infinity"):
        if s.startswith(word, i):
            _refuse_constant(word)
    raise json.JSONDecodeError("Expecting value", s, i)


def dumps_stepwise(value: Any) -> bytes:
    """``json.dumps(value, ensure_ascii=False).encode()``, a bounded piece per C call.

    Arrays and objects that hold arrays or objects are walked in Python; a run
    of scalars goes to `json.dumps` `RUN_ITEMS` at a time, and a long string a
    `CHUNK` of characters at a time.
    """
    out: list[bytes] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item.text)
        elif isinstance(item, str) and len(item) > CHUNK:
            pieces = (json.dumps(item[k : k + CHUNK], ensure_ascii=False)[1:-1] for k in range(0, len(item), CHUNK))
            out.append(b'"' + b"".join(piece.encode() for piece in pieces) + b'"')
        elif isinstance(item, dict) and not _flat(item.values()):
            stack.append(_Raw(b"}"))
            for k, (key, entry) in reversed(list(enumerate(item.items()))):
                stack.append(entry)
                stack.append(_Raw((", " if k else "{").encode() + json.dumps(str(key), ensure_ascii=False).encode()
                                  + b": "))
        elif isinstance(item, list) and not (len(item) <= RUN_ITEMS and _flat(item)):
            stack.append(_Raw(b"]"))
            if _flat(item):
                for k in reversed(range(0, len(item), RUN_ITEMS)):
                    run = json.dumps(item[k : k + RUN_ITEMS], ensure_ascii=False)[1:-1]
                    stack.append(_Raw((", " if k else "[").encode() + run.encode()))
            else:
                for k in reversed(range(len(item))):
                    stack.append(item[k])
                    stack.append(_Raw(b", " if k else b"["))
        else:
            out.append(json.dumps(item, ensure_ascii=False).encode())
    return b"".join(out)


def _flat(items: Any) -> bool:
    """Whether every item is a scalar: short strings, numbers, booleans, None."""
    return all(not isinstance(x, (list, dict)) and not (isinstance(x, str) and len(x) > CHUNK) for x in items)


@attrs.frozen
class _Raw:
    """Encoded JSON text that `dumps_stepwise` puts out as it is."""

    text: bytes
