"""Gathers a smollm2_hh run's figures into one JSON (bench/gpu_smollm2.sh's last step).

    python bench/collect_smollm2.py WORKDIR OUTDIR

Reads each stage's summary.json and metrics.jsonl (what the stages wrote; nothing is
recomputed) and writes OUTDIR/smollm2_gpu.json: PM held-out accuracy per subset with 95%
intervals and the longer-response baseline, training real tokens/s (the mean over the
logged windows after the first, which includes compilation), PPO's held-out evaluations,
best-of-n rows. A stage that did not finish is recorded as missing.
"""

from __future__ import annotations

import json
import os
import sys


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def pm_figures(stage_dir: str) -> dict:
    s = _summary(stage_dir)
    if s is None:
        return {"missing": True}
    rates = [m["perf/real_tokens_per_s"] for m in _jsonl(os.path.join(stage_dir, "metrics.jsonl"))
             if "perf/real_tokens_per_s" in m]
    rep = s["report"]
    return {"accuracy": rep["overall"], "per_subset": rep["per_subset"],
            "calibration_ece": rep["calibration"]["ece"], "steps": s["steps"],
            "data": s["data"], "heldout_pairs": s["heldout_pairs"],
            "real_tokens_per_s": sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else None,
            "real_tokens_per_s_windows": rates}


def main(work: str, out: str) -> dict:
    res = {"workdir": work}
    for stage in ("pm", "pm_test"):
        res[stage] = pm_figures(os.path.join(work, stage))
    ppo = _summary(os.path.join(work, "ppo"))
    res["ppo"] = {"missing": True} if ppo is None else {
        k: ppo[k] for k in ("evals", "sqrt_kl_fit", "timing") if k in ppo}
    bon = _summary(os.path.join(work, "bon"))
    res["bon"] = {"missing": True} if bon is None else bon
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "smollm2_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    for stage in ("pm", "pm_test"):
        r = res[stage]
        if not r.get("missing"):
            print(f"{stage}: held-out accuracy {r['accuracy']['accuracy']:.3f} "
                  f"{r['accuracy'].get('ci95')} longer-wins {r['accuracy'].get('longer_wins')} "
                  f"real tok/s {r['real_tokens_per_s']}")
        else:
            print(f"{stage}: missing")
    return res


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
