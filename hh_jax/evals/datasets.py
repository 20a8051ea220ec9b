"""Parsers for the shipped evaluation sets (data/evals/, see its PROVENANCE.md).

Evaluation only: never train on these (BIG-bench files carry a canary string).
Every problem in a file is a `DataError` whose message starts with `file:line:` (for a
JSON document, the line where the bad example starts).

  hhh_alignment  BIG-bench HHH eval (Askell et al. 2021): a dialogue, two responses
  truthfulqa     TruthfulQA.csv (Lin et al. 2021): MC1 (best vs incorrect answers) and
                 MC2 (all correct vs all incorrect answers)
  bbq_lite       BIG-bench BBQ-lite (Parrish et al. 2022): 3-way choice with an "unknown"
  winogender     occupations with their share of women (Rudinger et al. 2018)
  winogenerated  model-written Winogender sentences with a blank for a pronoun (Perez et
                 al. 2022)
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import re

from hh_jax import chat
from hh_jax.data.jsonl_reader import DataError, read_json

Turn = tuple[str, str]
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "evals")
HH_DIR = os.path.join(os.path.dirname(DATA_DIR), "hh-rlhf")
HHH_CATEGORIES = ("helpful", "honest", "harmless", "other")
# the "unknown" answers of BBQ (Parrish et al. 2022, the generator's UNKNOWN list)
BBQ_UNKNOWN = ("unknown", "cannot be determined", "can't be determined", "not answerable",
               "not known", "not enough info", "not enough information", "cannot answer",
               "can't answer", "undetermined")


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: `turns` the dialogue up to where the Assistant answers,
    `choices` the candidate answers, `labels` 1 for a correct choice, 0 otherwise."""

    task: str  # e.g. "hhh/helpful", "truthfulqa/mc1", "bbq/age_ambig"
    turns: tuple[Turn, ...]
    choices: tuple[str, ...]
    labels: tuple[int, ...]
    where: str  # "file:line"
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def correct(self) -> int:
        """Index of the (first) correct choice."""
        return self.labels.index(1)


@dataclasses.dataclass(frozen=True)
class Occupation:
    name: str
    pct_female: float  # BLS share of women, percent
    where: str


@dataclasses.dataclass(frozen=True)
class BlankItem:
    """A sentence with one blank `_` and the pronouns that may fill it (winogenerated)."""

    occupation: str
    sentence: str
    pronouns: tuple[str, ...]  # (male, female, neutral) as in the file
    pct_female: float
    where: str


def path_of(name: str, data_dir: str | None = None) -> str:
    return os.path.join(data_dir or DATA_DIR, name)


# ----------------------------------------------------------------------------- JSON documents


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(path, 1, "unreadable", str(e)) from None


def json_examples(path: str) -> tuple[dict, list[tuple[int, object]]]:
    """(document, [(line, example)]) of a BIG-bench task.json: each example with the line
    where it starts, so a bad one can be named by file:line."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, "invalid_json", e.msg) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
        raise DataError(path, 1, "no_examples", 'expected an object with an "examples" list')
    if not doc["examples"]:
        raise DataError(path, 1, "no_examples", '"examples" is empty')
    dec = json.JSONDecoder()
    for m in re.finditer(r'"examples"\s*:\s*\[', text):
        pos, out = m.end(), []
        line, counted = text.count("\n", 0, pos) + 1, pos  # counted incrementally: O(n)
        try:
            while True:
                while text[pos] in " \t\r\n,":
                    pos += 1
                if text[pos] == "]":
                    break
                item, end = dec.raw_decode(text, pos)
                line, counted = line + text.count("\n", counted, pos), pos
                out.append((line, item))
                pos = end
        except (json.JSONDecodeError, IndexError):
            continue
        if [x for _, x in out] == doc["examples"]:
            return doc, out
    return doc, [(1, x) for x in doc["examples"]]  # not located: whole-file position


def _field(ex, key: str, kind, path: str, line: int):
    if not isinstance(ex, dict):
        raise DataError(path, line, "bad_example", f"expected an object, got {type(ex).__name__}")
    if key not in ex:
        raise DataError(path, line, "missing_field", f"no {key!r}")
    if not isinstance(ex[key], kind):
        raise DataError(path, line, "bad_field",
                        f"{key!r} should be {getattr(kind, '__name__', kind)}")
    return ex[key]


def _choices(ex, path: str, line: int, n: int | None = None) -> tuple[list[str], list[int]]:
    scores = _field(ex, "target_scores", dict, path, line)
    if not scores:
        raise DataError(path, line, "empty_choices", "'target_scores' has no choices")
    if n is not None and len(scores) != n:
        raise DataError(path, line, "bad_choices", f"expected {n} choices, got {len(scores)}")
    choices, labels = list(scores), []
    for c, s in scores.items():
        if not c.strip():
            raise DataError(path, line, "empty_choices", "a choice is empty")
        if s not in (0, 1):
            raise DataError(path, line, "bad_choices", f"score {s!r} of {c[:40]!r} is not 0/1")
        labels.append(int(s))
    if sum(labels) != 1:
        raise DataError(path, line, "bad_choices", f"{sum(labels)} correct choices, expected 1")
    return choices, labels


def _text(ex, key: str, path: str, line: int) -> str:
    s = _field(ex, key, str, path, line)
    if not s.strip():
        raise DataError(path, line, "empty_field", f"{key!r} is empty")
    return s


# ----------------------------------------------------------------------------- HHH


def hhh_turns(text: str) -> list[Turn]:
    """An hhh_alignment input: the first Human turn without its marker, later turns with
    "\\n\\nAssistant:" / "\\n\\nHuman:" markers."""
    return chat.turns_of(chat.HUMAN + " " + text.strip())


def load_hhh(data_dir: str | None = None, categories=HHH_CATEGORIES) -> list[MCItem]:
    """HHH alignment, 221 items: two responses, the better one labelled 1."""
    items = []
    for cat in categories:
        path = os.path.join(path_of("hhh_alignment", data_dir), cat, "task.json")
        _, examples = json_examples(path)
        for line, ex in examples:
            text = _text(ex, "input", path, line)
            choices, labels = _choices(ex, path, line, n=2)
            items.append(MCItem(f"hhh/{cat}", tuple(hhh_turns(text)), tuple(choices),
                                tuple(labels), f"{path}:{line}", {"category": cat}))
    return items


# ----------------------------------------------------------------------------- TruthfulQA


_TQA_FIELDS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def _answers(s: str) -> list[str]:
    return [a.strip() for a in s.split(";") if a.strip()]


def load_truthfulqa(path: str | None = None) -> tuple[list[MCItem], list[MCItem]]:
    """(MC1 items, MC2 items) from TruthfulQA.csv. MC1: the best answer against the
    incorrect ones (one correct); MC2: every correct answer against every incorrect one."""
    path = path or os.path.join(path_of("truthfulqa"), "TruthfulQA.csv")
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, 1, "empty_file", "no header") from None
    missing = [f for f in _TQA_FIELDS if f not in header]
    if missing:
        raise DataError(path, 1, "missing_field", f"no column(s) {missing}")
    mc1, mc2 = [], []
    while True:
        ln = reader.line_num + 1  # the line the next record starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, ln, "bad_csv", str(e)) from None
        where = f"{path}:{ln}"
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(path, ln, "bad_row", f"{len(row)} fields, expected {len(header)}")
        get = dict(zip(header, (c.strip() for c in row), strict=True)).get
        q, best = get("Question"), get("Best Answer")
        correct, incorrect = _answers(get("Correct Answers")), _answers(get("Incorrect Answers"))
        for name, v in (("Question", q), ("Best Answer", best)):
            if not v:
                raise DataError(path, ln, "empty_field", f"{name!r} is empty")
        if not incorrect or not correct:
            raise DataError(path, ln, "empty_choices", "no correct or no incorrect answers")
        meta = {"category": get("Category") or ""}
        turns = (("Human", q),)
        wrong = [a for a in incorrect if a != best]
        mc1.append(MCItem("truthfulqa/mc1", turns, (best, *wrong), (1,) + (0,) * len(wrong),
                          where, meta))
        right = [best] + [a for a in correct if a != best]
        wrong2 = [a for a in incorrect if a not in right]
        mc2.append(MCItem("truthfulqa/mc2", turns, (*right, *wrong2),
                          (1,) * len(right) + (0,) * len(wrong2), where, meta))
    if not mc1:
        raise DataError(path, 2, "no_examples", "no questions")
    return mc1, mc2


# ----------------------------------------------------------------------------- BBQ-lite


def bbq_unknown_index(choices, path: str, line: int) -> int:
    hits = [i for i, c in enumerate(choices) if c.strip().rstrip(".").lower() in BBQ_UNKNOWN]
    if len(hits) != 1:
        raise DataError(path, line, "bad_choices",
                        f"{len(hits)} 'unknown' choices among {list(choices)}, expected 1")
    return hits[0]


def load_bbq_targets(path: str) -> dict[tuple[str, int], str]:
    """{(subset, example_id): the choice naming the stereotyped group} (bbq_targets.py)."""
    out = {}
    for line, r in read_json(path, bad_json="bad_row"):
        try:
            out[(r["subset"], int(r["example_id"]))] = r["target"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(path, line, "bad_row", str(e)) from None
    return out


def load_bbq(data_dir: str | None = None, subsets=None, targets: str | None = "auto"
             ) -> list[MCItem]:
    """BBQ-lite (BIG-bench bbq_lite_json): one item per example, with meta category,
    condition ("ambig" | "disambig"), polarity ("neg" | "nonneg"), the index of the
    "unknown" choice, and `target`, the index of the choice naming the stereotyped group
    where `targets` (default: bbq_lite/targets.jsonl.gz if present) knows it, else None."""
    root = path_of("bbq_lite", data_dir)
    if targets == "auto":
        targets = os.path.join(root, "targets.jsonl.gz")
        targets = targets if os.path.exists(targets) else None
    known = load_bbq_targets(targets) if targets else {}
    paths = sorted(glob.glob(os.path.join(root, "*", "task.json*")))
    if subsets is not None:
        paths = [p for p in paths if os.path.basename(os.path.dirname(p)) in subsets]
    if not paths:
        raise FileNotFoundError(f"no bbq_lite task.json files under {root}")
    items = []
    for path in paths:
        subset = os.path.basename(os.path.dirname(path))
        _, examples = json_examples(path)
        for line, ex in examples:
            text = _text(ex, "input", path, line)
            choices, labels = _choices(ex, path, line, n=3)
            comment = _field(ex, "comment", dict, path, line)
            for key in ("question_polarity", "context_condition", "category"):
                if key not in comment:
                    raise DataError(path, line, "missing_field", f"no comment.{key}")
            if comment["context_condition"] not in ("ambig", "disambig") or \
                    comment["question_polarity"] not in ("neg", "nonneg"):
                raise DataError(path, line, "bad_field", "unknown condition or polarity")
            unknown = bbq_unknown_index(choices, path, line)
            if comment["context_condition"] == "ambig" and labels[unknown] != 1:
                raise DataError(path, line, "bad_choices", "ambiguous, but 'unknown' is wrong")
            target = known.get((subset, comment.get("example_id")))
            if target is not None and target not in choices:
                raise DataError(path, line, "bad_target",
                                f"{targets} names {target!r}, not one of {choices}")
            meta = {"category": comment["category"], "condition": comment["context_condition"],
                    "target": None if target is None else choices.index(target),
                    "polarity": comment["question_polarity"], "unknown": unknown,
                    "example_id": comment.get("example_id"),
                    "question_index": comment.get("question_index")}
            items.append(MCItem(f"bbq/{subset}", (("Human", text),), tuple(choices),
                                tuple(labels), f"{path}:{line}", meta))
    return items


# ----------------------------------------------------------------------------- Winogender


def load_occupations(path: str | None = None) -> list[Occupation]:
    """Winogender's occupations-stats.tsv: occupation and BLS percent female."""
    path = path or os.path.join(path_of("winogender"), "occupations-stats.tsv")
    lines = _read_text(path).splitlines()
    if not lines:
        raise DataError(path, 1, "empty_file", "no header")
    header = lines[0].split("\t")
    for f in ("occupation", "bls_pct_female"):
        if f not in header:
            raise DataError(path, 1, "missing_field", f"no column {f!r}")
    io_, ip = header.index("occupation"), header.index("bls_pct_female")
    out = []
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        row = raw.split("\t")
        if len(row) != len(header) or not row[io_].strip():
            raise DataError(path, n, "bad_row", f"expected {len(header)} tab-separated fields")
        try:
            pct = float(row[ip])
        except ValueError:
            raise DataError(path, n, "bad_field", f"bls_pct_female {row[ip]!r}") from None
        out.append(Occupation(row[io_].strip(), pct, f"{path}:{n}"))
    if not out:
        raise DataError(path, 2, "no_examples", "no occupations")
    return out


def load_winogenerated(path: str | None = None) -> list[BlankItem]:
    """winogenerated_examples.jsonl: one sentence with a single blank `_` per line."""
    path = path or os.path.join(path_of("winogenerated"), "winogenerated_examples.jsonl")
    out = []
    for line, ex in read_json(path):
        sentence = _text(ex, "sentence_with_blank", path, line)
        occupation = _text(ex, "occupation", path, line)
        pronouns = _field(ex, "pronoun_options", list, path, line)
        pct = _field(ex, "BLS_percent_women_2019", (int, float), path, line)
        if len(pronouns) != 3 or not all(isinstance(p, str) and p.strip() for p in pronouns):
            raise DataError(path, line, "empty_choices", "expected 3 non-empty pronoun_options")
        if sentence.count("_") != 1:
            raise DataError(path, line, "bad_field", "sentence_with_blank needs exactly one _")
        out.append(BlankItem(occupation, sentence, tuple(pronouns), float(pct),
                             f"{path}:{line}"))
    if not out:
        raise DataError(path, 1, "no_examples", "no sentences")
    return out
