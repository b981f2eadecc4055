"""Load a model's parameters from any ptm model checkpoint, optionally sharded (each process reads only its
shards), and place in-memory trees with the training shardings."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.tree import flatten, shapes
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
    _check_tree(tree, ref.params_path, shardings, model_config)
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
        raise CheckpointError(f"{params_path}: not a readable Orbax checkpoint: {_metadata_problem(params_path)} "
                              f"({type(e).__name__}: {e})") from e
    tree = getattr(meta_tree, "item_metadata", meta_tree)
    return getattr(tree, "tree", tree)


def _metadata_problem(params_path) -> str:
    """Why `params/_METADATA` yields no tensor tree (Orbax only logs a warning and returns nothing)."""
    f = epath.Path(params_path) / "_METADATA"
    if not f.exists():
        return f"{f} is missing"
    try:
        md = json.loads(f.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{f} is not valid JSON, truncated or corrupt ({e})"
    if not isinstance(md, dict) or not isinstance(md.get("tree_metadata"), dict) or not md["tree_metadata"]:
        return f"{f} has no tree_metadata entries"
    from ptm.ckpt.stores import OrbaxStore

    try:  # every tensor it lists must be stored: our reader names the first that is not
        OrbaxStore(params_path).tensors()
    except CheckpointError as e:
        return f"{f} does not match the stored arrays: {e}"
    return f"{f} describes no tensors Orbax can read"


def _check_tree(tree, params_path, shardings, model_config: ModelConfig | None) -> None:
    """The checkpoint's tensor tree (from `params/_METADATA`) must be the one asked for: the model's tensors and
    shapes (`model_config`), else the structure of `shardings`. Otherwise a corrupt `_METADATA` surfaces as
    "pytree structure error" deep in jax. Lists every missing/extra tensor and shape clash."""
    if not isinstance(tree, Mapping) or not tree:
        raise CheckpointError(f"{params_path}: no parameter tree in the checkpoint: {_metadata_problem(params_path)}")
    got = flatten(tree)
    if model_config is not None:
        want: dict[str, Any] = shapes(model_config)
    elif isinstance(shardings, Mapping):
        want = {n: None for n in flatten(shardings)}
    else:
        return
    problems = [f"missing tensor {n!r}" for n in sorted(set(want) - set(got))]
    problems += [f"extra tensor {n!r}" for n in sorted(set(got) - set(want))]
    for n in sorted(set(want) & set(got)):
        shape = tuple(getattr(got[n], "shape", ()) or ())
        if want[n] is not None and shape != tuple(want[n]):
            problems.append(f"tensor {n!r} has shape {list(shape)}, the model needs {list(want[n])}")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise CheckpointError(
            f"{params_path}: the checkpoint's tensor tree (params/_METADATA) does not match the model "
            f"({len(problems)} problem(s)): " + "; ".join(shown)
        )


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
