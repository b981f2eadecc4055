"""Orbax checkpointing of training runs: async, keep-last-K, exact resume, local or gs://.

Each step dir holds items `params`, `opt_state`, `data_iter` (grain iterator position) and `ptm` (JSON metadata:
model config, step, data counts). `params` alone is a complete model checkpoint (see docs/checkpoint-format.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.errors import CheckpointError

COMPRESS_PARAMS = False  # see RunCheckpointer


class RunCheckpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `<run_dir>/checkpoints`.

    `params` are stored without zstd unless `compress_params`: trained bf16/fp32 weights barely compress (a
    1.1B bf16 model: 2.2 GB raw, 1.6 GB zstd) while decoding them was most of the cost of merging straight from
    training checkpoints (docs/benchmarks.md, "Orbax input"). The optimizer state keeps Orbax's default (zstd).
    Readers handle both: the codec is recorded per array."""

    def __init__(self, run_dir: str | epath.Path, *, save_every: int, keep: int = 2, async_save: bool = True,
                 compress_params: bool = COMPRESS_PARAMS):
        self.directory = ckpt_format.absolute(run_dir) / "checkpoints"
        self.save_every = max(int(save_every), 1)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # we decide when to save
            enable_async_checkpointing=async_save,
            create=True,
        )
        # StandardCheckpointHandler does not expose the codec; PyTreeCheckpointHandler (which it wraps, same
        # on-disk format) does.
        handler = ocp.PyTreeCheckpointHandler(use_compression=compress_params)
        reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
        reg.add("params", ocp.args.PyTreeSave, handler)
        reg.add("params", ocp.args.PyTreeRestore, handler)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, handler_registry=reg)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter, meta: dict[str, Any] | Callable[[], dict[str, Any]], *,
             force: bool = False) -> bool:
        """Save if `step` is due (or `force`). `meta` may be a callable, built only when a save happens."""
        if not force and step % self.save_every:
            return False

        def save_args(path, x, limit=64 << 20):
            # Arrays over 64 MiB are stored in chunks of <= 64 MiB so readers (the merge engine) can fetch and
            # decode pieces; stacked `layers` arrays are cut one layer per chunk first (axis 0). Smaller arrays
            # keep one chunk. Storage layout only: restore (and exact resume) read any chunking.
            if getattr(x, "nbytes", 0) <= limit:
                return ocp.SaveArgs()
            stacked = x.ndim > 1 and any(getattr(k, "key", None) == "layers" for k in path)
            return ocp.SaveArgs(chunk_byte_size=limit, shard_axes=(0,) if stacked else ())

        args = {
            "params": ocp.args.PyTreeSave(
                state["params"], save_args=jax.tree_util.tree_map_with_path(save_args, state["params"])
            ),
            "opt_state": ocp.args.StandardSave(state["opt_state"]),
            "ptm": ocp.args.JsonSave(meta() if callable(meta) else meta),
        }
        if data_iter is not None:
            import grain

            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: dict, data_iter) -> tuple[dict, dict]:
        """Restore state (with the shardings in `abstract_state`) and the data iterator in place."""
        meta = ckpt_format.read_meta(self.directory / str(step))
        if meta is None:
            raise CheckpointError(f"{self.directory / str(step)}: not a ptm checkpoint (no ptm/metadata)")
        args = {
            "params": ocp.args.PyTreeRestore(
                abstract_state["params"],
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state["params"]),
            ),
            "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"]),
        }
        if data_iter is not None:
            import grain

            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax raises many types for corrupt/mismatched trees
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore training state: {e}") from e
        step_arr = jax.device_put(np.asarray(meta["step"], np.int32), abstract_state["step"].sharding)
        return {"step": step_arr, "params": out["params"], "opt_state": out["opt_state"]}, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
