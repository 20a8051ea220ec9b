"""The pairs file and the comparisons store (hh_jax/label/store.py): validation with file:line
errors, torn-line recovery, replay rejection, concurrent appends (threads and processes),
fsync, and the HH export read back by the project's own HH reader."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from hh_jax.data.hh import load_hh_comparisons
from hh_jax.data.jsonl_reader import DataError
from hh_jax.label import store as st


def make_pair(i: int, **kw) -> dict:
    pair = {"id": f"p{i}",
            "context": f"\n\nHuman: question {i}?\n\nAssistant: hm\n\nHuman: and?\n\nAssistant:",
            "response_a": f" answer A{i}", "response_b": f"answer B{i} ünïcode",
            "meta": {"round": 1, "policy_a": "pi0", "policy_b": "pi1"}}
    return {**pair, **kw}


def lines_of(path) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def test_pairs_round_trip(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [make_pair(i) for i in range(3)]
    st.write_pairs(path, pairs)
    assert st.read_pairs(path) == pairs
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.parametrize("line, want", [
    ("{not json", "invalid_json"),
    (json.dumps({k: v for k, v in make_pair(9).items() if k != "response_b"}),
     "missing_key: no 'response_b'"),
    (json.dumps(make_pair(9, response_a="  ")), "empty_response"),
    (json.dumps(make_pair(0)), "duplicate_id: id 'p0' already on line 1"),
    (json.dumps(make_pair(9, context="no turns")), "bad_context"),
    (json.dumps(make_pair(9, response_b=" x\n\nAssistant: y")), "bad_response"),
    (json.dumps(make_pair(9, response_b=" answer A9")), "identical"),
    (json.dumps([1]), "not_object"),
])
def test_bad_pairs_file_names_file_and_line(tmp_path, line, want):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(make_pair(0)) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        st.read_pairs(path)
    assert str(e.value).startswith(f"{path}:3: ") and want in str(e.value), str(e.value)


def test_write_pairs_rejects_bad_pairs_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    st.write_pairs(path, [make_pair(0)])
    before = path.read_bytes()
    with pytest.raises(DataError, match="pairs.jsonl:2: duplicate_id"):
        st.write_pairs(path, [make_pair(0), make_pair(0)])
    assert path.read_bytes() == before


def test_append_records_provenance_and_rejects_a_replay(tmp_path):
    path = tmp_path / "labels.jsonl"
    with st.ComparisonStore(path) as store:
        rec = store.append(make_pair(0), "b", strength=3, labeler="ann", round=2, note="x")
        assert rec["chosen"] == "answer B0 ünïcode" and rec["rejected"] == " answer A0"
        assert rec["meta"] == {"round": 2, "policy_a": "pi0", "policy_b": "pi1", "note": "x"}
        assert rec["labeler"] == "ann" and rec["time"].endswith("+00:00")
        before = path.read_bytes()
        with pytest.raises(st.DuplicateLabel):
            store.append(make_pair(0), "a", labeler="ann")
        for bad in (dict(choice="c"), dict(strength=4), dict(labeler="")):
            with pytest.raises(ValueError):
                store.append(make_pair(1), **{"choice": "a", "labeler": "ann", **bad})
        assert path.read_bytes() == before
        assert store.labeled_ids() == {"p0"} and len(store) == 1
    assert lines_of(path) == [rec]
    with st.ComparisonStore(path) as again:  # a second session sees the label: no replay
        assert again.records() == [rec]
        with pytest.raises(st.DuplicateLabel):
            again.append(make_pair(0), "a", labeler="bob")


def test_torn_last_line_is_cut_with_a_warning(tmp_path, caplog):
    path = tmp_path / "labels.jsonl"
    with st.ComparisonStore(path) as store:
        store.append(make_pair(0), "a", labeler="ann")
    good = path.read_bytes()
    torn = b'{"id": "p1", "context": "\\n\\nHuman: q'
    with open(path, "ab") as f:
        f.write(torn)
    assert [r["id"] for r in st.read_store(path)] == ["p0"]  # a reader ignores it
    assert path.read_bytes() == good + torn  # ...and leaves the file alone
    with caplog.at_level(logging.WARNING, logger="hh_jax.label.store"):
        store = st.ComparisonStore(path)
    assert f"{len(torn)} bytes dropped" in caplog.text and "labels.jsonl:2" in caplog.text
    assert path.read_bytes() == good
    saved = list(tmp_path.glob("labels.jsonl.torn-*"))  # the cut bytes, kept aside
    assert len(saved) == 1 and saved[0].read_bytes() == torn and str(saved[0]) in caplog.text
    store.append(make_pair(1), "b", labeler="ann")
    assert [r["id"] for r in lines_of(path)] == ["p0", "p1"]
    store.close()


def test_a_whole_label_without_its_newline_survives_reopening(tmp_path, caplog):
    """A crash between a label and its newline leaves a complete record: kept, not cut."""
    path = tmp_path / "labels.jsonl"
    with st.ComparisonStore(path) as store:
        store.append(make_pair(0), "a", labeler="ann")
        store.append(make_pair(1), "b", labeler="ann")
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # the last newline never written
    assert [r["id"] for r in st.read_store(path)] == ["p0", "p1"]  # a reader counts it
    assert path.read_bytes() == whole[:-1]  # ...and leaves the file alone
    with caplog.at_level(logging.WARNING, logger="hh_jax.label.store"):
        store = st.ComparisonStore(path)
    assert "no trailing newline" in caplog.text and "labels.jsonl:2" in caplog.text
    assert path.read_bytes() == whole and store.labeled_ids() == {"p0", "p1"}
    with pytest.raises(st.DuplicateLabel):
        store.append(make_pair(1), "a", labeler="bob")
    store.append(make_pair(2), "a", labeler="ann")
    store.close()
    assert [r["id"] for r in lines_of(path)] == ["p0", "p1", "p2"]
    assert not list(tmp_path.glob("labels.jsonl.torn-*"))


def test_a_corrupt_store_names_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    with st.ComparisonStore(path) as store:
        store.append(make_pair(0), "a", labeler="ann")
    with open(path, "a") as f:
        f.write("[1, 2]\n")
    with pytest.raises(DataError, match=r"labels.jsonl:2: not_object"):
        st.ComparisonStore(path)


def test_append_fsyncs(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    with st.ComparisonStore(tmp_path / "labels.jsonl") as store:
        synced.clear()
        store.append(make_pair(0), "a", labeler="ann")
        assert synced == [store._fd]


def test_twenty_threads_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "labels.jsonl"
    store = st.ComparisonStore(path)
    errors, barrier = [], threading.Barrier(20)

    def label(i):
        barrier.wait()
        try:  # every thread also tries the same id p0: exactly one may win it
            store.append(make_pair(0), "a", labeler=f"t{i}")
        except st.DuplicateLabel:
            errors.append(i)
        store.append(make_pair(i + 1), "b", labeler=f"t{i}")

    threads = [threading.Thread(target=label, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = lines_of(path)
    assert len(rows) == 21 and len(errors) == 19
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(21))
    store.close()


_WORKER = """
import sys
from hh_jax.label import store as st
sys.path.insert(0, sys.argv[3])
from test_label_store import make_pair
s = st.ComparisonStore(sys.argv[1])
start = int(sys.argv[2])
dups = 0
for i in range(40):
    for j in (i, start + i):  # ids 0..39 are shared by both processes, the rest are not
        try:
            s.append(make_pair(j), "a", labeler=sys.argv[2])
        except st.DuplicateLabel:
            dups += 1
print(dups)
"""


def test_two_processes_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "labels.jsonl")
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, path, str(start), here],
                              stdout=subprocess.PIPE, text=True) for start in (1000, 2000)]
    dups = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [r["id"] for r in lines_of(path)]
    assert len(ids) == len(set(ids)) == 40 + 80
    assert sum(dups) == 40  # each shared id was won once, refused once


def test_export_round_trips_through_the_hh_reader(tmp_path):
    path, out = tmp_path / "labels.jsonl", tmp_path / "hh" / "labels.jsonl"
    pairs = [make_pair(i) for i in range(4)]
    with st.ComparisonStore(path) as store:
        for i, pair in enumerate(pairs):
            store.append(pair, "ab"[i % 2], labeler="ann")
        records = store.records()
    assert st.export_hh(path, out) == 4
    comps, report = load_hh_comparisons(str(out))
    assert report.total.comparisons == 4 and not report.total.skipped
    for rec, comp in zip(records, comps, strict=True):
        assert comp.context == rec["context"]
        # the HH format puts a space after "Assistant:": added where a response lacks one
        assert comp.chosen == st.hh_text("", rec["chosen"]) and comp.chosen.strip() == \
            rec["chosen"].strip()
        assert comp.rejected == st.hh_text("", rec["rejected"])
    assert comps[0].chosen == " answer A0"  # already had its space: byte for byte
    assert comps[1].chosen == " answer B1 ünïcode"
