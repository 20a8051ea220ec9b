#!/usr/bin/env bash
# Issue 6's GPU measurements in one go, most important first (an earlier version, timing one
# decode variant, took 6.5 minutes on one H200; generate()'s torch.compile takes 30-70 s
# per batch size). Each part has its own time limit, so one that hangs or fails leaves the
# others' results. Writes one text file per part into OUTDIR (default /tmp/hh_jax_gpu).
#
#   bash bench/gpu_ppo.sh [OUTDIR]
#
# 1. our KV-cache sampler (its default GPU decode step, hh_jax/decode_step.py, and the
#    model's stacked layer scan) vs transformers generate() (static cache, bf16, greedy,
#    128 new tokens) on SmolLM2-135M's shape at batch 64, 256 and 1 (target: >= 10x at 64);
# 2. a PPO iteration with SmolLM2-135M's shape as policy, pi0, value and PM (bf16 compute)
#    at the anchor's batch (8 prompts x 64 tokens, 32-token responses);
# 3. the CPU anchor shape (6M, float32) on the GPU;
# 4. the SmolLM2 iteration at a GPU-sized batch: 64 prompts x 64 tokens, 128-token responses;
# 5. (not yet measured) part 1's sampler with the decode's attention as a cuDNN kernel.
# Needs jax (CUDA), flax, optax, orbax, torch and transformers, and for hh_jax's imports
# ml_collections and grain (with array_record), which the GPU device image lacks. Carry them
# as wheels in the git-ignored .whl/ folder (the six of BENCHMARKS.md's SmolLM2 runs:
# ml_collections, grain, array_record, gguf, tensorboardX, portpicker) and install them
# on the device (offline) before this script:
#
#   pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Without them the script stops at once with that hint (rather than parts 2-4 dying at
# import).
set -uo pipefail
out=${1:-/tmp/hh_jax_gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the script changes directory
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc
  "$py" -c "import jax, flax, optax, torch, transformers as t
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax',
      optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)"
} 2>&1 | tee "$out/machine.txt"
if ! "$py" -c "import ml_collections, grain" 2> "$out/missing_wheels.txt"; then
  echo "gpu_ppo.sh: hh_jax's imports are missing ($(tail -n 1 "$out/missing_wheels.txt")):" \
    "carry the wheels in .whl/ and run 'pip install --no-deps --target /tmp/site" \
    ".whl/*.whl && export PYTHONPATH=/tmp/site' first (see this script's header)" >&2
  exit 2
fi
rm -f "$out/missing_wheels.txt"

part() {  # part NAME SECONDS ARGS...: one bench with its own time limit
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$py" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
}

part sampler_vs_generate 300 bench/sampler_vs_generate.py --batches 64,256,1 --repeats 3 \
  --variants auto,scan
part ppo_smollm2_b8 130 bench/ppo_iteration.py --size smollm2-135m --dtype bfloat16 --iters 5
part ppo_anchor 70 bench/ppo_iteration.py --iters 5
part ppo_smollm2_b64 120 bench/ppo_iteration.py --size smollm2-135m --dtype bfloat16 \
  --iters 3 --batch 64 --response 128 --skip-naive
# not yet measured: the decode's attention as one cuDNN kernel per layer
part sampler_cudnn_attention 150 bench/sampler_vs_generate.py --batches 64,256,1 --repeats 3 \
  --variants auto --skip-hf --attention-impl cudnn
