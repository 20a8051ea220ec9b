"""Experiment files: loading `get_config(arg)`, `--config.x=y` overrides, sweeps, running.

An experiment file (big_vision form) defines `get_config(arg: str) -> ConfigDict` and
`sweep(add, arg)`, which calls `add(**{"lm.model": "13M", ...})` once per member. The
config lists its `stages` in order; `config.<stage>` is that stage's config. Strings may
contain `{workdir}`, filled in when the experiment runs (how stages chain through paths).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import time
from typing import Any

from ml_collections import ConfigDict


def load_module(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: experiment file not found")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:  # lets experiment files share experiments/common.py
        sys.path.insert(0, folder)
    name = "hh_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path}: an experiment file must define get_config(arg)")
    return module


def load_config(spec: str, overrides: list[str] | None = None) -> ConfigDict:
    """`path.py[:arg]` plus `--config.a.b=value` overrides."""
    path, _, arg = spec.partition(":")
    config = load_module(path).get_config(arg)
    for item in overrides or []:
        key, value = parse_override(item)
        set_path(config, key, value)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    item = item.removeprefix("--")
    if not item.startswith("config.") or "=" not in item:
        raise ValueError(f"bad override {item!r}: expected --config.key=value")
    key, _, raw = item[len("config."):].partition("=")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    return key, value


def set_path(config: ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise KeyError(f"config has no field {key!r} (no {p!r})")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"config has no field {key!r}; fields here: {sorted(node.keys())}")
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    node[leaf] = value


def expand_sweep(path: str, arg: str = "") -> list[dict[str, Any]]:
    """The members of an experiment file's `sweep(add, arg)` as override dicts."""
    module = load_module(path)
    members: list[dict[str, Any]] = []
    if hasattr(module, "sweep"):
        module.sweep(lambda **kw: members.append(kw), arg)
    return members


def fill_workdir(config: ConfigDict, workdir: str) -> ConfigDict:
    """Replaces `{workdir}` in every string field and tuple of strings (stage hand-off
    paths)."""
    out = ConfigDict(config.to_dict())
    stack = [out]
    while stack:
        node = stack.pop()
        for k in list(node.keys()):
            v = node[k]
            if isinstance(v, ConfigDict):
                stack.append(v)
            elif isinstance(v, str) and "{workdir}" in v:
                node[k] = v.replace("{workdir}", workdir)
            elif isinstance(v, tuple) and any(isinstance(x, str) and "{workdir}" in x
                                              for x in v):  # e.g. a list of snapshots
                node[k] = tuple(x.replace("{workdir}", workdir) if isinstance(x, str) else x
                                for x in v)
    return out


def run(config: ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs every stage in `config.stages` under `workdir/<stage>`, skipping complete ones."""
    from hh_jax import checkpoint, metrics  # the stages and these import JAX: not at load time
    from hh_jax.stages import base, bon, distill, lm, online, pm, ppo

    runners = {"base": base.train_and_evaluate, "lm": lm.train_and_evaluate,
               "distill": distill.train_and_evaluate, "pmp": pm.train_and_evaluate,
               "pm": pm.train_and_evaluate, "pm_frozen": pm.train_frozen_and_evaluate,
               "ppo": ppo.train_and_evaluate, "bon": bon.train_and_evaluate,
               "collect": online.train_and_evaluate, "online": online.summarize}
    # stage kinds whose completion depends on their config, not only on summary.json
    completes = {"online": online.is_complete}
    workdir = os.path.abspath(workdir)
    config = fill_workdir(config, workdir)
    check(config, workdir, runners)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    summaries = {}
    for name in config.stages:
        kind = config[name].get("stage", name)
        stage_dir = os.path.join(workdir, name)
        done = completes.get(kind, lambda _cfg, d: checkpoint.is_complete(d))
        if done(config[name], stage_dir):
            print(f"[{name}] complete, skipped ({stage_dir}/summary.json)", flush=True)
            summaries[name] = metrics.read_summary(stage_dir)
            continue
        t0 = time.time()
        summaries[name] = runners[kind](config[name], stage_dir)
        print(f"[{name}] done in {time.time() - t0:.0f}s", flush=True)
    return summaries


_SOURCES = ("init_from", "policy_from", "pm_from", "test_pm_from", "teacher")


def check(config: ConfigDict, workdir: str, kinds) -> None:
    """Errors a run would meet late, raised before any stage computes: unknown stage kinds,
    a base model that is not there, and models that must share a tokenizer (a policy and
    its PMs, a student and its teacher) but descend from different ones."""
    from hh_jax.pretrained import registry

    for name in config.stages:
        if name not in config:
            raise ValueError(f"stage {name!r} is listed in config.stages but has no config")
        kind = config[name].get("stage", name)  # e.g. stage "pm_no_pmp" of kind "pm"
        if kind not in kinds:
            raise ValueError(f"unknown stage kind {kind!r} for {name!r}; known: {sorted(kinds)}")
        if kind == "base" and not registry.is_pretrained(config[name].model):
            raise ValueError(f"{name}.model {config[name].model!r}: not a known pretrained model "
                             f"({sorted(registry.PRETRAINED)}), a .gguf file or an HF directory")
    for name in config.stages:
        roots = {key: tokenizer_root(config, workdir, config[name][key])
                 for key in _SOURCES if config[name].get(key)}
        if len(set(roots.values())) > 1:
            raise ValueError(f"stage {name!r}: its models descend from different tokenizers "
                             f"({roots}); a policy, its PMs and a teacher must share one")


def tokenizer_root(config: ConfigDict, workdir: str, path: str, depth: int = 0) -> str:
    """Where the tokenizer of the export at `path` comes from: a pretrained model, an `lm`
    stage trained from scratch (it trains its own), or an existing export's tokenizer —
    following each stage's source (`init_from`, `policy_from`) through this config."""
    from hh_jax.pretrained import registry

    if registry.is_pretrained(path):
        return f"pretrained {path}"
    rel = os.path.relpath(path, workdir).split(os.sep)
    if len(rel) == 2 and rel[1] == "params" and rel[0] in config and depth < 20:
        stage = config[rel[0]]
        if stage.get("stage", rel[0]) == "base":
            return f"pretrained {stage.model}"
        src = stage.get("policy_from") or stage.get("init_from")
        if not src:  # trained from scratch with its own tokenizer
            return f"stage {rel[0]}"
        return tokenizer_root(config, workdir, src, depth + 1)
    meta = os.path.join(path, "meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return f"tokenizer {json.load(f).get('tokenizer')}"
    return f"export {path}"
