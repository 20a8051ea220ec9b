#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs hh_jax with its test extras, once: a stamp
# holding the hash of setup.cfg skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" - <<'PYCHECK' || { echo "hh_jax needs Python 3.11+ (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYCHECK
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.hh_jax-installed"
want="$(cat setup.cfg pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
