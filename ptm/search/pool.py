"""The search pool: checkpoints stacked per tensor ([N, ...]) and kept resident on the devices for the whole
search; a candidate merge is one call of `ptm.merge.resident`'s jitted weighted sum, nothing is written."""

from __future__ import annotations

import glob as _glob
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.tree import flatten, nest
from ptm.errors import CheckpointError, ConfigError, MergeError
from ptm.search.space import Space


def expand_paths(specs: Sequence[str]) -> list[str]:
    """Paths or globs (local or gs://) -> checkpoint paths, in order, globs sorted; a glob matching nothing
    is an error."""
    out: list[str] = []
    for s in specs:
        if not any(c in s for c in "*?["):
            out.append(s)
            continue
        if s.startswith("gs://"):
            import gcsfs

            fs = gcsfs.GCSFileSystem()
            hits = sorted("gs://" + h for h in fs.glob(s[5:]))
        else:
            hits = sorted(_glob.glob(s))
        if not hits:
            raise CheckpointError(f"pool glob {s!r} matches nothing")
        out.extend(hits)
    seen = set()
    dup = [p for p in out if p in seen or seen.add(p)]
    if dup:
        raise ConfigError(f"pool lists the same checkpoint twice: {dup}")
    return out


def _open_stores(paths: Sequence[str]) -> list:
    from ptm.ckpt.stores import open_store

    stores, problems = [], []
    for p in paths:
        try:
            stores.append(open_store(p))
        except Exception as e:  # PtmError or an unreadable file: collect all before failing
            problems.append(f"{p}: {e}")
    if problems:
        raise CheckpointError(f"cannot open {len(problems)} pool checkpoint(s):\n  " + "\n  ".join(problems))
    return stores


def _common_model(stores: Sequence) -> Any:
    """The ModelConfig of the pool (the first checkpoint with metadata); every member that records one must
    have the same shape."""
    models = [(s.path, ckpt_format.model_config(s.meta, s.path)) for s in stores
              if isinstance((s.meta or {}).get("model"), dict)]
    shapes = {json.dumps(m.shape_dict(), sort_keys=True) for _, m in models}
    if len(shapes) > 1:
        lines = [f"{p}: {json.dumps(m.shape_dict(), sort_keys=True)}" for p, m in models]
        raise MergeError("pool members have different model shapes:\n  " + "\n  ".join(lines))
    return models[0][1] if models else None


class Pool:
    """The pool's tensors stacked as [M, ...] jax Arrays, resident for the whole search.

    Rows 0..n-1 are the members; row n is the base when one is given (task-vector spaces). With a mesh each
    stacked tensor is sharded like the model's parameter (the member axis replicated), so a candidate merge is
    computed shard-locally with no communication.
    """

    def __init__(self, members: Sequence[str], base: str | None = None, mesh=None):
        from ptm.merge import engine

        self.members = expand_paths(list(members))
        if not self.members:
            raise ConfigError("the pool is empty")
        self.base = base
        self.mesh = mesh
        stores = _open_stores(self.members + ([base] if base else []))
        self.infos = engine.check_compatible(stores)
        self.model = _common_model(stores)  # ModelConfig | None
        toks = [(s.meta or {}).get("tokenizer") for s in stores]
        self.tokenizer = next((t for t in toks if t), None) or "byte"
        self.n = len(self.members)
        self.n_layers = engine.n_layers(self.infos)
        self.names = list(self.infos)
        self.shardings = self._shardings(mesh)
        self.stacked = self._stack(stores, mesh)
        self._fns: dict[tuple, Callable] = {}

    def _stack(self, stores: Sequence, mesh) -> dict[str, Any]:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

        dev = SingleDeviceSharding(jax.local_devices()[0])
        stacked: dict[str, Any] = {}
        for name, info in self.infos.items():
            full = tuple(slice(0, d) for d in info.shape)
            sh = self.shardings.get(name)
            ssh = NamedSharding(mesh, PartitionSpec(None, *sh.spec)) if sh is not None else dev

            def cb(idx, name=name, full=full):
                rows = range(*idx[0].indices(len(stores))) if idx else range(len(stores))
                sub = tuple(idx[1:]) + full[len(idx[1:]):]
                return np.stack([np.asarray(stores[r].read(name, sub)) for r in rows])

            stacked[name] = jax.make_array_from_callback((len(stores), *info.shape), ssh, cb)
        return stacked

    def _shardings(self, mesh) -> dict[str, Any]:
        if mesh is None:
            return {}
        from ptm.merge import engine

        if self.model is not None:
            from ptm.model.sharding import param_shardings

            try:
                flat = flatten(param_shardings(self.model, mesh))
                if set(flat) == set(self.infos):
                    return flat
            except (TypeError, ValueError):
                pass
        return {n: engine.default_sharding(mesh, i.shape) for n, i in self.infos.items()}

    def model_config(self):
        """The pool's ModelConfig (evaluating candidates needs it)."""
        if self.model is None:
            raise CheckpointError(f"{self.members[0]}: no ptm/metadata with a model config; the search needs it "
                                  "to evaluate candidates")
        return self.model

    def bytes(self) -> int:
        one = sum(int(np.prod(i.shape)) * i.dtype.itemsize for i in self.infos.values())
        return one * (self.n + bool(self.base))

    def coefficient_fn(self, space: Space) -> Callable:
        """The jitted merge for `space`: (stacked pool, weights [groups, n] float32, np.uint32(0)) -> flat dict
        of tensors, bit-identical to the engine (`ptm.merge.resident.weighted_sum_fn`)."""
        from ptm.merge.resident import weighted_sum_fn

        key = (space.kind, space.groups, space.layer_groups)
        if key in self._fns:
            return self._fns[key]
        if space.kind == "task_vector" and not self.base:
            raise ConfigError("a task_vector search space needs a base checkpoint (--base)")
        kind = "linear" if space.kind == "simplex" else "task_arithmetic"
        fn = weighted_sum_fn(self.infos, self.n, kind, space.layer_group_of(self.n_layers), space.other_group,
                             self.shardings or None)
        self._fns[key] = fn
        return fn

    def merge(self, weights: np.ndarray, space: Space) -> dict[str, Any]:
        """Candidate params (nested dict of jax Arrays) for weights [groups, n]; nothing is written."""
        w = np.asarray(weights, dtype=np.float64).reshape(space.groups, self.n).astype(np.float32)
        return nest(self.coefficient_fn(space)(self.stacked, w, np.uint32(0)))

    def member_params(self, i: int) -> dict[str, Any]:
        return nest({name: x[i] for name, x in self.stacked.items()})

    def recipe(self, weights: np.ndarray, space: Space, out: str):
        """The engine recipe that writes the same merge (per-layer schedules when layer groups are on)."""
        from ptm.merge.recipe import Recipe

        w = np.asarray(weights, dtype=np.float64).reshape(space.groups, self.n)
        if space.groups == 1:
            specs: list[Any] = [float(v) for v in w[0]]
        else:
            lg = space.layer_group_of(self.n_layers)
            specs = [{"layers": [float(w[g, i]) for g in lg], "default": float(w[space.other_group, i])}
                     for i in range(self.n)]
        if space.kind == "simplex":
            return Recipe(method="linear", inputs={"models": list(self.members)}, weights=specs, out=out,
                          name="search-best")
        return Recipe(method="task_arithmetic", inputs={"pre": self.base, "skills": list(self.members)},
                      weights=specs, out=out, name="search-best")
