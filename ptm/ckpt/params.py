"""Load a model's parameters from any ptm model checkpoint, optionally sharded (each process reads only its
shards), and place in-memory trees with the training shardings."""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.errors import CheckpointError
from ptm.model.config import ModelConfig
from ptm.model.sharding import param_shardings


def check_same_model(meta: dict, cfg: ModelConfig, where: str) -> None:
    """Refuse to resume/init from a checkpoint whose parameter shapes differ from the configured model."""
    theirs = ckpt_format.model_config(meta, where).shape_dict()
    ours = cfg.shape_dict()
    diff = {k: (theirs[k], ours[k]) for k in ours if theirs.get(k) != ours[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where}: model config differs from the checkpoint's ({lines})")


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns "Metadata file does not exist: .../params/_CHECKPOINT_METADATA" whenever one item of a
    CheckpointManager step is restored on its own (the file lives in the step dir). It is expected here and
    only alarms users, so it is dropped; other Orbax warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())


def load_params(path: str | epath.Path, shardings=None, *, model_config: ModelConfig | None = None):
    """Load just the params of a model checkpoint (run dir, step dir, merge output or bare Orbax dir).

    With `shardings` (a tree of NamedSharding), each process reads only its shards. Returns (params, meta).
    """
    ref = ckpt_format.resolve(path)
    if model_config is not None and ref.meta is not None:
        check_same_model(ref.meta, model_config, str(ref.root))
    ckptr = ocp.StandardCheckpointer()
    tree = _meta_tree(ckptr, ref.params_path)  # names, shapes, dtypes: read once, no arrays
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    if shardings is None:  # everything on the first local device
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: dev, tree, is_leaf=is_leaf)
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings,
                            is_leaf=is_leaf)
    try:
        params = ckptr.restore(ref.params_path, abstract)
    except Exception as e:
        raise CheckpointError(f"{ref.params_path}: cannot read params: {e}") from e
    return params, ref.meta


def _meta_tree(ckptr, params_path):
    try:
        meta_tree = ckptr.metadata(params_path)
    except Exception as e:
        raise CheckpointError(f"{params_path}: not a readable Orbax checkpoint: {e}") from e
    tree = getattr(meta_tree, "item_metadata", meta_tree)
    return getattr(tree, "tree", tree)


def read_model_config(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, meta) from a checkpoint's ptm/metadata, without reading any tensor."""
    ref = ckpt_format.resolve(path)
    return ref.model_config(), ref.meta


def load_checkpoint(path: str, mesh=None) -> tuple[Any, ModelConfig, dict]:
    """(params, ModelConfig, meta) of a ptm checkpoint; params sharded like training when `mesh` is given."""
    config, _ = read_model_config(path)
    shardings = param_shardings(config, mesh) if mesh is not None else None
    params, meta = load_params(path, shardings, model_config=config)
    return params, config, meta


def place_params(params, config: ModelConfig, mesh):
    """Put an in-memory tree (numpy or jax) on the mesh with the training shardings (no-op without a mesh)."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(config, mesh))
