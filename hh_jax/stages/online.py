"""Stages `collect` and `online`: iterated online RLHF (PAPER.md §4.5) at any scale.

An experiment lists the rounds as stages (experiments/online_hh.py): per round k,
`collect_k` → `pm_k` (the proxy PM, retrained from the base on every comparison so far)
→ `ppo_k` (from π0 against pm_k, judged by the gold PM); after the last round, `online`
gathers the rounds' numbers. A complete stage has its summary.json and is skipped on a
rerun, so a killed or paused loop resumes where it stopped.

`collect_k`:
  1. samples one pair per HH *train* prompt: the current policy against itself or an
     earlier snapshot (the paper deploys several snapshots at once, for diversity), and
     fresh on-policy pairs (two samples of the current policy) on *held-out* prompts;
  2. labels the train pairs (simulated: hh_jax.label.simulated with the gold PM's
     scores; or "human": writes pairs.jsonl and stops until `hh-jax label` has labeled
     it) and appends them to the run's comparisons store with provenance;
  3. exports the store's rounds ≤ k (+ an optional seed set of HH train pairs) as the HH
     jsonl pm_k trains on, and the fresh pairs, labeled by the gold PM (noise-free), as the
     HH jsonl pm_k is evaluated on: they are on-policy and pm_k never sees them.
"""

from __future__ import annotations

import collections
import functools
import json
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from hh_jax import checkpoint, metrics, reward, sampling, sharding
from hh_jax.chat import cut_reply
from hh_jax.data import hh
from hh_jax.data.jsonl_reader import DataError
from hh_jax.label import store as label_store
from hh_jax.label.simulated import SimulatedLabeler
from hh_jax.policy import Frozen, encode_prompts, load_prompts, stage_stops
from hh_jax.tokenizer import load_tokenizer


class AwaitingLabels(FileNotFoundError):
    """A round's pairs wait for people's labels (labeler "human"); rerun once labeled."""


def snapshot_name(path: str) -> str:
    """"ppo_2" for `.../ppo_2/params`: the policy's name in a pair's provenance."""
    return os.path.basename(os.path.dirname(os.path.normpath(path)))


def _sampler(policy: Frozen, tok, cfg: ConfigDict):
    """One jitted sampler for every snapshot (they share a shape: one compile)."""
    return jax.jit(functools.partial(
        sampling.sample, model=policy.model, eos_id=tok.eos_id, pad_id=tok.pad_id,
        cfg=sampling.SamplingConfig(max_new_tokens=cfg.response_len,
                                    temperature=cfg.temperature)))


def responses(sample_fn, params, tok, prompts: list[str], cfg: ConfigDict, key, stops
              ) -> list[str]:
    """One sampled reply per prompt, as HH text (" " + the reply cut at the next turn)."""
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        padded = chunk + [chunk[0]] * (cfg.batch_size - len(chunk))  # one shape: one compile
        tokens_BxQ, masks_BxQ = encode_prompts(tok, padded, cfg.prompt_len)
        s = jax.device_get(sample_fn(params, tokens_BxQ, masks_BxQ, jax.random.fold_in(key, i),
                                     stops=stops))
        for b in range(len(chunk)):
            n = int(s["lengths_B"][b]) - int(s["ended_B"][b])  # without EOS
            out.append(" " + cut_reply(tok.decode(s["tokens_BxR"][b][:n])).strip())
    return out


TAGS = {"train": 0, "fresh": 1}  # a pair set's index in its random numbers' seeds


def sample_pairs(cfg: ConfigDict, policies: dict, current: str, tok, prompts: list[str],
                 tag: str, mix: bool, stops) -> tuple[list[dict], dict]:
    """(valid pairs, dropped pairs by reason): per prompt the current policy
    (`policies[current]`; `policies`: name → Frozen) against a uniformly drawn policy of
    `policies` when `mix`, else against itself; a/b sides shuffled. A pair with an empty or
    identical response (or one the HH format cannot hold) is dropped and counted. The
    draws (sides, opponents, samples) depend on (seed, round, tag): "train" and "fresh"
    pairs never share them."""
    if tag not in TAGS:
        raise ValueError(f"tag must be one of {sorted(TAGS)}, got {tag!r}")
    if current not in policies:
        raise ValueError(f"current policy {current!r} is not among {sorted(policies)}")
    tag_id = TAGS[tag]
    names = list(policies)
    rng = np.random.default_rng([cfg.seed, cfg.round, tag_id])
    other_P = rng.integers(len(names), size=len(prompts)) if mix else np.full(
        len(prompts), names.index(current))
    swap_P = rng.random(len(prompts)) < 0.5
    sample_fn = _sampler(policies[current], tok, cfg)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), cfg.round),
                             tag_id)
    first = responses(sample_fn, policies[current].params, tok, prompts, cfg,
                      jax.random.fold_in(key, 0), stops)
    second = [""] * len(prompts)
    for j, name in enumerate(names):
        idx = np.flatnonzero(other_P == j)
        if len(idx):
            texts = responses(sample_fn, policies[name].params, tok, [prompts[i] for i in idx],
                              cfg, jax.random.fold_in(key, j + 1), stops)
            for i, t in zip(idx, texts, strict=True):
                second[i] = t
    pairs, dropped = [], collections.Counter()
    for i, prompt in enumerate(prompts):
        sides = [(current, first[i]), (names[other_P[i]], second[i])][::-1 if swap_P[i] else 1]
        pair = {"id": f"round{cfg.round}-{tag}-{i:05d}", "context": prompt,
                "response_a": sides[0][1], "response_b": sides[1][1],
                "meta": {"round": cfg.round, "policy_a": sides[0][0], "policy_b": sides[1][0],
                         "split": "train" if tag == "train" else "heldout"}}
        try:
            pairs.append(label_store.validate_pair(pair))
        except DataError as e:  # e.g. an empty reply: the model ended its turn at once
            dropped[e.reason] += 1
    return pairs, dict(dropped)


def pm_scores_of(pm: Frozen, tok, pairs: list[dict], cfg: ConfigDict, mesh
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(r_a_P, r_b_P): a PM export's scores of the pairs, as the PM stage scores pairs."""
    comps = [hh.Comparison(subset="online", context=p["context"], chosen=p["response_a"],
                           rejected=p["response_b"], first_human=hh.first_human_turn(p["context"]),
                           source=p["id"], line=i + 1, split=p["meta"]["split"])
             for i, p in enumerate(pairs)]
    pm_cfg = ConfigDict(dict(max_len=pm.meta.get("max_len", pm.cfg.max_len),
                             pair_layout=pm.meta.get("pair_layout", "shared"),
                             eval_batch_size=cfg.batch_size, buckets=()))
    score_fn = jax.jit(functools.partial(reward.score_step, model=pm.model))
    return reward.score_pairs(score_fn, pm.params, comps, tok, pm_cfg, mesh)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def policies_of(cfg: ConfigDict) -> dict[str, str]:
    """name → export path of the round's policies: the earlier snapshots, then the current
    policy (`policy_from`; a snapshot listed twice, or also as the current policy, counts
    once). Raises ValueError when two different exports share a name (a pair's provenance
    names its policies)."""
    out: dict[str, str] = {}
    for path in list(cfg.snapshots) + [cfg.policy_from]:
        name = snapshot_name(path)
        if name in out and os.path.normpath(out[name]) != os.path.normpath(path):
            raise ValueError(f"policies {out[name]} and {path} share the name {name!r}; a "
                             "pair's provenance could not tell them apart")
        out.setdefault(name, path)
    return out


def accuracy_with_ties(p_a, p_b, g_a, g_b) -> tuple[float | None, int]:
    """(accuracy, pairs): how often PM scores (p_a, p_b) prefer the side the gold scores
    (g_a, g_b) prefer, over the pairs gold does not tie; a PM tie counts ½ (as
    pm_accuracy.pm_report counts it)."""
    p_a, p_b, g_a, g_b = map(np.asarray, (p_a, p_b, g_a, g_b))
    keep = g_a != g_b
    if not keep.any():
        return None, 0
    margin = np.where(g_a > g_b, p_a - p_b, p_b - p_a)[keep]
    return float(((margin > 0) + 0.5 * (margin == 0)).mean()), int(keep.sum())


def _sample_round(cfg: ConfigDict, stage_dir: str, tok, mesh) -> None:
    """Samples and gold-scores the round's pairs; writes gold.json, fresh.jsonl (gold-
    labeled held-out pairs) and, last (it marks the sampling done), pairs.jsonl."""
    current = snapshot_name(cfg.policy_from)
    policies = {name: Frozen(path, mesh, None) for name, path in policies_of(cfg).items()}
    gold = Frozen(cfg.gold_pm_from, mesh, "pm")  # loaded outside sharding.activate (unbox)
    prev_pm = Frozen(cfg.prev_pm_from, mesh, "pm") if cfg.get("prev_pm_from") else None
    stops = stage_stops(cfg, tok, policies[current].cfg.vocab_size, mesh)
    rng = np.random.default_rng([cfg.seed, cfg.round])
    train = load_prompts(cfg.data, "train")
    train = [train[i] for i in rng.choice(len(train), min(cfg.pairs, len(train)), replace=False)]
    held = load_prompts(cfg.data, "heldout")
    held = [held[i] for i in rng.choice(len(held), min(cfg.fresh_pairs, len(held)),
                                        replace=False)]
    with sharding.activate(mesh):
        pairs, dropped = sample_pairs(cfg, policies, current, tok, train, "train",
                                      cfg.mix_snapshots, stops)
        fresh, fresh_dropped = sample_pairs(cfg, {current: policies[current]}, current, tok,
                                            held, "fresh", False, stops)
        r_a, r_b = pm_scores_of(gold, tok, pairs, cfg, mesh)
        f_a, f_b = pm_scores_of(gold, tok, fresh, cfg, mesh)
        prev = {}
        if prev_pm is not None:  # the PM the current policy was trained against
            p_a, p_b = pm_scores_of(prev_pm, tok, fresh, cfg, mesh)
            acc, n = accuracy_with_ties(p_a, p_b, f_a, f_b)
            prev = {"prev_pm_accuracy": acc, "prev_pm_pairs": n}
    fresh_rows = [(p["context"], p["response_a"], p["response_b"]) if a > b else
                  (p["context"], p["response_b"], p["response_a"])
                  for p, a, b in zip(fresh, f_a, f_b, strict=True) if a != b]  # ties: no label
    untied = np.asarray(f_a) != np.asarray(f_b)
    # the gold PM's score std on fresh.jsonl's responses (both sides of each row): the same
    # responses, counted the same way, as pm_k's report["scores"]["std"] (pm_k is
    # evaluated on fresh.jsonl), so the two PMs' gains are normalised on the same samples
    fresh_std = float(np.concatenate([np.asarray(f_a)[untied], np.asarray(f_b)[untied]]).std()
                      ) if untied.any() else None
    label_store.write_hh(os.path.join(stage_dir, "fresh.jsonl"), fresh_rows)
    _write_json(os.path.join(stage_dir, "gold.json"), {
        "scores": {p["id"]: [float(a), float(b)] for p, a, b in zip(pairs, r_a, r_b,
                                                                     strict=True)},
        "dropped": dropped, "fresh_dropped": fresh_dropped, "fresh_pairs": len(fresh_rows),
        "gold_fresh_score_std": fresh_std, **prev})
    label_store.write_pairs(os.path.join(stage_dir, "pairs.jsonl"), pairs)


def labeler_of(cfg: ConfigDict) -> SimulatedLabeler | None:
    """The round's simulated labeler, or None for people ("human")."""
    lcfg = cfg.labeler
    if lcfg.kind == "human":
        return None
    if lcfg.kind != "simulated":
        raise ValueError(f"labeler.kind must be 'simulated' or 'human', got {lcfg.kind!r}")
    return SimulatedLabeler(lcfg.temperature, lcfg.noise, lcfg.seed)


def label_round(cfg: ConfigDict, stage_dir: str, pairs: list[dict], gold: dict) -> dict:
    """Appends the labels of the round's unlabeled pairs to the store (labels already
    there, e.g. from a killed run or from people, are kept, never relabeled); returns
    counts. Raises AwaitingLabels when people have not labeled every pair yet, and
    store.PairMismatch when an id is labeled in the store with other texts (pairs
    resampled under the same ids, e.g. after collect_k was deleted)."""
    with label_store.ComparisonStore(cfg.store) as st:
        st.check_pairs(pairs, os.path.join(stage_dir, "pairs.jsonl"))
        done = st.labeled_ids()
        todo = [p for p in pairs if p["id"] not in done]
        labeler = labeler_of(cfg)
        if todo and labeler is None:
            pairs_path = os.path.join(stage_dir, "pairs.jsonl")
            raise AwaitingLabels(
                f"round {cfg.round}: {len(todo)} of {len(pairs)} pairs in {pairs_path} await "
                f"labels. Label them with `hh-jax label --pairs {pairs_path} --out "
                f"{cfg.store}`, then rerun the same command to continue")
        if todo:
            r_a = np.asarray([gold["scores"][p["id"]][0] for p in todo])
            r_b = np.asarray([gold["scores"][p["id"]][1] for p in todo])
            lab = labeler.label([p["id"] for p in todo], r_a, r_b)
            for p, choice, p_a in zip(todo, lab["choice"], lab["p_a_P"], strict=True):
                st.append(p, choice, labeler=labeler.name, p_a=float(p_a),
                          gold_margin=float(gold["scores"][p["id"]][0]
                                            - gold["scores"][p["id"]][1]))
        ids = {p["id"] for p in pairs}
        records = [r for r in st.records() if r["id"] in ids]
    agree = [(r["choice"] == "a") == (gold["scores"][r["id"]][0] > gold["scores"][r["id"]][1])
             for r in records if gold["scores"][r["id"]][0] != gold["scores"][r["id"]][1]]
    return {"labeled_now": len(todo), "labeled_before": len(pairs) - len(todo),
            "labelers": sorted({r["labeler"] for r in records}),
            "label_gold_agreement": float(np.mean(agree)) if agree else None}


def export_round(cfg: ConfigDict, stage_dir: str) -> dict:
    """comparisons.jsonl: the store's labels of rounds ≤ this one (+ the seed set) as HH
    jsonl, what pm_k trains on."""
    out = os.path.join(stage_dir, "comparisons.jsonl")
    if os.path.abspath(out) == os.path.abspath(cfg.store):
        raise ValueError(f"store {cfg.store}: the PM data export would overwrite the store "
                         "itself; put the store outside the collect stage's directory")
    records = [r for r in label_store.read_store(cfg.store)
               if int(r["meta"].get("round", 0)) <= cfg.round]
    rows = [(r["context"], r["chosen"], r["rejected"]) for r in records]
    seed = 0
    if cfg.seed_fraction > 0:  # HH train comparisons people labeled before the loop
        comps, _ = hh.load_hh_comparisons(cfg.data.hh_dir, subsets=list(cfg.data.subsets)
                                          or None, skip_invalid=True)
        seeds = hh.data_fraction(hh.select_split(comps, "train"), cfg.seed_fraction)
        rows += [(c.context, c.chosen, c.rejected) for c in seeds]
        seed = len(seeds)
    label_store.write_hh(out, rows)
    return {"comparisons": len(rows), "store_rows": len(records), "seed_rows": seed,
            "rounds_in_export": sorted({int(r["meta"].get("round", 0)) for r in records})}


def train_and_evaluate(cfg: ConfigDict, stage_dir: str) -> dict:
    """Stage `collect`: one round's pairs, labels and PM data (module docstring)."""
    os.makedirs(stage_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(stage_dir))
    tok = load_tokenizer(checkpoint.tokenizer_spec(cfg.policy_from))
    pairs_path = os.path.join(stage_dir, "pairs.jsonl")
    if os.path.exists(pairs_path):  # a resumed round: the same pairs, nothing resampled
        print(f"[{name}] pairs already sampled ({pairs_path})", flush=True)
    else:
        _sample_round(cfg, stage_dir, tok, sharding.make_mesh(cfg.mesh))
    pairs = label_store.read_pairs(pairs_path)
    with open(os.path.join(stage_dir, "gold.json")) as f:
        gold = json.load(f)
    labels = label_round(cfg, stage_dir, pairs, gold)
    export = export_round(cfg, stage_dir)
    dropped = sum(gold["dropped"].values())
    summary = {"round": cfg.round, "pairs": len(pairs), "dropped": dropped,
               "dropped_by_reason": gold["dropped"],
               "fresh_pairs": gold["fresh_pairs"], "fresh_dropped": gold["fresh_dropped"],
               "policy": snapshot_name(cfg.policy_from),
               "snapshots": [snapshot_name(p) for p in cfg.snapshots],
               "prev_pm_accuracy": gold.get("prev_pm_accuracy"),
               "prev_pm_pairs": gold.get("prev_pm_pairs"),
               "gold_fresh_score_std": gold.get("gold_fresh_score_std"), **labels, **export}
    print(f"[{name}] {len(pairs)} pairs ({dropped} dropped: {gold['dropped']}), "
          f"{labels['labeled_now']} "
          f"labeled now; {export['comparisons']} comparisons for the PM; "
          f"{gold['fresh_pairs']} fresh on-policy pairs", flush=True)
    metrics.write_summary(stage_dir, summary)
    return summary


def round_row(run_dir: str, k: int) -> dict:
    """One round's numbers from its stages' summaries.

    Gains are the PPO policy's mean held-out score minus π0's (PPO's first and last
    evaluation), under the proxy PM pm_k it was trained against and under the gold PM:
    raw (`*_gain`, each PM's own units) and normalised (`*_gain_std`) by each PM's score
    std on the *same* samples: the responses of round k's fresh on-policy pairs
    (collect_k/fresh.jsonl, both sides of each pair; samples of round k's current policy
    on held-out prompts). pm_k's std is its evaluation report's (pm_k is evaluated on
    fresh.jsonl), the gold PM's is computed by collect_k on the same rows
    (`gold_fresh_score_std`). So gap = proxy gain − gold gain in those units compares
    like with like: gap > 0 is over-optimisation (Gao et al. 2022: the proxy's score rises
    faster than the gold's)."""
    col = metrics.read_summary(os.path.join(run_dir, f"collect_{k}"))
    pm = metrics.read_summary(os.path.join(run_dir, f"pm_{k}"))
    ppo = metrics.read_summary(os.path.join(run_dir, f"ppo_{k}"))
    gold_std = col.get("gold_fresh_score_std")
    if gold_std is None:
        raise KeyError(f"{run_dir}/collect_{k}/summary.json has no gold_fresh_score_std (a "
                       f"collect stage from before it was recorded, or no untied fresh pair): "
                       f"delete collect_{k}, pm_{k}, ppo_{k} and rerun")
    proxy_std = pm["report"]["scores"]["std"]
    i, f = ppo["initial"], ppo["final"]
    overall = pm["report"]["overall"]
    row = {"round": k, "comparisons": col["comparisons"], "new_pairs": col["pairs"],
           "label_gold_agreement": col["label_gold_agreement"],
           "proxy_accuracy_fresh": overall["accuracy"], "fresh_pairs": overall["n"],
           "proxy_accuracy_ci95": overall["ci95"], "prev_pm_accuracy": col["prev_pm_accuracy"],
           "kl": f["eval/kl"], "proxy_score_pi0": i["eval/score"], "proxy_score": f["eval/score"],
           "gold_score_pi0": i["eval/test_score"], "gold_score": f["eval/test_score"],
           "proxy_std_fresh": proxy_std, "gold_std_fresh": gold_std}
    row["proxy_gain"] = f["eval/score"] - i["eval/score"]
    row["gold_gain"] = f["eval/test_score"] - i["eval/test_score"]
    row["proxy_gain_std"] = row["proxy_gain"] / max(proxy_std, 1e-8)
    row["gold_gain_std"] = row["gold_gain"] / max(gold_std, 1e-8)
    row["overopt_gap_std"] = row["proxy_gain_std"] - row["gold_gain_std"]
    return row


def is_complete(cfg: ConfigDict, stage_dir: str) -> bool:
    """The `online` stage is complete when its summary holds exactly rounds 1…cfg.rounds
    (a run extended with more rounds, or cut to fewer, summarizes again)."""
    if not os.path.exists(os.path.join(stage_dir, "summary.json")):
        return False
    rows = metrics.read_summary(stage_dir).get("rounds") or []
    return [r.get("round") for r in rows] == list(range(1, cfg.rounds + 1))


def summarize(cfg: ConfigDict, stage_dir: str) -> dict:
    """Stage `online`: metrics.jsonl (a row per round, rewritten from scratch),
    summary.json and online.png."""
    os.makedirs(stage_dir, exist_ok=True)
    rows = [round_row(cfg.run_dir, k) for k in range(1, cfg.rounds + 1)]
    jsonl = os.path.join(stage_dir, "metrics.jsonl")
    if os.path.exists(jsonl):  # an earlier summary's rows: replaced, not appended to
        os.remove(jsonl)
    writer = metrics.MetricsWriter(stage_dir)
    for r in rows:
        writer.write(r["round"], {k: v for k, v in r.items() if isinstance(v, int | float)})
    writer.close()
    plot(rows, os.path.join(stage_dir, "online.png"))
    for r in rows:
        print(f"[online] round {r['round']}: {r['comparisons']} comparisons; proxy PM on fresh "
              f"pairs {r['proxy_accuracy_fresh']:.3f} (n={r['fresh_pairs']}); PPO KL "
              f"{r['kl']:.3f}: gold {r['gold_score_pi0']:+.3f} → {r['gold_score']:+.3f} "
              f"({r['gold_gain_std']:+.3f} std), proxy {r['proxy_score_pi0']:+.3f} → "
              f"{r['proxy_score']:+.3f} ({r['proxy_gain_std']:+.3f} std); gap "
              f"{r['overopt_gap_std']:+.3f} std", flush=True)
    summary = {"rounds": rows, "gold_pm_from": cfg.gold_pm_from,
               "gain_units": "each PM's score std on the round's fresh on-policy pairs "
                             "(collect_k/fresh.jsonl)"}
    metrics.write_summary(stage_dir, summary)
    return summary


def plot(rows: list[dict], path: str) -> None:
    plt = metrics.pyplot()
    k = [r["round"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(k, [r["proxy_gain_std"] for r in rows], "s--", label="proxy PM (trained on)")
    a1.plot(k, [r["gold_gain_std"] for r in rows], "o-", label="gold PM")
    a1.axhline(0.0, color="gray", lw=1)
    a1.set_xlabel("round")
    for r in rows:  # the raw gains, in each PM's own units, beside the points
        a1.annotate(f"{r['proxy_gain']:+.3f}", (r["round"], r["proxy_gain_std"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points", color="C0")
        a1.annotate(f"{r['gold_gain']:+.3f}", (r["round"], r["gold_gain_std"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points", color="C1")
    a1.set_ylabel("score gain of the PPO policy over π0\n(held-out prompts; in each PM's "
                  "score std\non the fresh pairs; labels: raw)")
    a1.legend(fontsize=8)
    acc = np.asarray([r["proxy_accuracy_fresh"] for r in rows])
    ci = np.asarray([r["proxy_accuracy_ci95"] for r in rows]).reshape(-1, 2)
    a2.errorbar(k, acc, yerr=np.maximum(np.stack([acc - ci[:, 0], ci[:, 1] - acc]), 0),
                fmt="o-", capsize=3, label="proxy PM of the round")
    prev = [(r["round"], r["prev_pm_accuracy"]) for r in rows if r["prev_pm_accuracy"] is not None]
    if prev:
        a2.plot(*zip(*prev, strict=True), "D", label="previous round's proxy PM")
    a2.axhline(0.5, color="gray", ls="--", lw=1)
    a2.set_xlabel("round")
    a2.set_ylabel("accuracy vs gold labels,\nfresh on-policy pairs")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(k)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
