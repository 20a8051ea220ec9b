"""optax chains and schedules from config."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(cfg: ConfigDict, total_steps: int, lr: float | None = None
                           ) -> optax.Schedule:
    """Linear warmup then cosine / linear / constant to `lr` (default `cfg.lr`), with
    `cfg.warmup_steps`."""
    lr = cfg.lr if lr is None else lr
    warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    kind = cfg.get("schedule", "cosine")
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.get("lr_min_ratio", 0.1))
    elif kind == "linear":
        decay = optax.linear_schedule(lr, lr * cfg.get("lr_min_ratio", 0.0), decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule {kind!r}: expected cosine, linear or constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg: ConfigDict, total_steps: int, lr: float | None = None
                   ) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on matrices only, not norms or biases.
    `lr`: the peak learning rate, by default `cfg.lr` (the stages after the LM derive
    theirs from the LM's: base_lr × lr_ratio)."""
    schedule = learning_rate_schedule(cfg, total_steps, lr)
    return optax.chain(
        optax.clip_by_global_norm(cfg.get("grad_clip", 1.0)),
        optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95),
                    eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0),
                    mask=_decay_mask),
    )


def _decay_mask(params):
    # By name, not ndim: scanned layers stack norm scales into 2-D arrays.
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)
