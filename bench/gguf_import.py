"""SmolLM2 GGUF import: wall time and peak host memory, and held-out perplexity.

    python bench/gguf_import.py                 # import time + peak RSS (fresh processes)
    python bench/gguf_import.py --ppl [N]       # + perplexity on N held-out HH dialogues
                                                #   (default: all of them)

Import: each measurement runs in a fresh Python process (peak RSS is per process), and
reports the time of `load_pretrained("smollm2-135m")` split into header parse, tokenizer
build and weight dequantization, beside a reference measured in the same run: the `gguf`
package's own `GGUFReader` on the same file, and, if `transformers` is installed,
`AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`.

Perplexity: the chosen dialogues of the held-out split (hh_jax/data/hh.py `split_of`,
`skip_invalid=True`, deduplicated as the LM stage does: loaders.dialogue_texts), each
rendered in SmolLM2's chat format (ChatML) by hh_jax.chat.dialogue_ids; per-token
perplexity over every predicted token and over the Assistant-response tokens only (EOS
included). With --raw: the raw transcripts + EOS, as the LM stage packs them, with nats per
UTF-8 byte (comparable across tokenizers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
mode = sys.argv[1]
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
if mode == "ours":
    from hh_jax.pretrained import convert, gguf_file, registry
    from hh_jax.tokenizer import BPETokenizer
    out["import_s"] = time.perf_counter() - t0
    out["rss_after_import_mb"] = rss()
    path = registry.pretrained_path("smollm2-135m")
    t = time.perf_counter(); g = gguf_file.read_gguf(path)
    out["header_s"] = time.perf_counter() - t
    t = time.perf_counter(); BPETokenizer.from_gguf_metadata(g.metadata)
    out["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter(); cfg, params, tok = convert.load_pretrained("smollm2-135m")
    out["load_pretrained_s"] = time.perf_counter() - t
    out["param_mb"] = sum(x.nbytes for x in __import__("jax").tree_util.tree_leaves(params)) / 2**20
elif mode == "gguf_reader":
    import gguf
    from hh_jax.pretrained import registry
    path = registry.pretrained_path("smollm2-135m")
    t = time.perf_counter(); r = gguf.GGUFReader(path); out["header_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for x in r.tensors: gguf.quants.dequantize(x.data, x.tensor_type)
    out["dequantize_s"] = time.perf_counter() - t
else:
    import os, torch, transformers
    from hh_jax.pretrained import registry
    os.environ["HF_HUB_OFFLINE"] = "1"
    d, f = os.path.split(registry.pretrained_path("smollm2-135m"))
    out["import_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    out["load_s"] = time.perf_counter() - t
out["peak_rss_mb"] = rss()
print(json.dumps(out))
"""


def child(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    res = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_import(repeats: int, with_transformers: bool) -> dict:
    modes = ["ours", "gguf_reader"] + (["transformers"] if with_transformers else [])
    runs = {m: [child(m) for _ in range(repeats)] for m in modes}
    for m, rs in runs.items():
        for r in rs:
            print(m, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in r.items()}))
    best = {m: min(rs, key=lambda r: r.get("peak_rss_mb", 1e18)) for m, rs in runs.items()}
    ours, ref = best["ours"], best["gguf_reader"]
    if "header_s" in ours and "header_s" in ref:
        print(f"header parse: ours {ours['header_s']:.2f} s vs gguf.GGUFReader "
              f"{ref['header_s']:.2f} s ({ref['header_s'] / ours['header_s']:.0f}x)")
    return best


def _encode(tok, fmt, text):
    """(ids, is_reply) of one transcript: ChatML via chat.dialogue_ids, or the raw
    transcript + EOS as the LM stage packs it (no reply mask)."""
    from hh_jax import chat

    if fmt is None:
        ids = tok.encode(text) + [tok.eos_id]
        return ids, [False] * len(ids)
    return chat.dialogue_ids(tok, chat.turns_of(text), fmt)


def heldout_perplexity(n: int | None, raw: bool, every: int = 1, batch_tokens: int = 2048,
                       progress: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hh_jax import chat
    from hh_jax.data import loaders
    from hh_jax.model import Transformer
    from hh_jax.pretrained import convert

    texts = loaders.dialogue_texts(os.path.join(ROOT, "data", "hh-rlhf"), skip_invalid=True)[0]
    heldout = texts["heldout"][::every][:n] if n else texts["heldout"][::every]
    cfg, params, tok = convert.load_pretrained("smollm2-135m")
    fmt = None if raw else chat.format_for(tok)
    model = Transformer(cfg)

    @jax.jit
    def nll(params, tokens_BxL, mask_BxL):
        logits = model.apply(params, tokens_BxL, mask_BxL=mask_BxL)["logits_BxLxV"][:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]

    items = sorted((_encode(tok, fmt, t) for t in heldout), key=lambda x: len(x[0]))
    cut = sum(len(ids) > cfg.max_len for ids, _ in items)
    tot = np.zeros(4)  # nll, tokens, reply nll, reply tokens
    t0, i = time.perf_counter(), 0
    bucket = lambda n: -(-n // (32 if n <= 256 else 128)) * (32 if n <= 256 else 128)  # noqa: E731
    while i < len(items):
        chunk = items[i: i + max(1, batch_tokens // bucket(len(items[i][0])))]
        width = min(cfg.max_len, bucket(max(len(c[0]) for c in chunk)))
        tokens = np.zeros((len(chunk), width), np.int32)
        mask, reply = np.zeros_like(tokens, bool), np.zeros_like(tokens, bool)
        for b, (ids, rep) in enumerate(chunk):
            ids, rep = ids[:width], rep[:width]
            tokens[b, : len(ids)], mask[b, : len(ids)], reply[b, : len(ids)] = ids, True, rep
        out = np.asarray(nll(params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
        valid, rep = mask[:, 1:], reply[:, 1:]
        tot += [out[valid].sum(), valid.sum(), out[rep].sum(), rep.sum()]
        i += len(chunk)
        if progress:
            print(f"  {i}/{len(items)} dialogues, {int(tot[1])} tokens, "
                  f"{time.perf_counter() - t0:.0f} s, ppl so far {np.exp(tot[0] / tot[1]):.3f}",
                  flush=True)
    res = {"format": "raw hh transcript + EOS" if raw else fmt.name, "every": every,
           "heldout_dialogues": len(texts["heldout"]), "dialogues": len(items),
           "truncated_to_max_len": int(cut), "tokens_predicted": int(tot[1]),
           "ppl_all_tokens": float(np.exp(tot[0] / tot[1])), "seconds": time.perf_counter() - t0}
    if raw:
        res["nats_per_byte"] = float(tot[0] / sum(len(t.encode()) + 1 for t in heldout))
    else:
        res.update(reply_tokens=int(tot[3]), ppl_reply_tokens=float(np.exp(tot[2] / tot[3])))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--skip-import", action="store_true")
    parser.add_argument("--ppl", nargs="?", type=int, const=0, default=None,
                        help="held-out perplexity on N dialogues (no N: all)")
    parser.add_argument("--every", type=int, default=1,
                        help="perplexity on every k-th held-out dialogue (file order)")
    parser.add_argument("--raw", action="store_true",
                        help="perplexity of the raw HH transcripts instead of ChatML")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}")
    if not args.skip_import:
        try:
            import transformers  # noqa: F401
            has_tf = not args.no_transformers
        except ImportError:
            has_tf = False
        bench_import(args.repeats, has_tf)
    if args.ppl is not None:
        print(json.dumps(heldout_perplexity(args.ppl or None, args.raw, args.every)))


if __name__ == "__main__":
    main()
