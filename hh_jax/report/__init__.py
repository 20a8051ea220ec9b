"""`hh-jax report WORKDIR`: report.html (self-contained, PNGs embedded) + report.md of a
run (run.py) or of a sweep root (sweep.py, sweep_rl.py), built on page.py. The report reads
only what the stages and the sweep runner leave on disk; nothing but the CLI imports it.
"""

from __future__ import annotations

import os

import jax

from hh_jax.report import run, sweep
from hh_jax.report.page import Page


def write_report(workdir: str, out_dir: str | None = None) -> str | None:
    """Writes report.html + report.md (+ report_files/*.png) for a run or a sweep root.
    Returns the HTML path (None on processes other than 0, which write nothing)."""
    if jax.process_index() != 0:
        return None
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such workdir")
    out_dir = os.path.abspath(out_dir or workdir)
    if sweep.is_sweep_root(workdir):
        page = Page(out_dir, f"hh_jax sweep report: {os.path.basename(workdir)}")
        sweep.sweep_report(page, workdir)
    else:
        page = Page(out_dir, f"hh_jax report: {os.path.basename(workdir)}")
        run.run_report(page, workdir)
    return page.write()[0]
