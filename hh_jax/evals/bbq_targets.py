"""The stereotyped target of each BBQ-lite item, for the BBQ paper's bias score.

BIG-bench's bbq_lite_json files say which answer is correct but not which answer names
the group a stereotype targets, which the bias score needs (mc.bbq_bias_scores). The
original BBQ release (nyu-mll/BBQ, data/<Category>.jsonl, CC-BY-4.0) has it: each row's
`additional_metadata.stereotyped_groups` and each answer's group in `answer_info`. The
BBQ-lite files come from an earlier BBQ version (different example ids and some different
words), so items are joined by (category, question_index) → stereotyped groups and by
(question_index, answer words) → the answer's group; an item gets a target when exactly
one of its two non-unknown answers belongs to a stereotyped group.

`build(bbq_data_dir, out_path)` writes the shipped data/evals/bbq_lite/targets.jsonl.gz
(see data/evals/PROVENANCE.md for the source commit and what it covers).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re

from hh_jax.evals import datasets

# BBQ data file → BBQ-lite subset prefix
CATEGORIES = {"Age": "age", "Disability_status": "disability_status",
              "Gender_identity": "gender_identity", "Nationality": "nationality",
              "Physical_appearance": "physical_appearance", "Race_ethnicity": "race_ethnicity",
              "Religion": "religion", "SES": "ses", "Sexual_orientation": "sexual_orientation"}


def _words(answer: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", answer.strip().lower().rstrip("."))


def _tables(path: str):
    stereo, group, group_any = (collections.defaultdict(set) for _ in range(3))
    with open(path) as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                r = json.loads(raw)
                q = str(r["question_index"])
                stereo[q].update(g.lower() for g in r["additional_metadata"]["stereotyped_groups"])
                for k in ("ans0", "ans1", "ans2"):
                    g = r["answer_info"][k][1].lower()
                    if g != "unknown":
                        group[(q, _words(r[k]))].add(g)
                        group_any[_words(r[k])].add(g)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                raise datasets.DataError(path, line, "bad_row", str(e)) from None
    return stereo, group, group_any


def target_of(item: datasets.MCItem, stereo, group, group_any) -> int | None:
    """Index of the choice naming a stereotyped group, or None when not exactly one does
    (or an answer's group is unknown)."""
    q = str(item.meta.get("question_index"))
    if q not in stereo:
        return None
    hits = []
    for k, choice in enumerate(item.choices):
        if k == item.meta["unknown"]:
            continue
        g = group.get((q, _words(choice))) or group_any.get(_words(choice))
        if not g:
            return None
        if g & stereo[q]:
            hits.append(k)
    return hits[0] if len(hits) == 1 else None


def build(bbq_data_dir: str, out_path: str, data_dir: str | None = None) -> dict[str, int]:
    """targets.jsonl.gz rows {"subset", "example_id", "target": choice text}; returns the
    items with a target per category (a category whose BBQ file is absent is skipped)."""
    rows, counts = [], {}
    for cat, prefix in CATEGORIES.items():
        path = os.path.join(bbq_data_dir, f"{cat}.jsonl")
        if not os.path.exists(path):
            continue
        tables = _tables(path)
        items = datasets.load_bbq(data_dir, subsets=[f"{prefix}_ambig", f"{prefix}_disambig"],
                                  targets=None)
        n = 0
        for it in items:
            t = target_of(it, *tables)
            if t is not None:
                rows.append({"subset": it.task.split("/", 1)[1],
                             "example_id": it.meta["example_id"], "target": it.choices[t]})
                n += 1
        counts[cat] = n
    with gzip.GzipFile(out_path, "wb", mtime=0) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return counts
