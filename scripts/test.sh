#!/usr/bin/env bash
# The test suite: set up (first time only), then pytest on the fast suite (< 10 min on
# 2 cores). `bash scripts/test.sh -m slow` runs the slower checks instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
