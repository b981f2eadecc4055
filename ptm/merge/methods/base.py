"""The method registry and what methods share: `Method`, `Context`, `SharedBlock`, option checks, and the
helpers several families use (task vectors, sign-consensus sums, counter-based randomness, exact k-th largest)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptm.errors import MergeError

Arrays = dict[str, Any]  # role -> np.ndarray or list[np.ndarray]


@dataclass
class Context:
    """What a method may know about the slice it combines besides the values."""

    name: str = ""
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    flat_index: Callable[[], np.ndarray] | None = None  # global flat indices (uint64) of the slice's elements
    unit: dict[str, Any] = field(default_factory=dict)  # `Method.unit_stats` of this unit (memo space too)
    layer: int | None = None  # the layer of this slice (stacked axis 0 or an HF `layers.N.` name), else None
    n_layers: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., np.ndarray]
    required: tuple[str, ...]  # roles that must be given
    optional: tuple[str, ...]  # roles that may be given
    weighted: str  # the role whose entries the weights belong to ("skills", "models") or "omega" (one scalar)
    options: dict[str, Any]  # option name -> default
    stats: Callable[..., dict[str, Any]] | None = None  # per-tensor statistics (see tensor_stats)
    doc: str = ""
    # Optional fast path for the engine's blocks: fn(roles, weights, bufs, shared, **opts) -> block, bit-identical
    # to `fn`, where `roles` maps each role to indices into `bufs` (one float32 block per input) and `shared`
    # (a SharedBlock) lets the jobs of one pass (a sweep) reuse intermediate results.
    shared_fn: Callable[..., np.ndarray] | None = None
    check_inputs: Callable[[dict[str, Any]], str | None] | None = None  # a problem with the inputs, or None
    # Statistics per *unit* (one layer slice of a stacked `layers.*` tensor, else the whole tensor), computed by
    # the engine over the whole unit before any piece of it is combined, whatever the sharding:
    # unit_stats(stream, numel, **opts) -> dict, where stream() restarts an iterator of (x, flat_index) over the
    # unit's pieces (x: role -> float32 arrays as `fn` gets them; flat_index() -> global uint64 indices).
    unit_stats: Callable[..., dict[str, Any]] | None = None
    # "element": fn is elementwise given the stats (the engine calls it on cache-sized blocks of any piece).
    # "matrix": fn needs a whole unit at once (SVD methods, per-row ranks): the engine hands it the unit's full
    # arrays (a layer slice without the layer axis, or the whole tensor) and takes the piece's part of the result.
    kind: str = "element"
    mergekit_defaults: dict[str, Any] = field(default_factory=dict)  # options whose mergekit default differs

    def n_weights(self, inputs: dict[str, Any]) -> int:
        if self.weighted == "omega":
            return 1
        return len(inputs.get(self.weighted) or [])


class SharedBlock:
    """Scratch space for methods' fast paths over one block of elements: `memo` holds results any job of the
    pass may reuse (cleared for every block); `scratch(key)` is a persistent buffer of the block's length."""

    def __init__(self, capacity: int):
        self.capacity, self.m = capacity, 0
        self.memo: dict[Any, np.ndarray] = {}
        self._bufs: dict[Any, np.ndarray] = {}

    def start(self, m: int) -> None:
        self.m = m
        self.memo.clear()

    def scratch(self, key: Any) -> np.ndarray:
        return self._bufs.setdefault(key, np.empty(self.capacity, np.float32))[: self.m]


REGISTRY: dict[str, Method] = {}


CONVENTIONS = ("ptm", "mergekit")


def register(m: Method) -> Method:
    REGISTRY[m.name] = m
    return m


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise MergeError(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def _f32(w: float) -> np.float32:
    return np.float32(w)


def _anchor(x: Arrays, general_weight: float = 1.0) -> np.ndarray:
    """What the task vectors are added to: general (or pre without one); with `general_weight` w != 1,
    pre + w (general - pre) — a weight on the base-side model, as a mergekit config that lists it gives."""
    if general_weight == 1:
        return x.get("general", x["pre"])
    if "general" not in x:
        raise MergeError(f"general_weight = {general_weight!r} needs a `general` input (the base-side model)")
    return x["pre"] + _f32(general_weight) * (x["general"] - x["pre"])


def kth_largest_abs(blocks: Callable[[], Iterable[np.ndarray]] | Iterable[np.ndarray], k: int) -> float:
    """Exact k-th largest |x| over a stream of float32 blocks in O(block) memory: two 16-bit radix passes
    over the
    IEEE bit patterns (for non-negative floats the bit pattern orders like the value). `blocks` is iterated
    twice,
    so pass a callable that restarts the stream."""
    make = blocks if callable(blocks) else (lambda b=list(blocks): iter(b))
    hi = np.zeros(1 << 16, np.int64)
    for b in make():
        hi += np.bincount(np.abs(b, dtype=np.float32).view(np.uint32).ravel() >> 16, minlength=1 << 16)
    above = np.cumsum(hi[::-1])[::-1]  # above[i] = count with high bits >= i
    top = int(np.nonzero(above >= k)[0].max())
    k_in = k - (int(above[top + 1]) if top + 1 < (1 << 16) else 0)
    lo = np.zeros(1 << 16, np.int64)
    for b in make():
        u = np.abs(b, dtype=np.float32).view(np.uint32).ravel()
        lo += np.bincount(u[(u >> 16) == top] & 0xFFFF, minlength=1 << 16)
    above_lo = np.cumsum(lo[::-1])[::-1]
    low = int(np.nonzero(above_lo >= k_in)[0].max())
    return float(np.array([(top << 16) | low], np.uint32).view(np.float32)[0])


def _key(seed: int, name: str, k: int) -> np.uint64:
    h = hashlib.blake2b(f"{seed}\0{name}\0{k}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


def uniform_from_index(seed: int, name: str, k: int, flat_index: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (key(seed, name, k) + index * golden). A shard computes
    the same bits as the whole tensor because the only inputs are the element's global flat index and the
    key."""
    with np.errstate(over="ignore"):
        z = flat_index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + _key(seed, name, k)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _per(v: Any, k: int) -> float:
    """Option `v` for the k-th weighted input: a number, or a list with one entry per input."""
    return float(v[k]) if isinstance(v, list | tuple) else float(v)


def _taus(x: Arrays) -> list[np.ndarray]:
    pre = x["pre"]
    return [s - pre for s in x["skills"]]


def _consensus_sum(taus: list[np.ndarray], w: list[float], consensus: bool, normalize: bool,
                   convention: str = "ptm", base_weight: float = 0.0) -> np.ndarray:
    """sum_k w_k tau_k (tau_k already sparsified), with TIES' sign election when `consensus`: keep only entries
    whose sign agrees with sign(sum_k w_k tau_k). `normalize` divides by the sum of the weights that contribute at
    each element (consensus) or by sum_k w_k (+ `base_weight`, mergekit's weight on the base model) otherwise.
    convention "mergekit" elects "+" where the weighted vote is exactly 0; "ptm" keeps nothing there."""
    weighted = [_f32(wk) * t for t, wk in zip(taus, w, strict=True)]
    if consensus:
        total = np.zeros_like(weighted[0])
        for v in weighted:
            total += v
        sign = np.sign(total)
        if convention == "mergekit":
            sign[sign == 0] = 1
        mixed = np.zeros_like(total)
        divisor = np.zeros_like(total)
        for v, wk in zip(weighted, w, strict=True):
            agree = (np.sign(v) == sign) & (v != 0)
            mixed += np.where(agree, v, np.float32(0))
            divisor += np.where(agree, _f32(wk), np.float32(0))
        if normalize:
            divisor[np.abs(divisor) < 1e-8] = 1
            mixed /= divisor
        return mixed
    mixed = np.zeros_like(weighted[0])
    for v in weighted:
        mixed += v
    if normalize:
        total = math.fsum(w) + base_weight
        mixed /= np.float32(total if abs(total) >= 1e-8 else 1.0)
    return mixed


def _stream_taus(stream: Callable[[], Iterable[tuple[Arrays, Any]]], k: int) -> Callable[[], Iterable[np.ndarray]]:
    def gen() -> Iterable[np.ndarray]:
        for x, _ in stream():
            yield x["skills"][k] - x["pre"]

    return gen


def _vectors(x: Arrays) -> list[np.ndarray]:
    """The vectors spherical methods act on: the models, or their task vectors when a base (`pre`) is given."""
    if "pre" in x:
        return [m - x["pre"] for m in x["models"]]
    return list(x["models"])


def _memo(ctx: Context, key: Any, make: Callable[[], Any]) -> Any:
    memo = ctx.unit.setdefault("_memo", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _flat(ctx: Context, like: np.ndarray) -> np.ndarray:
    if ctx.flat_index is not None:
        return ctx.flat_index().reshape(like.shape)
    return np.arange(like.size, dtype=np.uint64).reshape(like.shape)


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a unit for per-matrix methods: the split of its axes into (rows, cols) that maximises
    min(rows, cols) (e.g. ptm's wq [dim, heads, head_dim] -> [dim, heads*head_dim], wo [heads, head_dim, dim] ->
    [heads*head_dim, dim]); ties take the earlier split."""
    best = (1, math.prod(shape))
    for i in range(1, len(shape)):
        r, c = math.prod(shape[:i]), math.prod(shape[i:])
        if min(r, c) > min(best):
            best = (r, c)
    return best


def _count(role: str, lo: int, hi: int | None = None):
    def check(inputs: dict[str, Any]) -> str | None:
        n = len(inputs.get(role) or [])
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return f"takes {want} {role} (got {n})"
        return None

    return check


_GTA = ("pre", "skills")


def check_options(method: Method, opts: dict[str, Any]) -> dict[str, Any]:
    """Method options with defaults filled in; ranges checked (density and drop rate in (0, 1])."""
    out = dict(method.options)
    for k, v in opts.items():
        if v is None:
            continue
        if k not in method.options:
            raise MergeError(
                f"method {method.name!r} takes no option {k!r} (options: {sorted(method.options)})"
            )
        out[k] = v
    for k in ("density", "drop_rate", "select_topk", "common_fraction"):
        if k not in out:
            continue
        vals = out[k] if isinstance(out[k], list | tuple) else [out[k]]
        if not vals or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in vals):
            raise MergeError(f"{k} must be in (0, 1] (or a list of such, one per input), got {out[k]!r}")
    if "drop_rate" in out and 1 in (out["drop_rate"] if isinstance(out["drop_rate"], list | tuple)
                                    else [out["drop_rate"]]):
        raise MergeError(
            "drop_rate 1 drops every entry (rescale 1/(1-p) is undefined); use a value in (0, 1)"
        )
    if "convention" in out and out["convention"] not in CONVENTIONS:
        raise MergeError(f"convention must be one of {CONVENTIONS}, got {out['convention']!r}")
    return out



