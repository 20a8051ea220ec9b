"""HH-RLHF comparisons: dialogue parsing, validation, splits, fractions (lines come from
hh_jax.data.jsonl_reader, which streams jsonl(.gz) files with file:line errors).

A row of the official files is `{"chosen": str, "rejected": str}`, two full transcripts
`"\\n\\nHuman: ...\\n\\nAssistant: ..."` identical up to the last Assistant turn (PAPER.md
§1.3). We split every row into the shared context (up to and including the final
`"\\n\\nAssistant:"`) and the two final responses, so `context + chosen` is the original
chosen transcript byte for byte.

Every problem is a `DataError` whose message starts with `file:line: reason:`. Loaders
raise the first one, or with `skip_invalid=True` count them by reason in a `FileReport`
(`rows == comparisons + sum(skipped)` always holds: nothing is lost silently).
Split rule (fixed; other stages quote it): a conversation is held-out iff
`sha256(first_human_turn.strip())` in hex starts with 0-3 (about 25%), else train.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from hh_jax.data.jsonl_reader import MAX_LINE_BYTES, DataError, read_json, read_lines

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HELDOUT_DIGITS = "0123"
FRACTION_SALT = "hh_jax/data-fraction/v1"
MAX_LISTED_ERRORS = 20  # errors kept verbatim per file; the rest are only counted
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")  # HHH
_TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One preference comparison; the PM should score `chosen` above `rejected`."""

    subset: str  # e.g. "helpful-base", or "stackexchange/coffee"
    context: str  # dialogue up to and including the final "\n\nAssistant:"
    chosen: str  # preferred final response, raw (usually starts with a space)
    rejected: str
    first_human: str  # first Human turn, stripped: the key of the train/held-out split
    source: str  # file the row came from
    line: int  # 1-based line (jsonl) or <row> line (Posts.xml)
    split: str  # "train" or "heldout" (see `split_of`)
    attribution: str = ""  # StackExchange: site and post ids (CC BY-SA)


@dataclasses.dataclass
class FileReport:
    """Counts of one file (or, after `merge`, of many)."""

    path: str
    kind: str = "hh"  # "hh" | "stackexchange"
    rows: int = 0  # non-blank lines / <row> elements read, valid or not
    blank: int = 0  # whitespace-only lines, ignored
    comparisons: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list = dataclasses.field(default_factory=list)  # first MAX_LISTED_ERRORS
    subsets: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    splits: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    extra: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_error(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append(err)

    def add(self, comp: Comparison) -> None:
        self.comparisons += 1
        self.subsets[comp.subset] += 1
        self.splits[comp.split] += 1

    def merge(self, other: FileReport) -> FileReport:
        out = FileReport(self.path, self.kind)
        for r in (self, other):
            out.rows, out.blank = out.rows + r.rows, out.blank + r.blank
            out.comparisons += r.comparisons
            out.errors = (out.errors + r.errors)[:MAX_LISTED_ERRORS]
            for name in ("skipped", "subsets", "splits", "extra"):
                getattr(out, name).update(getattr(r, name))
        return out

    def to_json(self) -> dict:
        """Plain-JSON counts (errors as strings), e.g. for TFDS metadata or summaries."""
        out = {k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v
               for k, v in vars(self).items()}
        return {**out, "errors": [str(e) for e in self.errors]}


@dataclasses.dataclass
class LoadReport:
    """Per-file reports of one load and their total."""

    files: list[FileReport]

    @property
    def total(self) -> FileReport:
        total = FileReport("<total>", self.files[0].kind if self.files else "hh")
        for r in self.files:
            total = total.merge(r)
        total.path = "<total>"
        return total

    def to_json(self) -> dict:
        return dict(files=[r.to_json() for r in self.files], total=self.total.to_json())


# ----------------------------------------------------------------------------- parsing


def split_turns(transcript: str) -> list[tuple[str, str]]:
    """[(role, text)] of `"\\n\\nHuman: ...\\n\\nAssistant: ..."`; text keeps its spaces.

    Only `\\n\\nHuman:` / `\\n\\nAssistant:` (or the same at the very start) open a turn;
    "Human:" inside a line is text. Text before the first turn is returned as role "".
    """
    marks = list(_TURN_RE.finditer(transcript))
    turns = []
    if not marks or transcript[: marks[0].start()].strip():
        turns.append(("", transcript[: marks[0].start()] if marks else transcript))
    for m, nxt in zip(marks, marks[1:] + [None], strict=True):
        turns.append((m.group(1), transcript[m.end(): nxt.start() if nxt else len(transcript)]))
    return turns


def split_of(first_human: str) -> str:
    """The fixed train/held-out rule: held-out iff sha256(text)[0] in "0123" (~25%)."""
    digest = hashlib.sha256(first_human.strip().encode("utf-8")).hexdigest()
    return "heldout" if digest[0] in HELDOUT_DIGITS else "train"


def first_human_turn(context: str) -> str | None:
    """Stripped text of the first turn if it is a Human turn, else None."""
    turns = split_turns(context)
    return turns[0][1].strip() if turns and turns[0][0] == "Human" else None


def split_comparison(chosen: str, rejected: str, where: tuple[str, int]
                     ) -> tuple[str, str, str, str]:
    """(context, chosen response, rejected response, first human turn); raises DataError."""
    path, line = where
    if chosen == rejected:
        raise DataError(path, line, "identical", "chosen == rejected")
    parts = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(path, line, "no_assistant", f"{key} has no '\\n\\nAssistant:' turn")
        context, response = text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]
        if not response.strip():
            raise DataError(path, line, "empty_response", f"{key}'s final response is empty")
        parts.append((context, response))
    (context, good), (other_context, bad) = parts
    if context != other_context:
        at = next((i for i, (a, b) in enumerate(zip(context, other_context, strict=False))
                   if a != b), min(len(context), len(other_context)))
        raise DataError(path, line, "context_mismatch",
                        f"chosen and rejected differ before the final Assistant turn "
                        f"(at character {at})")
    first = first_human_turn(context)
    if first is None:
        raise DataError(path, line, "no_human", "the dialogue does not start with a Human turn")
    return context, good, bad, first


def parse_hh_line(raw: bytes, path: str, line: int, subset: str, source: str | None = None
                  ) -> Comparison:
    """Validates one jsonl row and splits it into a Comparison; raises DataError.

    Errors name `path`; the Comparison records `source` (default: `path`).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, "invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
    if line == 1:
        text = text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, "invalid_json", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(path, line, "invalid_json", "nested too deeply") from None
    if not isinstance(row, dict):
        raise DataError(path, line, "not_object",
                        f"expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(path, line, "missing_key", f"no {key!r} key")
        if not isinstance(row[key], str):
            raise DataError(path, line, "not_string",
                            f"{key!r} is {type(row[key]).__name__}, not a string")
        try:
            row[key].encode("utf-8")
        except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates
            raise DataError(path, line, "invalid_utf8", f"{key!r} has a lone surrogate") from None
    context, good, bad, first = split_comparison(row["chosen"], row["rejected"], (path, line))
    return Comparison(subset=subset, context=context, chosen=good, rejected=bad,
                      first_human=first, source=source or path, line=line,
                      split=split_of(first))


def subset_of(path: str | os.PathLike) -> str:
    """Official layout `<subset>/<split>.jsonl.gz`: the subset is the folder name."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or "unknown"


def iter_hh_file(path: str | os.PathLike, report: FileReport | None = None, *,
                 subset: str | None = None, source: str | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Comparison | DataError]:
    """Yields a Comparison or a DataError per non-blank row; counts rows into `report`.

    Errors name the file as `path`; comparisons record `source` (default: `path`).
    """
    subset = subset or subset_of(path)
    for line, raw in read_lines(path, max_line_bytes):
        if not isinstance(raw, DataError) and not raw.strip():
            if report is not None:
                report.blank += 1
            continue
        if report is not None:
            report.rows += 1
        if isinstance(raw, DataError):
            yield raw
            continue
        try:
            yield parse_hh_line(raw, str(path), line, subset, source)
        except DataError as e:
            yield e


def find_hh_files(paths_or_dir: str | os.PathLike | Iterable, subsets: Sequence[str] | None
                  = None, files: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """[(path, name relative to its root)] of HH jsonl(.gz) files, sorted.

    A directory is searched for `<subset>/<name>.jsonl[.gz]` (the official layout) and for
    jsonl files directly inside it. `subsets` filters by folder name, `files` by stem
    ("train", "test").
    """
    items = [paths_or_dir] if isinstance(paths_or_dir, str | os.PathLike) else paths_or_dir
    found = []
    for item in map(str, items):
        if not os.path.isdir(item):
            if not os.path.exists(item):
                raise FileNotFoundError(f"{item}: no such file")
            found.append((item, item))
            continue
        for root, _, names in sorted(os.walk(item)):
            for name in sorted(names):
                if name.endswith((".jsonl", ".jsonl.gz")):
                    full = os.path.join(root, name)
                    found.append((full, os.path.relpath(full, item)))
    out = [(p, rel) for p, rel in found
           if (subsets is None or subset_of(p) in subsets)
           and (files is None or os.path.basename(p).split(".")[0] in files)]
    if not out:
        raise FileNotFoundError(f"no HH .jsonl[.gz] files in {items} (subsets={subsets}, "
                                f"files={files})")
    return out


def load_hh_comparisons(paths_or_dir, *, subsets: Sequence[str] | None = None,
                        files: Sequence[str] | None = None, skip_invalid: bool = False,
                        max_line_bytes: int = MAX_LINE_BYTES
                        ) -> tuple[list[Comparison], LoadReport]:
    """Loads HH comparisons from files or an official-layout directory.

    Raises the first DataError unless `skip_invalid`, which counts invalid rows by reason
    in the returned report instead. `source` of each row is relative to its directory.
    """
    comps, reports = [], []
    for path, rel in find_hh_files(paths_or_dir, subsets, files):
        report = FileReport(rel)
        for item in iter_hh_file(path, report, source=rel, max_line_bytes=max_line_bytes):
            if isinstance(item, DataError):
                if not skip_invalid:
                    raise item
                report.add_error(item)
            else:
                report.add(item)
                comps.append(item)
        reports.append(report)
    return comps, LoadReport(reports)


# ----------------------------------------------------------------------------- selection


def select_split(comparisons: Iterable[Comparison], split: str) -> list[Comparison]:
    """Comparisons on one side ("train" / "heldout") of the fixed hash split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [c for c in comparisons if c.split == split]


def fraction_key(comp: Comparison) -> str:
    """Order for data fractions: independent of the split hash and of file order."""
    ident = "\0".join((FRACTION_SALT, comp.first_human, comp.subset, comp.context,
                       comp.chosen, comp.rejected))
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()


def data_fraction(comparisons: Sequence[Comparison], fraction: float) -> list[Comparison]:
    """The first ceil(fraction·N) comparisons in `fraction_key` order, in input order.

    Nested by construction: a smaller fraction is a subset of every larger one.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = math.ceil(fraction * len(comparisons))
    ranked = sorted(range(len(comparisons)),
                    key=lambda i: (fraction_key(comparisons[i]), comparisons[i].source,
                                   comparisons[i].line))
    keep = set(ranked[:n])
    return [c for i, c in enumerate(comparisons) if i in keep]


def subsample(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed random subset of `limit` items (all of them without a limit), in order."""
    if limit is None or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
    return [items[i] for i in keep]


def load_hh_prompts(path: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Distinct first Human turns of an HH jsonl(.gz) file (a fixed random subset)."""
    seen, out = set(), []
    for line, row in read_json(path, bad_json="bad_row"):
        try:
            turns = split_turns(row["chosen"])
        except (KeyError, TypeError) as e:
            raise DataError(path, line, "bad_row",
                            f"no readable 'chosen' dialogue ({e})") from None
        if not turns or turns[0][0] != "Human" or not turns[0][1].strip():
            raise DataError(path, line, "bad_row", "the dialogue does not start with Human")
        text = turns[0][1].strip()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return subsample(out, limit, seed)
