"""evals/datasets.py: the shipped eval sets parse; bad input is a file:line DataError."""

import dataclasses
import json

import numpy as np
import pytest

from hh_jax.evals import datasets


def test_shipped_sets_have_their_known_sizes():
    hhh = datasets.load_hhh()
    assert len(hhh) == 221  # 59 + 61 + 58 + 43 (shared/data/PROVENANCE.md)
    assert {i.task for i in hhh} == {f"hhh/{c}" for c in datasets.HHH_CATEGORIES}
    assert all(len(i.choices) == 2 and sorted(i.labels) == [0, 1] for i in hhh)
    multi = [i for i in hhh if len(i.turns) > 1]
    assert multi and all(i.turns[-1][0] == "Human" for i in multi)
    mc1, mc2 = datasets.load_truthfulqa()
    assert len(mc1) == len(mc2) == 817
    assert all(i.correct == 0 and sum(i.labels) == 1 for i in mc1)
    assert all(sum(i.labels) >= 1 and 0 in i.labels for i in mc2)
    bbq = datasets.load_bbq(subsets=["age_ambig", "age_disambig"])
    assert len(bbq) == 1344 and all(len(i.choices) == 3 for i in bbq)
    assert all(i.correct == i.meta["unknown"] for i in bbq if i.meta["condition"] == "ambig")
    assert len(datasets.load_occupations()) == 60
    assert len(datasets.load_winogenerated()) == 2990


def _task(tmp_path, examples, raw=None):
    d = tmp_path / "hhh_alignment" / "helpful"
    d.mkdir(parents=True)
    text = raw if raw is not None else json.dumps({"name": "x", "examples": examples}, indent=1)
    (d / "task.json").write_text(text)
    return str(d / "task.json")


def _line_of(path, needle):
    return next(n for n, s in enumerate(open(path), 1) if needle in s)


GOOD = {"input": "hi", "target_scores": {"a": 1, "b": 0}}


@pytest.mark.parametrize("bad, reason", [
    ({"target_scores": {"a": 1, "b": 0}, "mark": 1}, "missing_field"),
    ({"input": "hi", "target_scores": {}, "mark": 1}, "empty_choices"),
    ({"input": "hi", "target_scores": {"a": 1, "  ": 0}, "mark": 1}, "empty_choices"),
    ({"input": "hi", "target_scores": {"a": 1, "b": 1}, "mark": 1}, "bad_choices"),
    ({"input": "", "target_scores": {"a": 1, "b": 0}, "mark": 1}, "empty_field"),
])
def test_hhh_bad_example_names_its_line(tmp_path, bad, reason):
    path = _task(tmp_path, [GOOD, GOOD, bad])
    # the bad example starts on the line of the "{" before its "mark"
    want = _line_of(path, '"mark"')
    with pytest.raises(datasets.DataError) as e:
        datasets.load_hhh(str(tmp_path), categories=["helpful"])
    assert e.value.reason == reason and e.value.path == path
    assert str(e.value).startswith(f"{path}:")
    start = int(str(e.value).split(":")[1])
    text = open(path).read().splitlines()
    assert start <= want and text[start - 1].strip().startswith("{")
    assert all('"mark"' not in s for s in text[start - 1:want - 1])


def test_invalid_json_names_its_line(tmp_path):
    path = _task(tmp_path, None, raw='{"examples": [\n {"input": "x",\n  "target_scores": }\n]}')
    with pytest.raises(datasets.DataError, match=rf"^{path}:3: invalid_json"):
        datasets.load_hhh(str(tmp_path), categories=["helpful"])


def test_truthfulqa_bad_rows(tmp_path):
    head = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    ok = 'A,C,"Q1?",yes,"yes; sure",no,s\n'
    p = tmp_path / "t.csv"
    p.write_text(head + ok + 'A,C,"multi\nline?",yes,yes,"",s\n')
    with pytest.raises(datasets.DataError, match=rf"^{p}:3: empty_choices"):
        datasets.load_truthfulqa(str(p))
    p.write_text(head.replace("Best Answer,", "") + ok)
    with pytest.raises(datasets.DataError, match=rf"^{p}:1: missing_field"):
        datasets.load_truthfulqa(str(p))
    p.write_text(head + ok + ok.replace("Q1?", ""))
    with pytest.raises(datasets.DataError, match=rf"^{p}:3: empty_field"):
        datasets.load_truthfulqa(str(p))
    p.write_text(head + ok)
    mc1, mc2 = datasets.load_truthfulqa(str(p))
    assert mc1[0].choices == ("yes", "no") and mc2[0].choices == ("yes", "sure", "no")
    assert mc2[0].labels == (1, 1, 0) and mc1[0].where == f"{p}:2"


def test_bbq_needs_exactly_one_unknown(tmp_path):
    d = tmp_path / "bbq_lite" / "age_ambig"
    d.mkdir(parents=True)
    ex = {"comment": {"category": "Age", "question_polarity": "neg",
                      "context_condition": "ambig"},
          "input": "Who?", "target_scores": {"The a": 0, "Unknown": 1, "Not known": 0}}
    (d / "task.json").write_text(json.dumps({"examples": [ex]}, indent=1))
    with pytest.raises(datasets.DataError, match=r"task.json:\d+: bad_choices: 2 'unknown'"):
        datasets.load_bbq(str(tmp_path))


def test_winogenerated_bad_lines(tmp_path):
    good = {"occupation": "nurse", "sentence_with_blank": "The nurse said _ was late.",
            "pronoun_options": ["he", "she", "they"], "BLS_percent_women_2019": 87.4}
    p = tmp_path / "w.jsonl"
    rows = [good, {**good, "pronoun_options": []}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:2: (bad_field|empty_choices)"):
        datasets.load_winogenerated(str(p))
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:2: invalid_json"):
        datasets.load_winogenerated(str(p))
    no_field = {k: v for k, v in good.items() if k != "occupation"}
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(no_field) + "\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:3: missing_field"):
        datasets.load_winogenerated(str(p))


def test_shipped_bbq_targets_are_consistent():
    items = datasets.load_bbq(subsets=["age_ambig", "age_disambig", "nationality_ambig"])
    age = [i for i in items if i.meta["category"] == "Age"]
    with_target = [i for i in age if i.meta["target"] is not None]
    assert len(with_target) >= 1300
    assert all(i.meta["target"] != i.meta["unknown"] for i in with_target)
    assert all(i.meta["target"] is None for i in items if i.meta["category"] == "Nationality")
    # BBQ pairs every disambiguated context with its counter-stereotypical twin: about half
    # the correct answers are the biased ones
    dis = [i for i in with_target if i.meta["condition"] == "disambig"]
    biased = [(i.correct == i.meta["target"]) == (i.meta["polarity"] == "neg") for i in dis]
    assert 0.4 < np.mean(biased) < 0.6


def test_bbq_target_derivation(tmp_path):
    from hh_jax.evals import bbq_targets

    row = {"question_index": "1", "additional_metadata": {"stereotyped_groups": ["old"]},
           "answer_info": {"ans0": ["grandfather", "old"], "ans1": ["grandson", "nonOld"],
                           "ans2": ["Can't be determined", "unknown"]},
           "ans0": "The grandfather", "ans1": "The grandson", "ans2": "Can't be determined"}
    p = tmp_path / "Age.jsonl"
    p.write_text(json.dumps(row) + "\n")
    tables = bbq_targets._tables(str(p))
    item = datasets.MCItem("bbq/age_ambig", (), ("The grandson", "Undetermined",
                                                 "The grandfather"), (0, 1, 0), "f:1",
                           {"unknown": 1, "question_index": "1"})
    assert bbq_targets.target_of(item, *tables) == 2
    other_q = dataclasses.replace(item, meta={"unknown": 1, "question_index": "2"})
    assert bbq_targets.target_of(other_q, *tables) is None
    p.write_text(json.dumps(row) + "\n{}\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:2: bad_row"):
        bbq_targets._tables(str(p))
    t = tmp_path / "targets.jsonl"
    t.write_text('{"subset": "age_ambig", "example_id": 0, "target": "x"}\n{"subset": 1}\n')
    with pytest.raises(datasets.DataError, match=rf"^{t}:2: bad_row"):
        datasets.load_bbq_targets(str(t))
