"""PM accuracy against PM size × amount of HH data, and the paper's fit (PAPER.md §4, eq. A.1).

Commands:
    hh-jax sweep experiments/pm_scaling.py:cpu --workdir runs/pm_scaling_cpu   # this machine
    hh-jax sweep experiments/pm_scaling.py --dry-run        # one `hh-jax run` per member
    hh-jax report runs/pm_scaling_cpu                        # re-render the sweep report
One member: hh-jax run experiments/pm_scaling.py:cpu --workdir DIR --config.lm.model='6M'
Each member runs lm → pmp → pm; members of one size share their LM and PMP stages (the
local sweep links them), so only the PM is trained once per data fraction.
Hardware and runtime:
    "tiny" sizes test/6M × fractions 1/64, 1/16: 4 members, 20 minutes measured on 2 busy
           CPU cores (most of it the two LMs and their sentencepiece tokenizers).
    "cpu"  sizes test/6M × fractions 1/16, 1/4, 1: 6 members, roughly 1–2 hours on 2 CPU
           cores (not measured; the 150-step 6M LM and the full-data PMs dominate).
    ""     paper sizes 13M/42M/197M/810M × DATA_FRACTIONS (16 members): a GPU or a TPU
           slice (launch/), hours; the 810M LM dominates.
Expected: accuracy rises roughly linearly in log D and log P; on the helpful subsets the
paper's fit is acc ≈ 0.72 + 0.007·ln(P/1e11) + 0.015·ln(D/8e4) (log base not stated). Our
models are far smaller and trained on ~5k pairs, so a is lower and the CPU sizes sit near
chance; `hh-jax report` prints our a, b, c next to the paper's.
"""

from common import DATA_FRACTIONS, add_grid, lm_config, pm_config, tie_lrs
from ml_collections import ConfigDict

HELPFUL = ("helpful-base", "helpful-online", "helpful-rejection-sampled")  # eq. A.1's data
SWEEPS = {"": (("13M", "42M", "197M", "810M"), DATA_FRACTIONS),
          "cpu": (("test", "6M"), (1 / 16, 1 / 4, 1.0)),
          "tiny": (("test", "6M"), (1 / 64, 1 / 16))}


def get_config(arg: str = "") -> ConfigDict:
    if arg not in SWEEPS:
        raise ValueError(f"unknown arg {arg!r}: expected one of {sorted(SWEEPS)}")
    c = ConfigDict()
    c.stages = ("lm", "pmp", "pm")
    c.lm = lm_config(model=SWEEPS[arg][0][0])
    c.pmp = pm_config("pmp")
    c.pm = pm_config("pm")
    c.pm.data.subsets = c.pm.eval.subsets = HELPFUL
    if arg in ("cpu", "tiny"):
        c.lm.steps, c.lm.eval_tokens = (150, 16_384) if arg == "cpu" else (30, 4096)
        c.lm.eval_every = c.lm.ckpt_every = c.lm.steps
        for stage in (c.pmp, c.pm):
            stage.max_len, stage.model_overrides.max_len = 128, 1024
            stage.eval.max_pairs = 512 if arg == "cpu" else 128
        c.pmp.data.fraction = 0.1 if arg == "cpu" else 0.02
    else:
        c.lm.model_overrides.max_len = 1024
        c.lm.update(seq_len=1024, batch_size=64, steps=2000, eval_every=500, ckpt_every=500)
        for stage in (c.pmp, c.pm):  # PAPER.md §2: PM context 1024
            stage.max_len, stage.model_overrides.max_len, stage.batch_size = 1024, 1024, 32
    return tie_lrs(c)


def sweep(add, arg: str = ""):
    sizes, fractions = SWEEPS[arg]
    add_grid(add, {"lm.model": sizes, "pm.data.fraction": fractions})
