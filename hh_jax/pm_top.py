"""A PM finetuned above a frozen trunk, trained on cached trunk activations (pm_cache).

The PM is the pretrained model with its first `n_frozen` layers fixed: its trainable
params are the top layers, the final norm and the reward head. PAPER.md §3 finetunes the
whole model; freezing the trunk is the cheap variant for a CPU (each epoch runs only the
top layers over the cached activations) and the export is an ordinary PM export (trunk +
trained top + head), so `hh-jax eval pm`, PPO and best-of-N read it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hh_jax import reward, state, trunk
from hh_jax.model import ModelConfig, ScalarHead
from hh_jax.pm_cache import bucket, pad_rows


def split_params(pm_params, n_frozen: int):
    """(frozen trunk params, trainable top) of a PM's {"backbone", "head"} params."""
    p = pm_params["backbone"]["params"]
    top = {"layers": trunk.layer_slice(p["layers"], n_frozen, None), "final_norm": p["final_norm"],
           "head": pm_params["head"]}
    frozen = {**p, "layers": trunk.layer_slice(p["layers"], 0, n_frozen)}
    del frozen["final_norm"]
    return frozen, top


def join_params(frozen, top):
    """The inverse of split_params: a full PM params tree (what a PM export holds)."""
    layers = jax.tree_util.tree_map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]),
                                    frozen["layers"], top["layers"])
    backbone = {**frozen, "layers": layers, "final_norm": top["final_norm"]}
    return {"backbone": {"params": backbone}, "head": top["head"]}


def pair_scores(top, batch, *, cfg: ModelConfig):
    """(r_chosen_B, r_rejected_B) from cached activations x_BxLxD (pm_cache rows)."""
    branch_BxL = batch["branch_BxL"].astype(jnp.int32)
    mask = trunk.mask_for(batch["positions_BxL"], branch_BxL > 0, branch_BxL)
    index_Bx2 = jnp.stack([batch["chosen_index_B"], batch["rejected_index_B"]], axis=1)
    hidden_Bx2xD = trunk.top_read(cfg, top["layers"], top["final_norm"],
                                  batch["x_BxLxD"].astype(jnp.dtype(cfg.dtype)),
                                  batch["positions_BxL"], mask, index_Bx2)
    r_Bx2 = ScalarHead(cfg.d_model, use_bias=False).apply(top["head"], hidden_Bx2xD)
    return r_Bx2[:, 0], r_Bx2[:, 1]


def loss_fn(top, batch, cfg: ModelConfig, bradley_terry):
    r_good_B, r_bad_B = pair_scores(top, batch, cfg=cfg)
    w_B = batch["weight_B"]
    loss = bradley_terry(r_good_B, r_bad_B, w_B)
    return loss, {"train/loss": loss, "train/bt_loss": loss,
                  **reward.pair_metrics(r_good_B, r_bad_B, w_B)}


def train_step(st: state.TrainState, batch, *, cfg: ModelConfig,
               optimizer: optax.GradientTransformation, bradley_terry):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params, batch, cfg,
                                                                bradley_terry)
    updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
    aux["train/grad_norm"] = optax.global_norm(grads)
    return st.replace(step=st.step + 1, params=optax.apply_updates(st.params, updates),
                      opt_state=opt_state), aux


def cache_batch(cache: dict, rows: np.ndarray, length: int) -> dict:
    """A padded batch of cached pair rows (length ≥ the longest row)."""
    out = dict(zip(("x_BxLxD", "positions_BxL", "branch_BxL"), pad_rows(
        rows, length, cache["offsets"], cache["lengths"], cache["x_TxD"], cache["positions"],
        cache["branch"]), strict=True))
    out["chosen_index_B"] = cache["chosen_index"][rows].astype(np.int32)
    out["rejected_index_B"] = cache["rejected_index"][rows].astype(np.int32)
    out["chosen_len_B"] = cache["chosen_len"][rows].astype(np.int32)
    out["rejected_len_B"] = cache["rejected_len"][rows].astype(np.int32)
    out["weight_B"] = np.ones(len(rows), np.float32)
    out["subset_B"] = np.asarray(cache["subset"][rows], dtype=object)
    return out


class CacheBatches:
    """Training batches over cached rows in a fixed order: `order` holds whole batches of
    row indices (pm.length_grouped's order, so batches pad little). Its state is the
    position, checkpointed with the model so a resumed run sees the same batches."""

    def __init__(self, cache: dict, order: Sequence[int], batch: int):
        self.cache, self.batch, self.pos = cache, batch, 0
        self.order = np.asarray(order)[: len(order) // batch * batch]

    def __len__(self) -> int:
        return len(self.order) // self.batch

    def next(self) -> dict:
        rows = self.order[self.pos * self.batch:(self.pos + 1) * self.batch]
        self.pos += 1
        return cache_batch(self.cache, rows, bucket(int(self.cache["lengths"][rows].max())))

    def get_state(self) -> dict:
        return {"pos": int(self.pos)}

    def set_state(self, s: dict) -> None:
        self.pos = int(s["pos"])


def score_cache(score_fn, top, cache: dict, rows: np.ndarray, batch_tokens: int = 8192,
                multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) of the cached `rows`, in their order. Batches hold rows of
    one length bucket, padded with copies to a multiple of `multiple` rows (the mesh's
    data-parallel size); the copies' scores are dropped."""
    rows = np.asarray(rows)
    rc, rr = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32)
    lengths = cache["lengths"][rows]
    order = np.argsort(lengths, kind="stable")
    i = 0
    while i < len(order):
        length = bucket(int(lengths[order[i]]))
        take = order[i:i + max(multiple, batch_tokens // length // multiple * multiple)]
        take = take[[bucket(int(n)) == length for n in lengths[take]]]
        padded = np.concatenate([take, np.repeat(take[-1:], -len(take) % multiple)])
        batch = cache_batch(cache, rows[padded], length)
        c, r = score_fn(top, {k: v for k, v in batch.items() if v.dtype != object})
        rc[take], rr[take] = np.asarray(c)[:len(take)], np.asarray(r)[:len(take)]
        i += len(take)
    return rc, rr
