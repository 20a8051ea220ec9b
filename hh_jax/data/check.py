"""`hh-jax data check PATH...`: validate HH jsonl(.gz) and StackExchange Posts.xml files.

Prints per-file counts (rows, comparisons, subsets, train/held-out split, truncations,
invalid rows by reason with `file:line: reason: detail`). Any invalid row makes the exit
status 1 unless `--skip-invalid`, which reports the skipped counts and exits 0 — the same
rules the training stages and TFDS builders apply (they call the same validators).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hh_jax.data import hh, stackexchange
from hh_jax.data.loaders import count_truncations
from hh_jax.tokenizer import load_tokenizer

_HH_EXT, _XML_EXT = (".jsonl", ".jsonl.gz"), (".xml",)


def _expand(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                out += [os.path.join(root, n) for n in sorted(names)
                        if n.endswith(_HH_EXT + _XML_EXT)]
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def check_hh(path: str, args) -> tuple[hh.FileReport, list[hh.Comparison]]:
    report, comps = hh.FileReport(path), []
    for item in hh.iter_hh_file(path, report, max_line_bytes=args.max_line_bytes):
        if isinstance(item, hh.DataError):
            report.add_error(item)
        else:
            report.add(item)
            comps.append(item)
    return report, comps


def check_posts(path: str, args) -> tuple[hh.FileReport, list[hh.Comparison]]:
    comps, load = stackexchange.load_stackexchange([path], binarize=True, skip_invalid=True)
    return load.files[0], comps


def _fmt(counter) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"


def _print_report(r: hh.FileReport, trunc, args, out) -> None:
    print(f"{r.path}  [{r.kind}]", file=out)
    if r.kind == "hh":
        print(f"  rows {r.rows}  comparisons {r.comparisons}  blank lines {r.blank}", file=out)
    else:
        x = r.extra
        print(f"  rows {r.rows}  questions {x['questions']}  answers {x['answers']}  other posts "
              f"{x['other_posts']}  orphan answers {x['orphan_answers']}", file=out)
        print(f"  answer pairs with different votes {x['pairs_diff_votes']}  PMP pairs (different "
              f"A21 scores) {x['pairs_diff_pmp_score']}  binarized comparisons {r.comparisons}",
              file=out)
    print(f"  subsets {_fmt(r.subsets)}", file=out)
    print(f"  split {_fmt(r.splits)}", file=out)
    if trunc is not None:
        print(f"  truncations ({args.tokenizer} tokenizer, max_len {args.max_len}): "
              f"{_fmt(trunc)}", file=out)
    invalid = sum(r.skipped.values())
    word = "skipped" if args.skip_invalid else ("INVALID" if invalid else "invalid")
    print(f"  {word} {invalid}: {_fmt(r.skipped)}", file=out)
    for e in r.errors[: args.max_errors]:
        print(f"    {e}", file=out)
    if invalid > min(len(r.errors), args.max_errors):
        print(f"    ... {invalid - min(len(r.errors), args.max_errors)} more", file=out)


def main(argv: list[str]) -> int:
    """Entry point; `argv` excludes the `data check` words. Returns the exit status."""
    ap = argparse.ArgumentParser(prog="hh-jax data check", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="count invalid rows by reason and exit 0 instead of failing")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a sentencepiece .model, "
                    "for the truncation counts")
    ap.add_argument("--max-len", type=int, default=1024, help="PM context length in tokens "
                    "(PAPER.md §3); 0 skips the truncation counts")
    ap.add_argument("--max-errors", type=int, default=hh.MAX_LISTED_ERRORS,
                    help="invalid rows listed per file")
    ap.add_argument("--max-line-bytes", type=int, default=hh.MAX_LINE_BYTES)
    ap.add_argument("--json", metavar="OUT", help="also write the counts as JSON here")
    args = ap.parse_args(argv)
    try:
        files = _expand(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.max_len > 0:
        tokenizer = load_tokenizer(args.tokenizer)
    status, reports, dump = 0, [], []
    for path in files:
        check = check_posts if path.endswith(_XML_EXT) else check_hh
        report, comps = check(path, args)
        trunc = None
        if tokenizer is not None:
            trunc = count_truncations(comps, tokenizer, args.max_len)
        _print_report(report, trunc, args, sys.stdout)
        reports.append(report)
        dump.append({**report.to_json(), "truncations": dict(trunc or {})})
        if report.skipped and not args.skip_invalid:
            status = 1
        if not report.comparisons:
            print(f"  {path}: no valid comparisons", file=sys.stdout)
            status = 1
    _print_totals(reports)
    if status and any(r.skipped for r in reports) and not args.skip_invalid:
        print("invalid rows found (listed above); --skip-invalid counts and skips them",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": dump, "skip_invalid": args.skip_invalid}, f, indent=1)
    return status


def _print_totals(reports: list[hh.FileReport]) -> None:
    for kind in ("hh", "stackexchange"):
        rs = [r for r in reports if r.kind == kind]
        if len(rs) < 2:
            continue
        total = hh.LoadReport(rs).total
        line = (f"total {kind}: {len(rs)} files  rows {total.rows}  comparisons "
                f"{total.comparisons}  split {_fmt(total.splits)}  invalid {_fmt(total.skipped)}")
        if kind == "stackexchange":
            line += (f"  pairs: different votes {total.extra['pairs_diff_votes']}, PMP "
                     f"{total.extra['pairs_diff_pmp_score']}")
        print(line)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
