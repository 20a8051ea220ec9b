"""Train/held-out split and nested data fractions."""

import gzip
import hashlib
import json
import math
import os
import random
import re

import hypothesis.strategies as st
from hypothesis import given, settings

from hh_jax.data import hh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_DIR = os.path.join(REPO, "data", "hh-rlhf")


def _comp(first_human, tail="", subset="s", line=1):
    ctx = f"\n\nHuman: {first_human}\n\nAssistant: ok{tail}\n\nHuman: more\n\nAssistant:"
    row = json.dumps({"chosen": ctx + " a", "rejected": ctx + " b"}).encode()
    return hh.parse_hh_line(row, "f", line, subset)


def test_split_rule_by_hand():
    for text in ["Hi", "  Hi \n", "How do I bake bread?", ""]:
        digit = hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[0]
        assert hh.split_of(text) == ("heldout" if digit in "0123" else "train")
    # Two comparisons from one conversation (different later turns) share a side.
    assert _comp("Hello there", " x").split == _comp("  Hello there ", " y").split


def test_shipped_split_counts_and_no_shared_conversation():
    # Independent count over all 8,552 rows, from the raw JSON with the stdlib.
    train = 0
    for subset in hh.SUBSETS:
        with gzip.open(os.path.join(HH_DIR, subset, "test.jsonl.gz"), "rt", encoding="utf-8") as f:
            for line in f:
                first = re.split(r"\n\n(?:Human|Assistant):", json.loads(line)["chosen"])[1]
                train += hashlib.sha256(first.strip().encode()).hexdigest()[0] not in "0123"
    assert train == 6380
    comps, report = hh.load_hh_comparisons(HH_DIR, skip_invalid=True)
    assert dict(report.total.splits) == {"train": 6325, "heldout": 2163}
    sides = {}
    for c in comps:
        assert sides.setdefault(c.first_human, c.split) == c.split
    train_set, held = hh.select_split(comps, "train"), hh.select_split(comps, "heldout")
    assert len(train_set) + len(held) == len(comps)
    assert not {c.first_human for c in train_set} & {c.first_human for c in held}


def test_fractions_nest_on_shipped_data():
    comps, _ = hh.load_hh_comparisons(HH_DIR, skip_invalid=True)
    train = hh.select_split(comps, "train")
    previous = set()
    for f in (0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0):
        chosen = hh.data_fraction(train, f)
        keys = {(c.source, c.line) for c in chosen}
        assert len(keys) == math.ceil(f * len(train))
        assert previous <= keys
        previous = keys
    assert previous == {(c.source, c.line) for c in train}
    # Independent of the order the rows arrive in.
    shuffled = train[:]
    random.Random(0).shuffle(shuffled)
    assert {(c.source, c.line) for c in hh.data_fraction(shuffled, 0.1)} == \
        {(c.source, c.line) for c in hh.data_fraction(train, 0.1)}
    # Every subset is represented in proportion (a hash, not file order, decides).
    tenth = hh.data_fraction(train, 0.1)
    for s in hh.SUBSETS:
        share = sum(c.subset == s for c in tenth) / len(tenth)
        assert abs(share - sum(c.subset == s for c in train) / len(train)) < 0.05


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=6), min_size=1, max_size=40),
       st.floats(0, 1), st.floats(0, 1))
def test_fractions_nest_property(firsts, f1, f2):
    comps = [_comp(t.replace("\n", " ").replace("\r", " "), line=i) for i, t in enumerate(firsts)]
    small, large = sorted((f1, f2))
    a, b = hh.data_fraction(comps, small), hh.data_fraction(comps, large)
    assert len(a) == math.ceil(small * len(comps)) and len(b) == math.ceil(large * len(comps))
    assert {c.line for c in a} <= {c.line for c in b}
