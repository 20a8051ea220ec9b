"""`hh-jax data check`: exit codes, `file:line:` messages, counts on the shipped data."""

import glob
import gzip
import json
import os
import subprocess
import sys

from hh_jax.data import check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILES = sorted(glob.glob(os.path.join(REPO, "data", "hh-rlhf", "*", "test.jsonl.gz")))
SE_FILES = sorted(glob.glob(os.path.join(REPO, "data", "stackexchange", "*", "Posts.xml")))
CTX = "\n\nHuman: hi\n\nAssistant:"


def test_shipped_counts_match_provenance(tmp_path, capsys):
    out_json = tmp_path / "counts.json"
    rc = check.main([*HH_FILES, *SE_FILES, "--max-len", "0", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 1  # the shipped files hold chosen == rejected rows, which are invalid
    assert "total hh: 4 files  rows 8552  comparisons 8488" in out
    assert "different votes 6121" in out
    assert "helpful-base/test.jsonl.gz:722: identical: chosen == rejected" in out
    files = json.loads(out_json.read_text())["files"]
    counts = {os.path.relpath(f["path"], REPO): f for f in files}
    hh = {p.split(os.sep)[2]: f for p, f in counts.items() if p.endswith(".gz")}
    assert {s: f["rows"] for s, f in hh.items()} == {
        "harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137,
        "helpful-rejection-sampled": 2749}
    assert [hh[s]["skipped"].get("context_mismatch", 0) for s in sorted(hh)] == [5, 9, 0, 3]
    assert [hh[s]["skipped"].get("identical", 0) for s in sorted(hh)] == [0, 2, 2, 32]
    se = {p.split(os.sep)[2]: f["extra"] for p, f in counts.items() if p.endswith(".xml")}
    assert {s: x["pairs_diff_votes"] for s, x in se.items()} == {
        "beer": 2196, "coffee": 150, "matheducators": 3775}
    assert check.main([*HH_FILES, "--max-len", "0", "--skip-invalid"]) == 0
    assert "skipped 35: context_mismatch=3 identical=32" in capsys.readouterr().out


def test_bad_file_exit_code_and_line(tmp_path, capsys):
    good = json.dumps({"chosen": CTX + " a", "rejected": CTX + " b"})
    path = tmp_path / "x.jsonl"
    path.write_text(f"{good}\n{good}\n{{broken\n\n{good}\n")
    assert check.main([str(path), "--max-len", "16"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: invalid_json: " in out
    assert "rows 4  comparisons 3  blank lines 1" in out
    assert "truncations (byte tokenizer, max_len 16): chosen=3 pairs=3 rejected=3" in out
    assert check.main([str(path), "--skip-invalid"]) == 0
    assert "skipped 1: invalid_json=1" in capsys.readouterr().out
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(((good + "\n") * 50).encode())[:-20])
    assert check.main([str(cut), "--skip-invalid"]) == 1  # nothing usable is left
    assert f"{cut}:" in capsys.readouterr().out
    assert check.main([str(tmp_path / "missing.jsonl")]) == 2


def test_module_entry_point(tmp_path):
    path = tmp_path / "Posts.xml"
    path.write_text('<?xml version="1.0"?>\n<posts>\n<row Id="1" PostTypeId="1"\n</posts>\n')
    proc = subprocess.run([sys.executable, "-m", "hh_jax.data.check", str(path), "--max-len",
                           "0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert f"{path}:4: xml_error: not well-formed (invalid token)" in proc.stdout
