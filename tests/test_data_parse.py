"""HH parsing and validation against hand-written rows and the PROVENANCE.md counts."""

import dataclasses
import gzip
import json
import os
import zlib

import pytest

from hh_jax.data import hh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_DIR = os.path.join(REPO, "data", "hh-rlhf")


def _row(chosen, rejected):
    return json.dumps({"chosen": chosen, "rejected": rejected})


CTX = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Tell me a joke\n\nAssistant:"
GOOD_ROW = _row(CTX + " Why did the chicken...", CTX + " No.")


def _write(path, lines, gz=False):
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
    return str(path)


def test_split_turns_hand_example():
    turns = hh.split_turns(CTX + " Sure: Human: is not a turn")
    assert turns == [("Human", " Hi there"), ("Assistant", " Hello."), ("Human", " Tell me a joke"),
                     ("Assistant", " Sure: Human: is not a turn")]
    assert hh.split_turns("Human: a\n\nAssistant: b") == [("Human", " a"), ("Assistant", " b")]
    assert hh.split_turns("junk\n\nHuman: a")[0] == ("", "junk")


def test_comparison_is_lossless_and_keyed_by_first_human():
    comp = hh.parse_hh_line(GOOD_ROW.encode(), "f.jsonl", 7, "helpful-base")
    assert comp.context == CTX
    assert (comp.chosen, comp.rejected) == (" Why did the chicken...", " No.")
    assert comp.context + comp.chosen == json.loads(GOOD_ROW)["chosen"]
    assert comp.first_human == "Hi there"
    assert (comp.source, comp.line, comp.subset) == ("f.jsonl", 7, "helpful-base")


@pytest.mark.parametrize("line, reason", [
    (b'{"chosen": "x", ', "invalid_json"),
    (b'["a", "b"]', "not_object"),
    (_row(CTX + " a", CTX + " a").encode(), "identical"),
    (json.dumps({"chosen": CTX + " a"}).encode(), "missing_key"),
    (json.dumps({"chosen": CTX + " a", "rejected": 3}).encode(), "not_string"),
    (_row("\n\nHuman: hi", "\n\nHuman: ho").encode(), "no_assistant"),
    (_row(CTX + " a", CTX + "  ").encode(), "empty_response"),
    (_row(CTX + " a", "\n\nHuman: other\n\nAssistant: b").encode(), "context_mismatch"),
    (_row("\n\nAssistant: a", "\n\nAssistant: b").encode(), "no_human"),
    (b'{"chosen": "\xff", "rejected": "b"}', "invalid_utf8"),
    (b'{"chosen": "\\ud800", "rejected": "b"}', "invalid_utf8"),
])
def test_each_reason_names_file_and_line(line, reason):
    with pytest.raises(hh.DataError) as info:
        hh.parse_hh_line(line, "dir/f.jsonl", 12, "s")
    assert info.value.reason == reason
    assert str(info.value).startswith(f"dir/f.jsonl:12: {reason}: ")


def test_hand_counted_file(tmp_path):
    """9 lines: 1 blank, 4 valid, 4 invalid (lines 3, 5, 6, 9)."""
    lines = [GOOD_ROW, GOOD_ROW.replace("joke", "story"), "not json", "",
             _row(CTX + " a", CTX + " a"), '{"chosen": 1, "rejected": "x"}',
             GOOD_ROW.replace("Hi there", "Yo"), GOOD_ROW.replace("Hello", "Hey"), "[]"]
    (tmp_path / "s").mkdir()
    path = _write(tmp_path / "s" / "test.jsonl", lines)
    with pytest.raises(hh.DataError, match=r"test.jsonl:3: invalid_json"):
        hh.load_hh_comparisons(path)
    comps, report = hh.load_hh_comparisons(path, skip_invalid=True)
    r = report.total
    assert (r.rows, r.blank, r.comparisons) == (8, 1, 4)
    assert dict(r.skipped) == {"invalid_json": 1, "identical": 1, "not_string": 1,
                               "not_object": 1}
    assert [c.line for c in comps] == [1, 2, 7, 8]
    assert [e.line for e in r.errors] == [3, 5, 6, 9]
    assert {c.subset for c in comps} == {"s"}


def test_gzip_truncated_and_corrupt(tmp_path):
    good = [GOOD_ROW.replace("joke", f"joke {i}") for i in range(200)]
    path = _write(tmp_path / "t.jsonl.gz", good, gz=True)
    blob = open(path, "rb").read()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    decoded = zlib.decompressobj(31).decompress(blob[: len(blob) // 2])
    comps, report = hh.load_hh_comparisons(str(cut), skip_invalid=True)
    r = report.total  # without the CRC no row can be trusted: one error, nothing kept
    assert comps == [] and dict(r.skipped) == {"truncated_gzip": 1} and r.rows == 1
    line = decoded.count(b"\n") + 1
    with pytest.raises(hh.DataError, match=rf"cut.jsonl.gz:{line}: truncated_gzip"):
        hh.load_hh_comparisons(str(cut))
    bad = bytearray(blob)
    bad[-6] ^= 0xFF  # inside the CRC32 trailer: every row decodes, none may be trusted
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(bad))
    comps, report = hh.load_hh_comparisons(str(tmp_path / "crc.jsonl.gz"), skip_invalid=True)
    assert comps == [] and dict(report.total.skipped) == {"corrupt_gzip": 1}
    (tmp_path / "plain.jsonl.gz").write_bytes(b"{}\n")
    with pytest.raises(hh.DataError, match="plain.jsonl.gz:1: corrupt_gzip"):
        hh.load_hh_comparisons(str(tmp_path / "plain.jsonl.gz"))


def test_multi_member_gzip_bom_crlf_and_long_lines(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress(("\ufeff" + GOOD_ROW + "\r\n").encode())
                     + gzip.compress((GOOD_ROW + "\n").encode()))
    comps, _ = hh.load_hh_comparisons(str(path))
    assert len(comps) == 2 and comps[0] == dataclasses.replace(comps[1], line=1)
    long_row = _row(CTX + " " + "x" * 5000, CTX + " y")
    plain = _write(tmp_path / "l.jsonl", [GOOD_ROW, long_row, GOOD_ROW])
    comps, report = hh.load_hh_comparisons(plain, skip_invalid=True, max_line_bytes=4096)
    assert [c.line for c in comps] == [1, 3]
    assert dict(report.total.skipped) == {"line_too_long": 1}
    assert len(hh.load_hh_comparisons(plain)[0]) == 3  # the default limit is 8 MiB


def test_shipped_files_match_provenance():
    """PROVENANCE.md: rows 2312/2354/1137/2749; shared context in 2307/2312, 2345/2354,
    1137/1137, 2746/2749; identical chosen==rejected 0, 2, 2, 32."""
    comps, report = hh.load_hh_comparisons(HH_DIR, skip_invalid=True)
    by_file = {os.path.dirname(r.path): r for r in report.files}
    rows = {s: by_file[s].rows for s in hh.SUBSETS}
    assert rows == dict(zip(hh.SUBSETS, (2312, 2354, 1137, 2749), strict=True))
    for s, mismatch, identical in zip(hh.SUBSETS, (5, 9, 0, 3), (0, 2, 2, 32), strict=True):
        assert by_file[s].skipped["context_mismatch"] == mismatch
        assert by_file[s].skipped["identical"] == identical
    total = report.total
    assert total.rows == 8552 == total.comparisons + sum(total.skipped.values())
    # Independent read with the stdlib: every kept row reassembles to its original line.
    lines = {}
    for comp in comps[::97]:
        if comp.source not in lines:
            with gzip.open(os.path.join(HH_DIR, comp.source), "rt", encoding="utf-8") as f:
                lines[comp.source] = f.readlines()
        row = json.loads(lines[comp.source][comp.line - 1])
        assert comp.context + comp.chosen == row["chosen"]
        assert comp.context + comp.rejected == row["rejected"]
