"""The on-disk layout of a ptm model checkpoint (see docs/checkpoint-format.md).

A model checkpoint dir holds `params/` (an Orbax PyTree checkpoint of the parameter tree) and `ptm/metadata`
(JSON: model config, step, data counts, tokenizer, provenance). A run dir holds `checkpoints/<step>/` of those.
Only *complete* steps are ever resolved: locally Orbax writes `N.orbax-checkpoint-tmp-*` and renames it to `N`
when done; on gs:// it writes `N/` in place and marks it complete with `N/commit_success.txt` (Orbax's
`atomicity` module). Kept free of jax/orbax imports so that every area can use it cheaply.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from etils import epath

from ptm.errors import CheckpointError
from ptm.model.config import ModelConfig

FORMAT = "ptm-checkpoint"
VERSION = 1
PARAMS_ITEM = "params"
META_ITEM = "ptm"
META_FILE = "metadata"
COMMIT_FILE = "commit_success.txt"  # Orbax's completion marker for steps written in place (gs://)
# Where ptm.ckpt.placement builds and parks outputs (siblings of the output path; see docs/checkpoint-format.md).
TMP_SUFFIX = ".ptm-merge-tmp"
OLD_SUFFIX = ".ptm-merge-old"
STAGED_MARKER = ".ptm-staged"


@dataclass(frozen=True)
class ModelCheckpoint:
    """Where a model checkpoint's pieces live. `meta` is None for a bare Orbax params dir."""

    root: epath.Path
    params_path: epath.Path
    meta: dict[str, Any] | None

    def model_config(self) -> ModelConfig:
        """The checkpoint's ModelConfig (from ptm/metadata); a clear error when there is none."""
        return model_config(self.meta, str(self.root))


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith("gs://")


def _is_orbax_pytree(p: epath.Path) -> bool:
    return (p / "_METADATA").exists() or (p / "_sharding").exists() or (p / "manifest.ocdbt").exists()


def is_checkpoint_dir(p: str | epath.Path) -> bool:
    """A dir with a complete `params/` Orbax tree (a training step or a merge output)."""
    p = epath.Path(p)
    return (p / PARAMS_ITEM).exists() and _is_orbax_pytree(p / PARAMS_ITEM)


def step_is_complete(step_dir: epath.Path) -> bool:
    """A numeric step dir that Orbax finished: on gs:// it must hold `commit_success.txt` (written last);
    locally the final name alone says so (unfinished steps are `N.orbax-checkpoint-tmp-*`)."""
    if not re.fullmatch(r"\d+", step_dir.name):
        return False
    return (step_dir / COMMIT_FILE).exists() if is_gcs(step_dir) else True


def complete_steps(checkpoints: str | epath.Path) -> list[epath.Path]:
    """The complete step dirs of `<run>/checkpoints`, oldest first. Listings on gs:// are read fresh (gcsfs caches
    them, and a long-lived process resolving a run that is still training must see its new steps)."""
    checkpoints = epath.Path(checkpoints)
    if is_gcs(checkpoints):
        invalidate_gcs_listings()
    if not checkpoints.exists():
        return []
    steps = [p for p in checkpoints.iterdir() if step_is_complete(p)]
    return sorted(steps, key=lambda p: int(p.name))


def invalidate_gcs_listings() -> None:
    """Drop the directory listings that gcsfs caches, in every instance (epath and tensorstore users each hold
    one), so that existence checks and listings see objects written by other processes since."""
    try:
        import gcsfs
    except ImportError:  # pragma: no cover - gcsfs is a core dependency
        return
    for fs in list(getattr(gcsfs.GCSFileSystem, "_cache", {}).values()):
        fs.invalidate_cache()


def read_meta(step_dir: str | epath.Path) -> dict[str, Any] | None:
    f = epath.Path(step_dir) / META_ITEM / META_FILE
    if not f.exists():
        return None
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: ptm metadata is not UTF-8 text (byte {e.start}); corrupt file") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt ptm metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{f}: not a ptm checkpoint metadata file (format={fmt!r})")
    return meta


def write_meta(step_dir: str | epath.Path, meta: dict[str, Any]) -> None:
    """Write `ptm/metadata` (used by writers that do not go through a CheckpointManager, e.g. the merge)."""
    d = epath.Path(step_dir) / META_ITEM
    d.mkdir(parents=True, exist_ok=True)
    full = {**meta, "format": FORMAT, "version": VERSION}
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


def model_config(meta: dict[str, Any] | None, where: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's metadata (the one place that parses it)."""
    if not meta or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{where}: no ptm/metadata with a model config; cannot tell the model shape")
    try:
        return ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad model config in ptm/metadata: {e}") from e


def absolute(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax refuses relative ones: "Checkpoint path should be absolute");
    gs:// and other URLs unchanged."""
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def resolve(path: str | epath.Path) -> ModelCheckpoint:
    """Accept a run dir (newest complete step), a step/merge-output dir, or a bare Orbax params dir."""
    p = absolute(path)
    if is_gcs(p):
        invalidate_gcs_listings()
    if not p.exists():
        old = str(p) + OLD_SUFFIX
        if not is_gcs(p) and os.path.isdir(old):
            raise CheckpointError(f"{p}: missing, but {old} holds the previous output of an interrupted "
                                  f"replacement; the next `ptm merge --out {p}` restores it (or: mv {old} {p})")
        raise CheckpointError(f"{p}: no such checkpoint")
    if (p / "checkpoints").exists():
        steps = complete_steps(p / "checkpoints")
        if not steps:
            raise CheckpointError(f"{p}: run directory has no complete checkpoint under checkpoints/")
        p = steps[-1]
    elif re.fullmatch(r"\d+", p.name) and p.parent.name == "checkpoints" and not step_is_complete(p):
        raise CheckpointError(f"{p}: training step is incomplete (no {COMMIT_FILE}: still being written, or its "
                              "writer was killed); use an earlier step or the run dir")
    if is_checkpoint_dir(p):
        return ModelCheckpoint(root=p, params_path=p / PARAMS_ITEM, meta=read_meta(p))
    if _is_orbax_pytree(p):
        return ModelCheckpoint(root=p, params_path=p, meta=None)
    if (p / PARAMS_ITEM).exists() or (p / META_ITEM).exists():
        stage = p.parent / f".{p.name}{TMP_SUFFIX}"
        if (stage / STAGED_MARKER).exists():
            raise CheckpointError(f"{p}: incomplete: a replacement was interrupted; the complete new output is in "
                                  f"{stage}, and the next `ptm merge --out {p} --overwrite` finishes the switch")
        raise CheckpointError(f"{p}: incomplete checkpoint (no {PARAMS_ITEM}/_METADATA: being written, or its "
                              "writer was killed)")
    raise CheckpointError(
        f"{p}: not a ptm checkpoint (expected a run dir with checkpoints/, a dir with params/ and ptm/metadata, "
        "or an Orbax PyTree checkpoint)"
    )
