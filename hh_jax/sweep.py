"""`hh-jax sweep EXPERIMENT[:arg] [--dry-run]`: an experiment file's sweep() member by member.

Each member is the experiment's config with that member's overrides, run into
`ROOT/<member name>`. Locally the members run one after another in this process; a stage
whose config (and every earlier stage's config) equals one a previous member completed
is linked, not recomputed (e.g. one LM per size shared by all data fractions). With
`--dry-run` the sweep prints one `hh-jax run` command per member instead, for a cluster
launcher (launch/). `ROOT/sweep.json` lists the members; `hh-jax report ROOT` then fits
the paper's PM scaling form acc ≈ a + b·log(P) + c·log(D) (PAPER.md §4, eq. A.1).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex

import numpy as np

from hh_jax import experiment
from hh_jax.evals import fits


def member_name(index: int, overrides: dict) -> str:
    """`03_model-13M_fraction-0.25`: the index keeps names unique and ordered."""
    parts = [f"{index:02d}"]
    for key, value in overrides.items():
        v = "+".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{key.split('.')[-1]}-{v}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(parts))[:120]


def members(spec: str) -> list[tuple[str, dict]]:
    path, _, arg = spec.partition(":")
    return [(member_name(i, m), m) for i, m in enumerate(experiment.expand_sweep(path, arg))]


def default_root(spec: str) -> str:
    path, _, arg = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", stem + (f"-{arg}" if arg else ""))


def override_args(overrides: dict) -> list[str]:
    """`--config.k=v` items that `experiment.parse_override` reads back to the same value
    (a string stays bare unless it would parse as a literal: "13M" but "'1.0'")."""
    return [f"--config.{k}={v if isinstance(v, str) and not _is_literal(v) else repr(v)}"
            for k, v in overrides.items()]


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def command(spec: str, workdir: str, overrides: dict, extra: list[str] = ()) -> str:
    return shlex.join(["hh-jax", "run", spec, "--workdir", workdir, *extra,
                       *override_args(overrides)])


def member_config(spec: str, overrides: dict, extra: list[str] = ()):
    config = experiment.load_config(spec, list(extra))
    for key, value in overrides.items():
        experiment.set_path(config, key, value)
    return config


def _stage_keys(config) -> dict[str, str]:
    """Per stage: a key for its config and every earlier stage's (before {workdir} is
    filled, so equal keys mean equal work in any member)."""
    keys, acc = {}, []
    for name in config.stages:
        acc.append([name, config[name].to_dict()])
        keys[name] = json.dumps(acc, sort_keys=True, default=str)
    return keys


def _link_shared(config, member_dir: str, done: dict[str, str]) -> list[str]:
    from hh_jax import checkpoint

    linked = []
    for name, key in _stage_keys(config).items():
        target, here = done.get(key), os.path.join(member_dir, name)
        if target and checkpoint.is_complete(target) and not os.path.exists(here):
            os.makedirs(member_dir, exist_ok=True)
            os.symlink(os.path.relpath(target, member_dir), here)
            linked.append(name)
    return linked


def run(spec: str, root: str | None = None, extra: list[str] = (), dry_run: bool = False
        ) -> list[str]:
    """Runs (or, dry, prints) every member; returns the commands / member workdirs."""
    root = root or default_root(spec)
    todo = members(spec)
    if not todo:
        raise ValueError(f"{spec}: the experiment file has no sweep() or it adds no member")
    if dry_run:
        cmds = [command(spec, os.path.join(root, name), ov, extra) for name, ov in todo]
        print("\n".join(cmds))
        return cmds
    import jax

    from hh_jax import report

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(root, "sweep.json"), "w") as f:
            json.dump({"experiment": spec, "overrides": list(extra), "members": [
                {"name": n, "overrides": ov} for n, ov in todo]}, f, indent=1, default=str)
    # linking is a single-process shortcut: with several processes, every one must see the
    # same stages complete at the same time, so each member runs all of its stages
    link = jax.process_count() == 1
    done: dict[str, str] = {}
    for i, (name, ov) in enumerate(todo):
        member_dir = os.path.join(root, name)
        config = member_config(spec, ov, extra)
        linked = _link_shared(config, member_dir, done) if link else []
        print(f"[sweep] member {i + 1}/{len(todo)} {name}: {ov}"
              + (f" (reusing {', '.join(linked)})" if linked else ""), flush=True)
        experiment.run(config, member_dir)
        for stage, key in _stage_keys(config).items():
            done.setdefault(key, os.path.realpath(os.path.join(member_dir, stage)))
        report.write_report(member_dir)
    print(f"[sweep] report: {report.write_report(root)}", flush=True)
    return [os.path.join(root, n) for n, _ in todo]


# ---------------------------------------------------------------------- scaling report
def _pm_stage(config: dict) -> str | None:
    from hh_jax import report

    pms = report.stages_of_kind(config, "pm")
    return "pm" if "pm" in pms else (pms[-1] if pms else None)


def member_dirs(root: str) -> list[str]:
    """Members from sweep.json, else every subdirectory holding a config.json (a sweep run
    member by member by a cluster launcher, which writes no sweep.json)."""
    from hh_jax import report

    info = report.read_json(os.path.join(root, "sweep.json"))
    if info:
        return [m["name"] for m in info["members"]]
    return sorted(d for d in os.listdir(root)
                  if os.path.exists(os.path.join(root, d, "config.json")))


def is_sweep_root(root: str) -> bool:
    return os.path.exists(os.path.join(root, "sweep.json")) or (
        not os.path.exists(os.path.join(root, "config.json")) and bool(member_dirs(root)))


def collect(root: str) -> list[dict]:
    """One row per member with a finished PM stage: size, P, D, accuracy, CI."""
    from hh_jax import report

    rows = []
    for name in member_dirs(root):
        member_dir = os.path.join(root, name)
        config = report.read_json(os.path.join(member_dir, "config.json"), {})
        stage = _pm_stage(config)
        summary = report.read_json(os.path.join(member_dir, str(stage), "summary.json"))
        meta = report.read_json(os.path.join(member_dir, str(stage), "params", "meta.json"))
        row = {"member": name, "stage": stage, "complete": bool(summary and meta)}
        if row["complete"]:
            overall = summary["report"]["overall"]
            row.update(size=(config.get("lm") or {}).get("model", "?"),
                       P=fits.non_embedding_params(meta["model"]), D=summary["data"]["used"],
                       acc=overall["accuracy"], ci=overall["ci95"],
                       longer=overall["longer_wins"])
        rows.append(row)
    return rows


def sweep_report(page, root: str) -> None:
    from hh_jax import report, sweep_rl

    info = report.read_json(os.path.join(root, "sweep.json"), {})
    rows = collect(root)
    page.para(f"Sweep of {info.get('experiment', 'an experiment')} ({len(rows)} members) under "
              f"{root}. "
              "P = non-embedding parameters, D = training comparisons, accuracy on the held-out "
              "HH pairs with a 95% Wilson interval.")
    if any(r["stage"] for r in rows):
        _pm_part(page, rows)
    sweep_rl.section(page, root, member_dirs(root))
    page.links([(f"{r['member']} report", f"{r['member']}/report.html") for r in rows
                if os.path.exists(os.path.join(root, r["member"], "report.html"))])


def _pm_part(page, rows: list[dict]) -> None:
    done = [r for r in rows if r["complete"]]
    page.table(["member", "PM stage", "size", "P", "D", "accuracy", "95% CI", "longer wins"],
               [[r["member"], r["stage"], r.get("size"), r.get("P"), r.get("D"), r.get("acc"),
                 f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if "ci" in r else "not complete",
                 r.get("longer")] for r in rows])
    table = []
    for stage in sorted({r["stage"] for r in done}):
        group = [r for r in done if r["stage"] == stage]
        fit = fits.fit_scaling([r["P"] for r in group], [r["D"] for r in group],
                          [r["acc"] for r in group])
        table.append([f"{stage} (ours, {fit['n']} runs)", fit["a"], fit["b"], fit["c"], fit["r2"]])
        _scaling_plot(page, stage, group, fit)
    table.append(["paper eq. A.1 (helpful only, 13M–52B)", *fits.PAPER_FIT.values(), float("nan")])
    page.heading("Fit: acc ≈ a + b·ln(P/1e11) + c·ln(D/8e4)", 3)
    page.table(["fit", "a", "b", "c", "R²"], table)


def _scaling_plot(page, stage: str, group: list[dict], fit: dict) -> None:
    from hh_jax import report, report_page

    plt = report_page.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (x_key, line_key, xlabel) in zip(axes, [("D", "P", "D (training comparisons)"),
                                                    ("P", "D", "P (non-embedding params)")],
                                             strict=True):
        for color, value in zip(report_page.COLORS * 4, sorted({r[line_key] for r in group}),
                                strict=False):
            pts = sorted((r for r in group if r[line_key] == value), key=lambda r: r[x_key])
            x = np.asarray([r[x_key] for r in pts], np.float64)
            acc = np.asarray([r["acc"] for r in pts])
            ci = np.asarray([r["ci"] for r in pts]).reshape(-1, 2)
            label = f"{line_key}={value:,}" + (f" ({pts[0]['size']})" if line_key == "P" else "")
            ax.errorbar(x, acc, yerr=report.error_bars(acc, ci), fmt="o-", color=color,
                        capsize=3, label=label)
            if math.isfinite(fit["a"]):
                xs = np.geomspace(x.min(), x.max(), 20) if len(x) > 1 else x
                pred = fits.predict_scaling(fit, xs if x_key == "P" else value,
                                            xs if x_key == "D" else value)
                ax.plot(xs, pred * np.ones_like(xs), "--", color=color, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.axhline(0.5, color="gray", ls=":", lw=1)
        ax.legend(fontsize=7)
    page.figure(fig, f"scaling_{stage}", f"{stage}: accuracy against data (left) and PM size "
                "(right); dashed: the fit")

