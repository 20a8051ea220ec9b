"""The paper's 52B preference model (PAPER.md §2–4) on a TPU pod slice: PMP, then PM.

Command (a v5p-128 or v4-128 slice: 64 chips, one process per host; launch/README.md):
    python launch/tpu_pod.py --name hh52b --zone us-east5-a --accelerator v5p-128 \\
        --experiment experiments/paper_52b.py --workdir gs://BUCKET/hh52b \\
        --config.pmp.init_from=gs://BUCKET/lm52b/params          # prints; add --run
which runs on every host: hh-jax run experiments/paper_52b.py --workdir gs://BUCKET/hh52b
Shapes: SIZES["52B"], 64 layers, d_model 8192, 64 heads of 128, SwiGLU d_ff 21,888, vocab
65,536 (52.68B parameters, 51.61B non-embedding). The train state (f32 params + Adam mu,
nu) is 632 GB, sharded 64 ways by the (data 1, fsdp 16, tensor 4) mesh: 9.9 GB per chip,
plus gradients and bf16 activations with remat (docs/scaling.md). tests/test_paper_52b.py
builds this state abstractly on 8 fake CPU devices and prints the parameter count and the
bytes per device.
Hyperparameters (PAPER.md §3–4): PM context 1024; PMP LR 0.1× and PM LR 0.01× the LM's
pretraining LR (not given in the paper: 8e-5 here, between GPT-3's 13B and 175B); one
epoch each; constant LR; batch 64 pairs (not stated in the paper). Binarized StackExchange
PMP (the shipped dumps; the paper also used Reddit and Wikipedia, which we lack).
init_from: a 52B LM params export (e.g. one imported with hh_jax.pretrained.convert). The paper's
pretrained LMs are not public; without init_from PMP starts from a random 52B backbone with
the byte tokenizer — a memory and throughput run, not a reproduction.
Runtime: PMP over the ~10k binarized StackExchange pairs plus the PM epoch over ~6.3k HH
pairs, about 250 steps of 64 pairs × 2 × 1024 tokens: well under an hour on v5p-128.
Expected: held-out HH accuracy near the paper's 52B static PM (≈ 0.72 on the mixture,
PAPER.md §4) only with a strong pretrained 52B LM in init_from.
"""

from common import lm_config, pm_config, tie_lrs
from ml_collections import ConfigDict

MESH = (1, 16, 4)  # 64 devices: FSDP over 16, tensor parallel over 4 (heads / ffw / vocab)
PRETRAIN_LR = 8e-5  # assumed; PAPER.md §3 gives only the PMP/PM ratios to it
MODEL = dict(dtype="bfloat16", param_dtype="float32", remat=True, max_len=8192)


def get_config(arg: str = "") -> ConfigDict:
    c = ConfigDict()
    c.stages = ("pmp", "pm")
    c.pmp = pm_config("pmp", init_from="", model="52B", tokenizer="byte")
    c.pm = pm_config("pm")
    for stage in (c.pmp, c.pm):
        stage.model_overrides = ConfigDict(MODEL)
        stage.update(max_len=1024, batch_size=64, eval_batch_size=128, epochs=1, mesh=MESH,
                     log_every=10, ckpt_every=50)
        stage.optim.schedule, stage.optim.warmup_steps = "constant", 10
    # Our own 52B LM stage at the paper's 8192 context is configured but not run: the paper
    # pretrained on 400B tokens, we ship only the HH dialogues. To chain it anyway:
    # --config.stages="('lm','pmp','pm')" --config.pmp.init_from='{workdir}/lm/params'
    c.lm = lm_config(model="52B", seq_len=8192, batch_size=64, mesh=MESH)
    c.lm.model_overrides = ConfigDict(MODEL)
    tie_lrs(c)
    c.lm.optim.lr = PRETRAIN_LR  # PMP and PM train at 0.1× and 0.01× of it
    if arg == "v4":  # v4 chips have 32 GB: more FSDP, same 64 devices
        for stage in (c.lm, c.pmp, c.pm):
            stage.mesh = (1, 32, 2)
    elif arg:
        raise ValueError(f"unknown arg {arg!r}: expected '' (v5p-128) or 'v4' (v4-128)")
    return c
