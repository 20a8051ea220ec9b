"""Elo of policies judged by a PM (PAPER.md §5 [P §2.4, App. B.5]).

Every policy answers the same prompts (sampled here, or read from a responses file);
best-of-n policies pick, among n samples of a base policy, the one a PM scores highest.
A judge PM scores every response; on each prompt each pair of policies is one game, won
by the higher score (a tie counts ½ each). Win counts → maximum-likelihood Bradley–Terry
→ Elo (anchored at the first policy), with percentile intervals from resampling prompts.

The paper's PM-score-to-Elo relation, ΔElo ≈ 174·ΔPM (i.e. P(a beats b) =
σ(r_a − r_b) with r the PM score), is checked two ways: "pm_elo" = 174·(mean score −
the anchor's), to compare with the fitted Elo; and "soft_elo", the BT fit of the PM's own
predicted preferences σ(s_a − s_b) per game instead of hard wins.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os

import jax
import numpy as np

from hh_jax import chat, sampling
from hh_jax.data import hh
from hh_jax.evals import common, datasets, loglik, pm_judge, stats


def games(scores_PxQ: np.ndarray, soft: bool = False):
    """(i_G, j_G, outcome_G, prompt_G): every pair of policies on every prompt; outcome 1
    when i scored higher, ½ on a tie; `soft`: σ(s_i − s_j) instead."""
    s = np.asarray(scores_PxQ, np.float64)
    i, j, o, q = [], [], [], []
    for a, b in itertools.combinations(range(s.shape[0]), 2):
        d = s[a] - s[b]
        i += [a] * len(d)
        j += [b] * len(d)
        o += list(1 / (1 + np.exp(-d)) if soft else (d > 0) + 0.5 * (d == 0))
        q += list(range(len(d)))
    return np.array(i), np.array(j), np.array(o, np.float64), np.array(q)


def elo_table(scores_PxQ: np.ndarray, names: list[str], *, n_boot: int = 200, seed: int = 0
              ) -> dict:
    """Elo (hard wins, with bootstrap over prompts), soft Elo, PM-predicted Elo, win rates
    against the anchor, and the least-squares slope of Elo on mean PM score (paper: 174)."""
    s = np.asarray(scores_PxQ, np.float64)
    i, j, o, q = games(s)
    boot = stats.bradley_terry_bootstrap(i, j, o, len(names), groups_G=q, n_boot=n_boot,
                                         seed=seed)
    si, sj, so, _ = games(s, soft=True)
    soft = stats.bradley_terry(stats.win_matrix(si, sj, so, len(names)), l2=1e-3)
    mean = s.mean(1)
    pm_elo = stats.ELO_PER_NAT * (mean - mean[0])
    slope = float(np.polyfit(mean, boot["elo"], 1)[0]) if np.ptp(mean) > 0 else float("nan")
    wins = stats.win_matrix(i, j, o, len(names))
    rate = np.divide(wins, wins + wins.T, out=np.full_like(wins, np.nan),
                     where=(wins + wins.T) > 0)
    return {"policies": names, "elo": boot["elo"], "lo": boot["lo"], "hi": boot["hi"],
            "soft_elo": soft, "pm_elo": pm_elo, "mean_pm_score": mean,
            "elo_per_pm_unit": slope, "paper_elo_per_pm_unit": stats.ELO_PER_NAT,
            "win_rate_vs_anchor": rate[:, 0], "prompts": s.shape[1]}


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    spec: str  # params export or pretrained name
    n: int = 1  # best-of-n (judged by the selection PM)


def parse_policy(arg: str) -> Policy:
    """"name=spec" or "name=spec@bon:N" (best-of-N of spec's samples)."""
    name, _, rest = arg.partition("=")
    if not rest:
        name, rest = os.path.basename(arg.rstrip("/")), arg
    spec, _, bon = rest.partition("@bon:")
    return Policy(name, spec, int(bon) if bon else 1)


def sample_replies(spec: str, prompts: list[str], n: int, *, max_new_tokens: int,
                   temperature: float, top_p: float, batch_size: int, seed: int
                   ) -> list[list[str]]:
    """n sampled replies per prompt ([prompt][k]), one jitted sampler, fixed batch shape."""
    model, params, tok, fmt = loglik.load_model(spec)
    ids = [chat.prompt_ids(tok, [("Human", p)], fmt)[-(model.cfg.max_len - max_new_tokens):]
           for p in prompts]
    rows = [(qi, k) for qi in range(len(prompts)) for k in range(n)]
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=0, top_p=top_p)
    fn = jax.jit(functools.partial(sampling.sample, model=model, cfg=cfg, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id))
    width = max(len(x) for x in ids)
    out = [[""] * n for _ in prompts]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        batch = [ids[qi] for qi, _ in chunk] + [ids[0]] * (batch_size - len(chunk))
        toks, mask = sampling.pad_prompts(batch, tok.pad_id, length=width)
        res = jax.device_get(fn(params, toks, mask, jax.random.fold_in(jax.random.key(seed), s)))
        for r, (qi, k) in enumerate(chunk):
            text = tok.decode(res["tokens_BxR"][r][:res["lengths_B"][r]])
            out[qi][k] = chat.cut_reply(text, fmt)
    return out


def run(policies: list[str], pm: str, out_dir: str, *, select_pm: str | None = None,
        n_prompts: int = 64, max_new_tokens: int = 64, temperature: float = 1.0,
        top_p: float = 1.0, batch_size: int = 16, n_boot: int = 200, seed: int = 0,
        responses: str | None = None, progress: bool = True) -> dict:
    """`hh-jax eval elo`: summary.json (+ responses.jsonl), a table, elo.png."""
    pols = [parse_policy(p) for p in policies]
    judge = pm_judge.PMJudge(pm, progress=progress)
    selector = judge if select_pm in (None, pm) else pm_judge.PMJudge(select_pm)
    if responses:
        prompts, replies = read_responses(responses, [p.name for p in pols])
    else:
        prompts = (hh.load_hh_prompts(os.path.join(datasets.HH_DIR, "helpful-base",
                                                         "test.jsonl.gz"), n_prompts // 2, seed)
                   + hh.load_hh_prompts(os.path.join(datasets.HH_DIR, "harmless-base",
                                                           "test.jsonl.gz"),
                                              n_prompts - n_prompts // 2, seed))
        replies = {}
        for spec in dict.fromkeys(p.spec for p in pols):  # sample each model once
            n = max(p.n for p in pols if p.spec == spec)
            samples = sample_replies(spec, prompts, n, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p,
                                     batch_size=batch_size, seed=seed)
            for p in (p for p in pols if p.spec == spec):
                replies[p.name] = best_of(samples, p.n, prompts, selector)
        write_responses(os.path.join(out_dir, "responses.jsonl"), prompts, replies)
    texts = [pm_judge.transcript([("Human", q)], replies[p.name][k])
             for p in pols for k, q in enumerate(prompts)]
    scores = judge(texts).reshape(len(pols), len(prompts))
    table = elo_table(scores, [p.name for p in pols], n_boot=n_boot, seed=seed)
    summary = {"pm": pm, "select_pm": select_pm or pm,
               "policy_specs": [dataclasses.asdict(p) for p in pols],
               "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               **table}
    print(report_table(summary), flush=True)
    common.write_summary(out_dir, summary)
    plot(summary, os.path.join(out_dir, "elo.png"))
    return summary


def best_of(samples: list[list[str]], n: int, prompts: list[str], selector) -> list[str]:
    if n == 1:
        return [s[0] for s in samples]
    texts = [pm_judge.transcript([("Human", q)], r) for q, s in zip(prompts, samples, strict=True)
             for r in s[:n]]
    sc = selector(texts).reshape(len(prompts), n)
    return [s[int(np.argmax(row))] for s, row in zip(samples, sc, strict=True)]


def write_responses(path: str, prompts: list[str], replies: dict[str, list[str]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for name, rs in replies.items():
            for q, r in zip(prompts, rs, strict=True):
                f.write(json.dumps({"policy": name, "prompt": q, "response": r}) + "\n")


def read_responses(path: str, names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """A responses.jsonl ({"policy", "prompt", "response"} per line): every policy must
    answer the same prompts."""
    by: dict[str, dict[str, str]] = {}
    order: list[str] = []
    with open(path) as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                name, q, r = row["policy"], row["prompt"], row["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise datasets.DataError(path, line, "bad_row", str(e)) from None
            by.setdefault(name, {})[q] = r
            if q not in order:
                order.append(q)
    for name in names:
        missing = [q for q in order if q not in by.get(name, {})]
        if missing:
            raise datasets.DataError(path, 1, "missing_responses",
                                     f"policy {name!r} lacks {len(missing)} of the prompts")
    return order, {n: [by[n][q] for q in order] for n in names}


def report_table(summary: dict) -> str:
    rows = [(n, f"{e:.0f} [{lo:.0f}, {hi:.0f}]", f"{se:.0f}", f"{pe:.0f}", f"{m:.3f}",
             f"{w:.2f}" if np.isfinite(w) else "-")
            for n, e, lo, hi, se, pe, m, w in zip(
                summary["policies"], summary["elo"], summary["lo"],
                summary["hi"], summary["soft_elo"], summary["pm_elo"],
                summary["mean_pm_score"], summary["win_rate_vs_anchor"], strict=True)]
    return common.table(("policy", "Elo [95%]", "soft Elo", "174·ΔPM", "mean PM",
                         "win vs anchor"), rows,
                        f"Elo on {summary['prompts']} prompts, judge {summary['pm']}; "
                        f"Elo per PM unit {summary['elo_per_pm_unit']:.0f} (paper ≈ 174)")


def plot(summary: dict, path: str) -> None:
    plt = common.pyplot()
    names = summary["policies"]
    e, lo, hi = (np.asarray(summary[k]) for k in ("elo", "lo", "hi"))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    m = np.asarray(summary["mean_pm_score"])
    ax.errorbar(m, e, yerr=[e - lo, hi - e], fmt="o", capsize=3, label="BT Elo (PM judge)")
    xs = np.linspace(m.min(), m.max(), 10)
    ax.plot(xs, stats.ELO_PER_NAT * (xs - m[0]), "--", color="grey", label="174·ΔPM (paper)")
    for n, x, y in zip(names, m, e, strict=True):
        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean PM score")
    ax.set_ylabel("Elo (anchor = first policy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
