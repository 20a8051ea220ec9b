"""`hh-jax sweep EXPERIMENT[:arg] [--dry-run]`: an experiment file's sweep() member by member.

Each member is the experiment's config with that member's overrides, run into
`ROOT/<member name>`. Locally the members run one after another in this process; a stage
whose config (and every earlier stage's config) equals one a previous member completed
is linked, not recomputed (e.g. one LM per size shared by all data fractions). With
`--dry-run` the sweep prints one `hh-jax run` command per member instead, for a cluster
launcher (launch/). `ROOT/sweep.json` lists the members; `hh-jax report ROOT` then fits
the paper's PM scaling form acc ≈ a + b·log(P) + c·log(D) (PAPER.md §4, eq. A.1) and
the RL section (hh_jax/report/sweep.py); this module never imports the report.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
from collections.abc import Callable

from hh_jax import experiment


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
    from hh_jax import checkpoint  # orbax: not needed to print a dry run

    linked = []
    for name, key in _stage_keys(config).items():
        target, here = done.get(key), os.path.join(member_dir, name)
        if target and checkpoint.is_complete(target) and not os.path.exists(here):
            os.makedirs(member_dir, exist_ok=True)
            os.symlink(os.path.relpath(target, member_dir), here)
            linked.append(name)
    return linked


def run(spec: str, root: str | None = None, extra: list[str] = (), dry_run: bool = False,
        after_member: Callable[[str], object] | None = None) -> list[str]:
    """Runs (or, dry, prints) every member; returns the commands / member workdirs.
    `after_member(member_dir)` is called after each member (the CLI writes its report)."""
    root = root or default_root(spec)
    todo = members(spec)
    if not todo:
        raise ValueError(f"{spec}: the experiment file has no sweep() or it adds no member")
    if dry_run:
        cmds = [command(spec, os.path.join(root, name), ov, extra) for name, ov in todo]
        print("\n".join(cmds))
        return cmds
    import jax

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
        if after_member is not None:
            after_member(member_dir)
    return [os.path.join(root, n) for n, _ in todo]
