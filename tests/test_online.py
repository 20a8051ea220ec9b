"""Iterated online RLHF (hh_jax/stages/online.py, experiments/online_hh.py): labeling
resumes without relabeling, a round's PM data holds every earlier round's labels, people
label a paused round and the loop continues, and the rounds' numbers are written."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from hh_jax import experiment, report
from hh_jax.label import store as label_store
from hh_jax.label.simulated import SimulatedLabeler
from hh_jax.stages import online

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "online_hh.py")


def fake_pairs(n: int, rnd: int) -> list[dict]:
    return [{"id": f"round{rnd}-train-{i:05d}", "context": f"\n\nHuman: q{i}?\n\nAssistant:",
             "response_a": f" yes {i}", "response_b": f" no {i}",
             "meta": {"round": rnd, "policy_a": "pi0", "policy_b": "ppo_1", "split": "train"}}
            for i in range(n)]


def collect_cfg(tmp_path, rnd: int, kind: str = "simulated") -> ConfigDict:
    return ConfigDict(dict(round=rnd, store=str(tmp_path / "comparisons.jsonl"),
                           labeler=ConfigDict(dict(kind=kind, temperature=1.0, noise=0.1,
                                                   seed=3)), seed_fraction=0.0))


def test_a_resumed_round_labels_only_the_rest_and_the_same_way(tmp_path):
    pairs = fake_pairs(40, 1)
    gold = {"scores": {p["id"]: [float(i % 3), 1.0] for i, p in enumerate(pairs)}}
    cfg = collect_cfg(tmp_path, 1)
    with label_store.ComparisonStore(cfg.store) as st:  # a run killed after 15 labels
        lab = SimulatedLabeler(1.0, 0.1, 3).label([p["id"] for p in pairs[:15]],
                                                  np.zeros(15), np.zeros(15))
        for p, c in zip(pairs[:15], lab["choice"], strict=True):
            st.append(p, c, labeler="simulated:earlier")
    out = online.label_round(cfg, str(tmp_path), pairs, gold)
    assert (out["labeled_now"], out["labeled_before"]) == (25, 15)
    again = online.label_round(cfg, str(tmp_path), pairs, gold)  # a rerun: nothing new
    assert again["labeled_now"] == 0
    records = label_store.read_store(cfg.store)
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert {r["labeler"] for r in records[:15]} == {"simulated:earlier"}  # kept, not relabeled
    fresh = SimulatedLabeler(1.0, 0.1, 3).label(
        [p["id"] for p in pairs[15:]], *np.asarray([gold["scores"][p["id"]]
                                                    for p in pairs[15:]]).T)["choice"]
    assert [r["choice"] for r in records[15:]] == fresh  # as an uninterrupted run labels
    r = records[-1]
    assert r["labeler"] == "simulated:T=1,noise=0.1,seed=3"
    assert r["meta"]["round"] == 1 and "p_a" in r["meta"] and "gold_margin" in r["meta"]


def test_human_round_waits_for_labels_then_exports_every_round(tmp_path):
    cfg = collect_cfg(tmp_path, 1)
    online.label_round(cfg, str(tmp_path), fake_pairs(6, 1),
                       {"scores": {p["id"]: [1.0, 0.0] for p in fake_pairs(6, 1)}})
    human = collect_cfg(tmp_path, 2, kind="human")
    pairs2 = fake_pairs(4, 2)
    with pytest.raises(online.AwaitingLabels, match="hh-jax label --pairs .*pairs.jsonl"):
        online.label_round(human, str(tmp_path), pairs2, {"scores": {}})
    with label_store.ComparisonStore(human.store) as st:  # a person labels the round
        for p in pairs2:
            st.append(p, "b", labeler="human:ann")
    gold = {"scores": {p["id"]: [0.0, 1.0] for p in pairs2}}
    out = online.label_round(human, str(tmp_path), pairs2, gold)
    assert out["labeled_now"] == 0 and out["labelers"] == ["human:ann"]
    assert out["label_gold_agreement"] == 1.0
    out_dir = tmp_path / "collect"
    out_dir.mkdir()
    assert online.export_round(human, str(out_dir))["comparisons"] == 10  # rounds 1 + 2
    assert online.export_round(cfg, str(out_dir))["comparisons"] == 6  # round 1 only
    with pytest.raises(ValueError, match="the store itself"):
        online.export_round(cfg, str(tmp_path))
    with open(out_dir / "comparisons.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["chosen"].startswith("\n\nHuman: q0?\n\nAssistant: ")


def test_the_experiment_lists_rounds():
    c = experiment.load_config(EXPERIMENT + ":tiny,rounds=3")
    assert c.stages[-10:] == ("collect_1", "pm_1", "ppo_1", "collect_2", "pm_2", "ppo_2",
                              "collect_3", "pm_3", "ppo_3", "online")
    assert c.collect_3.snapshots == ("{workdir}/lm/params", "{workdir}/ppo_1/params")
    assert c.collect_3.policy_from == "{workdir}/ppo_2/params"
    assert c.pm_3.init_from == "{workdir}/lm/params"  # retrained from the base (§4.5)
    assert c.pm_3.data.hh_dir == "{workdir}/collect_3/comparisons.jsonl"
    assert c.ppo_3.policy_from == "{workdir}/lm/params"  # PPO from π0 every round
    assert c.ppo_3.test_pm_from == "{workdir}/gold_pm/params"
    smoke = experiment.load_config(EXPERIMENT + ":smoke,human")
    assert smoke.pm_2.init_from == "{workdir}/pmp/params" and smoke.collect_2.labeler.kind == \
        "human"
    filled = experiment.fill_workdir(c, "/w")
    assert filled.collect_3.snapshots == ("/w/lm/params", "/w/ppo_1/params")


@pytest.mark.slow
def test_two_rounds_run_pause_for_people_and_resume(tmp_path):
    """The tiny loop: round 1 simulated, round 2 by "people"; the run stops at round 2's
    pairs, continues once they are labeled, and a rerun relabels nothing."""
    config = experiment.load_config(EXPERIMENT + ":tiny,rounds=2")
    config.collect_2.labeler.kind = "human"
    workdir = str(tmp_path / "run")
    with pytest.raises(online.AwaitingLabels, match="hh-jax label"):
        experiment.run(config, workdir)
    pairs = label_store.read_pairs(os.path.join(workdir, "collect_2", "pairs.jsonl"))
    store = os.path.join(workdir, "comparisons.jsonl")
    with label_store.ComparisonStore(store) as st:
        for p in pairs:
            st.append(p, "a", labeler="human:test")
    experiment.run(config, workdir)
    records = label_store.read_store(store)
    by_round = {k: [r for r in records if r["meta"]["round"] == k] for k in (1, 2)}
    assert len(by_round[1]) == 16 - online_dropped(workdir, 1)
    lab = config.collect_1.labeler
    assert {r["labeler"] for r in by_round[1]} == {
        f"simulated:T={lab.temperature:g},noise={lab.noise:g},seed={lab.seed}"}
    assert {r["meta"]["policy_a"] for r in by_round[1]} == {"lm"}
    assert {r["labeler"] for r in by_round[2]} == {"human:test"} and len(by_round[2]) == len(pairs)
    assert {r["meta"]["policy_a"] for r in by_round[2]} | {r["meta"]["policy_b"] for r in
                                                           by_round[2]} <= {"lm", "ppo_1"}
    pm1, pm2 = (json.load(open(os.path.join(workdir, f"pm_{k}", "summary.json")))
                for k in (1, 2))
    assert pm1["data"]["used"] == len(by_round[1])
    assert pm2["data"]["used"] == len(records)  # round 2's PM: rounds 1 + 2
    os.remove(os.path.join(workdir, "collect_2", "summary.json"))  # resume mid-loop
    os.remove(os.path.join(workdir, "online", "summary.json"))
    experiment.run(config, workdir)
    assert len(label_store.read_store(store)) == len(records)
    col2 = json.load(open(os.path.join(workdir, "collect_2", "summary.json")))
    assert col2["labeled_now"] == 0 and col2["comparisons"] == len(records)
    summary = json.load(open(os.path.join(workdir, "online", "summary.json")))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert os.path.exists(os.path.join(workdir, "online", "online.png"))
    report.write_report(workdir)
    with open(os.path.join(workdir, "report.md")) as f:
        page = f.read()
    assert "## Stage online (online)" in page and "proxy acc (fresh)" in page


def online_dropped(workdir: str, k: int) -> int:
    with open(os.path.join(workdir, f"collect_{k}", "gold.json")) as f:
        return sum(json.load(f)["dropped"].values())


def test_train_and_fresh_pairs_draw_different_random_numbers(monkeypatch):
    """The same prompts sampled as "train" and as "fresh" get different replies and sides
    (their seeds once came from len(tag), and len("train") == len("fresh"))."""
    import jax

    def fake_responses(sample_fn, params, tok, prompts, cfg, key, stops):
        draws = jax.random.randint(key, (len(prompts),), 0, 10 ** 9)
        return [f" {params} says {int(d)}" for d in draws]

    monkeypatch.setattr(online, "_sampler", lambda policy, tok, cfg: None)
    monkeypatch.setattr(online, "responses", fake_responses)
    policies = {"pi0": ConfigDict(dict(params="pi0")), "ppo_1": ConfigDict(dict(params="ppo_1"))}
    prompts = [f"\n\nHuman: q{i}?\n\nAssistant:" for i in range(32)]
    cfg = ConfigDict(dict(seed=0, round=2))
    train, _ = online.sample_pairs(cfg, policies, "ppo_1", None, prompts, "train", True, None)
    again, _ = online.sample_pairs(cfg, policies, "ppo_1", None, prompts, "train", True, None)
    fresh, _ = online.sample_pairs(cfg, policies, "ppo_1", None, prompts, "fresh", True, None)
    assert train == again  # deterministic per (seed, round, tag)
    replies = lambda ps: [(p["response_a"], p["response_b"]) for p in ps]  # noqa: E731
    assert all(set(t) & set(f) == set() for t, f in zip(replies(train), replies(fresh),
                                                         strict=True))
    sides = lambda ps: [p["meta"]["policy_a"] for p in ps]  # noqa: E731
    assert sides(train) != sides(fresh)
    assert {p["meta"]["split"] for p in fresh} == {"heldout"}
    with pytest.raises(ValueError, match="tag"):
        online.sample_pairs(cfg, policies, "ppo_1", None, prompts, "Train", True, None)


def test_the_current_policy_is_chosen_by_name_and_names_are_unique():
    cfg = ConfigDict(dict(snapshots=("/w/distill/params", "/w/ppo_1/params"),
                          policy_from="/w/ppo_1/params"))
    assert online.policies_of(cfg) == {"distill": "/w/distill/params",
                                       "ppo_1": "/w/ppo_1/params"}
    cfg.snapshots = ("/w/distill/params", "/other/ppo_1/params")
    with pytest.raises(ValueError, match="share the name 'ppo_1'"):
        online.policies_of(cfg)


def test_previous_pm_accuracy_counts_ties_as_half():
    # gold prefers a, b, a, (tie: skipped), a; the PM: right, wrong, tie, -, right
    acc, n = online.accuracy_with_ties([1.0, 3.0, 0.5, 0.0, 3.0], [0.0, 2.0, 0.5, 9.0, 1.0],
                                       [1.0, 0.0, 2.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.5])
    assert (acc, n) == (2.5 / 4, 4)
    assert online.accuracy_with_ties([1.0], [0.0], [1.0], [1.0]) == (None, 0)


def fake_round(run_dir, k: int, proxy=(-1.0, -0.5), proxy_std=0.25, gold=(0.30, 0.32),
               gold_std=0.04) -> None:
    """Round k's collect/pm/ppo summaries with the numbers round_row reads."""
    summaries = {
        f"collect_{k}": {"comparisons": 50 * k, "pairs": 50, "label_gold_agreement": 0.7,
                         "prev_pm_accuracy": None, "gold_fresh_score_std": gold_std},
        f"pm_{k}": {"report": {"overall": {"accuracy": 0.6, "n": 40, "ci95": [0.45, 0.74]},
                               "scores": {"mean": -1.0, "std": proxy_std, "mean_margin": 0.1}}},
        f"ppo_{k}": {"initial": {"eval/score": proxy[0], "eval/test_score": gold[0],
                                 "eval/kl": 0.0},
                     "final": {"eval/score": proxy[1], "eval/test_score": gold[1],
                               "eval/kl": 0.08}}}
    for name, s in summaries.items():
        os.makedirs(os.path.join(run_dir, name), exist_ok=True)
        with open(os.path.join(run_dir, name, "summary.json"), "w") as f:
            json.dump(s, f)


def test_round_row_normalises_both_pms_on_the_same_samples(tmp_path):
    fake_round(str(tmp_path), 1)
    row = online.round_row(str(tmp_path), 1)
    # raw: proxy −0.5 − (−1.0) = 0.5, gold 0.32 − 0.30 = 0.02; stds on the fresh pairs:
    # proxy 0.25, gold 0.04 → 0.5 / 0.25 = 2.0 and 0.02 / 0.04 = 0.5; gap 2.0 − 0.5 = 1.5
    assert row["proxy_gain"] == pytest.approx(0.5) and row["gold_gain"] == pytest.approx(0.02)
    assert row["proxy_gain_std"] == pytest.approx(2.0)
    assert row["gold_gain_std"] == pytest.approx(0.5)
    assert row["overopt_gap_std"] == pytest.approx(1.5)
    assert (row["proxy_std_fresh"], row["gold_std_fresh"]) == (0.25, 0.04)
    fake_round(str(tmp_path), 2, proxy=(-2.0, -2.3), proxy_std=0.6, gold=(0.1, 0.4),
               gold_std=0.2)
    cfg = ConfigDict(dict(rounds=2, run_dir=str(tmp_path), gold_pm_from="/g"))
    summary = online.summarize(cfg, str(tmp_path / "online"))
    r2 = summary["rounds"][1]
    # −0.3 / 0.6 = −0.5; 0.3 / 0.2 = 1.5; gap −2.0
    assert (r2["proxy_gain_std"], r2["gold_gain_std"], r2["overopt_gap_std"]) == \
        pytest.approx((-0.5, 1.5, -2.0))
    with open(tmp_path / "collect_1" / "summary.json") as f:
        old = {k: v for k, v in json.load(f).items() if k != "gold_fresh_score_std"}
    with open(tmp_path / "collect_1" / "summary.json", "w") as f:
        json.dump(old, f)
    with pytest.raises(KeyError, match="gold_fresh_score_std"):
        online.round_row(str(tmp_path), 1)


def test_extending_a_run_with_rounds_summarizes_again(tmp_path):
    """`online` is complete only for the rounds it summarized; summarizing again rewrites
    metrics.jsonl instead of appending duplicate rows."""
    run_dir = str(tmp_path)
    fake_round(run_dir, 1)
    fake_round(run_dir, 2, proxy=(0.0, 1.0), gold=(0.0, 0.1))
    config = ConfigDict(dict(stages=("online",), online=ConfigDict(dict(
        stage="online", rounds=1, run_dir="{workdir}", gold_pm_from="{workdir}/gold"))))
    experiment.run(config, run_dir)
    jsonl = tmp_path / "online" / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in jsonl.read_text().splitlines()] == [1]
    experiment.run(config, run_dir)  # complete: skipped
    assert len(jsonl.read_text().splitlines()) == 1
    config.online.rounds = 2  # the run extended by a round
    assert not online.is_complete(config.online, str(tmp_path / "online"))
    experiment.run(config, run_dir)
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [json.loads(x)["step"] for x in jsonl.read_text().splitlines()] == [1, 2]
    assert online.is_complete(config.online, str(tmp_path / "online"))


def test_resampled_pairs_under_labeled_ids_are_refused(tmp_path):
    """collect_k deleted and resampled: the store's labels of the old texts under the same
    positional ids must not count as the new pairs' labels."""
    cfg = collect_cfg(tmp_path, 1)
    pairs = fake_pairs(4, 1)
    gold = {"scores": {p["id"]: [1.0, 0.0] for p in pairs}}
    online.label_round(cfg, str(tmp_path), pairs, gold)
    assert online.label_round(cfg, str(tmp_path), pairs, gold)["labeled_now"] == 0
    resampled = [{**p, "response_b": p["response_b"] + " again"} if i == 2 else p
                 for i, p in enumerate(pairs)]
    with pytest.raises(label_store.PairMismatch,
                       match=r"(?s)pairs.jsonl .*comparisons.jsonl.*'round1-train-00002'"):
        online.label_round(cfg, str(tmp_path), resampled, gold)
