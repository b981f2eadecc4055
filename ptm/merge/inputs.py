"""What the engine merges: each recipe input opened as a store, then seen as a frankenmerge layer stack
(`slices`) and through the output vocabulary (`tokenizer`) when the recipe asks — one store per input path, so
the engine never special-cases either."""

from __future__ import annotations

from typing import Any

from ptm.ckpt import stores as S
from ptm.errors import MergeError
from ptm.merge import slices as SL
from ptm.merge import vocab as V


def open_inputs(recipes: list[Any], paths: list[str], cache: dict[str, S.InputStore]) -> list[S.InputStore]:
    """One store per path of `paths` (the recipes' distinct input paths, in order)."""
    r = recipes[0]
    for o in recipes[1:]:
        if o.slices != r.slices or o.tokenizer != r.tokenizer:
            raise MergeError("recipes merged in one pass must have the same `slices` and `tokenizer`")
    need = SL.models(r) if r.slices else paths
    for p in need:
        if p not in cache:
            cache[p] = S.open_store(p)
    stores = SL.stacks(r, cache) if r.slices else [cache[p] for p in paths]
    if r.tokenizer:
        if r.tokenizer == "union" and (r.output_format or stores[0].kind) != "safetensors":
            raise MergeError("tokenizer = 'union' writes a new tokenizer, which only a safetensors (HF) output holds: "
                             "set output_format = 'safetensors'")
        stores = V.views(r.tokenizer, r.inputs.get("pre"), paths, stores)
    return stores


def source_paths(stores: list[S.InputStore]) -> list[str]:
    """The real paths behind the stores (what output placement must keep apart from the outputs)."""
    return list(dict.fromkeys(p for s in stores for p in getattr(s, "paths", [s.path])))
