"""`hh-jax` command line. Intentionally short: each verb lives in its own module."""

from __future__ import annotations

import argparse
import sys


def _run(args, overrides) -> int:
    from hh_jax import distributed, experiment, report

    distributed.maybe_initialize()  # first: before anything touches a JAX backend
    config = experiment.load_config(args.experiment, overrides)
    summaries = experiment.run(config, args.workdir)
    for stage, summary in summaries.items():  # scalars only; summary.json has the rest
        print(f"[{stage}] summary: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in summary.items() if isinstance(v, int | float)))
    path = report.write_report(args.workdir)  # None on processes other than 0
    if path:
        print(f"report: {path}", flush=True)
    return 0


def _sample(args, _) -> int:
    from hh_jax import generate

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, raw=args.raw)
    if args.model:
        texts = generate.sample_from_pretrained(args.model, [args.prompt], **kw)
    else:
        texts = generate.sample_from_export(args.params, [args.prompt], **kw)
    for text in texts:
        print(text)
    return 0


def _eval(args, _) -> int:
    from hh_jax.evals import cli

    if args.what != "pm":  # hhh, mc, ood, elo: hh_jax/evals/cli.py
        cli.run(args)
        return 0
    from hh_jax.evals import pm_accuracy

    if not (args.params and args.data):
        raise SystemExit("hh-jax eval pm: needs --params and --data")
    out = args.out or cli.default_out("pm", [args.params])
    pm_accuracy.eval_export(args.params, args.data, out,
                            skip_invalid=args.skip_invalid, batch_size=args.batch_size or 32)
    return 0


def _report(args, _) -> int:
    from hh_jax import report

    print(report.write_report(args.workdir, args.out))
    return 0


def _sweep(args, overrides) -> int:
    from hh_jax import distributed, sweep

    if args.dry_run:
        sweep.run(args.experiment, args.workdir, overrides, dry_run=True)
        return 0
    from hh_jax import report

    distributed.maybe_initialize()
    root = args.workdir or sweep.default_root(args.experiment)
    sweep.run(args.experiment, root, overrides, after_member=report.write_report)
    print(f"[sweep] report: {report.write_report(root)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "check"]:
        from hh_jax.data import check
        return check.main(argv[2:])
    if argv[:1] == ["label"]:  # its own options: hh_jax/label/cli.py
        from hh_jax.label import cli as label_cli
        return label_cli.main(argv[1:])
    parser = argparse.ArgumentParser(prog="hh-jax", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run an experiment's stages: run experiments/x.py[:arg]")
    run.add_argument("experiment")
    run.add_argument("--workdir", required=True)
    run.set_defaults(fn=_run)
    smp = sub.add_parser("sample", help="continue a prompt with a trained or pretrained model")
    src = smp.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="a stage's params export directory")
    src.add_argument("--model", help="a pretrained model: smollm2-135m, a .gguf file or a "
                     "Hugging Face checkpoint dir (prompted in its own chat format)")
    smp.add_argument("--prompt", required=True)
    smp.add_argument("--max-new-tokens", type=int, default=64)
    smp.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    smp.add_argument("--top-k", type=int, default=0)
    smp.add_argument("--top-p", type=float, default=0.95)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--raw", action="store_true",
                     help="feed the prompt as is (default: as one Human turn of a dialogue)")
    smp.set_defaults(fn=_sample)
    from hh_jax.evals import cli as eval_cli  # options only: no JAX imported here

    ev = sub.add_parser("eval", help="eval {pm,hhh,mc,ood,elo}: PM accuracy, HHH, multiple "
                        "choice, OOD detection, Elo (each writes OUT/summary.json + plots)")
    ev.add_argument("what", choices=["pm", *eval_cli.WHAT])
    ev.add_argument("--params", help="pm: a pm/pmp stage's params export")
    ev.add_argument("--data", nargs="+", help="pm: HH-format jsonl(.gz) files")
    ev.add_argument("--out", help="where summary.json and the plots go (default: "
                    "WORKDIR/evals/<what>_<stage> for a run's WORKDIR/<stage>/params, where "
                    "`hh-jax report WORKDIR` shows it; else pm_eval for pm, eval_<what>)")
    ev.add_argument("--batch-size", type=int, help="rows per batch (pm: 32, others: 8)")
    ev.add_argument("--skip-invalid", action="store_true", help="pm: count bad rows, go on")
    eval_cli.add_arguments(ev)
    ev.set_defaults(fn=_eval)
    rep = sub.add_parser("report", help="report WORKDIR: report.html + report.md of a run/sweep")
    rep.add_argument("workdir")
    rep.add_argument("--out", help="where to write (default: WORKDIR)")
    rep.set_defaults(fn=_report)
    swp = sub.add_parser("sweep", help="sweep experiments/x.py[:arg]: run its sweep() members")
    swp.add_argument("experiment")
    swp.add_argument("--workdir", help="sweep root (default: runs/<experiment>[-<arg>])")
    swp.add_argument("--dry-run", action="store_true", help="print one command per member")
    swp.set_defaults(fn=_sweep)
    sub.add_parser("data", help="data check PATH...: validate HH jsonl(.gz) / Posts.xml")
    sub.add_parser("label", help="label --pairs F --out F: the labeling page; label export "
                   "--store F --out F: labels as HH jsonl")
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        return args.fn(args, overrides)
    except (FileNotFoundError, KeyError, ValueError, FloatingPointError) as e:
        # bad input (DataError is a ValueError naming file:line), a missing file, a wrong
        # config key, or a NaN: one clear line, no traceback, non-zero exit
        print(f"hh-jax {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
