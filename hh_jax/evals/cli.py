"""`hh-jax eval {hhh,mc,ood,elo}`: the evaluators' command-line options and dispatch
(hh_jax/main.py owns the `eval` verb and `eval pm`)."""

from __future__ import annotations

import argparse
import os

WHAT = ("hhh", "mc", "ood", "elo")


def add_arguments(ev: argparse.ArgumentParser) -> None:
    """Options of the evaluators (besides main.py's --out and --batch-size)."""
    g = ev.add_argument_group("hhh / mc / ood / elo")
    g.add_argument("--model", help="the policy: a params export dir or a pretrained name "
                   "(smollm2-135m, a .gguf, an HF dir); hhh, mc, ood")
    g.add_argument("--pm", help="a pm/pmp params export: the judge (hhh, elo)")
    g.add_argument("--limit", type=int, help="evaluate a fixed random subset of N items")
    g.add_argument("--max-len", type=int, help="longest row scored (default: per eval)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tasks", default="truthfulqa,bbq,gender",
                   help="mc: comma list of truthfulqa, bbq, gender, winogenerated")
    g.add_argument("--n-in", type=int, default=1000, help="ood: helpful (in-dist.) prompts")
    g.add_argument("--n-out", type=int, default=500, help="ood: harmless (OOD) prompts")
    g.add_argument("--n-shot", type=int, default=10, help="ood: outlier-exposure OOD examples")
    g.add_argument("--n-splits", type=int, default=3, help="ood: random train/test splits")
    g.add_argument("--policy", action="append", default=[],
                   help="elo: NAME=SPEC or NAME=SPEC@bon:N (repeat; the first is the anchor)")
    g.add_argument("--select-pm", help="elo: the PM best-of-N selects with (default: --pm)")
    g.add_argument("--n-prompts", type=int, default=64, help="elo: HH prompts answered")
    g.add_argument("--max-new-tokens", type=int, default=64, help="elo: response length")
    g.add_argument("--temperature", type=float, default=1.0, help="elo: sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="elo: nucleus sampling")
    g.add_argument("--responses", help="elo: a responses.jsonl to judge instead of sampling")
    g.add_argument("--n-boot", type=int, default=200, help="elo: bootstrap resamples")


def run_stage(spec: str | None) -> tuple[str, str] | None:
    """(run workdir, stage) when `spec` is a run's export `<workdir>/<stage>/params` (a
    config.json in <workdir>), else None."""
    if not spec:
        return None
    params = os.path.abspath(spec)
    stage_dir = os.path.dirname(params)
    workdir = os.path.dirname(stage_dir)
    if os.path.basename(params) != "params" or not os.path.exists(
            os.path.join(workdir, "config.json")):
        return None
    return workdir, os.path.basename(stage_dir)


def default_out(what: str, specs: list[str | None]) -> str:
    """Where `hh-jax eval <what>` writes without --out: `<workdir>/evals/<what>_<stage>` for
    the first of `specs` (the evaluated exports, most telling first) that is a run's
    export, so the run report (hh_jax/report/evaluations.py) shows it; else `eval_<what>` (`pm_eval`
    for pm) in the current directory. Elo, which compares several policies, is `evals/elo`."""
    for spec in specs:
        found = run_stage(spec)
        if found:
            workdir, stage = found
            return os.path.join(workdir, "evals", "elo" if what == "elo" else f"{what}_{stage}")
    return "pm_eval" if what == "pm" else f"eval_{what}"


def _need(args, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n, None)]
    if missing:
        raise SystemExit(f"hh-jax eval {args.what}: needs {' and '.join(missing)}")


def run(args) -> dict:
    """Dispatches `hh-jax eval <what>`; each writes summary.json, prints a table, plots."""
    policies = [(p.partition("=")[2] or p).partition("@bon:")[0] for p in args.policy]
    out = args.out or default_out(args.what, [args.model, args.pm, *policies])
    batch = args.batch_size or 8
    if args.what == "hhh":
        if not (args.model or args.pm):
            raise SystemExit("hh-jax eval hhh: needs --model and/or --pm")
        from hh_jax.evals import hhh

        return hhh.run(out, model_spec=args.model, pm=args.pm, limit=args.limit,
                       batch_size=batch, max_len=args.max_len or 2048, seed=args.seed)
    if args.what == "mc":
        _need(args, "model")
        from hh_jax.evals import mc

        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        bad = set(tasks) - {"truthfulqa", "bbq", "gender", "winogenerated"}
        if bad:
            raise SystemExit(f"hh-jax eval mc: unknown tasks {sorted(bad)}")
        return mc.run(args.model, out, tasks=tasks, limit=args.limit, batch_size=batch,
                      max_len=args.max_len or 1024, seed=args.seed)
    if args.what == "ood":
        _need(args, "model")
        from hh_jax.evals import ood

        return ood.run(args.model, out, n_in=args.n_in, n_out=args.n_out, n_shot=args.n_shot,
                       n_splits=args.n_splits, batch_size=batch, max_len=args.max_len or 256,
                       seed=args.seed)
    if args.what == "elo":
        _need(args, "pm", "policy")
        from hh_jax.evals import elo

        return elo.run(args.policy, args.pm, out, select_pm=args.select_pm,
                       n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, batch_size=batch,
                       n_boot=args.n_boot, seed=args.seed, responses=args.responses)
    raise SystemExit(f"hh-jax eval: unknown target {args.what!r} (expected: pm, {', '.join(WHAT)})")
