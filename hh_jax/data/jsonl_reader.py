"""Reading jsonl(.gz) files line by line, for the data layer (hh_jax.data.hh).

Every problem is a `DataError` whose message starts with `file:line: reason:`. Gzip is
detected by its magic bytes and decoded in bounded chunks (no decompression bombs); a
corrupt or cut-off gzip file is one error at the line where decoding stopped, and none of
its rows is used (deflate has no per-block checksum: without the final CRC no row can be
trusted). Overlong lines are reported without being held in memory.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

MAX_LINE_BYTES = 8 << 20  # official rows are < 25 KB; a bigger line is almost surely broken
_CHUNK = 1 << 20


class DataError(ValueError):
    """Bad input; `str(e)` is `file:line: reason: detail`. `reason` is a short code."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = str(path), int(line), reason, detail
        super().__init__(f"{self.path}:{self.line}: {reason}: {detail}")


class _StreamError(Exception):
    def __init__(self, reason: str, detail: str, line: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.line = reason, detail, line


def _gunzip(f) -> Iterator[bytes]:
    """Decompresses (multi-member) gzip; raises _StreamError on corrupt or cut-off data."""
    d, started, data = zlib.decompressobj(31), False, b""
    while True:
        if not data:
            data = f.read(_CHUNK)
            if not data:
                break
        if d.eof:  # another gzip member follows (or zero padding, which gzip tolerates)
            if not data.strip(b"\0"):
                data = b""
                continue
            d = zlib.decompressobj(31)
        started = True
        try:
            out = d.decompress(data, _CHUNK)  # bounded output: no decompression bombs
        except zlib.error as e:
            raise _StreamError("corrupt_gzip", f"corrupt gzip data ({e})") from None
        yield out
        data = d.unused_data if d.eof else d.unconsumed_tail
    if started and not d.eof:
        yield d.flush()  # output held back by the max_length cap above
    if started and not d.eof:
        raise _StreamError("truncated_gzip", "gzip stream ends early (file cut off?)")


def _gzip_damage(path: str | os.PathLike) -> _StreamError | None:
    """First pass over a gzip file: the error if it is corrupt or cut off, else None.

    Deflate has no per-block checksum and a corrupt stream can look merely cut off, so
    without the final CRC no row of the file can be trusted: a damaged file is one error
    (at the line where decoding stopped) and none of its rows is used.
    """
    lines = 0
    with open(path, "rb") as f:
        try:
            for out in _gunzip(f):
                lines += out.count(b"\n")
        except _StreamError as e:
            e.line = lines + 1
            e.detail += f"; the {lines} lines before cannot be verified and are not used"
            return e
    return None


def _byte_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":  # detect gzip by magic bytes, not by file name
            problem = _gzip_damage(path)
            if problem is not None:
                raise problem
            f.seek(0)
            yield from _gunzip(f)
            return
        if str(path).endswith(".gz"):
            raise _StreamError("corrupt_gzip", "not a gzip file (no gzip magic bytes)")
        f.seek(0)
        yield from iter(lambda: f.read(_CHUNK), b"")


def read_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES
               ) -> Iterator[tuple[int, bytes | DataError]]:
    """Yields (1-based line number, raw line bytes or a DataError) of a jsonl(.gz) file.

    A stream error (corrupt or truncated gzip) is yielded once, for the line being read,
    and ends the file. Overlong lines are skipped without holding them in memory.
    """
    line_no, buf, overlong = 0, b"", False
    too_long = ("line_too_long", f"line longer than {max_line_bytes} bytes")
    try:
        for chunk in _byte_chunks(path):
            parts = chunk.split(b"\n")
            for i, part in enumerate(parts):
                if not overlong:
                    buf += part
                    overlong = len(buf) > max_line_bytes
                    if overlong:
                        buf = b""
                if i == len(parts) - 1:
                    break  # no newline after the last part: the line continues
                line_no += 1
                yield line_no, DataError(path, line_no, *too_long) if overlong else buf
                buf, overlong = b"", False
    except _StreamError as e:
        line = e.line or line_no + 1
        yield line, DataError(path, line, e.reason, e.detail)
        return
    if buf or overlong:
        yield line_no + 1, DataError(path, line_no + 1, *too_long) if overlong else buf


def read_json(path: str | os.PathLike, bad_json: str = "invalid_json"
              ) -> Iterator[tuple[int, object]]:
    """Yields (1-based line number, parsed JSON value) of each non-blank line of a
    jsonl(.gz) file; raises the first DataError: a file problem from `read_lines`, or a
    line that is not JSON (reason `bad_json`)."""
    for line, raw in read_lines(path):
        if isinstance(raw, DataError):
            raise raw
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DataError(path, line, bad_json, str(e)) from None
