"""The whole pipeline on CPU, from scratch, in minutes: the README's main job.

Command:
    hh-jax run experiments/smoke.py --workdir runs/smoke
Runtime: about 4 minutes on 2 CPU cores (most of it the LM stage).
Expected: a 6M-parameter Llama-style LM with a 4,096-piece sentencepiece tokenizer trained
on the HH train-split dialogues reaches a held-out perplexity far below the unigram
perplexity of the same tokenizer (see README "Results").
Arg: "tiny" shrinks everything to the "test" model for a seconds-long check.
"""

from common import lm_config, pm_config
from ml_collections import ConfigDict


def get_config(arg: str = "") -> ConfigDict:
    c = ConfigDict()
    c.stages = ("lm", "pmp", "pm")
    c.lm = lm_config()
    c.pmp = pm_config("pmp")
    c.pm = pm_config("pm")
    if arg == "tiny":
        c.lm.model = "test"
        c.lm.tokenizer.vocab_size = 512
        c.lm.seq_len, c.lm.batch_size, c.lm.steps = 64, 8, 6
        c.lm.model_overrides.max_len = 128
        c.lm.eval_tokens, c.lm.log_every, c.lm.eval_every, c.lm.ckpt_every = 2048, 2, 4, 2
        c.lm.optim.warmup_steps = 2
        for stage in (c.pmp, c.pm):
            stage.max_len, stage.batch_size, stage.eval_batch_size = 64, 8, 16
            stage.data.fraction, stage.eval.max_pairs, stage.ckpt_every = 0.02, 32, 4
            stage.log_every = 4
    elif arg:
        raise ValueError(f"unknown arg {arg!r}: expected '' or 'tiny'")
    return c


def sweep(add, arg: str = ""):
    for size in ("test", "6M"):
        add(**{"lm.model": size})
