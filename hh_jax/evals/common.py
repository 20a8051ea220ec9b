"""Shared bits of the evaluators: accuracy with intervals, tables, summaries, plots."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from hh_jax import metrics
from hh_jax.data import hh
from hh_jax.evals import stats


def accuracy(correct: Sequence[bool]) -> dict:
    """{"accuracy", "lo", "hi" (Wilson 95%), "n"}."""
    c = np.asarray(correct, bool)
    k, n = int(c.sum()), int(c.size)
    lo, hi = stats.wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "lo": lo, "hi": hi, "n": n}


def grouped_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> dict[str, dict]:
    """accuracy() per group, plus "all"."""
    out = {}
    for g in sorted(set(groups)):
        out[g] = accuracy([c for c, gg in zip(correct, groups, strict=True) if gg == g])
    out["all"] = accuracy(correct)
    return out


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def table(header: Sequence[str], rows: Iterable[Sequence], title: str = "") -> str:
    """A plain aligned text table (the stdout report of every evaluator)."""
    cells = [[str(h) for h in header]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if k else c.ljust(w)  # noqa: E731
                               for k, (c, w) in enumerate(zip(r, widths, strict=True)))
    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def acc_cell(a: dict) -> str:
    return f"{a['accuracy']:.3f} [{a['lo']:.2f}, {a['hi']:.2f}]"


def write_summary(out_dir: str, summary: dict) -> str:
    metrics.write_summary(out_dir, summary)
    return os.path.join(out_dir, "summary.json")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def subsample(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed random subset of `limit` items (all of them without a limit), in order."""
    return hh.subsample(items, limit, seed)
