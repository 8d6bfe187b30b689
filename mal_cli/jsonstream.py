"""Read a big JSON document piecewise: the items of chosen top-level arrays in chunks, the rest whole.

`mal label` on LVIS-scale input (1.3 M annotations) must not hold the parsed document: as Python
objects it is ~1.2 KiB per box. `iter_document` walks the file once and hands out the items of the
arrays named in `stream_keys` (or of a top-level array) a few thousand at a time, so a caller keeps
what it needs in compact form and drops the rest.

Speed: a chunk of items is found by cutting the buffer at its last `},` and parsing `[` + chunk + `]`
with orjson in one call. A cut inside a string or a nested object leaves an unbalanced prefix, which
never parses, so a wrong cut is detected and that stretch is read item by item with an exact
tokenizer instead (also used for NaN/Infinity, which only the standard json module reads).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Collection, Iterator, Optional, Union

import numpy as np
import orjson

from mal_cli.errors import InputError

__all__ = ["iter_document", "iter_entries", "loads", "unreadable", "Entry"]

# Items parsed per orjson call: 256 KB of text, ~2k COCO boxes (bigger chunks: more memory, no faster).
CHUNK_BYTES = 1 << 18

_WS = re.compile(rb"[ \t\r\n]*")
_BRACKET_OR_QUOTE = re.compile(rb'[\[\]{}"]')
_SCALAR = re.compile(rb"[^,\]}\s]+")
# Deepest nesting read: orjson writes at most 255 levels, and parsing far deeper overflows its C stack
# (SIGSEGV), so deeper documents are refused up front, with the byte where the limit is passed.
MAX_DEPTH = 255
_DEPTH_LUT = np.zeros(256, np.int8)
_DEPTH_LUT[[ord("["), ord("{")]] = 1
_DEPTH_LUT[[ord("]"), ord("}")]] = -1
_DEPTH_LUT[ord('"')] = 2

# ("value", key, value): a top-level entry read whole (key None: the document is not an object);
# ("start", key, None): a streamed array begins; ("items", key, list): its next items, in order.
Entry = tuple[str, Optional[str], Any]


def iter_document(
    path: Union[str, Path], stream_keys: Collection[str] = (), source: Optional[str] = None
) -> Iterator[Entry]:
    """Walk the JSON file at `path` in document order (see `Entry`). A top-level array is always streamed.

    Raises `InputError` ("truncated/invalid JSON at byte N of SIZE") on bad JSON, naming `source`.
    """
    source = source or str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise unreadable(err, source) from None
    with handle:
        reader = _Reader(handle, source)
        yield from reader.document(set(stream_keys))


def loads(text: bytes) -> Any:
    """orjson.loads, plus the NaN/Infinity that Python's json.dump writes (not JSON, but common; such boxes
    become fallbacks), read with the json module. Raises orjson.JSONDecodeError, also for nesting deeper
    than MAX_DEPTH."""
    if text.count(b"[") + text.count(b"{") > MAX_DEPTH:  # cheap: only then can it be too deep
        too_deep = depth_exceeded(text, MAX_DEPTH)
        if too_deep is not None:
            raise orjson.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", too_deep)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        if b"NaN" in text or b"Infinity" in text:
            try:
                return json.loads(text)
            except ValueError:
                pass
            except RecursionError:
                raise orjson.JSONDecodeError("nested too deep", "", 0) from None
        raise


def depth_exceeded(text: bytes, limit: int, chunk: int = 1 << 24) -> Optional[int]:
    """The offset of the first bracket nested deeper than `limit` (brackets in strings do not count), or None.

    Vectorised over chunks of the text: a byte table marks brackets and quotes, escaped quotes (rare) are
    sorted out one by one, and a bracket counts when an even number of quotes precedes it.
    """
    depth = 0
    in_string = False
    whole = np.frombuffer(text, np.uint8)
    for start in range(0, len(text), chunk):
        kinds = _DEPTH_LUT[whole[start : start + chunk]]
        pos = np.flatnonzero(kinds)
        kind = kinds[pos]
        is_quote = kind == 2
        quotes = pos[is_quote] + start
        after_backslash = quotes[quotes > 0][whole[quotes[quotes > 0] - 1] == 0x5C]
        if after_backslash.size:
            escaped = {int(q) for q in after_backslash if _escaped(text, int(q))}
            quotes = quotes[[int(q) not in escaped for q in quotes]]
        brackets = pos[~is_quote] + start
        outside = (np.searchsorted(quotes, brackets) + int(in_string)) % 2 == 0
        levels = np.cumsum(kind[~is_quote][outside], dtype=np.int64) + depth
        over = np.flatnonzero(levels > limit)
        if over.size:
            return int(brackets[outside][over[0]])
        if levels.size:
            depth = int(levels[-1])
        in_string = (int(in_string) + quotes.size) % 2 == 1
    return None


def _escaped(text: bytes, quote: int) -> bool:
    """Whether the quote at `quote` is escaped: an odd number of backslashes stands before it."""
    backslashes = 0
    while quote - 1 - backslashes >= 0 and text[quote - 1 - backslashes] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 1


def unreadable(err: OSError, source: str) -> InputError:
    """The user-facing error for a JSON file that cannot be opened or read."""
    if isinstance(err, FileNotFoundError):
        return InputError(f"{source}: no such file; check the path")
    if isinstance(err, IsADirectoryError):
        return InputError(f"{source}: is a directory, expected a JSON file")
    return InputError(f"{source}: cannot read: {err.strerror or err}")


def iter_entries(
    path: Union[str, Path], stream_keys: Collection[str] = (), source: Optional[str] = None
) -> Iterator[tuple]:
    """`iter_document` grouped by top-level entry: ("value", key, value), or ("array", key, chunks) for a streamed
    array, where `chunks` iterates its item lists. Read (or leave) `chunks` before asking for the next entry."""
    held: list = []
    events = iter_document(path, stream_keys, source)

    def next_event():
        return held.pop() if held else next(events, None)

    def chunks():
        while (event := next_event()) is not None:
            if event[0] != "items":
                held.append(event)
                return
            yield event[2]

    while (event := next_event()) is not None:
        kind, key, value = event
        if kind == "start":
            array = chunks()
            yield "array", key, array
            for _ in array:  # what the caller left unread
                pass
        else:
            yield kind, key, value


def _string_end(buf: bytes, start: int) -> Optional[int]:
    """The index just past the string whose opening quote is at `start`, or None if `buf` ends inside it."""
    pos = start + 1
    while (quote := buf.find(b'"', pos)) >= 0:
        if not _escaped(buf, quote):
            return quote + 1
        pos = quote + 1
    return None


class _Reader:
    """A sliding window over the file: `buf[pos:]` is unread, `base` is the file offset of `buf[0]`."""

    def __init__(self, handle: BinaryIO, source: str):
        self.handle = handle
        self.source = source
        self.size = os.fstat(handle.fileno()).st_size
        self.buf = b""
        self.pos = 0
        self.base = 0
        self.eof = False

    # --- buffer -------------------------------------------------------------------------------------

    def fill(self, need: int) -> bool:
        """Make at least `need` unread bytes available if the file has them; False at the end of file."""
        while len(self.buf) - self.pos < need and not self.eof:
            data = self.handle.read(max(need, CHUNK_BYTES))
            if not data:
                self.eof = True
                break
            self.buf = self.buf[self.pos :] + data
            self.base += self.pos
            self.pos = 0
        return len(self.buf) - self.pos >= need

    def peek(self) -> Optional[int]:
        """The next non-blank byte (not consumed), or None at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill(1):
                return None

    def expect(self, allowed: bytes) -> int:
        byte = self.peek()
        if byte is None:
            self.fail(None, "unexpected end of data")
        if byte not in allowed:
            self.fail(self.pos, f"expected one of {allowed.decode()!r}, found {chr(byte)!r}")
        self.pos += 1
        return byte

    def fail(self, at: Optional[int], message: str):
        offset = self.size if at is None else self.base + at
        what = "truncated" if at is None or offset >= self._content_end() else "invalid"
        raise InputError(
            f"{self.source}: {what} JSON at byte {offset} of {self.size} ({message}); regenerate or fix the file"
        )

    def _content_end(self) -> int:
        """File offset just past the last non-blank byte (what `len(data.rstrip())` gives for the whole file)."""
        tail = min(self.size, 1 << 16)
        self.handle.seek(self.size - tail)
        return self.size - tail + len(self.handle.read(tail).rstrip())

    # --- values -------------------------------------------------------------------------------------

    def value_end(self) -> int:
        """The end (index into buf) of the value starting at `pos`, reading more of the file as needed."""
        more = 1 << 16
        while True:
            end = self._scan(self.pos)
            if end is not None:
                return end
            if self.eof:
                self.fail(None, "unexpected end of data")
            self.fill(len(self.buf) - self.pos + more)
            more *= 2

    def _scan(self, start: int) -> Optional[int]:
        """The end of the value at `start`, or None when the buffer ends first. Strings are skipped with
        `bytes.find` (a regex over a long string costs ~100 bytes of memory per byte), so the memory is
        the buffer's: a small multiple of the longest token."""
        buf = self.buf
        first = buf[start : start + 1]
        if first == b'"':
            return _string_end(buf, start)
        if first not in (b"{", b"["):
            match = _SCALAR.match(buf, start)
            if match is None:
                return start + 1  # let the parser name the bad byte
            # A scalar running into the end of the buffer may continue in the file.
            return match.end() if match.end() < len(buf) or self.eof else None
        depth = 0
        pos = start
        while (token := _BRACKET_OR_QUOTE.search(buf, pos)) is not None:
            byte = buf[token.start()]
            if byte == 0x22:
                pos = _string_end(buf, token.start())
                if pos is None:
                    return None  # a string cut off by the end of the buffer
                continue
            pos = token.end()
            if byte in (0x7B, 0x5B):
                depth += 1
                if depth > MAX_DEPTH:
                    self.fail(token.start(), f"nested deeper than {MAX_DEPTH} levels")
            else:
                depth -= 1
                if depth == 0:
                    return pos
        return None

    def parse(self, start: int, end: int, wrap: bool = False) -> Any:
        text = b"[" + self.buf[start:end] + b"]" if wrap else self.buf[start:end]
        try:
            return loads(text)
        except orjson.JSONDecodeError as err:
            if wrap:
                raise
            self.fail(start + min(err.pos, end - start), err.msg)

    def read_value(self) -> Any:
        if self.peek() is None:
            self.fail(None, "unexpected end of data")
        end = self.value_end()
        start = self.pos  # `value_end` may have moved the window
        value = self.parse(start, end)
        self.pos = end
        return value

    # --- the document -------------------------------------------------------------------------------

    def document(self, stream_keys: set) -> Iterator[Entry]:
        first = self.peek()
        if first is None:
            self.fail(None, "no JSON value")
        if first == ord("["):
            yield ("start", None, None)
            yield from self.array_items(None)
        elif first == ord("{"):
            self.pos += 1
            if self.peek() == ord("}"):
                self.pos += 1
            else:
                while True:
                    if self.peek() != ord('"'):
                        self.expect(b'"')
                    key = self.read_value()
                    self.expect(b":")
                    if key in stream_keys and self.peek() == ord("["):
                        yield ("start", key, None)
                        yield from self.array_items(key)
                    else:
                        yield ("value", key, self.read_value())
                    if self.expect(b",}") == ord("}"):
                        break
        else:
            yield ("value", None, self.read_value())
        if self.peek() is not None:
            self.fail(self.pos, "unexpected content after the document")

    def array_items(self, key: Optional[str]) -> Iterator[Entry]:
        """The items of the array at `pos` (on its `[`), in chunks; leaves `pos` after its `]`."""
        self.expect(b"[")
        if self.peek() == ord("]"):
            self.pos += 1
            return
        exact_items = 0  # after a failed fast chunk, this many items are read exactly before trying again
        while True:
            if exact_items == 0:
                items = self._fast_chunk()
                if items is not None:
                    yield ("items", key, items)
                    if self.peek() == ord("]"):
                        self.fail(self.pos, "trailing comma")
                    continue
                exact_items = 256
            # Exact path: one item, then `,` or `]`.
            exact_items -= 1
            item = self.read_value()
            yield ("items", key, [item])
            if self.expect(b",]") == ord("]"):
                return

    def _fast_chunk(self) -> Optional[list]:
        """Every complete item up to the last item boundary (`}` `,` `{`) in the next CHUNK_BYTES, in one parse;
        None when no cut parses (no boundary, or each cut fell inside a string or a nested object)."""
        self.fill(CHUNK_BYTES + 1024)
        buf, start = self.buf, self.pos
        stop = min(len(buf), start + CHUNK_BYTES)
        for _ in range(8):
            cut = self._boundary(start, stop)
            if cut is None:
                return None
            try:
                items = self.parse(start, cut + 1, wrap=True)
            except orjson.JSONDecodeError as err:
                # Valid up to err.pos: the array may end before the cut (`]` then the next key), or the cut
                # is wrong; either way the next cut to try lies before the error.
                stop = min(cut + 1, start + max(err.pos - 1, 0))
                continue
            except ValueError:
                return None
            self.pos = cut + 2
            return items
        return None

    def _boundary(self, start: int, stop: int) -> Optional[int]:
        """Index of the `}` of the last `},` + `{` in buf[start:stop] (`},"area"` ends a nested object, not an item)."""
        buf = self.buf
        for _ in range(64):
            cut = buf.rfind(b"},", start, stop)
            if cut <= start:
                return None
            after = _WS.match(buf, cut + 2).end()
            if buf[after : after + 1] == b"{":
                return cut
            stop = cut + 1
        return None
