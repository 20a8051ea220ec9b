"""LM train step: hh_jax's jitted step vs a plain-JAX reference of the same shapes.

    python bench/train_step.py [--size 6M] [--batch 16] [--seq 256] [--steps 20] [--dtype float32]

The reference is written here in jax.numpy alone (Llama block: RMSNorm, RoPE, GQA
attention, SwiGLU, tied head; hand-written AdamW), with no Flax, no optax and no sharding
annotations. Both are timed in the same process on the same shapes, interleaved, and the
script prints tokens/s, model FLOP/s (6N + 12·L·d·T per token) and the ratio ours/reference.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ml_collections import ConfigDict  # noqa: E402
from reference import ref_init, ref_step, time_fn  # noqa: E402

from hh_jax import metrics, sharding, state  # noqa: E402
from hh_jax.model import SIZES, Transformer  # noqa: E402
from hh_jax.optim import make_optimizer  # noqa: E402
from hh_jax.stages import lm


# ------------------------------------------------------------------------------ timing
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="6M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    cfg = SIZES[a.size].replace(vocab_size=a.vocab, max_len=a.seq, dtype=a.dtype)
    tokens = jax.random.randint(jax.random.key(1), (a.batch, a.seq), 0, cfg.vocab_size)
    ones = jnp.ones_like(tokens, jnp.float32)
    batch = {"tokens_BxL": tokens, "mask_BxL": ones.astype(bool), "weights_BxL": ones}

    mesh = sharding.make_mesh((-1, 1, 1))
    model = Transformer(cfg)
    opt = make_optimizer(ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule="constant")), 100)
    boxed = lambda: model.init(jax.random.key(0), tokens)  # noqa: E731
    abstract, p_sh = state.param_shardings(boxed, mesh)
    st_sh = state.state_shardings(p_sh, opt, abstract, mesh)
    st = state.init_state(state.init_params(boxed, mesh)[0], opt, st_sh)
    ours = jax.jit(functools.partial(lm.train_step, model=model, optimizer=opt),
                   in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=0)
    holder = {"st": st}

    def run_ours():
        with sharding.activate(mesh):
            holder["st"], m = ours(holder["st"], batch)
        return m["train/loss"]

    rp = ref_init(cfg, jax.random.key(0))
    ref = jax.jit(functools.partial(ref_step, cfg=cfg), donate_argnums=(0, 1, 2))
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, rp)  # noqa: E731
    rh = {"s": (rp, zeros(), zeros(), jnp.zeros((), jnp.float32))}

    def run_ref():
        p, m, v, s, loss = ref(*rh["s"], tokens)
        rh["s"] = (p, m, v, s)
        return loss

    t_ours, t_ref = [], []
    for _ in range(a.rounds):  # interleaved, best of rounds: robust to a noisy neighbour
        t_ours.append(time_fn(run_ours, a.steps))
        t_ref.append(time_fn(run_ref, a.steps))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(holder["st"].params))
    non_embed = n_params - cfg.vocab_size * cfg.d_model
    flops_tok = metrics.transformer_flops_per_token(non_embed + cfg.vocab_size * cfg.d_model,
                                                    cfg.n_layers, cfg.d_model, a.seq)
    toks = a.batch * a.seq
    best_ours, best_ref = min(t_ours), min(t_ref)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")
    print(f"shape: {a.size} ({n_params / 1e6:.2f}M params, vocab {cfg.vocab_size}), batch "
          f"{a.batch} x seq {a.seq}, {a.dtype}")
    for name, t in (("hh_jax", best_ours), ("plain-JAX reference", best_ref)):
        print(f"{name:>20}: {t * 1e3:8.1f} ms/step  {toks / t:10.0f} tokens/s  "
              f"{flops_tok * toks / t / 1e9:8.1f} model GFLOP/s")
    print(f"ratio (hh_jax / reference tokens/s): {best_ref / best_ours:.3f}")


if __name__ == "__main__":
    main()
