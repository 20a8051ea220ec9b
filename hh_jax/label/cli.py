"""`hh-jax label`: serve the labeling page, or export the labels as HH jsonl.

  hh-jax label --pairs PAIRS.jsonl --out LABELS.jsonl [--host H] [--port P] [--labeler NAME]
  hh-jax label export --store LABELS.jsonl --out HH.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys

from hh_jax.data.jsonl_reader import DataError


def _serve(args) -> int:
    from hh_jax.label import server

    srv = server.make_server(args.pairs, args.out, host=args.host, port=args.port,
                             labeler=args.labeler)
    app = srv.RequestHandlerClass.app
    done = app.progress(app.store.labeled_ids())
    print(f"labeling {done['total']} pairs ({done['done']} done) as {app.labeler!r} into "
          f"{args.out}\nopen {srv.url}  (Ctrl-C to stop)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        done = app.progress(app.store.labeled_ids())
        app.store.close()
    print(f"stopped: {done['done']} of {done['total']} labeled in {args.out}")
    return 0


def _export(args) -> int:
    from hh_jax.label import store

    n = store.export_hh(args.store, args.out)
    print(f"wrote {n} HH comparisons to {args.out} (read by `hh-jax eval pm --data` and the "
          "pm stage's data paths)")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="hh-jax label export",
                                    description="write a comparisons store as HH jsonl")
        p.add_argument("--store", required=True, help="the labels file `hh-jax label` wrote")
        p.add_argument("--out", required=True, help="HH jsonl to write (atomically)")
        args, fn = p.parse_args(argv[1:]), _export
    else:
        p = argparse.ArgumentParser(prog="hh-jax label", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--pairs", required=True, help="pairs jsonl: id, context, response_a/b")
        p.add_argument("--out", required=True, help="the comparisons store (appended to)")
        p.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=0, help="0 (default): a free port")
        p.add_argument("--labeler", help="name recorded with each label (default: OS user)")
        args, fn = p.parse_args(argv), _serve
    try:
        return fn(args)
    except (DataError, FileNotFoundError, OSError) as e:  # file:line errors: one line
        print(f"hh-jax label: error: {e}", file=sys.stderr)
        return 1
