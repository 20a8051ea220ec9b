#!/usr/bin/env bash
# The test suite: set up (first time only), then pytest on the fast suite (< 10 min on
# 2 cores). `bash scripts/test.sh -m slow` runs the slower checks instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh  # Chromium for the labeling page's browser test (or it skips)
exec .venv/bin/python -m pytest -q "$@"
