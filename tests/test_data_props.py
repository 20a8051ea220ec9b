"""Property tests: corrupted HH files give a clean error on the right line, or, with
skip_invalid, every row is either kept (and reassembles to its line) or counted."""

import gzip
import json
import os
import tempfile
import zlib

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from hh_jax.data import hh

LIMIT = 2048  # max_line_bytes in these tests, so "huge lines" stay cheap
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAGMENTS = ["\n\nHuman:", "\n\nAssistant:", "Human:", " ", "é", '"', "\\", "\U0001f600", "\u2028",
             "\n"]
piece = st.one_of(st.text(alphabet="abc xyz", max_size=8), st.sampled_from(FRAGMENTS))
text = st.lists(piece, max_size=4).map("".join)


@st.composite
def hh_lines(draw) -> list[bytes]:
    """Mostly valid HH rows, as JSON lines (bytes, no newline)."""
    lines = []
    for i in range(draw(st.integers(1, 8))):
        turns = draw(st.lists(st.tuples(text, text), min_size=0, max_size=2))
        ctx = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)
        ctx += f"\n\nHuman: {draw(text)}\n\nAssistant:"
        good, bad = f" good{i} {draw(text)}", f" bad{i} {draw(text)}"
        row = {"chosen": ctx + good, "rejected": ctx + bad}
        lines.append(json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8"))
    return lines


@st.composite
def corrupted(draw) -> bytes:
    """A jsonl payload with one kind of damage (or none)."""
    lines = draw(hh_lines())
    kind = draw(st.sampled_from(["none", "flip", "truncate", "delete_key", "wrong_type",
                                 "huge", "bad_utf8", "blank"]))
    i = draw(st.integers(0, len(lines) - 1))
    if kind in ("delete_key", "wrong_type"):
        row = json.loads(lines[i])
        key = draw(st.sampled_from(["chosen", "rejected"]))
        if kind == "delete_key":
            del row[key]
        else:
            row[key] = draw(st.sampled_from([None, 3, 1.5, ["x"], {"a": "b"}, True]))
        lines[i] = json.dumps(row).encode()
    elif kind == "huge":
        big = json.loads(lines[i])
        big["chosen"] += "z" * draw(st.sampled_from([LIMIT // 2, LIMIT * 2]))
        lines[i] = json.dumps(big).encode()
    elif kind == "bad_utf8":
        pos = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) \
            + lines[i][pos:]
    elif kind == "blank":
        lines.insert(i, draw(st.sampled_from([b"", b"  ", b"\t\r"])))
    payload = b"\n".join(lines) + b"\n"
    if kind == "flip":
        buf = bytearray(payload)
        for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4)):
            buf[pos] ^= draw(st.integers(1, 255))
        payload = bytes(buf)
    elif kind == "truncate":
        payload = payload[: draw(st.integers(0, len(payload)))]
    return payload


def _confirm(reason: str, raw: bytes) -> bool:
    """Independent stdlib check that a row flagged with `reason` really has that defect."""
    if reason == "line_too_long":
        return len(raw) > LIMIT
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return reason == "invalid_utf8"
    except ValueError:
        return reason == "invalid_json"
    if not isinstance(row, dict):
        return reason == "not_object"
    if "chosen" not in row or "rejected" not in row:
        return reason == "missing_key"
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return reason == "not_string"
    if any("\ud800" <= ch <= "\udfff" for ch in chosen + rejected):
        return reason == "invalid_utf8"
    if chosen == rejected:
        return reason == "identical"
    if "\n\nAssistant:" not in chosen or "\n\nAssistant:" not in rejected:
        return reason == "no_assistant"
    return reason in ("empty_response", "context_mismatch", "no_human")


def _check(path: str, lines_bytes: list[bytes]) -> None:
    """lines_bytes: the file's lines as an independent reader sees them."""
    items = list(hh.iter_hh_file(path, max_line_bytes=LIMIT))
    nonblank = [n for n, raw in enumerate(lines_bytes, 1) if raw.strip()]
    seen = [(it.line, it) for it in items]
    assert [n for n, _ in seen] == nonblank  # every non-blank line accounted for, once
    for n, it in seen:
        raw = lines_bytes[n - 1]
        if isinstance(it, hh.DataError):
            assert str(it).startswith(f"{path}:{n}: {it.reason}: ")
            assert _confirm(it.reason, raw), (it, raw)
        else:
            row = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            assert it.context + it.chosen == row["chosen"]
            assert it.context + it.rejected == row["rejected"]
    _, report = hh.load_hh_comparisons(path, skip_invalid=True, max_line_bytes=LIMIT)
    total = report.total
    assert total.rows == len(nonblank) == total.comparisons + sum(total.skipped.values())
    errors = [it for it in items if isinstance(it, hh.DataError)]
    try:
        comps, _ = hh.load_hh_comparisons(path, max_line_bytes=LIMIT)
    except hh.DataError as e:
        assert errors and str(e) == str(errors[0])
    else:
        assert not errors and len(comps) == len(nonblank)


@settings(max_examples=50, **SETTINGS)
@given(corrupted())
def test_corrupted_plain_jsonl(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test.jsonl")
        with open(path, "wb") as f:
            f.write(payload)
        lines = payload.split(b"\n")
        _check(path, lines[:-1] if payload.endswith(b"\n") or not payload else lines)


@settings(max_examples=25, **SETTINGS)
@given(corrupted())
def test_corrupted_rows_inside_valid_gzip(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test.jsonl.gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
        lines = payload.split(b"\n")
        _check(path, lines[:-1] if payload.endswith(b"\n") or not payload else lines)


@settings(max_examples=30, **SETTINGS)
@given(hh_lines(), st.data())
def test_damaged_gzip_keeps_only_intact_rows(lines, draw):
    payload = b"\n".join(lines) + b"\n"
    blob = bytearray(gzip.compress(payload, mtime=0))
    cut = draw.draw(st.booleans())
    if cut:
        blob = blob[: draw.draw(st.integers(0, len(blob) - 1))]
    else:
        for pos in draw.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=3)):
            blob[pos] ^= draw.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test.jsonl.gz")
        with open(path, "wb") as f:
            f.write(bytes(blob))
        items = list(hh.iter_hh_file(path, max_line_bytes=LIMIT))
        original = {it.line: it for it in hh.iter_hh_file(_plain(tmp, payload))}
        damaged = [it for it in items if isinstance(it, hh.DataError)
                   and it.reason in ("corrupt_gzip", "truncated_gzip")]
        if damaged:  # one clean error at the line where decoding stopped; no row used
            assert items == damaged
            assert str(damaged[0]).startswith(f"{path}:{damaged[0].line}: ")
            assert damaged[0].line >= 1
            if cut:  # a cut stream decodes to a prefix of the payload: the error is at the
                # line after the prefix's last newline (zlib directly as the reference);
                # flipped bits can decode to garbage with more newlines before failing
                try:
                    prefix = zlib.decompressobj(31).decompress(bytes(blob))
                except zlib.error:  # cut inside the header
                    prefix = b""
                assert payload.startswith(prefix)
                assert damaged[0].line == prefix.count(b"\n") + 1
        else:  # header-only damage (e.g. mtime): the file reads exactly as before
            assert [str(it) if isinstance(it, hh.DataError) else vars(it) | {"source": ""}
                    for it in items] == [
                str(it).replace(_plain(tmp, payload), path) if isinstance(it, hh.DataError)
                else vars(it) | {"source": ""} for it in original.values()]


def _plain(tmp: str, payload: bytes) -> str:
    path = os.path.join(tmp, "orig.jsonl")
    with open(path, "wb") as f:
        f.write(payload)
    return path
