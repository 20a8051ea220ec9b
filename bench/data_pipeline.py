"""Throughput of the grain input pipelines, tokenization included, vs a plain loop.

    python bench/data_pipeline.py [--vocab 4000] [--threads 0,1,2,4] [--repeats 2]

Data: the shipped HH-RLHF test files (8,488 valid comparisons). Tokenizers: the byte
tokenizer and a sentencepiece BPE (vocab 4000) trained here on the train side. For each,
the reference is a plain Python loop that only tokenizes the same texts (no grain, no
batching, no padding); the pipeline rows give examples/s and the ratio pipeline/reference.
PM: one example = one (chosen, rejected) pair, max_len 1024, global batch 32, bucketed
padding. LM: one example = one dialogue (context + chosen), packed into 1024-token rows.
Prints a markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hh_jax.data import hh, loaders, stackexchange  # noqa: E402
from hh_jax.tokenizer import ByteTokenizer, SentencePieceTokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{len(os.sched_getaffinity(0))} CPUs usable (nproc), {model}, Python "
            f"{platform.python_version()}, load average {load} at the end")


def best_of(repeats: int, fn) -> float:
    """Fastest wall time of `repeats` runs of fn() (the least disturbed one)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def drain(ds) -> int:
    n = 0
    for batch in ds:
        n += len(next(iter(batch.values())))
    return n


def bench_tokenizer(name, tok, comps, texts, args, rows) -> None:
    n_pairs, n_texts = len(comps), len(texts)
    t_ref = best_of(args.repeats, lambda: [(tok.encode(c.context + c.chosen),
                                            tok.encode(c.context + c.rejected)) for c in comps])
    rows.append((name, "PM reference: plain tokenize loop", "-", n_pairs / t_ref, 1.0))
    for threads in args.threads:
        def pm(threads=threads):
            ds = loaders.pm_dataset(comps, tok, max_len=1024, global_batch=32, seed=0,
                                    drop_remainder=False, process_index=0, process_count=1,
                                    num_threads=threads)
            assert drain(ds) == -(-n_pairs // 32) * 32
        t = best_of(args.repeats, pm)
        rows.append((name, "PM grain pipeline (pairs)", threads, n_pairs / t, t_ref / t))
    t_ref = best_of(args.repeats, lambda: [tok.encode(x) for x in texts])
    rows.append((name, "LM reference: plain tokenize loop", "-", n_texts / t_ref, 1.0))
    for threads in args.threads:
        def lm(threads=threads):
            drain(loaders.lm_dataset(texts, tok, seq_len=1024, global_batch=8, seed=0,
                                     num_epochs=1, process_index=0, process_count=1,
                                     num_threads=threads))
        t = best_of(args.repeats, lm)
        rows.append((name, "LM grain pipeline (dialogues, packed)", threads, n_texts / t,
                     t_ref / t))


def bench_tfds(tok, args, rows) -> None:
    from hh_jax.data import tfds_builders

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        builder = tfds_builders.prepare("hh_rlhf/all", tmp, skip_invalid=True,
                                        source_dir=os.path.join(REPO, "data", "hh-rlhf"))
        t_build = time.perf_counter() - start
        source = tfds_builders.ComparisonSource(
            builder.as_data_source(split=tfds_builders.hh_split(builder, "test")))
        rows.append(("-", "TFDS build hh_rlhf/all (parse + validate + write)", "-",
                     len(source) / t_build, None))
        threads = max(args.threads)
        t = best_of(args.repeats, lambda: drain(loaders.pm_dataset(
            source, tok, max_len=1024, global_batch=32, seed=0, drop_remainder=False,
            process_index=0, process_count=1, num_threads=threads)))
        rows.append(("sentencepiece", "PM grain pipeline from array_record", threads,
                     len(source) / t, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--threads", default="0,1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.threads = [int(x) for x in args.threads.split(",")]
    rows = []
    hh_dir = os.path.join(REPO, "data", "hh-rlhf")
    start = time.perf_counter()
    comps, report = hh.load_hh_comparisons(hh_dir, skip_invalid=True)
    t = time.perf_counter() - start
    rows.append(("-", "parse + validate HH jsonl.gz (rows)", "-", report.total.rows / t, None))
    start = time.perf_counter()
    _, se_report = stackexchange.load_stackexchange(os.path.join(REPO, "data", "stackexchange"))
    t = time.perf_counter() - start
    rows.append(("-", "parse Posts.xml + build PMP pairs (rows)", "-", se_report.total.rows / t,
                 None))
    texts = loaders.lm_texts(comps)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sp = SentencePieceTokenizer.train(loaders.lm_texts(hh.select_split(comps, "train")),
                                          os.path.join(tmp, "sp"), vocab_size=args.vocab)
        t_train = time.perf_counter() - start
        print(f"trained sentencepiece vocab {args.vocab} in {t_train:.1f}s", file=sys.stderr)
        for name, tok in (("byte", ByteTokenizer()), ("sentencepiece", sp)):
            bench_tokenizer(name, tok, comps, texts, args, rows)
        bench_tfds(sp, args, rows)
    print(f"Machine: {machine()}. Data: {len(comps)} HH comparisons (shipped test files). "
          f"sentencepiece: BPE vocab {args.vocab}, trained in {t_train:.1f}s. Best of "
          f"{args.repeats} runs.\n")
    print("| tokenizer | what | read threads | examples/s | vs reference loop |")
    print("|---|---|---|---|---|")
    for name, what, threads, rate, ratio in rows:
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"| {name} | {what} | {threads} | {rate:,.0f} | {ratio_s} |")


if __name__ == "__main__":
    main()
