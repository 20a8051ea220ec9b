"""RLHF on HH prompts (PAPER.md §4.2–5): π0 by context distillation, PPO against a train PM
with a KL penalty to π0, best-of-n beside it, and the √KL law; swept over policy size × λ_KL.

Commands:
    hh-jax run experiments/ppo_hh.py:cpu --workdir runs/ppo_hh_cpu    # one member, 2 CPU cores
    hh-jax sweep experiments/ppo_hh.py:cpu --workdir runs/ppo_hh_sweep_cpu
    hh-jax sweep experiments/ppo_hh.py:tiny --workdir runs/ppo_hh_tiny  # a minutes-long check
    hh-jax sweep experiments/ppo_hh.py --dry-run   # paper sizes: one `hh-jax run` per member
    hh-jax report runs/ppo_hh_sweep_cpu            # re-render the sweep report
One member: hh-jax run experiments/ppo_hh.py:cpu --workdir DIR --config.lm.model='6M'
    --config.ppo.ppo.kl_coef=0.01
Stages: lm → distill (π0) → pmp → pm (train PM, half "a" of the train split) → pm_test (test
PM, half "b": the robustness protocol of §4.2) → ppo → bon. The PMs have the policy's size
(all start from that size's LM, as in the paper). Members of one size share lm … pm_test
(the local sweep links them), so only ppo and bon run again for each λ_KL.
Hardware and runtime:
    "tiny" size "test" × λ_KL 0.001, 0.1: 2 members, about 5 minutes on 2 CPU cores.
    "cpu"  sizes test/6M × λ_KL 0.001, 0.01, 0.1: 6 members on 2 CPU cores, roughly 1–2
           hours (not measured as a whole: a 6M member's ppo + bon took 8.5 minutes,
           BENCHMARKS.md).
    ""     paper sizes 13M/42M/197M × λ_KL 0.001, 0.01, 0.1 (9 members), responses ≤ 128
           tokens: a GPU or TPU slice (launch/), hours.
Expected: the test-PM score rises roughly linearly in √KL early in training (PAPER.md §4.3,
fit and R² in each member's report and in the sweep report), larger λ_KL holds the policy
at smaller KL, and best-of-n at the same KL is the reference PPO is compared with. At the
CPU sizes the PMs are near chance, so the PM scores measure the mechanics, not helpfulness.
"""

from common import (
    add_grid,
    bon_config,
    distill_config,
    lm_config,
    pm_config,
    ppo_config,
    tie_lrs,
)
from ml_collections import ConfigDict

SWEEPS = {"": (("13M", "42M", "197M"), (0.001, 0.01, 0.1)),
          "cpu": (("test", "6M"), (0.001, 0.01, 0.1)),
          "tiny": (("test",), (0.001, 0.1))}


def get_config(arg: str = "") -> ConfigDict:
    if arg not in SWEEPS:
        raise ValueError(f"unknown arg {arg!r}: expected one of {sorted(SWEEPS)}")
    c = ConfigDict()
    c.stages = ("lm", "distill", "pmp", "pm", "pm_test", "ppo", "bon")
    c.lm = lm_config(model=SWEEPS[arg][0][0])
    c.distill = distill_config()
    c.pmp = pm_config("pmp")
    c.pm = pm_config("pm")
    c.pm.data.half = "a"
    c.pm_test = pm_config("pm")
    c.pm_test.data.half = "b"
    c.ppo = ppo_config(policy_from="{workdir}/distill/params",
                       test_pm_from="{workdir}/pm_test/params")
    c.bon = bon_config()
    if arg in ("cpu", "tiny"):
        c.lm.steps = 300 if arg == "cpu" else 30
        c.lm.eval_every = c.lm.ckpt_every = c.lm.steps
        c.distill.steps = 100 if arg == "cpu" else 10
        c.distill.eval_every = c.distill.ckpt_every = c.distill.steps
        for stage in (c.pmp, c.pm, c.pm_test):  # shared rows ≤ 2 × 256 tokens
            stage.max_len, stage.buckets = 256, ()
            stage.eval.max_pairs = 512 if arg == "cpu" else 64
        c.pmp.data.fraction = 0.05 if arg == "cpu" else 0.01
        if arg == "tiny":
            c.pm.data.fraction = c.pm_test.data.fraction = 0.05
        c.ppo.update(iterations=200 if arg == "cpu" else 12, batch_size=16,
                     eval_every=20 if arg == "cpu" else 4, eval_prompts=64 if arg == "cpu" else 16,
                     log_every=10 if arg == "cpu" else 4, ckpt_every=50)
        c.bon.eval_prompts = 64 if arg == "cpu" else 16
    else:
        c.lm.model_overrides.max_len = 1024
        c.lm.update(seq_len=1024, batch_size=64, steps=2000, eval_every=500, ckpt_every=500)
        c.distill.update(seq_len=1024, batch_size=32, steps=500, eval_every=250, ckpt_every=250)
        for stage in (c.pmp, c.pm, c.pm_test):  # PAPER.md §2: PM context 1024
            stage.max_len, stage.model_overrides.max_len, stage.batch_size = 1024, 1024, 32
        # PAPER.md §5: responses ≤ 128 tokens; prompts cut to their last 256 tokens
        c.ppo.update(prompt_len=256, response_len=128, batch_size=64, iterations=500,
                     eval_every=50, eval_prompts=256, ckpt_every=50)
        c.bon.update(prompt_len=256, response_len=128, eval_prompts=256, batch_size=64)
    return tie_lrs(c)


def sweep(add, arg: str = ""):
    sizes, kl_coefs = SWEEPS[arg]
    add_grid(add, {"lm.model": sizes, "ppo.ppo.kl_coef": kl_coefs})
