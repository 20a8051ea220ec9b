"""Defaults shared by experiment files: stage configs and the sweep axes."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence

from ml_collections import ConfigDict

from hh_jax.ppo import PPOConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_DIR = os.path.join(REPO, "data", "hh-rlhf")
SE_DIR = os.path.join(REPO, "data", "stackexchange")
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

# A sampled response ends at EOS or where the model starts the next Human turn itself (the
# HH-format prompts of the ppo / bon stages); () stops at EOS only. Trained like a
# multi-token EOS, never part of the PM's input (hh_jax/ppo.py).
HH_STOP = ("\n\nHuman:",)

# Learning rates: the LM stage's peak LR, and every later stage's as a ratio of it (each
# stage trains at base_lr × lr_ratio; `tie_lrs` makes base_lr follow lm.optim.lr).
LM_LR = 3e-3
LR_RATIOS = {"pmp": 0.1, "pm": 0.01,  # PAPER.md §3
             "distill": 0.05,  # PAPER.md §5 [P A.1]: 0.05× the pretraining LR
             "ppo": 0.01, "value": 0.01}  # PAPER.md §5: 0.01× (policy and value model)

# Nested data fractions for scaling sweeps (a smaller one is a subset of every larger one).
DATA_FRACTIONS = (1 / 64, 1 / 16, 1 / 4, 1.0)
PAPER_SIZES = ("13M", "42M", "197M", "810M", "2.7B", "13B", "52B")


def optim_config(warmup_steps: int, schedule: str = "cosine", weight_decay: float = 0.01,
                 **extra) -> ConfigDict:
    """AdamW and its schedule (hh_jax/optim.py). The peak LR: `lr` in the LM stage's (pass
    lr=...); base_lr × lr_ratio beside it in the later stages'."""
    return ConfigDict(dict(warmup_steps=warmup_steps, schedule=schedule, lr_min_ratio=0.1,
                           b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay, grad_clip=1.0,
                           **extra))


def tie_lrs(c: ConfigDict) -> ConfigDict:
    """Makes every stage's `base_lr` follow `lm.optim.lr` (a lazy reference), so an
    override or a sweep of the LM's LR keeps the ratios (LR_RATIOS). Only stages whose
    base_lr equals the LM's LR are tied: one set to another value keeps it, and so does
    every stage of a config without an `lm` stage config. Later setting a stage's base_lr
    cuts its link only."""
    if "lm" not in c:
        return c
    for name, stage in c.items():
        if isinstance(stage, ConfigDict) and stage.get("base_lr") == c.lm.optim.lr:
            c[name].base_lr = c.lm.optim.get_ref("lr").identity()
    return c


def lm_config(**overrides) -> ConfigDict:
    """The LM stage: from-scratch next-token training on the HH train-split dialogues."""
    c = ConfigDict(dict(
        model="6M",
        model_overrides=ConfigDict(dict(max_len=128)),
        tokenizer=ConfigDict(dict(kind="sentencepiece", vocab_size=4096)),
        # skip_invalid: the shipped test files hold rows whose chosen/rejected contexts
        # differ or whose response is empty; they are counted in summary.json, not used.
        data=ConfigDict(dict(hh_dir=HH_DIR, subsets=HH_SUBSETS, skip_invalid=True)),
        seq_len=128,
        batch_size=16,
        steps=150,
        eval_tokens=32_768,
        log_every=25,
        eval_every=50,
        ckpt_every=50,
        mesh=(-1, 1, 1),
        seed=0,
        init_from="",
        resume="",
        optim=optim_config(warmup_steps=15, lr=LM_LR),
    ))
    c.update(overrides)
    return c


def pm_config(stage: str = "pm", **overrides) -> ConfigDict:
    """A `pmp` (StackExchange) or `pm` (HH comparisons) stage: LR base_lr × lr_ratio
    (LR_RATIOS, PAPER.md §3: 0.1× the LM's for PMP, 0.01× for finetuning), one epoch,
    constant LR."""
    c = ConfigDict(dict(
        stage=stage,
        model="6M",  # used only without init_from
        model_overrides=ConfigDict(dict(max_len=512)),
        tokenizer="byte",  # used only without init_from (else the export's tokenizer)
        init_from="{workdir}/lm/params" if stage == "pmp" else "{workdir}/pmp/params",
        resume="",
        data=ConfigDict(dict(kind="stackexchange" if stage == "pmp" else "hh", hh_dir=HH_DIR,
                             subsets=HH_SUBSETS, se_dir=SE_DIR, binarize=True, fraction=1.0,
                             skip_invalid=True, half="")),  # half: "a"/"b" of the train split
        eval=ConfigDict(dict(hh_dir=HH_DIR, subsets=HH_SUBSETS, max_pairs=0)),
        max_len=512,
        # "shared": one row per pair, the context run once for both responses (≈1.5× fewer
        # tokens on HH); "separate": chosen and rejected as two rows (the textbook layout)
        pair_layout="shared",
        buckets=(),  # padded row lengths; () = multiples of 64 up to the longest row
        batch_size=16,
        eval_batch_size=32,
        epochs=1,
        base_lr=LM_LR,
        lr_ratio=LR_RATIOS[stage],
        harmless_weight=1.0,
        lm_coef=0.0,
        log_every=25,
        eval_every=1_000_000,
        ckpt_every=100,
        mesh=(-1, 1, 1),
        seed=0,
        optim=optim_config(warmup_steps=10, schedule="constant"),
    ))
    c.update(overrides)
    return c


def ppo_fields() -> ConfigDict:
    """The PPO choices (hh_jax.ppo.PPOConfig, whose defaults are the paper's where it gives
    one), but the score normalisation the stage reads from the PM."""
    return ConfigDict({f.name: f.default for f in dataclasses.fields(PPOConfig)
                       if f.name not in ("score_shift", "score_scale")})


def ppo_config(**overrides) -> ConfigDict:
    """PPO against the train PM with a KL penalty to π0 (PAPER.md §5, defaults per paper:
    λ_KL 0.001, ε 0.2, γ 1, no entropy bonus, K = 1; the open choices as fields)."""
    c = ConfigDict(dict(
        stage="ppo",
        policy_from="{workdir}/lm/params",
        pm_from="{workdir}/pm/params",
        test_pm_from="",
        data=ConfigDict(dict(hh_dir=HH_DIR, subsets=HH_SUBSETS)),
        prompt_len=64,
        response_len=32,
        stop_strings=HH_STOP,
        batch_size=16,
        iterations=40,
        eval_prompts=64,
        eval_every=10,
        log_every=5,
        ckpt_every=10,
        base_lr=LM_LR,
        lr_ratio=LR_RATIOS["ppo"],
        value_lr_ratio=LR_RATIOS["value"],
        value_head_init="pm",  # value model = PM backbone (+ its head, or "zero")
        model_overrides=ConfigDict(),  # compute-only, every model: e.g. remat=True
        normalize_scores=True,  # r ← (r − mean)/std of the PM's held-out scores
        mesh=(-1, 1, 1),
        seed=0,
        ppo=ppo_fields(),
        # Adam without weight decay (LMHP): decay would pull the policy towards 0, a drift
        # from π0 that the KL penalty does not see
        optim=optim_config(warmup_steps=0, schedule="constant", weight_decay=0.0),
    ))
    c.update(overrides)
    return c


def distill_config(**overrides) -> ConfigDict:
    """The `distill` stage (context distillation → π0, PAPER.md §5): the LM export is both
    the teacher (with the HHH prompt prepended) and the student's start; KL to the teacher's
    top-50 + rest distribution on HH train-split dialogue text; LR 0.05× the LM's base LR,
    decayed linearly to 0."""
    c = ConfigDict(dict(
        init_from="{workdir}/lm/params",
        teacher="",  # "" → the init_from export; any export with the same tokenizer works
        prompt_file="",  # "" → hh_jax/data/prompts/hhh_prompt.txt (see its README.md)
        resume="",
        data=ConfigDict(dict(hh_dir=HH_DIR, subsets=HH_SUBSETS, skip_invalid=True)),
        seq_len=128,
        batch_size=16,
        steps=100,
        eval_tokens=16_384,
        top_k=50,
        base_lr=LM_LR,
        lr_ratio=LR_RATIOS["distill"],
        log_every=25,
        eval_every=50,
        ckpt_every=50,
        mesh=(-1, 1, 1),
        seed=0,
        optim=optim_config(warmup_steps=0, schedule="linear"),
    ))
    c.optim.lr_min_ratio = 0.0  # decayed linearly to 0
    c.update(overrides)
    return c


def bon_config(**overrides) -> ConfigDict:
    """Best-of-n from π0 with the train PM, judged by the test PM (PAPER.md §4.3)."""
    c = ConfigDict(dict(
        stage="bon",
        policy_from="{workdir}/distill/params",
        pm_from="{workdir}/pm/params",
        test_pm_from="{workdir}/pm_test/params",
        ppo_dir="{workdir}/ppo",
        data=ConfigDict(dict(hh_dir=HH_DIR, subsets=HH_SUBSETS)),
        ns=(1, 2, 4, 8, 16),
        eval_prompts=64,
        prompt_len=64,
        response_len=32,
        stop_strings=HH_STOP,
        batch_size=64,
        temperature=PPOConfig.temperature,  # as PPO samples: the two compare at equal KL
        mesh=(-1, 1, 1),
        seed=0,
    ))
    c.update(overrides)
    return c


def add_grid(add: Callable[..., None], axes: dict[str, Sequence]) -> None:
    """A sweep's members: one `add(**overrides)` per point of the grid over `axes` (config
    path → values), the first axis outermost."""
    for values in itertools.product(*axes.values()):
        add(**dict(zip(axes, values, strict=True)))
