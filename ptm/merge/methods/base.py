"""The method registry and what methods share: `Method`, `Context`, `SharedBlock`, option checks, and the
helpers several families use (task vectors, sign-consensus sums, counter-based randomness, exact k-th largest)."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ptm.errors import MergeError
from ptm.merge.methods import select

Arrays = dict[str, Any]  # role -> np.ndarray or list[np.ndarray]


class FlatIndex:
    """The global flat indices (uint64, C order) of a slice's elements, computed when called. `start` is set when
    they are one contiguous run start + arange(size): then methods can take any part of it (`Run`) without the
    8-byte-per-entry array of the whole piece."""

    def __init__(self, make: Callable[[], np.ndarray], start: int | None = None):
        self.make, self.start = make, start

    def __call__(self) -> np.ndarray:
        return self.make()


class Run(NamedTuple):
    """The flat indices start .. start + size - 1 (what `random_bits` takes instead of an index array)."""

    start: int
    size: int


def flat_run(fi: Callable[[], np.ndarray] | None, lo: int, hi: int) -> Run | None:
    """Entries lo..hi of a FlatIndex as a Run, or None when it is not one contiguous run."""
    start = getattr(fi, "start", None)
    return Run(start + lo, hi - lo) if start is not None else None


def merge_threads(default_max: int = 4) -> int:
    """Threads a merge may compute on: $PTM_MERGE_THREADS if set, else min(`default_max`, the CPUs)."""
    v = os.environ.get("PTM_MERGE_THREADS")
    if not v:
        return max(1, min(default_max, os.cpu_count() or 1))
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise MergeError(f"PTM_MERGE_THREADS={v!r}: want a positive integer")
    return n


@dataclass
class Context:
    """What a method may know about the slice it combines besides the values."""

    name: str = ""
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    flat_index: Callable[[], np.ndarray] | None = None  # global flat indices (uint64) of the slice (FlatIndex)
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
    # unit's pieces (x: role -> float32 arrays as `fn` gets them; flat_index() -> global uint64 indices, in C
    # order; the engine passes a `FlatIndex`, whose `start` says when they are one contiguous run).
    unit_stats: Callable[..., dict[str, Any]] | None = None
    # "element": fn is elementwise given the stats (the engine calls it on cache-sized blocks of any piece).
    # "matrix": fn needs a whole unit at once (SVD methods, per-row ranks): the engine hands it the unit's full
    # arrays (a layer slice without the layer axis, or the whole tensor) and takes the piece's part of the result.
    kind: str = "element"
    # The unit's arrays ("matrix" fn) and unit_stats' stream come in their stored dtype (e.g. bfloat16), and the
    # method converts what it needs to float32 itself, block by block (DELLA: a float32 copy of a 32000 x 2048
    # embedding's inputs is 0.8 GB; the Gram methods: whole-piece conversions cost 3x their sums).
    stored_dtype_units: bool = False
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


def kth_largest_abs(blocks: Callable[[], Iterable[np.ndarray]] | Iterable[np.ndarray], k: int,
                    n: int | None = None) -> float:
    """Exact k-th largest |x| over a stream of float32 blocks in O(block) memory. Given the count `n`: one pass
    with a sampled bracket (`select.AbsSelect`); without it, or when the bracket misses: two 16-bit radix passes
    over the IEEE bit patterns (for non-negative floats the bit pattern orders like the value). Pass a callable
    that restarts the stream."""
    make = blocks if callable(blocks) else (lambda b=list(blocks): iter(b))
    if n is not None:
        sel = select.AbsSelect(n, [k])
        for b in make():
            flat = np.ascontiguousarray(b, np.float32).reshape(-1)
            if sel.br is None:
                sel.prime(select.sample(flat))
            for sl in select.sub_blocks(flat.size):
                sel.feed(select.abs_bits(flat[sl]))
        v = sel.value(0)
        if v is not None:
            return select.as_float(v)
    return _kth_radix(make, k)


def _kth_radix(make: Callable[[], Iterable[np.ndarray]], k: int) -> float:
    """The exact k-th largest |x| by two 16-bit radix passes (high then low half of the bit patterns)."""
    hi = np.zeros(1 << 16, np.int64)
    for b in make():
        hi += np.bincount(select.abs_bits(b) >> 16, minlength=1 << 16)
    above = np.cumsum(hi[::-1])[::-1]  # above[i] = count with high bits >= i
    top = int(np.nonzero(above >= k)[0].max())
    k_in = k - (int(above[top + 1]) if top + 1 < (1 << 16) else 0)
    lo = np.zeros(1 << 16, np.int64)
    for b in make():
        u = select.abs_bits(b)
        lo += np.bincount(u[(u >> 16) == top] & 0xFFFF, minlength=1 << 16)
    above_lo = np.cumsum(lo[::-1])[::-1]
    low = int(np.nonzero(above_lo >= k_in)[0].max())
    return select.as_float((top << 16) | low)


def _key(seed: int, name: str, k: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{name}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


_GOLDEN32 = np.uint32(0x9E3779B9)


def _lowbias32(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32 integer hash (a bijection of uint32 with low bias), in place on `x`."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        np.right_shift(x, np.uint32(shift), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, np.uint32(mul), out=x)
    np.right_shift(x, np.uint32(16), out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    return x


def _key32(key: int, hi: np.ndarray) -> np.ndarray:
    """The 32-bit key of the elements whose flat index has high word `hi` (one key per 2^32 elements)."""
    x = np.bitwise_xor(hi.astype(np.uint32), np.uint32(key >> 32))
    return _lowbias32(x, np.empty_like(x)) + np.uint32(key & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4096)
def _key32_of(key: int, hi: int) -> int:
    """`_key32` of one high word, memoised (a dozen ufuncs on a 1-entry array cost more than a 32K-entry block's
    share of them)."""
    return int(_key32(key, np.array([hi], np.uint32))[0])


def random_bits(seed: int, name: str, k: int, flat_index: np.ndarray | Run) -> np.ndarray:
    """Counter-based random uint32 per element: lowbias32(lo32(index) * golden + key), the key a hash of (seed,
    tensor name, input k, high word of the index). A shard computes the same bits as the whole tensor because
    the only inputs are the element's global flat index and the key; 32-bit arithmetic, ~10 in-place ufuncs.
    `flat_index`: an index array, or a `Run` (then lo32 * golden comes from a cached table: one ufunc less)."""
    key = _key(seed, name, k)
    if isinstance(flat_index, Run):
        start, n = flat_index
        if n <= _TABLE and (start >> 32) == ((start + max(n, 1) - 1) >> 32):
            k32 = _key32_of(key, start >> 32)
            x = np.add(_golden_table()[:n], np.uint32((start * 0x9E3779B9 + k32) & 0xFFFFFFFF))
            return _lowbias32(x, np.empty_like(x))
        flat_index = np.arange(start, start + n, dtype=np.uint64)
    idx = np.asarray(flat_index).reshape(-1)
    x = idx.astype(np.uint32)  # the low word (wraps)
    np.multiply(x, _GOLDEN32, out=x)
    top = int(idx.max()) >> 32 if idx.size else 0
    if top == 0:
        x += np.uint32(_key32_of(key, 0))
    else:
        x += _key32(key, (idx >> np.uint64(32)).astype(np.uint32))
    return _lowbias32(x, np.empty_like(x)).reshape(np.shape(flat_index))


_TABLE = 1 << 16
_GOLDEN: list[np.ndarray] = []


def _golden_table() -> np.ndarray:
    """i * golden (mod 2^32) for i < _TABLE."""
    if not _GOLDEN:
        _GOLDEN.append(np.arange(_TABLE, dtype=np.uint32) * _GOLDEN32)
    return _GOLDEN[0]


def uniform_from_index(seed: int, name: str, k: int, flat_index: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1), multiples of 2^-24: the top 24 of `random_bits`."""
    u = random_bits(seed, name, k, flat_index) >> np.uint32(8)
    return u.astype(np.float32) * np.float32(1.0 / (1 << 24))


def keep_mask(seed: int, name: str, k: int, flat_index: np.ndarray | Run, drop_rate: float) -> np.ndarray:
    """DARE's keep test `uniform_from_index(...) >= float32(drop_rate)` as a uint32 mask (all ones: kept), to
    AND onto float32 bit patterns: with u = m 2^-24, u >= p <=> m >= ceil(p 2^24) (exact: powers of two)."""
    m_min = math.ceil(float(np.float32(drop_rate)) * (1 << 24))  # keep iff m >= m_min
    m = random_bits(seed, name, k, flat_index)
    np.right_shift(m, np.uint32(8), out=m)
    m = m.view(np.int32)
    np.subtract(np.int32(m_min - 1), m, out=m)  # negative iff kept (m and m_min are within [0, 2^24])
    np.right_shift(m, np.int32(31), out=m)  # arithmetic: -1 (all ones) iff kept
    return m.view(np.uint32)


def and_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x (float32, in place) with the entries where `mask` (uint32) is 0 set to +0.0, as np.where(m, x, 0)."""
    np.bitwise_and(x.view(np.uint32), mask.reshape(x.shape), out=x.view(np.uint32))
    return x


def ge_mask(ab: np.ndarray, bits: int, strict: bool = False) -> np.ndarray:
    """uint32 mask of `ab >= bits` (`>` when strict) for |x| bit patterns `ab` (all < 2^31): the sign of
    (bits - 1 - ab) (or bits - ab), no bool array and no np.where."""
    if bits <= 0 and not strict:
        return np.full(ab.shape, 0xFFFFFFFF, np.uint32)
    if bits > 0x7FFFFFFF:
        return np.zeros(ab.shape, np.uint32)
    m = np.subtract(np.int32(bits if strict else bits - 1), ab.view(np.int32))
    return np.right_shift(m, np.int32(31), out=m).view(np.uint32)


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
    convention "mergekit" elects "+" where the weighted vote is exactly 0; "ptm" keeps nothing there.

    Bit-identical to `_consensus_ref` with in-place ufuncs instead of np.sign/np.where temporaries: v agrees
    iff v with the sign bit of the vote XORed in is > 0 (a zero vote: all v are -0 or, in "ptm", masked out), and
    an element nobody agrees on gets divisor 1 (its sum is +0). Needs every non-empty subset sum of the weights
    to be >= 1e-8 in magnitude (else the reference's |divisor| < 1e-8 rule may hit non-empty subsets)."""
    if not consensus or not _fast_divisors(w, normalize):
        return _consensus_ref(taus, w, consensus, normalize, convention, base_weight)
    weighted = [np.multiply(t, _f32(wk)) for t, wk in zip(taus, w, strict=True)]
    total = weighted[0].copy()
    for v in weighted[1:]:
        total += v
    sign = np.bitwise_and(total.view(np.uint32), np.uint32(0x80000000))
    nonzero = total != 0 if convention != "mergekit" else None
    mixed = np.zeros_like(total)
    divisor = np.zeros_like(total)
    tmp = np.empty_like(total)
    agree = np.empty(total.shape, bool)
    anyone = np.zeros(total.shape, bool)
    for v, wk in zip(weighted, w, strict=True):
        np.bitwise_xor(v.view(np.uint32), sign, out=tmp.view(np.uint32))  # v * sign(vote)
        np.greater(tmp, np.float32(0), out=agree)
        if nonzero is not None:
            agree &= nonzero
        mixed += np.multiply(v, agree, out=tmp)  # -0 where not agreeing: x + -0 == x, and mixed starts at +0
        if normalize:
            divisor += np.multiply(agree, _f32(wk), out=tmp)
            anyone |= agree
    if normalize:
        divisor += ~anyone
        mixed /= divisor
    return mixed


def _fast_divisors(w: list[float], normalize: bool) -> bool:
    return not normalize or _subset_sums_ok(tuple(float(x) for x in w))


@functools.lru_cache(maxsize=1024)
def _subset_sums_ok(w: tuple[float, ...]) -> bool:
    """Every non-empty subset sum of the float32 weights (in order, in float32) is >= 1e-8 in magnitude."""
    if len(w) > 12:
        return False
    wf = [_f32(x) for x in w]
    for mask in range(1, 1 << len(w)):
        s = np.float32(0)
        for i, x in enumerate(wf):
            if mask >> i & 1:
                s = np.float32(s + x)
        if not abs(s) >= 1e-8:
            return False
    return True


def _consensus_ref(taus: list[np.ndarray], w: list[float], consensus: bool, normalize: bool,
                   convention: str = "ptm", base_weight: float = 0.0) -> np.ndarray:
    """`_consensus_sum` written plainly (np.sign, np.where): the reference the fast path is tested against, and
    what runs when the fast path's precondition fails."""
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



