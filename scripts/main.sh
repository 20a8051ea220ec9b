#!/usr/bin/env bash
# The main job: set up (first time only), then run the whole pipeline on the CPU and
# sample from the trained model. Extra arguments go to `hh-jax run` (e.g. --config.lm.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR="${WORKDIR:-runs/smoke}"
.venv/bin/hh-jax run experiments/smoke.py --workdir "$WORKDIR" "$@"
.venv/bin/hh-jax sample --params "$WORKDIR/ppo/params" --prompt "How do I make a good cup of coffee?"
