"""Stage `base`: a pretrained model imported once and exported as the pipeline's base.

`model` is a registered name (`smollm2-135m`), a `.gguf` file or a Hugging Face checkpoint
directory (hh_jax/pretrained/convert.py). The export is an ordinary LM export (params,
meta.json with the model config and the tokenizer's name), so π0 (`policy_from`) and the
PMs (`init_from`) start from it like from a model trained here.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics
from hh_jax.pretrained import convert


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    mcfg, params, tok = convert.load_pretrained(cfg.model)
    export_dir = os.path.join(stage_dir, "params")
    checkpoint.export_params(export_dir, params, {
        "stage": "lm", "step": 0, "model": dataclasses.asdict(mcfg), "tokenizer": cfg.model,
        "source": cfg.model})
    n = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    print(f"[base] {cfg.model}: {mcfg.n_layers}L d{mcfg.d_model}, {n:,} params, vocab "
          f"{tok.vocab_size} → {export_dir}", flush=True)
    summary = {"model": cfg.model, "params": n, "config": dataclasses.asdict(mcfg)}
    metrics.write_summary(stage_dir, summary)
    return summary
