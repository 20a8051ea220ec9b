"""PM training throughput on real HH pairs, in real (non-pad) tokens/s.

    python bench/pm_step.py [--steps 20] [--batch 16] [--max-len 512]

Shape: the anchor of issue 5 (4 layers, d 256, 4 heads / 2 KV heads, ffw 1024, vocab 8192,
≤ 512 tokens, float32). Batches come from hh_jax's PM loader over the HH train split in
length-grouped order (pm.length_grouped), the same pairs in the same order in both pair
layouts: "shared" (the stage default: one row per pair, context run once) and "separate"
(chosen and rejected as two rows). The reference is a plain-JAX PM step (bench/reference.py:
same architecture, full-mask attention, hand-written Adam) on the SAME separate batches,
timed in the same run. Printed: real tokens/s (context + response, counted for each
response, as TRL counts them), row tokens run per real token, the ratios to the reference,
and to TRL RewardTrainer's recorded anchor (1,846 real tokens/s, TRL 1.16 / PyTorch 2.13
CPU on this kind of 2-core machine; recorded, not rerun here).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optax  # noqa: E402
from reference import ref_hidden, ref_init  # noqa: E402

from hh_jax import reward, sharding, state  # noqa: E402
from hh_jax.data import hh, loaders
from hh_jax.model import SIZES, Transformer  # noqa: E402
from hh_jax.stages import pm
from hh_jax.tokenizer import SentencePieceTokenizer  # noqa: E402

TRL_ANCHOR = 1846.0


def batches(n, batch, max_len, vocab, workdir, layout):
    comps, _ = hh.load_hh_comparisons(os.path.join(os.path.dirname(__file__), "..", "data",
                                                     "hh-rlhf"), skip_invalid=True)
    train = hh.select_split(comps, "train")
    tok_path = os.path.join(workdir, f"bench_sp{vocab}.model")
    tok = (SentencePieceTokenizer(tok_path) if os.path.exists(tok_path) else
           SentencePieceTokenizer.train([c.context + c.chosen for c in train],
                                        tok_path[:-len(".model")], vocab))
    lengths = reward.pair_row_lengths(train, tok, max_len, "shared")  # one order for both layouts
    ordered = pm.length_grouped(train, lengths, batch, seed=0)
    ds = loaders.pm_dataset(ordered, tok, max_len=max_len, global_batch=batch, seed=0,
                            shuffle=False, layout=layout)
    out = []
    for b in ds:
        out.append({k: v for k, v in b.items() if v.dtype != object})
        if len(out) == n:
            return out


def ref_pm_loss(p, b, cfg):
    tokens = jnp.concatenate([b["chosen_tokens_BxL"], b["rejected_tokens_BxL"]])
    lens = jnp.concatenate([b["chosen_len_B"], b["rejected_len_B"]])
    mask = jnp.arange(tokens.shape[1])[None] < lens[:, None]
    h = ref_hidden(p, tokens, cfg, mask)
    r = h[jnp.arange(len(lens)), lens - 1] @ p["head"]
    n = b["chosen_len_B"].shape[0]
    return jax.nn.softplus(r[n:] - r[:n]).mean()


def ref_adam_step(p, m, v, t, b, cfg, lr=1e-4):
    loss, g = jax.value_and_grad(ref_pm_loss)(p, b, cfg)
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree_util.tree_map(lambda v, g: 0.95 * v + 0.05 * g * g, v, g)
    p = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * (m / (1 - 0.9 ** t)) / (jnp.sqrt(v / (1 - 0.95 ** t)) + 1e-8),
        p, m, v)
    return p, m, v, t, loss


def shape_of(b):
    return tuple(v.shape for k, v in sorted(b.items()) if k.endswith("_BxL"))


def run(fn, bs):
    for b in {shape_of(b): b for b in bs}.values():  # compile every bucket shape first
        jax.block_until_ready(fn(b))
    t0 = time.perf_counter()
    for b in bs:
        out = fn(b)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def our_step(cfg, mesh):
    model = Transformer(cfg)
    opt = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
    boxed = reward.pm_init(model)
    abstract, p_sh = state.param_shardings(boxed, mesh)
    st_sh = state.state_shardings(p_sh, opt, abstract, mesh)
    holder = {"st": state.init_state(state.init_params(boxed, mesh)[0], opt, st_sh)}
    step = jax.jit(functools.partial(pm.train_step, model=model, optimizer=opt),
                   in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)

    def ours(b):
        with sharding.activate(mesh):
            holder["st"], m = step(holder["st"], sharding.put_batch(b, mesh))
        return m["train/loss"]
    return ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/hh_jax_bench")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    cfg = SIZES["6M"].replace(vocab_size=a.vocab, max_len=a.max_len)
    mesh = sharding.make_mesh((-1, 1, 1))
    runs = {}
    for layout in ("shared", "separate"):  # the same pairs in the same order, both layouts
        bs = batches(a.steps, a.batch, a.max_len, a.vocab, a.workdir, layout)
        real = sum(float(b["chosen_len_B"].sum() + b["rejected_len_B"].sum()) for b in bs)
        rows = sum(b["pair_tokens_BxL" if layout == "shared" else "chosen_tokens_BxL"].size
                   * (1 if layout == "shared" else 2) for b in bs)
        ran = (sum(float((b["pair_branch_BxL"] > 0).sum()) for b in bs) if layout == "shared"
               else real)
        ours = our_step(cfg, mesh)
        runs[layout] = dict(real=real, rows=rows, ran=ran, bs=bs,
                            t=min(run(ours, bs), run(ours, bs)))
    rp = {**ref_init(cfg, jax.random.key(0)), "head": jnp.zeros((cfg.d_model,))}
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, rp)  # noqa: E731
    rh = {"s": (rp, zeros(), zeros(), jnp.zeros(()))}
    rstep = jax.jit(functools.partial(ref_adam_step, cfg=cfg), donate_argnums=(0, 1, 2))

    def ref(b):
        p, m, v, t, loss = rstep(*rh["s"], b)
        rh["s"] = (p, m, v, t)
        return loss

    sep = runs["separate"]
    t_ref = min(run(ref, sep["bs"]), run(ref, sep["bs"]))
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__}; {a.steps} batches of "
          f"{a.batch} HH train pairs (length-grouped), ≤{a.max_len} tokens a response's view, "
          f"vocab {a.vocab}; real tokens = context + response, counted for each response "
          f"(TRL's count)")
    for layout, r in runs.items():
        print(f"layout {layout:>8}: {r['ran'] / r['rows']:.1%} of the padded row tokens are "
              f"real; the model runs {r['rows'] / r['real']:.2f} row tokens per real token "
              f"(TRL: 2.17)")
    rows = (("hh_jax PM step, shared", runs["shared"]["t"], runs["shared"]["real"]),
            ("hh_jax PM step, separate", sep["t"], sep["real"]),
            ("plain-JAX reference, separate", t_ref, sep["real"]))
    for name, t, real in rows:
        print(f"{name:>30}: {real / t:9.0f} real tokens/s  ({t / a.steps * 1e3:.0f} ms/step)")
    print(f"ratio hh_jax / reference, same separate batches: {t_ref / sep['t']:.3f}")
    print(f"ratio hh_jax (shared) / reference: "
          f"{runs['shared']['real'] / runs['shared']['t'] / (sep['real'] / t_ref):.3f}")
    print(f"ratio hh_jax (shared) / TRL anchor ({TRL_ANCHOR:.0f} real tokens/s): "
          f"{runs['shared']['real'] / runs['shared']['t'] / TRL_ANCHOR:.2f}")


if __name__ == "__main__":
    main()
