"""TFDS builders (array_record, no TensorFlow) read back what the loaders produce."""

import gzip
import json
import sys

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from hh_jax.data import hh, loaders, tfds_builders  # noqa: E402
from hh_jax.tokenizer import ByteTokenizer  # noqa: E402

tfds.disable_progress_bar()


def _row(first, i, same=False):
    ctx = f"\n\nHuman: {first}\n\nAssistant:"
    return json.dumps({"chosen": ctx + f" yes {i}", "rejected": ctx + (f" yes {i}" if same
                                                                        else f" no {i}")})


def _source(tmp_path):
    """Official layout: helpful-base/{train,test}.jsonl.gz, harmless-base/test.jsonl.gz."""
    files = {"helpful-base/train.jsonl.gz": [_row(f"help {i}", i) for i in range(12)],
             "helpful-base/test.jsonl.gz": [_row(f"test {i}", i) for i in range(5)],
             "harmless-base/test.jsonl.gz": [_row(f"harm {i}", i, same=i == 2) for i in range(6)]}
    for rel, lines in files.items():
        path = tmp_path / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress("".join(x + "\n" for x in lines).encode()))
    return tmp_path / "src"


def _key(c):
    return (c.source, c.line, c.context, c.chosen, c.rejected, c.split, c.subset)


def test_hh_builder_round_trip(tmp_path):
    src = _source(tmp_path)
    builder = tfds_builders.prepare("hh_rlhf/all", tmp_path / "tfds", source_dir=src,
                                    skip_invalid=True)
    assert "tensorflow" not in sys.modules
    comps, report = hh.load_hh_comparisons(str(src), skip_invalid=True)
    want = {}
    for c in comps:  # split names: <file stem>_<hash side>
        want.setdefault(f"{c.source.split('/')[-1].split('.')[0]}_{c.split}", set()).add(_key(c))
    got = {name: {_key(tfds_builders.comparison_from_record(r))
                  for r in builder.as_data_source(split=name)} for name in builder.info.splits}
    assert got == want and sum(map(len, got.values())) == 12 + 5 + 5
    meta = builder.info.metadata["report"]["total"]
    assert meta["skipped"] == {"identical": 1} and meta["rows"] == 23
    assert meta["errors"][0].endswith("harmless-base/test.jsonl.gz:3: identical: "
                                      "chosen == rejected")
    every_test = builder.as_data_source(split=tfds_builders.hh_split(builder, "test"))
    assert len(every_test) == 10
    # Reuse is free; other input in the same data_dir is refused, not silently reused.
    tfds_builders.prepare("hh_rlhf/all", tmp_path / "tfds", source_dir=src, skip_invalid=True)
    (src / "helpful-base" / "test.jsonl.gz").write_bytes(gzip.compress(b"\n"))
    with pytest.raises(ValueError, match="prepared from other input"):
        tfds_builders.prepare("hh_rlhf/all", tmp_path / "tfds", source_dir=src,
                              skip_invalid=True)
    # The pipeline streams from the array_record files.
    source = tfds_builders.ComparisonSource(builder.as_data_source(split="train_train"))
    batch = next(iter(loaders.pm_dataset(source, ByteTokenizer(), max_len=128, global_batch=2,
                                         seed=0, process_index=0, process_count=1)))
    assert batch["subset_B"].tolist() == ["helpful-base"] * 2


def test_hh_builder_per_subset_and_strict(tmp_path):
    src = _source(tmp_path)
    builder = tfds_builders.prepare("hh_rlhf/helpful-base", tmp_path / "tfds", source_dir=src)
    subsets = {tfds_builders.comparison_from_record(r).subset
               for name in builder.info.splits for r in builder.as_data_source(split=name)}
    assert subsets == {"helpful-base"}
    with pytest.raises(hh.DataError, match=r"harmless-base/test.jsonl.gz:3: identical"):
        tfds_builders.prepare("hh_rlhf/harmless-base", tmp_path / "tfds", source_dir=src)


def test_stackexchange_builder(tmp_path):
    site = tmp_path / "se" / "tea"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
        '<row Id="1" PostTypeId="1" Score="2" Title="Green or black?" Body="?"/>\n'
        '<row Id="2" PostTypeId="2" ParentId="1" Score="9" Body="Green" OwnerUserId="3"/>\n'
        '<row Id="3" PostTypeId="2" ParentId="1" Score="0" Body="Black" OwnerUserId="4"/>\n'
        "</posts>\n", encoding="utf-8")
    builder = tfds_builders.prepare("stackexchange_pmp/binarized", tmp_path / "tfds",
                                    source_dir=tmp_path / "se")
    records = [tfds_builders.comparison_from_record(r)
               for name in builder.info.splits for r in builder.as_data_source(split=name)]
    assert sorted((c.chosen, c.rejected) for c in records) == [
        (" Black\n\n[BAD]", " Black\n\n[GOOD]"), (" Green\n\n[GOOD]", " Green\n\n[BAD]")]
    assert all(c.attribution.startswith("tea.stackexchange.com q/1") for c in records)
    assert builder.info.metadata["report"]["total"]["extra"]["pairs_diff_pmp_score"] == 1
