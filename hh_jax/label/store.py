"""Comparisons a person (or a simulated labeler) judges: the pairs file that goes in and the
append-only store of labels that comes out (issue #17 parts 3 and 4).

A pairs file is jsonl, one object a line:
  {"id": str (unique), "context": str (HH transcript ending "\\n\\nAssistant:"),
   "response_a": str, "response_b": str, "meta": {round, policy_a, policy_b, ...}}

The store is jsonl too, one label a line, written with one O_APPEND write + fsync under a
thread lock and an exclusive flock, so concurrent writers (threads or processes) never
interleave and a crash loses at most the label being written. The next time the store is
opened for writing, a last line without its newline is repaired: a complete label (the
crash came between the record and its newline) gets its newline and is kept; a torn one is
copied to `<store>.torn-<UTC time>` and cut off, with a warning either way.
`export_hh` turns the labels into HH jsonl rows that `hh_jax.data.hh` reads (the PM stage,
`hh-jax eval pm`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable

from hh_jax.data.hh import ASSISTANT, first_human_turn
from hh_jax.data.jsonl_reader import DataError, read_json

log = logging.getLogger(__name__)
CHOICES = ("a", "b")
STRENGTHS = (1, 2, 3)  # slightly / clearly / much better; None when not asked
RECORD_KEYS = ("id", "context", "chosen", "rejected", "choice", "strength", "labeler", "time",
               "meta")


class DuplicateLabel(ValueError):
    """The pair's id is already labeled in the store (a replayed label)."""

    def __init__(self, pair_id: str):
        self.id = pair_id
        super().__init__(f"pair {pair_id!r} is already labeled")


class PairMismatch(ValueError):
    """A pair's id is labeled in the store, but the stored label is of other texts (e.g.
    pairs resampled under the same positional ids)."""


def mismatched_ids(records: Iterable[dict], pairs: Iterable[dict]) -> list[str]:
    """Ids of `pairs` that `records` label with another context or other responses
    (either orientation matches: the label may have chosen a or b)."""
    by_id = {r["id"]: r for r in records}
    out = []
    for p in pairs:
        r = by_id.get(p["id"])
        if r is not None and (r["context"] != p["context"] or {
                (r["chosen"], r["rejected"])} - {(p["response_a"], p["response_b"]),
                                                 (p["response_b"], p["response_a"])}):
            out.append(p["id"])
    return out


def _problem(pair) -> tuple[str, str] | None:
    """(reason, detail) of the first thing wrong with a pair object, else None."""
    if not isinstance(pair, dict):
        return "not_object", f"expected a JSON object, got {type(pair).__name__}"
    for key in ("id", "context", "response_a", "response_b"):
        if key not in pair:
            return "missing_key", f"no {key!r} key"
        if not isinstance(pair[key], str):
            return "not_string", f"{key!r} is {type(pair[key]).__name__}, not a string"
        try:
            pair[key].encode("utf-8")
        except UnicodeEncodeError:
            return "invalid_utf8", f"{key!r} has a lone surrogate"
    if not pair["id"].strip():
        return "empty_id", "'id' is empty"
    if not isinstance(pair.get("meta", {}), dict):
        return "bad_meta", "'meta' is not an object"
    context = pair["context"]
    if not context.endswith(ASSISTANT) or first_human_turn(context) is None:
        return "bad_context", "'context' must start with a Human turn and end '\\n\\nAssistant:'"
    for key in ("response_a", "response_b"):
        if not pair[key].strip():
            return "empty_response", f"{key!r} is empty"
        if ASSISTANT in pair[key]:  # the HH format could not tell where the response starts
            return "bad_response", f"{key!r} contains '\\n\\nAssistant:'"
    if hh_text(context, pair["response_a"]) == hh_text(context, pair["response_b"]):
        return "identical", "response_a and response_b are the same"  # HH rejects those
    return None


def validate_pair(pair, where: tuple[str, int] = ("<pair>", 0)) -> dict:
    """The pair with "meta" defaulted to {}; raises DataError naming `where` (file, line)."""
    problem = _problem(pair)
    if problem:
        raise DataError(where[0], where[1], *problem)
    return {**pair, "meta": dict(pair.get("meta", {}))}


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """The pairs of a jsonl(.gz) file in file order; DataError (file:line: ...) on bad rows."""
    pairs, first_line = [], {}
    for line, obj in read_json(path):
        pair = validate_pair(obj, (str(path), line))
        if pair["id"] in first_line:
            raise DataError(path, line, "duplicate_id",
                            f"id {pair['id']!r} already on line {first_line[pair['id']]}")
        first_line[pair["id"]] = line
        pairs.append(pair)
    return pairs


def _atomic_write(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Writes a temp file beside `path`, fsyncs it, renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:  # the rename itself survives a crash only once the folder is synced
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_pairs(path: str | os.PathLike, pairs: Iterable[dict]) -> None:
    """Validates `pairs` (unique ids) and writes them as a pairs file, atomically."""
    out, seen = [], set()
    for i, pair in enumerate(pairs):
        pair = validate_pair(pair, (str(path), i + 1))
        if pair["id"] in seen:
            raise DataError(path, i + 1, "duplicate_id", f"id {pair['id']!r} appears twice")
        seen.add(pair["id"])
        out.append(json.dumps(pair, ensure_ascii=False) + "\n")
    _atomic_write(path, out)


def _parse_record(raw: bytes, path: str, line: int) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(path, line, "invalid_json", str(e)) from None
    if not isinstance(rec, dict):
        raise DataError(path, line, "not_object", "a label must be a JSON object")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise DataError(path, line, "missing_key", f"no {missing[0]!r} key")
    if not isinstance(rec["id"], str) or rec["choice"] not in CHOICES:
        raise DataError(path, line, "bad_label", "'id' must be a string, 'choice' a or b")
    return rec


def _parse_lines(data: bytes, path: str, first_line: int, seen: set[str]) -> list[dict]:
    """Records of complete lines `data` (ends with a newline) starting at `first_line`."""
    out = []
    for i, raw in enumerate(data.split(b"\n")[:-1]):
        if not raw.strip():
            continue
        rec = _parse_record(raw, path, first_line + i)
        if rec["id"] in seen:
            raise DataError(path, first_line + i, "duplicate_id",
                            f"id {rec['id']!r} is labeled twice")
        seen.add(rec["id"])
        out.append(rec)
    return out


def _is_record(raw: bytes) -> bool:
    """Whether `raw` (a last line without its newline) is a whole, valid label."""
    try:
        _parse_record(raw, "<tail>", 0)
    except DataError:
        return False
    return True


def read_store(path: str | os.PathLike) -> list[dict]:
    """The labels of a store, read only: a last line without its newline counts when it is
    a whole label, else it is ignored (with a warning); the file is left alone."""
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        if _is_record(data[len(complete):]):
            complete = data + b"\n"
        else:
            log.warning("%s: ignoring a torn last line (%d bytes, no newline)", path,
                        len(data) - len(complete))
    return _parse_lines(complete, str(path), 1, set())


def _save_torn(path: str, tail: bytes) -> str:
    """Copies a torn last line to `<path>.torn-<UTC time>` (fsynced); returns its path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    for n in range(100):
        out = f"{path}.torn-{stamp}" + (f"-{n}" if n else "")
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            view = memoryview(tail)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return out
    raise FileExistsError(f"{path}.torn-{stamp}: 100 files of that name exist")


class ComparisonStore:
    """Append-only jsonl of labels; one writer at a time across threads and processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._offset, self._lines = 0, 0  # how much of the file is parsed
        self._records: list[dict] = []
        self._ids: set[str] = set()
        with self._locked():
            self._catch_up()

    @contextlib.contextmanager
    def _locked(self):
        """The thread lock (threads share one fd, and flock is per fd) + flock (processes)."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Parses what other writers appended and repairs a last line without its newline
        (call under the lock: no writer is mid-write then, so such a line is a crashed
        write): a whole label gets its newline; a torn one is saved aside and cut off."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:
            raise DataError(self.path, self._lines + 1, "shrunk",
                            "the store got shorter while open (it is append-only)")
        data = os.pread(self._fd, size - self._offset, self._offset)
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            tail, line = data[len(complete):], self._lines + complete.count(b"\n") + 1
            if _is_record(tail):  # the crash came between the label and its newline
                log.warning("%s:%d: the last label has no trailing newline (a write that "
                            "stopped just before it); adding the newline, keeping the label",
                            self.path, line)
                os.write(self._fd, b"\n")  # O_APPEND: at the end
                os.fsync(self._fd)
                complete = data + b"\n"
            else:
                saved = _save_torn(self.path, tail)
                log.warning("%s:%d: cutting off a torn last line (%d bytes dropped: a label "
                            "whose write did not finish; saved to %s)", self.path, line,
                            len(tail), saved)
                os.ftruncate(self._fd, self._offset + len(complete))
                os.fsync(self._fd)
        self._records += _parse_lines(complete, self.path, self._lines + 1, self._ids)
        self._offset += len(complete)
        self._lines += complete.count(b"\n")

    def append(self, pair: dict, choice: str, *, strength: int | None = None,
               labeler: str, **provenance) -> dict:
        """Records that `choice` ("a"/"b") is the better response of `pair`; returns the
        record. Raises DuplicateLabel when the pair is already labeled, ValueError on bad
        arguments (nothing is written then)."""
        pair = validate_pair(pair)
        if choice not in CHOICES:
            raise ValueError(f"choice must be 'a' or 'b', got {choice!r}")
        if strength is not None and (isinstance(strength, bool) or strength not in STRENGTHS):
            raise ValueError(f"strength must be one of {STRENGTHS} or None, got {strength!r}")
        if not isinstance(labeler, str) or not labeler.strip():
            raise ValueError("labeler must be a non-empty string")
        good, bad = ("response_a", "response_b")[:: 1 if choice == "a" else -1]
        record = dict(id=pair["id"], context=pair["context"], chosen=pair[good],
                      rejected=pair[bad], choice=choice, strength=strength, labeler=labeler,
                      time=datetime.datetime.now(datetime.UTC).isoformat(
                          timespec="milliseconds"),
                      meta=pair["meta"] | provenance)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked():
            self._catch_up()
            if record["id"] in self._ids:
                raise DuplicateLabel(record["id"])
            view = memoryview(data)
            while view:  # O_APPEND: every write lands at the end, after other writers'
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self._offset += len(data)
            self._lines += 1
            self._ids.add(record["id"])
            self._records.append(record)
        return record

    def check_pairs(self, pairs: Iterable[dict], pairs_path: str | os.PathLike) -> None:
        """Raises PairMismatch, naming the store and the pairs file, when a pair's id is
        already labeled here with other texts: its label belongs to another pair and must
        not count as this one's."""
        bad = mismatched_ids(self.records(), pairs)
        if bad:
            raise PairMismatch(
                f"{len(bad)} pair(s) of {pairs_path} have ids already labeled in the store "
                f"{self.path} with a different context or responses (first: "
                f"{', '.join(map(repr, bad[:3]))}): the pairs were resampled or edited under "
                f"the same ids. Use a new store, or new ids, or remove those labels from the "
                f"store if they are obsolete")

    def labeled_ids(self) -> set[str]:
        with self._locked():
            self._catch_up()
            return set(self._ids)

    def records(self) -> list[dict]:
        with self._locked():
            self._catch_up()
            return [dict(r) for r in self._records]

    def __len__(self) -> int:
        return len(self.labeled_ids())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ComparisonStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hh_text(context: str, response: str) -> str:
    """The HH transcript of a response: HH responses start with a space after
    "Assistant:", so one is added when the response has no leading whitespace."""
    return context + (response if response[:1].isspace() else " " + response)


def write_hh(path: str | os.PathLike, rows: Iterable[tuple[str, str, str]]) -> int:
    """Writes (context, chosen response, rejected response) rows as HH jsonl rows
    {"chosen", "rejected"} that `hh_jax.data.hh` reads, atomically (temp file, fsync,
    rename); returns the number of rows."""
    lines = [json.dumps({"chosen": hh_text(ctx, good), "rejected": hh_text(ctx, bad)},
                        ensure_ascii=False) + "\n" for ctx, good, bad in rows]
    _atomic_write(path, lines)
    return len(lines)


def export_hh(store_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Writes the store's labels as HH jsonl rows {"chosen", "rejected"} (atomically);
    returns the number of rows."""
    return write_hh(out_path, ((r["context"], r["chosen"], r["rejected"])
                               for r in read_store(store_path)))
