"""Frankenmerges: an input whose layers are ranges of other models' layers (mergekit's `slices` / `layer_range`).

A `LayerStack` is a read-only InputStore that the engine merges like any checkpoint, so streaming, sharding and
every method work unchanged: the output's layer count is the sum of the slices' range lengths. ptm checkpoints
stack layers (`layers.*`, axis 0 = layer): a read of output layers [a, b) is the concatenation of the matching
source ranges. HF safetensors name each layer (`model.layers.N.…`): output layer j is renamed from its source
layer. Non-layer tensors follow mergekit: the embedding comes from the first slice's model, every other
non-layer tensor (final norm, LM head) from the last slice's model.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptm.ckpt import stores as S
from ptm.ckpt import tree
from ptm.errors import ConfigError, MergeError

_LAYER = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")
EMBED_PATTERN = "re:embed"  # the non-layer tensors taken from the first slice (recipe.match pattern)


@dataclass(frozen=True)
class Source:
    model: str
    start: int
    stop: int


def parse(slices: Any, n_inputs: int, paths: list[str], where: str = "recipe") -> list[list[Source]]:
    """Recipe `slices` -> per slice, one Source per recipe input (in `Recipe.input_paths()` order).

    A slice is `{layer_range = [a, b]}` (every input, its own model) or `{sources = [...]}` with one entry per
    input: `[a, b]` (that input's model) or `{model = PATH, layer_range = [a, b]}`."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: `slices` must be a non-empty list of slices")
    out = []
    for i, s in enumerate(slices):
        at = f"{where}: slices[{i}]"
        if not isinstance(s, dict) or set(s) - {"sources", "layer_range"} or ("sources" in s) == ("layer_range" in s):
            raise ConfigError(f"{at}: a slice is {{layer_range = [a, b]}} or {{sources = [...]}}, got {s!r}")
        srcs = s.get("sources") or [s["layer_range"]] * n_inputs
        if not isinstance(srcs, list) or len(srcs) != n_inputs:
            raise ConfigError(f"{at}: {len(srcs) if isinstance(srcs, list) else srcs!r} sources, but the recipe "
                              f"has {n_inputs} input(s) {paths}: give one source per input, in input order")
        row = []
        for k, src in enumerate(srcs):
            model, rng = paths[k], src
            if isinstance(src, dict):
                bad = set(src) - {"model", "layer_range"}
                if bad or "layer_range" not in src:
                    raise ConfigError(f"{at}.sources[{k}]: a source is {{model = ..., layer_range = [a, b]}} "
                                      f"(got keys {sorted(src)})")
                model, rng = str(src.get("model", paths[k])), src["layer_range"]
            ints = isinstance(rng, list | tuple) and len(rng) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in rng)
            if not ints or not 0 <= rng[0] < rng[1]:
                raise ConfigError(f"{at}.sources[{k}]: layer_range must be [start, stop) with 0 <= start < stop, "
                                  f"got {rng!r}")
            row.append(Source(model, int(rng[0]), int(rng[1])))
        lens = {r.stop - r.start for r in row}
        if len(lens) > 1:
            got = [(r.model, [r.start, r.stop]) for r in row]
            raise ConfigError(f"{at}: the sources' layer ranges differ in length ({got}); aligned slices need "
                              "equal lengths")
        out.append(row)
    return out


def _layer_count(st: S.InputStore) -> int:
    infos = st.tensors()
    stacked = {i.shape[0] for n, i in infos.items() if tree.is_stacked_layer(n) and i.shape}
    if stacked:
        return max(stacked)
    idx = [tree.layer_of(n) for n in infos]
    return max((i for i in idx if i is not None), default=-1) + 1


def _is_embedding(name: str) -> bool:
    return re.search(EMBED_PATTERN[3:], name) is not None


class LayerStack(S.InputStore):
    """One merge input assembled from layer ranges of other inputs (see the module docstring)."""

    def __init__(self, label: str, segments: list[tuple[S.InputStore, int, int]]):
        self.path = label
        self.paths = list(dict.fromkeys(st.path for st, _, _ in segments))
        self.segments = segments
        self.kind = segments[0][0].kind
        first, last = segments[0][0], segments[-1][0]
        for st, a, b in segments:
            n = _layer_count(st)
            if b > n:
                raise MergeError(f"{st.path}: layer_range [{a}, {b}) is past its last layer ({n} layers)")
        self.n_layers = sum(b - a for _, a, b in segments)
        self._map: dict[str, tuple[S.InputStore, str]] = {}  # output name -> (store, source name), unstacked
        self._infos: dict[str, S.TensorInfo] = {}
        ref = first.tensors()
        stacked = any(tree.is_stacked_layer(n) for n in ref)
        for n, info in ref.items():
            if tree.is_stacked_layer(n):
                self._infos[n] = S.TensorInfo(n, (self.n_layers, *info.shape[1:]), info.dtype)
            elif tree.layer_of(n) is None:
                src = first if _is_embedding(n) else last
                if n not in src.tensors():
                    raise MergeError(f"{src.path}: missing tensor {n!r} (present in {first.path})")
                self._infos[n] = src.tensors()[n]
                self._map[n] = (src, n)
        if not stacked:  # HF names: output layer j <- source layer a + offset
            j = 0
            for st, a, b in segments:
                t = st.tensors()
                for layer in range(a, b):
                    for n, info in t.items():
                        if tree.layer_of(n) == layer:
                            out = _LAYER.sub(lambda m, j=j: f"{m.group(1)}{j}{m.group(3)}", n, count=1)
                            self._infos[out], self._map[out] = S.TensorInfo(out, info.shape, info.dtype), (st, n)
                    j += 1
        problems = []
        for st, _, _ in segments:
            t = st.tensors()
            for n, info in self._infos.items():
                if tree.is_stacked_layer(n):
                    if n not in t or t[n].shape[1:] != info.shape[1:] or t[n].dtype != info.dtype:
                        problems.append(f"{st.path}: tensor {n!r} missing or of another layer shape/dtype")
        if problems:
            raise MergeError(f"{label}: slices do not fit together:\n  " + "\n  ".join(problems))
        self.meta = copy.deepcopy(first.meta)
        if self.meta and isinstance(self.meta.get("model"), dict):
            self.meta["model"]["num_layers"] = self.n_layers

    def tensors(self) -> dict[str, S.TensorInfo]:
        return dict(sorted(self._infos.items()))

    def keys(self, name: str) -> list[dict[str, Any]] | None:
        return None

    def reads_are_views(self, name: str) -> bool:
        if name in self._map:  # a layer's own tensor; stacked ones are concatenated copies
            st, src = self._map[name]
            return st.reads_are_views(src)
        return False

    def read_async(self, name: str, index: Any):
        info = self._infos[name]
        if name in self._map:
            st, src = self._map[name]
            return st.read_async(src, index)
        idx = tuple(index) + (slice(None),) * (len(info.shape) - len(tuple(index)))
        r0, r1, _ = idx[0].indices(info.shape[0])
        parts, pos = [], 0
        for st, a, b in self.segments:
            lo, hi = max(r0, pos), min(r1, pos + b - a)
            if lo < hi:
                parts.append(st.read_async(name, (slice(a + lo - pos, a + hi - pos), *idx[1:])))
            pos += b - a
        return _Concat(parts)


class _Concat:
    def __init__(self, parts: list[Any]):
        self.parts = parts

    def result(self) -> np.ndarray:
        arrs = [p.result() for p in self.parts]
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)


def stacks(recipe: Any, stores_by_path: dict[str, S.InputStore]) -> list[S.InputStore]:
    """One LayerStack per recipe input (input_paths() order) from `recipe.slices`."""
    paths = recipe.input_paths()
    if len(set(paths)) != len(paths):
        raise ConfigError(f"slices: every input must be a different path, got {paths}")
    rows = parse(recipe.slices, len(paths), paths)
    return [LayerStack(f"{p}[slices]", [(stores_by_path[r[k].model], r[k].start, r[k].stop) for r in rows])
            for k, p in enumerate(paths)]


def models(recipe: Any) -> list[str]:
    """Every model path a recipe's slices read (the recipe's own inputs first)."""
    paths = recipe.input_paths()
    rows = parse(recipe.slices, len(paths), paths)
    return list(dict.fromkeys([*paths, *(s.model for r in rows for s in r)]))
