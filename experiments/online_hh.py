"""Iterated online RLHF with a simulated labeler (PAPER.md §4.5; issue 17).

Commands:
    hh-jax run experiments/online_hh.py:smoke --workdir runs/online_hh      # 6M, 3 rounds
    hh-jax run experiments/online_hh.py:tiny,rounds=2 --workdir runs/online_tiny  # ~1 min
    hh-jax run experiments/online_hh.py:smoke,human --workdir runs/online_human  # people
Arg: comma-separated: "smoke" (default) or "tiny"; "rounds=N"; "human" (people label
each round: the run stops at a round's pairs with the `hh-jax label` command to run, and
the same `hh-jax run` command continues once they are labeled).
Stages: lm → distill (π0) → pmp (the base every proxy PM starts from) → gold_pm (the gold
PM: the simulated labeler's judgement, trained on HH train comparisons, never on held-out
ones; from the LM with its own head, so it does not share the proxies' start) → per round
k: collect_k (pairs from the current policy vs itself or an earlier snapshot on HH train
prompts, labeled by the simulated labeler, appended to WORKDIR/comparisons.jsonl; plus
fresh on-policy pairs on held-out prompts labeled by the gold PM) → pm_k (the proxy PM,
retrained from pmp on every comparison collected so far; evaluated on the fresh pairs) →
ppo_k (from π0 against pm_k, held-out prompts scored by pm_k and by the gold PM) → online
(WORKDIR/online/: metrics.jsonl a row per round, summary.json, online.png). "tiny" skips
distill and pmp (π0 and the PMs' base are the LM).
Runtime: "smoke" 22.5 minutes measured on 2 busy shared CPU cores (BENCHMARKS.md, "Online
RLHF (issue 17)"; its 3 rounds alone 4 min 55 s in the 2026-12-04 rerun); "tiny,rounds=2"
62 s wall measured (2026-12-04, 2 shared CPU cores, lm to online from an empty workdir).
Expected: the machinery, not the paper's numbers. At 6M the PMs barely move from their
start, so the proxy PM's accuracy on fresh on-policy pairs (0.64–0.72 measured; pmp alone
0.57–0.69 on the same pairs) is what it shares with the gold PM through the common LM,
not what the labels taught, and the gold-vs-proxy gap at KL < 0.1 is noise-sized; the
run shows that rounds chain, label, resume and report.
"""

from common import HH_STOP
from ml_collections import ConfigDict
from smoke import get_config as smoke_config

from hh_jax.ppo import PPOConfig


def collect_config(k: int, policy_from: str, snapshots: tuple, prev_pm_from: str,
                   data: ConfigDict) -> ConfigDict:
    """Round k's `collect` stage (hh_jax/stages/online.py)."""
    return ConfigDict(dict(
        stage="collect", round=k, policy_from=policy_from, snapshots=snapshots,
        gold_pm_from="{workdir}/gold_pm/params", prev_pm_from=prev_pm_from,
        store="{workdir}/comparisons.jsonl", data=ConfigDict(data.to_dict()),
        # T in gold-PM score units; noise: the fraction of labels flipped afterwards
        labeler=ConfigDict(dict(kind="simulated", temperature=0.05, noise=0.05, seed=0)),
        pairs=96,  # train-prompt pairs labeled per round
        fresh_pairs=96,  # held-out on-policy pairs the round's proxy PM is evaluated on
        mix_snapshots=True,  # current vs a random earlier snapshot (or itself), else itself
        seed_fraction=0.0,  # HH train pairs added to every round's PM data (0: none)
        prompt_len=64, response_len=32, stop_strings=HH_STOP,
        temperature=PPOConfig.temperature, batch_size=32, mesh=(-1, 1, 1), seed=0))


def add_rounds(c: ConfigDict, rounds: int, pi0: str, base: str, continue_pm: bool = False
               ) -> None:
    """collect_k → pm_k → ppo_k for k = 1…rounds, then `online`."""
    stages = list(c.stages) + ["gold_pm"]
    for k in range(1, rounds + 1):
        policy = pi0 if k == 1 else f"{{workdir}}/ppo_{k - 1}/params"
        earlier = (pi0,) + tuple(f"{{workdir}}/ppo_{j}/params" for j in range(1, k - 1))
        c[f"collect_{k}"] = collect_config(k, policy, earlier if k > 1 else (),
                                           f"{{workdir}}/pm_{k - 1}/params" if k > 1 else "",
                                           c.ppo.data)
        pm = ConfigDict(c.pm_base.to_dict())
        # the paper retrains PMs from scratch each round (§4.5); continue_pm starts from the last
        pm.init_from = f"{{workdir}}/pm_{k - 1}/params" if continue_pm and k > 1 else base
        pm.data.hh_dir, pm.data.subsets = f"{{workdir}}/collect_{k}/comparisons.jsonl", ()
        pm.eval.hh_dir, pm.eval.subsets = f"{{workdir}}/collect_{k}/fresh.jsonl", ()
        pm.eval.max_pairs = 0
        c[f"pm_{k}"] = pm
        ppo = ConfigDict(c.ppo.to_dict())
        ppo.pm_from, ppo.test_pm_from = f"{{workdir}}/pm_{k}/params", "{workdir}/gold_pm/params"
        c[f"ppo_{k}"] = ppo
        stages += [f"collect_{k}", f"pm_{k}", f"ppo_{k}"]
    c.online = ConfigDict(dict(stage="online", rounds=rounds, run_dir="{workdir}",
                               gold_pm_from="{workdir}/gold_pm/params"))
    c.stages = tuple(stages + ["online"])
    del c["ppo"], c["pm_base"]


def parse(arg: str) -> dict:
    out = {"size": "smoke", "rounds": 3, "human": False}
    for item in filter(None, arg.split(",")):
        if item in ("smoke", "tiny"):
            out["size"] = item
        elif item == "human":
            out["human"] = True
        elif item.startswith("rounds="):
            out["rounds"] = int(item.split("=", 1)[1])
        else:
            raise ValueError(f"unknown arg item {item!r}: expected smoke, tiny, rounds=N, human")
    if out["rounds"] < 1:
        raise ValueError("rounds must be ≥ 1")
    return out


def get_config(arg: str = "") -> ConfigDict:
    a = parse(arg)
    tiny = a["size"] == "tiny"
    base = smoke_config("tiny" if tiny else "")  # lm, distill, pmp as the main job's
    c = ConfigDict()
    c.lm = base.lm
    if tiny:  # π0 and the PMs' base are the LM itself: no distill, no pmp
        c.stages, pi0, pm_base = ("lm",), "{workdir}/lm/params", "{workdir}/lm/params"
    else:
        c.stages, pi0, pm_base = ("lm", "distill", "pmp"), "{workdir}/distill/params", \
            "{workdir}/pmp/params"
        c.distill, c.pmp = base.distill, base.pmp
    # the gold PM: the labeler's judgement, from the base like the proxies, on more HH train
    # comparisons than any proxy sees (at CPU scale a fraction of the train split)
    c.gold_pm = ConfigDict(base.pm.to_dict())
    # from the LM with its own head seed, not from the proxies' start: a gold PM that starts
    # where the proxies start agrees with them by construction (at a 0.01× LR the PMs move
    # little), which would read as proxy accuracy
    c.gold_pm.init_from, c.gold_pm.data.half, c.gold_pm.seed = "{workdir}/lm/params", "", 7
    c.gold_pm.data.fraction = 0.05 if tiny else 0.15
    c.pm_base = ConfigDict(base.pm.to_dict())
    c.pm_base.data.half, c.pm_base.data.fraction, c.pm_base.epochs = "", 1.0, 2
    c.ppo = ConfigDict(base.ppo.to_dict())
    c.ppo.policy_from = pi0
    if not tiny:
        c.ppo.iterations, c.ppo.eval_every = 12, 6
    add_rounds(c, a["rounds"], pi0, pm_base)
    for k in range(1, a["rounds"] + 1):
        if a["human"]:
            c[f"collect_{k}"].labeler.kind = "human"
        if tiny:
            col = c[f"collect_{k}"]
            col.pairs, col.fresh_pairs, col.batch_size = 16, 16, 8
            col.prompt_len, col.response_len = 32, 8
    _tie(c)
    return c


def _tie(c: ConfigDict) -> None:
    """Every stage's base_lr follows lm.optim.lr, as common.tie_lrs does (the PM and PPO
    stages here are copies, whose references to_dict() resolved)."""
    lr = c.lm.optim.get_ref("lr")
    for name in c.stages:
        if name != "lm" and "base_lr" in c[name]:
            c[name].base_lr = lr.identity()
