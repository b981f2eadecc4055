"""Merges evaluated in memory: the models of a recipe file (a sweep gives several), merged by the engine and never
written, each with the ModelConfig and metadata of its inputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ptm.ckpt import format as ckpt_format
from ptm.errors import ConfigError
from ptm.merge import recipe as R
from ptm.merge.engine import merge_to_tree


def recipe_models(path: str, only: int | None = None) -> Iterator[tuple[str, Any, Any, dict]]:
    """Yield (name, params, ModelConfig, meta) for each merge of the recipe file `path` (or just merge `only`)."""
    recipes = R.load(path)
    if only is not None and not 0 <= only < len(recipes):
        raise ConfigError(f"{path}: recipe_index={only} but the file has {len(recipes)} merge(s)")
    for i, rec in enumerate(recipes):
        if only is not None and i != only:
            continue
        metas = R.input_metas(rec)
        meta = next((m for m in metas.values() if m and m.get("model")), None)
        if meta is None:
            raise ConfigError(f"{path}: no input has ptm/metadata with a model config; cannot evaluate")
        config = ckpt_format.model_config(meta, path)
        name = rec.name or (path if len(recipes) == 1 else f"{path}[{i}]")
        yield name, merge_to_tree(rec), config, {**meta, "provenance": {"recipe": path, **rec.to_dict()}}
