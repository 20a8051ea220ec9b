"""All orbax calls: the stage's CheckpointManager, resume order, params-only export/import.

Layout under a stage's workdir:
  checkpoints/<step>/{state,data}   full train state (sharded arrays) + data position (JSON)
  params/                           params-only export: what the next stage's init_from reads
  summary.json                      written last, marks the stage complete

Resume order (DESIGN.md §3): the stage's own latest checkpoint → `config.resume` (a
checkpoints dir of the same stage type) → `config.init_from` (params only) → scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings, so restore lands arrays in place."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


class StageCheckpoints:
    """Thin wrapper over `ocp.CheckpointManager` for one stage's `checkpoints/` dir."""

    def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def export_params(path: str, params: Any, meta: dict | None = None) -> None:
    """Params-only export for stage hand-off (+ `meta.json`: model config, tokenizer)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
    if meta is not None and jax.process_index() == 0:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)


def read_meta(path: str) -> dict:
    meta_path = os.path.join(os.path.abspath(path), "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: not a params export (no meta.json)")
    with open(meta_path) as f:
        return json.load(f)


def tokenizer_spec(path: str) -> str:
    """The tokenizer an export was trained with: a file inside it, or a named spec."""
    spec = read_meta(path)["tokenizer"]
    local = os.path.join(os.path.abspath(path), spec)
    return local if os.path.exists(local) else spec


def copy_tokenizer(src_export: str, dst_export: str) -> str:
    """Carries a tokenizer file from one export to the next (exports are self-contained)."""
    spec = tokenizer_spec(src_export)
    if not os.path.exists(spec):
        return spec
    os.makedirs(dst_export, exist_ok=True)
    if jax.process_index() == 0:
        shutil.copyfile(spec, os.path.join(dst_export, os.path.basename(spec)))
    return os.path.basename(spec)


def import_params(path: str, abstract_params: Any | None = None) -> Any:
    """Restores a params export; with `abstract_params` (ShapeDtypeStructs with shardings)
    the arrays land sharded, and a shape mismatch is an error naming the path."""
    path = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no params export here")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_params is None:
            return ckptr.restore(path)
        return ckptr.restore(path, abstract_params)


def is_complete(stage_dir: str) -> bool:
    """A stage is complete once its summary.json exists (written after the export)."""
    return os.path.exists(os.path.join(stage_dir, "summary.json"))
