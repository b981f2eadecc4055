"""The streaming merge engine: for each tensor, read each input's piece, combine, write — never a whole model.

- Validation first: every input is opened (metadata only), all mismatches are listed in one MergeError, every
  recipe's weights are resolved for every tensor and every output is checked before anything is written.
- Pieces: a tensor is cut into chunks of at most `piece_bytes` (float32) that tile this process's shards; the
  output's zarr chunks are exactly these pieces, so a process writes whole chunks only. Reads of the next
  piece
  are in flight (tensorstore is asynchronous) while the current one is combined, in blocks of `BLOCK` elements.
- Sweeps / several recipes over the same inputs: each input piece is read once and fed to every recipe.
- Sharded (a jax Mesh): each tensor is sharded along its largest axis divisible by the mesh size; a process
  reads/combines/writes only its addressable shards. Methods are elementwise given per-tensor stats computed
  on
  the whole tensor and global element indices, so the result is bit-identical to the unsharded merge.
- Multi-process: process 0 prepares the temp output and commits; everyone writes only its shards; barriers
  before writing and before commit.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import placement, tree
from ptm.ckpt import stores as S
from ptm.ckpt import writers as W
from ptm.ckpt.dtypes import FLOAT32_EXACT, parse_dtype
from ptm.errors import MergeError
from ptm.merge import hf_output
from ptm.merge import inputs as merge_inputs
from ptm.merge import methods as M
from ptm.merge import recipe as R
from ptm.merge import vocab as merge_vocab

PIECE_BYTES = 16 << 20  # float32 bytes of one piece (= one output chunk)
BLOCK = 1 << 18  # elements per block of the inner loop, 1 MiB of float32 (32K: up to 20 % more wall, Python overhead)


# ------------------------------------------------------------------------------------------------- planning


@dataclass
class _Job:
    recipe: R.Recipe
    method: M.Method
    opts: dict[str, Any]
    roles: dict[str, int | list[int]]  # role -> index into Plan.stores
    heuristic: list[float] | None
    weights: dict[str, R.WeightPlan] = field(default_factory=dict)
    out_dtypes: dict[str, np.dtype] = field(default_factory=dict)
    writer: W.OutputWriter | None = None


@dataclass
class Plan:
    stores: list[S.InputStore]
    infos: dict[str, S.TensorInfo]
    jobs: list[_Job]
    n_layers: int

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def has_stats(self) -> bool:
        """Whether some job's method has whole-tensor or per-unit statistics (a second pass over the inputs)."""
        return any(j.method.stats is not None or j.method.unit_stats is not None for j in self.jobs)


def check_compatible(stores: list[S.InputStore]) -> dict[str, S.TensorInfo]:
    """The common tensor set; raises one MergeError that lists every missing/extra tensor and shape/dtype
    clash."""
    ref = stores[0].tensors()
    problems = []
    for st in stores[1:]:
        t = st.tensors()
        for n in sorted(set(ref) - set(t)):
            problems.append(f"{st.path}: missing tensor {n!r} (present in {stores[0].path})")
        for n in sorted(set(t) - set(ref)):
            problems.append(f"{st.path}: extra tensor {n!r} (absent from {stores[0].path})")
        for n in sorted(set(ref) & set(t)):
            a, b = ref[n], t[n]
            if a.shape != b.shape:
                hint = " (vocabularies differ? set tokenizer = 'base' | 'union' | an input)" if (
                    n in merge_vocab.VOCAB_AXIS) else ""
                problems.append(
                    f"{st.path}: tensor {n!r} has shape {list(b.shape)}, {stores[0].path} has {list(a.shape)}{hint}"
                )
            if a.dtype != b.dtype:
                problems.append(
                    f"{st.path}: tensor {n!r} has dtype {b.dtype}, {stores[0].path} has {a.dtype}"
                )
    if problems:
        raise MergeError(f"inputs do not match ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return ref


def n_layers(infos: dict[str, S.TensorInfo]) -> int:
    """The model's layer count from tensor shapes (stacked `layers.*` axis 0, or HF `layers.N.` names)."""
    stacked = {i.shape[0] for n, i in infos.items() if tree.is_stacked_layer(n) and i.shape}
    if len(stacked) > 1:
        raise MergeError(f"tensors under layers.* disagree on the layer axis: {sorted(stacked)}")
    if stacked:
        return stacked.pop()
    idx = [tree.layer_of(n) for n in infos]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def plan(recipes: list[R.Recipe], store_cache: dict[str, S.InputStore] | None = None) -> Plan:
    """Open inputs, validate everything that can be validated before writing."""
    if not recipes:
        raise MergeError("nothing to merge: no recipe")
    paths = recipes[0].input_paths()
    for r in recipes[1:]:
        if sorted(r.input_paths()) != sorted(paths):
            raise MergeError("recipes merged in one pass must read the same inputs")
    jobs = []
    for r in recipes:
        method = M.get(r.method)
        for role in method.required:
            if not r.inputs.get(role):
                raise MergeError(
                    f"method {method.name!r} needs input {role!r} (recipe inputs: {sorted(r.inputs)})"
                )
        extra = set(r.inputs) - set(method.required) - set(method.optional)
        if extra:
            raise MergeError(f"method {method.name!r} does not use input(s) {sorted(extra)}")
        problem = method.check_inputs(r.inputs) if method.check_inputs else None
        if problem:
            raise MergeError(f"method {method.name!r}: {problem}")
        opts = M.check_options(method, r.options(method))
        jobs.append(_Job(r, method, opts, {}, None))
    cache = store_cache if store_cache is not None else {}
    uniq = list(dict.fromkeys(paths))
    stores = merge_inputs.open_inputs(recipes, uniq, cache)  # + frankenmerge stacks, vocabulary views
    infos = check_compatible(stores)
    n_layers_ = n_layers(infos)
    pos = {p: i for i, p in enumerate(uniq)}
    metas = {p: s.meta for p, s in zip(uniq, stores, strict=True)}
    for j in jobs:
        j.roles = {
            k: ([pos[p] for p in v] if isinstance(v, list) else pos[v]) for k, v in j.recipe.inputs.items()
        }
        uses_h = j.recipe.weights == "heuristic" or any(
            o["weights"] == "heuristic" for o in j.recipe.overrides
        )
        j.heuristic = R.heuristic_omegas(j.recipe, metas) if uses_h else None
        odt = parse_dtype(j.recipe.output_dtype) if j.recipe.output_dtype else None
        for n, info in infos.items():
            j.weights[n] = R.resolve_weights(j.recipe, j.method, n, n_layers_, j.heuristic)
            j.out_dtypes[n] = odt or info.dtype
    return Plan(stores, infos, jobs, n_layers_)


def piece_shape(shard: tuple[int, ...], full: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Pieces of at most PIECE_BYTES (float32) that tile `shard`: W.chunk_shape's exact divisors, unless they
    are tiny (a 32002-row embedding has no divisor between 2 and 16001: one-row pieces); then the first axis
    that needs splitting and is not split across devices (shard == full there) takes a ragged last piece."""
    exact = W.chunk_shape(shard, 4, PIECE_BYTES)
    if math.prod(exact) * 4 * 4 >= PIECE_BYTES or math.prod(shard) * 4 <= PIECE_BYTES:
        return exact
    full = full or shard
    chunk = list(shard)
    for ax in range(len(chunk)):
        rest = math.prod(chunk[ax + 1:]) * 4
        if rest * chunk[ax] <= PIECE_BYTES:
            break
        if shard[ax] != full[ax]:
            return exact
        chunk[ax] = max(1, min(chunk[ax], PIECE_BYTES // rest))
    return tuple(chunk)


# ------------------------------------------------------------------------------------------------- sharding


def shard_axis(shape: tuple[int, ...], n: int) -> int | None:
    """The largest axis divisible by n (ties: the first), or None (replicated)."""
    best = None
    for ax, d in enumerate(shape):
        if d % n == 0 and d >= n and (best is None or d > shape[best]):
            best = ax
    return best


def default_sharding(mesh, shape: tuple[int, ...]):
    from jax.sharding import NamedSharding, PartitionSpec

    ax = shard_axis(shape, mesh.size) if mesh.size > 1 else None
    spec = [None] * len(shape)
    if ax is not None:
        spec[ax] = tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _norm_index(idx: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, d in zip(idx, shape, strict=False):
        start, stop, _ = s.indices(d)
        out.append(slice(start, stop))
    out.extend(slice(0, d) for d in shape[len(out) :])
    return tuple(out)


def local_shards(sharding, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """This process's distinct shard indices. A replicated tensor is written by process 0 only."""
    import jax

    keys = {
        tuple((s.start, s.stop) for s in _norm_index(i, shape))
        for i in sharding.addressable_devices_indices_map(shape).values()
    }
    full = tuple((0, d) for d in shape)
    if keys == {full} and jax.process_index() != 0 and not sharding.is_fully_addressable:
        return []
    return [tuple(slice(a, b) for a, b in k) for k in sorted(keys)]


def pieces(region: tuple[slice, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The chunk grid inside `region` (which chunks tile exactly)."""
    ranges = [range(s.start, s.stop, c) for s, c in zip(region, chunk, strict=True)]
    for starts in np.ndindex(*[len(r) for r in ranges]) if ranges else [()]:
        yield tuple(
            slice(r[i], min(r[i] + c, s.stop))
            for r, i, c, s in zip(ranges, starts, chunk, region, strict=True)
        )


# ------------------------------------------------------------------------------------------------ combining


def _units(name: str, shape: tuple[int, ...]) -> list[tuple[int | None, tuple[slice, ...]]]:
    """A tensor's units (what per-unit statistics and matrix methods see): each layer slice of a stacked
    `layers.*` tensor, else the whole tensor (an HF tensor is one layer's matrix already)."""
    full = _norm_index((), shape)
    if tree.is_stacked_layer(name) and shape:
        return [(i, (slice(i, i + 1), *full[1:])) for i in range(shape[0])]
    return [(None, full)]


def _run_start(region: tuple[slice, ...], shape: tuple[int, ...]) -> int | None:
    """The first flat index of `region` when its elements are one contiguous run of the C order, else None."""
    if not shape:
        return 0
    dims = tuple(s.stop - s.start for s in region)
    first = next((ax for ax, d in enumerate(dims) if d != 1), len(dims) - 1)
    if dims[first + 1:] != shape[first + 1:]:
        return None
    return sum(s.start * math.prod(shape[i + 1:]) for i, s in enumerate(region))


def _flat_index(region: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Global C-order flat indices (uint64) of the elements of `region`, shaped like it."""
    if not shape:
        return np.zeros((), np.uint64)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    dims = tuple(s.stop - s.start for s in region)
    start = _run_start(region, shape)
    if start is not None:  # one contiguous run of the flat order: start + arange
        return np.arange(start, start + math.prod(dims), dtype=np.uint64).reshape(dims)
    out = np.zeros(tuple(s.stop - s.start for s in region), np.uint64)
    for ax, (s, st) in enumerate(zip(region, strides, strict=True)):
        r = np.arange(s.start, s.stop, dtype=np.uint64) * np.uint64(st)
        out += r.reshape([-1 if a == ax else 1 for a in range(len(shape))])
    return out


@functools.cache
def _inf_bits(d: np.dtype) -> tuple[np.dtype, Any, Any] | None:
    """(unsigned dtype of d's size, mask of all bits but the sign, bits of +inf) for a float dtype, else None:
    x is finite iff (x.view(u) & mask) < inf, ~5x cheaper than np.isfinite on bf16/f16."""
    if d.name not in ("bfloat16", "float16", "float32", "float64"):
        return None
    u = np.dtype(f"u{d.itemsize}")
    return u, u.type((1 << (8 * d.itemsize - 1)) - 1), np.array(np.inf, d).view(u)[()]


def _finite(stored: np.ndarray, f32: np.ndarray) -> bool:
    """Whether a block read (`stored`, contiguous) and its float32 copy `f32` are all finite: tested on the
    stored bits where float32 holds the values exactly, else on the copy (float64 may overflow float32)."""
    bits = _inf_bits(stored.dtype) if stored.dtype in FLOAT32_EXACT else None
    if bits is None:
        return bool(np.isfinite(f32).all()) if stored.dtype.kind in "fcV" else True
    return bool((stored.view(bits[0]) & bits[1]).max() < bits[2]) if stored.size else True


def _following(names: Iterable[str]) -> dict[str, str]:
    """Tensor -> the tensor merged after it, in merge order (`names` may repeat a tensor, once per piece)."""
    order = list(dict.fromkeys(names))
    return dict(zip(order, order[1:], strict=False))


class _Closed(Exception):
    """Raised in the statistics thread once the merge has stopped."""


class _Combiner:
    """Combines the pieces of one tensor for every job (recipe) of a plan."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.check_finite = not all(j.recipe.allow_nonfinite for j in plan.jobs)
        self.stats: dict[tuple[int, str], dict[str, Any]] = {}
        self.unit_stats: dict[tuple[int, str, int | None], dict[str, Any]] = {}
        self._units: dict[tuple[int, str, int | None], np.ndarray] = {}  # matrix methods' results, current tensor
        self._bufs = [np.empty(BLOCK, np.float32) for _ in plan.stores]
        self._shared = M.SharedBlock(BLOCK)  # work that the jobs of one pass share (methods' fast paths)
        # Stores are not thread-safe (caches, lazily opened files): every read is started under this lock.
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future] = {}

    def read_async(self, si: int, name: str, index: tuple[slice, ...]) -> Any:
        """Start reading piece `index` of tensor `name` from input `si` (`.result()` gives the array)."""
        if self._closing.is_set():
            raise _Closed
        with self._lock:
            return self.plan.stores[si].read_async(name, index)

    def read(self, si: int, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.read_async(si, name, index).result()

    def tensor_stats(self, name: str, then: str | None = None) -> None:
        """Install the per-tensor and per-unit statistics of `name` (computed ahead if `then` was `name` in the
        previous call), then start computing those of the next tensor `then` in a second thread."""
        fut = self._ahead.pop(name, None)
        stats, units = fut.result() if fut is not None else self._stats_of(name)
        self.stats.update(stats)
        self._units.clear()
        self.unit_stats = units
        if then is not None and self.plan.has_stats and self._views(then):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ptm-merge-stats")
            self._ahead[then] = self._pool.submit(self._stats_of, then)

    def _views(self, name: str) -> bool:
        """Whether every input serves `name` as views of mapped files. Only then are statistics computed ahead:
        it costs no buffers (the memory bound holds), and decoded inputs keep their read-ahead chunk cache."""
        return all(s.reads_are_views(name) for s in self.plan.stores)

    def close(self) -> None:
        """Stop the statistics thread (a running computation ends at its next read)."""
        self._closing.set()
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _stats_of(self, name: str) -> tuple[dict[tuple[int, str], dict[str, Any]],
                                             dict[tuple[int, str, int | None], dict[str, Any]]]:
        """Per-tensor statistics (TIES thresholds) over the *whole* tensor, so every shard uses the same ones,
        and each unit's (SLERP's Gram matrix). A function of the inputs only: computing it in another thread,
        or ahead, gives the same bits."""
        info = self.plan.infos[name]
        full = _norm_index((), info.shape)
        chunk = piece_shape(info.shape)
        stats, units = {}, {}
        for ji, j in enumerate(self.plan.jobs):
            if j.method.stats is None:
                continue
            pre, skills = j.roles["pre"], j.roles["skills"]

            def taus(k: int, pre=pre, skills=skills) -> Callable[[], Iterator[np.ndarray]]:
                def gen() -> Iterator[np.ndarray]:
                    for p in pieces(full, chunk):
                        a = self.read(skills[k], name, p).astype(np.float32)
                        a -= self.read(pre, name, p)
                        yield a

                return gen

            stats[(ji, name)] = j.method.stats(taus, len(skills), math.prod(info.shape), **j.opts)
        for ji, j in enumerate(self.plan.jobs):
            if j.method.unit_stats is None:
                continue
            for layer, region in _units(name, info.shape):
                units[(ji, name, layer)] = j.method.unit_stats(
                    self._unit_stream(j, name, region), math.prod(s.stop - s.start for s in region),
                    seed=j.recipe.seed, name=name, **j.opts)
        return stats, units

    def _read_unit(self, j: _Job, name: str, index: tuple[slice, ...]) -> dict[int, np.ndarray]:
        """Each input the job uses, at `index`: float32, or the stored dtype for `stored_dtype_units` methods."""
        used = sorted({i for v in j.roles.values() for i in (v if isinstance(v, list) else [v])})
        arr = {i: self.read(i, name, index) for i in used}
        return arr if j.method.stored_dtype_units else {i: a.astype(np.float32) for i, a in arr.items()}

    def _unit_stream(self, j: _Job, name: str, region: tuple[slice, ...]) -> Callable[[], Iterator[Any]]:
        """A restartable stream of (x, flat_index) over the pieces of one unit, x as the method's fn gets it."""
        shape = self.plan.infos[name].shape
        chunk = piece_shape(tuple(s.stop - s.start for s in region))

        def gen() -> Iterator[Any]:
            for p in pieces(region, chunk):
                arr = self._read_unit(j, name, p)
                x = {k: ([arr[i] for i in v] if isinstance(v, list) else arr[v]) for k, v in j.roles.items()}
                yield x, M.FlatIndex(lambda p=p: _flat_index(p, shape), _run_start(p, shape))

        return gen

    def _unit_result(self, ji: int, name: str, layer: int | None, region: tuple[slice, ...], ws: list[float]
                     ) -> np.ndarray:
        """A matrix method's result for one whole unit (float32, the unit's shape; no layer axis when stacked)."""
        key = (ji, name, layer)
        if key not in self._units:
            j = self.plan.jobs[ji]
            info = self.plan.infos[name]
            stacked = tree.is_stacked_layer(name) and len(info.shape) > 0
            ushape = info.shape[1:] if stacked else info.shape
            arr = {i: a.reshape(ushape) for i, a in self._read_unit(j, name, region).items()}
            x = {k: ([arr[i] for i in v] if isinstance(v, list) else arr[v]) for k, v in j.roles.items()}
            ctx = M.Context(name=name, seed=j.recipe.seed, stats=self.stats.get((ji, name), {}),
                            flat_index=M.FlatIndex(lambda: _flat_index(region, info.shape).reshape(ushape),
                                                   _run_start(region, info.shape)),
                            unit=self.unit_stats.get(key, {}), layer=layer, n_layers=self.plan.n_layers)
            res = np.asarray(j.method.fn(x, ws, ctx, **j.opts), dtype=np.float32)
            if res.shape != ushape:
                raise MergeError(f"method {j.method.name!r} returned shape {res.shape} for {name!r}, want {ushape}")
            for k in [k for k in self._units if k[1] != name]:  # tensors are merged one after the other
                del self._units[k]
            while len(self._units) >= 2:  # a piece spans at most a few units; keep memory to ~2 units per job
                self._units.pop(next(iter(self._units)))
            self._units[key] = res
        return self._units[key]

    def combine(self, name: str, index: tuple[slice, ...], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Merged piece `index` of tensor `name` for every job, in each job's output dtype."""
        info = self.plan.infos[name]
        pshape = tuple(s.stop - s.start for s in index)
        outs = [np.empty(pshape, j.out_dtypes[name]) for j in self.plan.jobs]
        # Output pieces can become NaN/Inf although inputs and weights are finite (a huge weight, a float16
        # output). Test on the bits: |x| < inf as unsigned ints, ~5x cheaper than np.isfinite on bf16/f16.
        fin = [None if j.recipe.allow_nonfinite else _inf_bits(j.out_dtypes[name]) for j in self.plan.jobs]
        stacked = tree.is_stacked_layer(name) and len(pshape) > 0
        hf_layer = tree.layer_of(name)
        # Rows with one weight each: one layer per row for stacked tensors, else the whole piece.
        groups = [(r, r + 1) for r in range(pshape[0])] if stacked else [(0, pshape[0] if pshape else 1)]
        for g0, g1 in groups:
            layer = index[0].start + g0 if stacked else hf_layer
            ws = []
            for j in self.plan.jobs:
                wp = j.weights[name]
                ws.append(
                    [
                        float(v[layer]) if layer is not None else d
                        for v, d in zip(wp.per_layer, wp.default, strict=True)
                    ]
                )
            src = [np.ascontiguousarray(a[g0:g1] if pshape else a).reshape(-1) for a in arrays]
            dst = [o[g0:g1].reshape(-1) if pshape else o.reshape(-1) for o in outs]
            unit_layer = layer if stacked else None
            for ji, j in enumerate(self.plan.jobs):
                if j.method.kind != "matrix":
                    continue
                if stacked:
                    region = (slice(layer, layer + 1), *_norm_index((), info.shape)[1:])
                    part = tuple(index[1:])
                else:
                    region, part = _norm_index((), info.shape), tuple(index)
                res = self._unit_result(ji, name, unit_layer, region, ws[ji])
                dst[ji][...] = (res[part] if part else res).reshape(-1)
            gshape = (g1 - g0, *pshape[1:]) if pshape else ()
            offset = (index[0].start + g0, *(s.start for s in index[1:])) if pshape else ()
            n = src[0].size if src else 0
            for j0 in range(0, n, BLOCK):
                j1 = min(j0 + BLOCK, n)
                m = j1 - j0
                bufs = []
                for si, a in enumerate(src):
                    b = self._bufs[si][:m]
                    b[...] = a[j0:j1]
                    if self.check_finite and not _finite(a[j0:j1], b):
                        raise MergeError(
                            f"{self.plan.stores[si].path}: tensor {name!r} contains NaN/Inf "
                            "(set allow_nonfinite to merge it anyway)"
                        )
                    bufs.append(b)

                whole_rows = gshape and gshape[1:] == info.shape[1:]
                run = offset[0] * math.prod(info.shape[1:]) + j0 if whole_rows else None

                def flat_index(j0=j0, j1=j1, gshape=gshape, offset=offset, run=run) -> np.ndarray:
                    if run is not None:  # whole rows: a contiguous run
                        return np.arange(run, run + j1 - j0, dtype=np.uint64)
                    loc = np.unravel_index(np.arange(j0, j1), gshape) if gshape else ()
                    glob = tuple(c + o for c, o in zip(loc, offset, strict=True))
                    return (
                        np.ravel_multi_index(glob, info.shape).astype(np.uint64)
                        if gshape
                        else np.zeros(1, np.uint64)
                    )

                self._shared.start(m)
                for ji, j in enumerate(self.plan.jobs):
                    if j.method.kind == "matrix":
                        continue
                    if j.method.shared_fn is not None:
                        dst[ji][j0:j1] = j.method.shared_fn(j.roles, ws[ji], bufs, self._shared, **j.opts)
                        continue
                    x = {
                        k: ([bufs[i] for i in v] if isinstance(v, list) else bufs[v])
                        for k, v in j.roles.items()
                    }
                    ctx = M.Context(
                        name=name,
                        seed=j.recipe.seed,
                        stats=self.stats.get((ji, name), {}),
                        flat_index=M.FlatIndex(flat_index, run),
                        unit=self.unit_stats.get((ji, name, unit_layer), {}),
                        layer=layer,
                        n_layers=self.plan.n_layers,
                    )
                    dst[ji][j0:j1] = j.method.fn(x, ws[ji], ctx, **j.opts)
                for ji, f in enumerate(fin):
                    if f is not None and (dst[ji][j0:j1].view(f[0]) & f[1]).max() >= f[2]:
                        r = self.plan.jobs[ji].recipe
                        raise MergeError(
                            f"{r.out or 'in-memory merge'} (recipe {r.name or r.method}, weights {r.weights!r}, "
                            f"output dtype {outs[ji].dtype}): merged tensor {name!r} became NaN/Inf (overflow: a "
                            "weight too large or an output dtype too narrow; set allow_nonfinite to keep it)"
                        )
        return outs


# -------------------------------------------------------------------------------------------------- running


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _process() -> tuple[int, int]:
    if "jax" not in sys.modules:
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
    if _process()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclass
class MergeSummary:
    outputs: list[str]
    recipes: list[dict[str, Any]]
    inputs: list[str]
    seconds: float
    peak_rss_bytes: int
    memory_bound_bytes: int
    bytes_read: int
    bytes_written: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"merged {len(self.outputs)} output(s) from {len(self.inputs)} input(s) in {self.seconds:.2f} s"
        ]
        for r, o in zip(self.recipes, self.outputs, strict=True):
            w = r.get("weights")
            out.append(f"  {o}: method={r['method']} weights={w} dtype={r.get('output_dtype') or 'inputs'}")
        out.append(f"  inputs: {', '.join(self.inputs)}")
        out.append(
            f"  read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB, "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB (bound for merge buffers "
            f"{self.memory_bound_bytes / 2**20:.0f} MiB + mapped input pages)"
        )
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def _layout(plan: Plan, mesh) -> tuple[dict[str, tuple[int, ...]], dict[str, list[tuple[slice, ...]]]]:
    chunks, regions = {}, {}
    for n, info in plan.infos.items():
        if mesh is None:
            shard_shape, regs = info.shape, [_norm_index((), info.shape)]
        else:
            sh = default_sharding(mesh, info.shape)
            shard_shape = sh.shard_shape(info.shape)
            regs = local_shards(sh, info.shape)
        chunks[n] = piece_shape(shard_shape, info.shape)
        regions[n] = regs
    return chunks, regions


def _memory_bound(plan: Plan, chunks: dict[str, tuple[int, ...]]) -> int:
    biggest = max((math.prod(c) for c in chunks.values()), default=0)
    in_item = max((i.dtype.itemsize for i in plan.infos.values()), default=4)
    out_item = max((d.itemsize for j in plan.jobs for d in j.out_dtypes.values()), default=4)
    # two pieces of every input in flight, each job's output piece plus up to 4 queued writes, block buffers,
    # and the statistics thread's float32 copies (a piece of every input and a difference)
    return (biggest * (2 * len(plan.stores) * in_item + 5 * len(plan.jobs) * out_item
                       + plan.has_stats * (len(plan.stores) + 1) * 4) + BLOCK * 4 * 8)


def _writers(plan: Plan, chunks: dict[str, tuple[int, ...]], overwrite: bool, mesh) -> None:
    """One writer per job; every output is checked (placement rules, existence) before anything is written."""
    outs = [j.recipe.out for j in plan.jobs]
    if any(o is None for o in outs):
        raise MergeError("every recipe needs an output path (`out`)")
    norm = [placement.normalize(o) for o in outs]
    if len(set(norm)) != len(norm):
        raise MergeError(f"two recipes write the same output: {outs}")
    inputs = merge_inputs.source_paths(plan.stores)
    for o in outs:
        if _process()[0] == 0:
            placement.recover(o, say=lambda m: print(m, file=sys.stderr, flush=True))
        placement.check(o, overwrite, inputs)
    keys_src = next((s for s in plan.stores if isinstance(s, S.OrbaxStore)), None)
    for j in plan.jobs:
        fmt = j.recipe.output_format or plan.stores[0].kind
        infos = [S.TensorInfo(n, i.shape, j.out_dtypes[n]) for n, i in plan.infos.items()]
        if fmt == "orbax" and hf_output.writes_tokenizer(plan.stores):
            raise MergeError(f"{j.recipe.out}: the tokenizer spec adds tokens (a union or listed tokens), which only "
                             "a safetensors (HF) output holds: set output_format = 'safetensors'")
        if fmt == "orbax":
            keys = {n: keys_src.keys(n) for n in plan.infos} if keys_src else {}
            j.writer = W.OrbaxWriter(j.recipe.out, infos, chunks, {k: v for k, v in keys.items() if v}, overwrite,
                                     inputs=inputs)
        elif fmt == "safetensors":
            if _process()[1] > 1:
                raise MergeError(
                    "safetensors outputs are written by one process; use an Orbax output for a "
                    "multi-process merge and convert it afterwards"
                )
            j.writer = W.SafetensorsWriter(j.recipe.out, infos, overwrite, inputs=inputs,
                                           max_shard_bytes=j.recipe.shard_bytes or hf_output.DEFAULT_SHARD_BYTES)
        else:
            raise MergeError(f"unknown output_format {fmt!r} (orbax or safetensors)")


def output_tokenizer(stores: list[S.InputStore]) -> tuple[str | None, str | None]:
    """(tokenizer, note): the tokenizer every input's metadata names, or None and a note saying why not."""
    toks = {s.path: (s.meta or {}).get("tokenizer") for s in stores}
    named = {t for t in toks.values() if t}
    if len(named) == 1 and all(toks.values()):
        return named.pop(), None
    if not named:
        return None, None
    listed = ", ".join(f"{p}: {t or 'none recorded'}" for p, t in toks.items())
    return None, f"inputs name different tokenizers ({listed}); the output records none"


def _provenance(j: _Job) -> dict[str, Any]:
    p = j.recipe.to_dict()
    p["resolved_heuristic_omegas"] = j.heuristic
    p["options"] = j.opts
    return p


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The heap as it is frozen for the tensor loop: the loop makes ~10 short-lived objects per block, and the
    collector's scans of everything imported before cost ~3 % of a 1B merge's CPU (measured). Freezing, not
    disabling: cycles made during the loop (an I/O library's exceptions) are still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def merge(
    recipes: R.Recipe | list[R.Recipe],
    *,
    mesh=None,
    overwrite: bool = False,
    progress: bool = True,
    summary: bool = True,
    log: Callable[[str], None] | None = None,
) -> MergeSummary:
    """Run one or several recipes over the same inputs in one streaming pass, writing each output
    atomically."""
    say = log or (lambda s: print(s, file=sys.stderr))
    recipes = [recipes] if isinstance(recipes, R.Recipe) else list(recipes)
    t0 = time.perf_counter()
    pl = plan(recipes)
    chunks, regions = _layout(pl, mesh)
    _writers(pl, chunks, overwrite, mesh)
    pid, _ = _process()
    leader = pid == 0
    bound = _memory_bound(pl, chunks)
    if summary:
        say(
            f"ptm merge: {len(pl.infos)} tensors, {len(pl.stores)} input(s), {len(pl.jobs)} output(s); "
            f"merge buffers bounded by ~{bound / 2**20:.0f} MiB"
        )
    tokenizer, tok_note = output_tokenizer(pl.stores)
    for j in pl.jobs:
        j.writer.prepare(leader)
    _barrier("ptm-merge-prepared")
    comb = _Combiner(pl)
    work = [(n, p) for n in pl.infos for reg in regions[n] for p in pieces(reg, chunks[n])]
    total_in = sum(math.prod(s.stop - s.start for s in p) * pl.infos[n].dtype.itemsize for n, p in work)
    read_b = written = 0
    try:
        for j in pl.jobs:
            j.writer.open()
        from tqdm import tqdm

        bar = tqdm(
            total=total_in * len(pl.stores),
            unit="B",
            unit_scale=True,
            desc="merge",
            file=sys.stderr,
            disable=not progress,
        )
        done_tensors: set[str] = set()
        with _gc_paused():
            following = _following(n for n, _ in work)
            nxt = [comb.read_async(si, *work[0]) for si in range(len(pl.stores))] if work else []
            for w, (name, idx) in enumerate(work):
                if w == 0 or work[w - 1][0] != name:
                    comb.tensor_stats(name, following.get(name))
                cur = [f.result() for f in nxt]
                if w + 1 < len(work):
                    nxt = [comb.read_async(si, *work[w + 1]) for si in range(len(pl.stores))]
                outs = comb.combine(name, idx, cur)
                for j, o in zip(pl.jobs, outs, strict=True):
                    j.writer.write(name, idx, o)
                    written += o.nbytes
                nb = sum(a.nbytes for a in cur)
                read_b += nb
                done_tensors.add(name)
                bar.update(nb)
                bar.set_postfix_str(f"tensors {len(done_tensors)}/{len(pl.infos)}", refresh=False)
        bar.close()
        for j in pl.jobs:
            j.writer.flush()
        _barrier("ptm-merge-written")
        model = next((s.meta.get("model") for s in pl.stores if s.meta and s.meta.get("model")), None)
        for j in pl.jobs:
            meta = ckpt_format.make_meta(model or {}, step=0, provenance=_provenance(j), tokenizer=tokenizer)
            if isinstance(j.writer, W.SafetensorsWriter):
                dts = {d for d in j.out_dtypes.values()}
                j.writer.commit(meta, leader, extra_files=hf_output.extra_files(
                    j.recipe, dts.pop() if len(dts) == 1 else None, pl.infos, pl.n_layers, pl.stores))
            else:
                j.writer.commit(meta, leader)
        _barrier("ptm-merge-committed")
    except BaseException:
        comb.close()
        for j in pl.jobs:
            j.writer.abort()
        raise
    comb.close()
    result = MergeSummary(
        outputs=[j.recipe.out for j in pl.jobs],
        recipes=[j.recipe.to_dict() for j in pl.jobs],
        inputs=[s.path for s in pl.stores],
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=_rss_peak(),
        memory_bound_bytes=bound,
        bytes_read=read_b,
        bytes_written=written,
        notes=[tok_note] if tok_note else [],
    )
    if summary:
        for line in result.lines():
            say(line)
    return result


def merge_to_tree(
    recipe: R.Recipe, *, shardings: Any = None, mesh=None, store_cache: dict[str, S.InputStore] | None = None
) -> dict[str, Any]:
    """Merge in memory (nothing written): the nested param dict of numpy arrays, or of jax Arrays when
    `shardings` (dict name -> Sharding, or callable(name, shape) -> Sharding) or `mesh` (default sharding
    rule)
    is given — then each device's slice is computed from just that slice of the inputs.
    `store_cache` (path -> store) lets a search reuse opened inputs across many candidate merges."""
    pl = plan([recipe], store_cache)
    comb = _Combiner(pl)
    flat: dict[str, Any] = {}

    def region(name: str, reg: tuple[slice, ...]) -> np.ndarray:
        shape = tuple(s.stop - s.start for s in reg)
        out = np.empty(shape, pl.jobs[0].out_dtypes[name])
        for p in pieces(reg, piece_shape(shape)):
            arrays = [comb.read(si, name, p) for si in range(len(pl.stores))]
            local = tuple(slice(a.start - r.start, a.stop - r.start) for a, r in zip(p, reg, strict=True))
            out[local] = comb.combine(name, p, arrays)[0]
        return out

    following = _following(pl.infos)
    try:
        for name, info in pl.infos.items():
            comb.tensor_stats(name, following.get(name))
            flat[name] = _tree_leaf(name, info, region, shardings, mesh)
    finally:
        comb.close()
    return tree.nest(flat)


def _tree_leaf(name: str, info: S.TensorInfo, region: Callable[[str, tuple[slice, ...]], np.ndarray],
               shardings: Any, mesh) -> Any:
    """One merged tensor of `merge_to_tree`: a numpy array, or a jax Array built from its devices' slices."""
    if shardings is None and mesh is None:
        return region(name, _norm_index((), info.shape))
    import jax

    if mesh is not None and shardings is None:
        sh = default_sharding(mesh, info.shape)
    elif callable(shardings):
        sh = shardings(name, info.shape)
    else:
        sh = shardings[name]
    cache: dict[tuple, np.ndarray] = {}

    def cb(idx):
        key = tuple((s.start, s.stop) for s in _norm_index(idx, info.shape))
        if key not in cache:
            cache[key] = region(name, _norm_index(idx, info.shape))
        return cache[key]

    return jax.make_array_from_callback(info.shape, sh, cb)
