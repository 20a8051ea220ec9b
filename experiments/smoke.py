"""The whole pipeline on CPU, from scratch, in minutes: the README's main job.

Command:
    hh-jax run experiments/smoke.py --workdir runs/smoke
Runtime: under 10 minutes on 2 CPU cores (BENCHMARKS.md has the measured per-stage times).
Stages: lm → distill → pmp → pm (train PM, half "a") → pm_test (test PM, half "b") → ppo →
bon, then report.html. Expected: the 6M LM's held-out perplexity far below the unigram
perplexity of its tokenizer; PMs near chance at this scale (their accuracy comes with 95%
intervals and the longer-response baseline); PPO moves the policy a measured KL from π0
and reports train- and test-PM scores and the √KL fit; best-of-n beside it.
Arg: "tiny" shrinks everything to the "test" model for a seconds-long check.
"""

import os

from common import REPO, bon_config, distill_config, lm_config, pm_config, ppo_config, tie_lrs
from ml_collections import ConfigDict

SHORT_PROMPT = os.path.join(REPO, "hh_jax", "data", "prompts", "hhh_prompt_short.txt")


def get_config(arg: str = "") -> ConfigDict:
    c = ConfigDict()
    c.stages = ("lm", "distill", "pmp", "pm", "pm_test", "ppo", "bon")
    # CPU budget: every stage is cut to minutes; experiments/pm_hh.py trains PMs on all data
    c.lm = lm_config(steps=90)
    # the short HHH prompt (76 tokens with this tokenizer) + 48 tokens of text fit the
    # LM's 128-token context; the default prompt (461 tokens) needs a longer-context LM
    c.distill = distill_config(steps=10, eval_tokens=8192, log_every=5, ckpt_every=5,
                               prompt_file=SHORT_PROMPT, seq_len=48)
    # PM stages read the last 128 tokens (context cut from the left, the response kept):
    # a 2-core CPU trains ~1-2k real tokens/s, so these see a few hundred pairs each
    c.pmp = pm_config("pmp", max_len=128)
    c.pmp.data.fraction = 0.03
    # robustness protocol (PAPER.md §4.2): the train PM and the test PM see disjoint halves
    c.pm = pm_config("pm", max_len=128)
    c.pm.data.half, c.pm.data.fraction = "a", 0.1
    c.pm_test = pm_config("pm", max_len=128)
    c.pm_test.data.half, c.pm_test.data.fraction = "b", 0.1
    for stage in (c.pmp, c.pm, c.pm_test):
        stage.eval.max_pairs, stage.buckets = 128, (128, 256)  # shared rows: ≤ 2 × 128
    c.ppo = ppo_config(policy_from="{workdir}/distill/params",
                       test_pm_from="{workdir}/pm_test/params", iterations=16,
                       eval_prompts=32, eval_every=4)
    c.bon = bon_config(eval_prompts=32)
    if arg == "tiny":
        c.lm.model = "test"
        c.lm.tokenizer.vocab_size = 512
        c.lm.seq_len, c.lm.batch_size, c.lm.steps = 64, 8, 6
        c.lm.model_overrides.max_len = 128
        c.lm.eval_tokens, c.lm.log_every, c.lm.eval_every, c.lm.ckpt_every = 2048, 2, 4, 2
        c.lm.optim.warmup_steps = 2
        c.distill.steps, c.distill.seq_len, c.distill.batch_size = 4, 64, 8
        c.distill.eval_tokens, c.distill.log_every, c.distill.ckpt_every = 1024, 2, 2
        c.distill.eval_every = 1000
        c.ppo.iterations, c.ppo.batch_size, c.ppo.eval_prompts = 4, 8, 16
        c.ppo.prompt_len, c.ppo.response_len, c.ppo.eval_every, c.ppo.ckpt_every = 32, 8, 2, 2
        c.ppo.log_every = 1
        c.bon.ns, c.bon.eval_prompts, c.bon.prompt_len, c.bon.response_len = (1, 2, 4), 16, 32, 8
        for stage in (c.pmp, c.pm, c.pm_test):
            stage.max_len, stage.batch_size, stage.eval_batch_size = 64, 8, 16
            stage.buckets = (128,)
            stage.data.fraction, stage.eval.max_pairs, stage.ckpt_every = 0.02, 32, 4
            stage.log_every = 4
    elif arg:
        raise ValueError(f"unknown arg {arg!r}: expected '' or 'tiny'")
    return tie_lrs(c)


def sweep(add, arg: str = ""):
    for size in ("test", "6M"):
        add(**{"lm.model": size})
