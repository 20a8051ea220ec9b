"""StackExchange → PMP comparisons on a hand-made dump and on the shipped ones."""

import os
import re

import pytest

from hh_jax.data import hh, stackexchange

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SE_DIR = os.path.join(REPO, "data", "stackexchange")

# q1: answers 11 (5 votes, accepted), 12 (5), 13 (0), 14 (-2); q2: one answer; 30 orphan.
POSTS = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" AcceptedAnswerId="11" Score="3" Title="Best grind?" \
Body="&lt;p&gt;For &amp;amp; drip?&lt;/p&gt;" OwnerUserId="7" />
  <row Id="11" PostTypeId="2" ParentId="1" Score="5" Body="&lt;p&gt;Medium.&lt;/p&gt;" \
OwnerUserId="8" />
  <row Id="12" PostTypeId="2" ParentId="1" Score="5" Body="Fine" OwnerUserId="9" />
  <row Id="13" PostTypeId="2" ParentId="1" Score="0" Body="Coarse" />
  <row Id="14" PostTypeId="2" ParentId="1" Score="-2" Body="Whatever" />
  <row Id="2" PostTypeId="1" Score="1" Title="Alone" Body="q" />
  <row Id="21" PostTypeId="2" ParentId="2" Score="4" Body="only answer" />
  <row Id="30" PostTypeId="2" ParentId="99" Score="4" Body="orphan" />
  <row Id="40" PostTypeId="4" Body="tag wiki" />
</posts>
"""


def _write(tmp_path, text, site="coffee"):
    (tmp_path / site).mkdir(exist_ok=True)
    path = tmp_path / site / "Posts.xml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("votes, accepted, score", [
    (-3, False, -1), (-1, True, -1), (0, False, 0), (0, True, 1), (1, False, 1), (2, False, 2),
    (3, False, 2), (5, False, 3), (5, True, 4), (10, False, 3), (100, False, 7)])
def test_pmp_score_table(votes, accepted, score):
    assert stackexchange.pmp_score(votes, accepted) == score


def test_html_to_text():
    got = stackexchange.html_to_text("<p>Hi &amp; <b>bye</b> &amp;lt;</p>\n<ul><li>x</li></ul>")
    assert got == "Hi & bye &lt;\n\n- x"


def test_hand_made_dump_ranked_and_binarized(tmp_path):
    path = _write(tmp_path, POSTS)
    ranked, report = stackexchange.load_stackexchange(path, binarize=False)
    # scores: 11 → 3+1 = 4, 12 → 3, 13 → 0, 14 → -1: all six pairs differ.
    order = [tuple(re.findall(r"a/\d+", c.attribution)) for c in ranked]
    assert order == [("a/11", "a/12"), ("a/11", "a/13"), ("a/11", "a/14"), ("a/12", "a/13"),
                     ("a/12", "a/14"), ("a/13", "a/14")]
    extra = report.total.extra
    assert (extra["questions"], extra["answers"], extra["orphan_answers"]) == (2, 5, 1)
    assert (extra["pairs_diff_votes"], extra["pairs_diff_pmp_score"]) == (5, 6)
    first = ranked[0]
    assert first.context == "\n\nHuman: Best grind?\n\nFor & drip?\n\nAssistant:"
    assert (first.chosen, first.rejected) == (" Medium.", " Fine")
    assert first.subset == "stackexchange/coffee" and first.line == 4
    assert first.attribution.startswith("coffee.stackexchange.com q/1 a/11 (user 8, score 5)")
    binary, _ = stackexchange.load_stackexchange(path, binarize=True)
    assert len(binary) == 12
    assert (binary[0].chosen, binary[0].rejected) == (" Medium.\n\n[GOOD]", " Medium.\n\n[BAD]")
    assert (binary[1].chosen, binary[1].rejected) == (" Fine\n\n[BAD]", " Fine\n\n[GOOD]")


@pytest.mark.parametrize("row, line, reason", [
    ('<row Id="5" PostTypeId="2" ParentId="1" Body="x" />', 4, "missing_attribute"),
    ('<row Id="5" PostTypeId="2" ParentId="1" Score="many" Body="x" />', 4, "bad_attribute"),
    ('<row Id="1" PostTypeId="2" ParentId="1" Score="1" Body="x" />', 4, "duplicate_id"),
    ('<row Id="5" PostTypeId="2" ParentId="1" Score="1" Body="x" >', 6, "xml_error"),
])
def test_bad_rows_name_their_line(tmp_path, row, line, reason):
    text = ('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
            '  <row Id="1" PostTypeId="1" Score="1" Title="t" Body="b" />\n'
            f"  {row}\n  <row Id=\"6\" PostTypeId=\"2\" ParentId=\"1\" Score=\"3\" Body=\"y\" />\n"
            "</posts>\n")
    path = _write(tmp_path, text)
    with pytest.raises(hh.DataError) as info:
        stackexchange.load_stackexchange(path)
    assert str(info.value).startswith(f"{path}:{line}: {reason}: ")
    _, report = stackexchange.load_stackexchange(path, skip_invalid=True)
    total = report.total
    assert dict(total.skipped) == {reason: 1}
    assert total.rows == total.extra["valid_rows"] + 1


def test_invalid_utf8_is_an_xml_error(tmp_path):
    path = tmp_path / "beer"
    path.mkdir()
    (path / "Posts.xml").write_bytes(b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
                                     b'  <row Id="1" Body="\xff" />\n</posts>\n')
    with pytest.raises(hh.DataError, match=r"Posts.xml:3: xml_error: not well-formed"):
        stackexchange.load_stackexchange(str(path / "Posts.xml"))


def test_shipped_dumps_match_provenance():
    """PROVENANCE.md: 2196 / 150 / 3775 differing-score answer pairs (beer, coffee,
    matheducators); 663 / 225 / 397 questions, 1572 / 327 / 1507 answers."""
    comps, report = stackexchange.load_stackexchange(SE_DIR, binarize=True)
    by_site = {r.path.split(os.sep)[0]: r.extra for r in report.files}
    assert {s: x["pairs_diff_votes"] for s, x in by_site.items()} == \
        {"beer": 2196, "coffee": 150, "matheducators": 3775}
    assert {s: (x["questions"], x["answers"]) for s, x in by_site.items()} == \
        {"beer": (663, 1572), "coffee": (225, 327), "matheducators": (397, 1507)}
    pmp = {s: x["pairs_diff_pmp_score"] for s, x in by_site.items()}
    assert len(comps) == 2 * sum(pmp.values())
    assert all(c.attribution and c.subset.startswith("stackexchange/") for c in comps)
