"""Preference-model pretraining (PMP) comparisons from StackExchange `Posts.xml` dumps.

Recipe after Askell et al. 2021 (PAPER.md §3): pair answers to the same question whose
scores differ, `score = round(log2(1 + votes))` (+1 if the asker accepted it), `-1` for
negative votes. Approximation: the dumps hold the net `Score` (up − down votes), not the
up-votes A21 used, so `votes` here is the net score.

Two output modes:
  * ranked: one comparison per pair, the higher-scored answer chosen;
  * binarized (A21 §4.1): each ranked pair A > B becomes `GOOD:A > BAD:A` and
    `BAD:B > GOOD:B`: the same answer tagged GOOD vs BAD. The tag goes at the END of the
    answer (" <answer>\n\n[GOOD]"): PM inputs are truncated from the left, and a tag at
    the start of a long answer would be cut away, leaving two identical sequences.

Prompts are `"\\n\\nHuman: <title>\\n\\n<question>\\n\\nAssistant:"` with HTML turned into
plain text. Every comparison keeps its attribution (site, post ids, author ids: the
content is CC BY-SA 3.0).
"""

from __future__ import annotations

import html.parser
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from xml.parsers import expat

from hh_jax.data.hh import (
    ASSISTANT,
    Comparison,
    DataError,
    FileReport,
    LoadReport,
    split_of,
)

GOOD, BAD = "[GOOD]", "[BAD]"
_BLOCK_TAGS = {"p", "div", "pre", "blockquote", "li", "ul", "ol", "br", "hr", "h1", "h2", "h3",
               "h4", "h5", "h6", "table", "tr"}


def pmp_score(votes: int, accepted: bool) -> int:
    """A21's answer score: round(log2(1 + votes)) (+1 if accepted); -1 if votes < 0."""
    if votes < 0:
        return -1
    return round(math.log2(1 + votes)) + int(accepted)


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)


def html_to_text(body: str) -> str:
    """Post HTML → plain text: tags dropped, entities decoded, blank-line paragraphs."""
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    lines = "".join(parser.parts).split("\n")
    out, blank = [], False
    for line in (x.rstrip() for x in lines):
        if line:
            if blank and out:
                out.append("")
            out.append(line)
        blank = not line
    return "\n".join(out).strip()  # entities were decoded once, by the parser


def _int_attr(attrs: dict, key: str, where: tuple[str, int], required: bool = True) -> int | None:
    value = attrs.get(key)
    if value is None:
        if required:
            raise DataError(*where, "missing_attribute", f"<row> has no {key} attribute")
        return None
    try:
        return int(value)
    except ValueError:
        raise DataError(*where, "bad_attribute", f"{key}={value!r} is not an integer") from None


def _parse_row(attrs: dict, where: tuple[str, int]) -> dict:
    """The fields we use of one <row>; raises DataError if they are missing or bad."""
    post = dict(id=_int_attr(attrs, "Id", where), type=_int_attr(attrs, "PostTypeId", where),
                line=where[1], user=attrs.get("OwnerUserId", "?"))
    if post["type"] not in (1, 2):  # tag wikis, moderator posts, ...: not used
        return post
    post["score"] = _int_attr(attrs, "Score", where)
    if "Body" not in attrs:
        raise DataError(*where, "missing_attribute", "<row> has no Body attribute")
    post["body"] = html_to_text(attrs["Body"])
    if post["type"] == 1:
        if not attrs.get("Title", "").strip():
            raise DataError(*where, "missing_attribute", "question has no Title")
        post["title"] = attrs["Title"].strip()
        post["accepted"] = _int_attr(attrs, "AcceptedAnswerId", where, required=False)
    else:
        post["parent"] = _int_attr(attrs, "ParentId", where)
        if not post["body"]:
            raise DataError(*where, "empty_response", "answer body is empty")
    return post


def iter_posts(path: str | os.PathLike, report: FileReport | None = None,
               source: str | None = None) -> Iterator[dict | DataError]:
    """Yields each <row> of a Posts.xml as a dict (see `_parse_row`) or a DataError.

    An XML syntax error is yielded once, with the parser's line, and ends the file.
    """
    source = source or str(path)
    rows: list[tuple[int, dict]] = []
    parser = expat.ParserCreate()
    depth = [0]

    def start(name, attrs):
        depth[0] += 1
        if depth[0] == 1 and name != "posts":
            raise DataError(source, parser.CurrentLineNumber, "xml_error",
                            f"root element is <{name}>, expected <posts>")
        if depth[0] == 2 and name == "row":
            rows.append((parser.CurrentLineNumber, attrs))

    def end(name):
        depth[0] -= 1

    parser.StartElementHandler, parser.EndElementHandler = start, end
    with open(path, "rb") as f:
        try:
            for chunk in itertools.chain(iter(lambda: f.read(1 << 20), b""), [None]):
                parser.Parse(chunk or b"", chunk is None)
                yield from _emit(rows, source, report)
        except expat.ExpatError as e:
            yield from _emit(rows, source, report)
            if report is not None:
                report.rows += 1  # the unreadable rest counts as one bad row
            yield DataError(source, e.lineno, "xml_error", expat.errors.messages[e.code])
        except DataError as e:
            if report is not None:
                report.rows += 1
            yield e


def _emit(rows: list, source: str, report: FileReport | None) -> Iterator[dict | DataError]:
    for line, attrs in rows:
        if report is not None:
            report.rows += 1
        try:
            yield _parse_row(attrs, (source, line))
        except DataError as e:
            yield e
    rows.clear()


def _site_of(path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or "unknown"


def pairs_from_posts(posts: Sequence[dict], report: FileReport) -> list[tuple[dict, dict, dict]]:
    """[(question, better answer, worse answer)] for answers whose PMP scores differ."""
    questions = {p["id"]: p for p in posts if p["type"] == 1}
    answers: dict[int, list[dict]] = {}
    for p in posts:
        if p["type"] == 2:
            if p["parent"] in questions:
                answers.setdefault(p["parent"], []).append(p)
            else:
                report.extra["orphan_answers"] += 1  # partial dump: question not included
        elif p["type"] != 1:
            report.extra["other_posts"] += 1
    report.extra["questions"] += len(questions)
    report.extra["answers"] += sum(map(len, answers.values()))
    pairs = []
    for qid in sorted(answers):
        q = questions[qid]
        for a, b in itertools.combinations(sorted(answers[qid], key=lambda p: p["id"]), 2):
            report.extra["pairs_diff_votes"] += a["score"] != b["score"]
            sa, sb = (pmp_score(p["score"], p["id"] == q["accepted"]) for p in (a, b))
            if sa != sb:
                pairs.append((q, a, b) if sa > sb else (q, b, a))
    report.extra["pairs_diff_pmp_score"] += len(pairs)
    return pairs


def pair_comparisons(site: str, source: str, q: dict, good: dict, bad: dict, binarize: bool
                     ) -> list[Comparison]:
    """One ranked comparison, or A21's two binarized ones, for a (question, good, bad)."""
    first = f"{q['title']}\n\n{q['body']}".strip()
    context = f"\n\nHuman: {first}{ASSISTANT}"
    common = dict(subset=f"stackexchange/{site}", context=context, first_human=first,
                  source=source, split=split_of(first))
    where = f"{site}.stackexchange.com q/{q['id']}"
    a, b = (f"a/{p['id']} (user {p['user']}, score {p['score']})" for p in (good, bad))
    if not binarize:
        return [Comparison(chosen=" " + good["body"], rejected=" " + bad["body"],
                           line=good["line"], attribution=f"{where} {a} > {b}", **common)]
    return [
        Comparison(chosen=f" {good['body']}\n\n{GOOD}", rejected=f" {good['body']}\n\n{BAD}",
                   line=good["line"], attribution=f"{where} {a}: GOOD > BAD", **common),
        Comparison(chosen=f" {bad['body']}\n\n{BAD}", rejected=f" {bad['body']}\n\n{GOOD}",
                   line=bad["line"], attribution=f"{where} {b}: BAD > GOOD", **common),
    ]


def find_posts_files(paths_or_dir) -> list[tuple[str, str]]:
    """[(path, name relative to its root)] of Posts.xml files under files/directories."""
    items = [paths_or_dir] if isinstance(paths_or_dir, str | os.PathLike) else paths_or_dir
    found = []
    for item in map(str, items):
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                found += [(os.path.join(root, n), os.path.relpath(os.path.join(root, n), item))
                          for n in sorted(names) if n.endswith(".xml")]
        elif os.path.exists(item):
            found.append((item, item))
        else:
            raise FileNotFoundError(f"{item}: no such file")
    if not found:
        raise FileNotFoundError(f"no Posts.xml files in {items}")
    return found


def load_stackexchange(paths_or_dir, *, binarize: bool = True, skip_invalid: bool = False,
                       sites: Iterable[str] | None = None) -> tuple[list[Comparison], LoadReport]:
    """PMP comparisons from Posts.xml files (site = folder name); see the module doc.

    Raises the first DataError unless `skip_invalid`, which counts bad rows by reason.
    `report.extra` holds questions, answers, orphan answers and pair counts.
    """
    comps, reports = [], []
    for path, rel in find_posts_files(paths_or_dir):
        site = _site_of(path)
        if sites is not None and site not in sites:
            continue
        report, posts, seen = FileReport(rel, kind="stackexchange"), [], set()
        for item in iter_posts(path, report):  # errors name the real path
            if not isinstance(item, DataError) and item["id"] in seen:
                item = DataError(path, item["line"], "duplicate_id", f"Id {item['id']} repeats")
            if isinstance(item, DataError):
                if not skip_invalid:
                    raise item
                report.add_error(item)
                continue
            seen.add(item["id"])
            posts.append(item)
        report.extra["valid_rows"] = len(posts)  # rows == valid_rows + sum(skipped)
        for q, good, bad in pairs_from_posts(posts, report):
            for comp in pair_comparisons(site, rel, q, good, bad, binarize):
                report.add(comp)
                comps.append(comp)
        reports.append(report)
    return comps, LoadReport(reports)
