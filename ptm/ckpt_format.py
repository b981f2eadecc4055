"""The on-disk layout of a ptm model checkpoint (see docs/checkpoint-format.md).

A model checkpoint dir holds `params/` (an Orbax PyTree checkpoint of the parameter tree) and `ptm/metadata`
(JSON: model config, step, data counts, provenance). A run dir holds `checkpoints/<step>/` of those.
Kept free of jax/orbax imports so that every area can use it cheaply.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from etils import epath

from ptm.errors import CheckpointError

FORMAT = "ptm-checkpoint"
VERSION = 1
PARAMS_ITEM = "params"
META_ITEM = "ptm"
META_FILE = "metadata"


@dataclass(frozen=True)
class ModelCheckpoint:
    """Where a model checkpoint's pieces live. `meta` is None for a bare Orbax params dir."""

    root: epath.Path
    params_path: epath.Path
    meta: dict[str, Any] | None


def _is_orbax_pytree(p: epath.Path) -> bool:
    return (p / "_METADATA").exists() or (p / "_sharding").exists() or (p / "manifest.ocdbt").exists()


def _step_dirs(checkpoints: epath.Path) -> list[epath.Path]:
    """Completed step dirs (Orbax writes `N.orbax-checkpoint-tmp-*` while saving; those are skipped)."""
    if not checkpoints.exists():
        return []
    steps = [p for p in checkpoints.iterdir() if re.fullmatch(r"\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name))


def read_meta(step_dir: str | epath.Path) -> dict[str, Any] | None:
    f = epath.Path(step_dir) / META_ITEM / META_FILE
    if not f.exists():
        return None
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt ptm metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a ptm checkpoint metadata file (format={meta.get('format')!r})")
    return meta


def write_meta(step_dir: str | epath.Path, meta: dict[str, Any]) -> None:
    """Write `ptm/metadata` (used by writers that do not go through a CheckpointManager, e.g. the merge)."""
    d = epath.Path(step_dir) / META_ITEM
    d.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "version": VERSION, **meta}
    (d / META_FILE).write_text(json.dumps(full, indent=1, sort_keys=True))


def make_meta(
    model: dict[str, Any],
    step: int,
    data: dict[str, int] | None = None,
    provenance: dict[str, Any] | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """`tokenizer` is the spec `ptm.data.tokenizers.load_tokenizer` takes ("byte" or a path)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "step": int(step),
        "tokenizer": tokenizer,
        "data": dict(data or {}),
        "provenance": dict(provenance or {}),
    }


def absolute(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax refuses relative ones: "Checkpoint path should be absolute");
    gs:// and other URLs unchanged."""
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def resolve(path: str | epath.Path) -> ModelCheckpoint:
    """Accept a run dir (newest complete step), a step/merge-output dir, or a bare Orbax params dir."""
    p = absolute(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if (p / "checkpoints").exists():
        steps = _step_dirs(p / "checkpoints")
        if not steps:
            raise CheckpointError(f"{p}: run directory has no complete checkpoint under checkpoints/")
        p = steps[-1]
    if (p / PARAMS_ITEM).exists() and _is_orbax_pytree(p / PARAMS_ITEM):
        return ModelCheckpoint(root=p, params_path=p / PARAMS_ITEM, meta=read_meta(p))
    if _is_orbax_pytree(p):
        return ModelCheckpoint(root=p, params_path=p, meta=None)
    raise CheckpointError(
        f"{p}: not a ptm checkpoint (expected a run dir with checkpoints/, a dir with params/ and ptm/metadata, "
        "or an Orbax PyTree checkpoint)"
    )
