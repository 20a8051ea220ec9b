"""Metrics contract (DESIGN.md §3): metrics.jsonl + TensorBoard events + summary.json.

Only process 0 writes. `check_finite` is the NaN/Inf guard: stages call it before every
checkpoint save, so a divergence stops training with the last good checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
    pass


def to_python(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x.tolist()
    return x


def check_finite(metrics: dict[str, Any], step: int, where: str) -> None:
    for name, value in metrics.items():
        v = to_python(value)
        if isinstance(v, float) and not math.isfinite(v):
            raise NonFiniteError(
                f"{where}: {name} = {v} at step {step}; training stopped, the last good "
                f"checkpoint is kept (lower the learning rate or check the data)")


class MetricsWriter:
    """Appends JSON lines and TensorBoard scalars under `directory` (process 0 only)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            os.makedirs(directory, exist_ok=True)
            self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def _board(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.directory, flush_secs=10)
        return self._tb

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time(), **to_python(metrics)}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for name, value in row.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                self._board().add_scalar(name, value, step)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def write_summary(directory: str, summary: dict[str, Any]) -> None:
    """summary.json, written atomically: its presence marks the stage complete."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(to_python(summary), f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_summary(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, "summary.json")) as f:
        return json.load(f)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed): every stage plot and the
    report's figures draw with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def transformer_flops_per_token(n_params_non_embed: int, n_layers: int, d_model: int,
                                seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·d·T (Kaplan et al. 2020, incl. attention)."""
    return 6.0 * n_params_non_embed + 12.0 * n_layers * d_model * seq_len
