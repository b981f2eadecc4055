"""Merge methods: pure float32 array functions in a registry keyed by name (no I/O).

Every method is elementwise *given* per-tensor statistics (TIES' trim thresholds) and the global flat index of
each element (DARE's random mask), so the engine may call it on any slice of a tensor — a shard, a cache-sized
block — and get exactly the bits the whole-tensor call would. Inputs arrive as a dict of roles:
`pre` (theta_pre), `general` (theta_G), `skills` (list of theta_D), `cft` (theta_CFT), `models` (list).
Weights are plain floats here; layer schedules and per-tensor overrides are resolved by the engine.
"""

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


# --------------------------------------------------------------------------------------------------- methods


def task_arithmetic(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_G + sum_k omega_k (theta_k - theta_pre) (paper Eq. 1-2); anchor = pre when no general is
    given."""
    pre = x["pre"]
    out = np.array(x.get("general", pre), dtype=np.float32, copy=True)
    for s, wk in zip(x["skills"], w, strict=True):
        out += _f32(wk) * (s - pre)
    return out


def task_arithmetic_shared(roles: dict[str, Any], w: list[float], bufs: list[np.ndarray],
                           shared: SharedBlock) -> np.ndarray:
    """Bit-identical to `task_arithmetic` (anchor + w_0 tau_0 + w_1 tau_1 ..., same rounding order), but each
    tau = skill - pre is computed once per block for all jobs of a pass (a sweep) instead of once per job."""
    pre = roles["pre"]
    anchor = bufs[roles.get("general", pre)]
    out = shared.scratch("task_arithmetic.out")
    if not roles["skills"]:
        out[...] = anchor
        return out
    for k, (si, wk) in enumerate(zip(roles["skills"], w, strict=True)):
        key = ("tau", si, pre)
        if key not in shared.memo:
            tau = shared.scratch(key)
            np.subtract(bufs[si], bufs[pre], out=tau)
            shared.memo[key] = tau
        tau = shared.memo[key]
        if k == 0:
            np.multiply(tau, np.float32(wk), out=out)
            np.add(anchor, out, out=out)  # anchor + w tau (addition commutes)
        else:
            out += np.float32(wk) * tau
    return out


def linear_interpolation(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_pre + omega tau_D + (1 - omega) tau_G (Eq. 3-4)."""
    pre, omega = x["pre"], _f32(w[0])
    return pre + omega * (x["skills"][0] - pre) + (np.float32(1) - omega) * (x["general"] - pre)


def wise_ft(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_G + omega (theta_CFT - theta_G) (Eq. 5-6)."""
    g = x["general"]
    return g + _f32(w[0]) * (x["cft"] - g)


def linear(x: Arrays, w: list[float], ctx: Context, normalize: bool = False) -> np.ndarray:
    """Model soup sum_i alpha_i theta_i. No renormalisation unless normalize=True (then divided by sum
    alpha)."""
    out = np.zeros_like(x["models"][0], dtype=np.float32)
    for m, a in zip(x["models"], w, strict=True):
        out += _f32(a) * m
    if normalize:
        total = math.fsum(w)
        if total == 0:
            raise MergeError("linear merge with normalize=True needs weights that do not sum to 0")
        out /= np.float32(total)
    return out


def _anchor(x: Arrays) -> np.ndarray:
    return x.get("general", x["pre"])


def ties(x: Arrays, w: list[float], ctx: Context, density: Any = 1.0, normalize: bool = True,
         convention: str = "ptm") -> np.ndarray:
    """TIES: trim each task vector to its top-`density` magnitudes, elect the sign of the weighted sum, and take
    the (weight-)mean of the entries that agree with it. Weights are applied before the vote (as mergekit does).
    convention "ptm": keep every |tau| >= the ceil(density n)-th largest, no sign on a zero vote; "mergekit": keep
    exactly int(density n) entries per unit (ties at the threshold: lowest flat index first), "+" on a zero vote."""
    if convention == "mergekit":
        idx = _flat(ctx, x["pre"])
        taus = []
        for t, (thr, cut) in zip(_taus(x), ctx.unit["exact"], strict=True):
            a = np.abs(t)
            keep = (a > np.float32(thr)) | ((a == np.float32(thr)) & (idx <= np.uint64(cut))) if cut >= 0 else (
                a > np.float32(thr))
            taus.append(np.where(keep, t, np.float32(0)))
        return _anchor(x) + _consensus_sum(taus, w, True, normalize, "mergekit")
    pre = x["pre"]
    thr = ctx.stats.get("thresholds") or [0.0] * len(x["skills"])
    taus = []
    for s, t in zip(x["skills"], thr, strict=True):
        tau = s - pre
        if t > 0:
            tau[np.abs(tau) < np.float32(t)] = 0
        taus.append(tau)
    return _anchor(x) + _consensus_sum(taus, w, True, normalize, "ptm")


def ties_stats(
    tau_blocks: Callable[[int], Iterable[np.ndarray]],
    n_skills: int,
    numel: int,
    density: Any = 1.0,
    convention: str = "ptm",
    **_: Any,
) -> dict[str, Any]:
    """Per skill, the magnitude of the ceil(density * numel)-th largest task-vector entry (kept: |tau| >= it)."""
    if convention == "mergekit" or all(_per(density, k) >= 1.0 for k in range(n_skills)):
        return {"thresholds": [0.0] * n_skills}
    out = []
    for i in range(n_skills):
        d = _per(density, i)
        out.append(0.0 if d >= 1.0 else kth_largest_abs(tau_blocks(i), max(1, math.ceil(d * numel))))
    return {"thresholds": out}


def ties_unit_stats(stream, numel: int, density: Any = 1.0, convention: str = "ptm", **_: Any) -> dict[str, Any]:
    """convention "mergekit": per skill (threshold, cutoff) keeping exactly k = int(density * numel) entries of the
    unit: every |tau| > threshold, and the entries equal to it with flat index <= cutoff (-1: none of them)."""
    if convention != "mergekit":
        return {}
    x0, _ = next(iter(stream()))
    out = []
    for k in range(len(x0["skills"])):
        n_keep = int(_per(density, k) * numel)
        if n_keep >= numel:
            out.append((-1.0, -1))  # keep all (|tau| > -1)
            continue
        if n_keep == 0:
            out.append((math.inf, -1))
            continue
        taus = _stream_taus(stream, k)
        thr = kth_largest_abs(taus, n_keep)
        n_gt, ties_idx = 0, np.zeros(0, np.uint64)
        for x, idx in stream():
            a = np.abs(x["skills"][k] - x["pre"])
            n_gt += int((a > np.float32(thr)).sum())
            ties_idx = np.concatenate([ties_idx, idx().reshape(a.shape)[a == np.float32(thr)].ravel()])
        need = n_keep - n_gt
        ties_idx.sort()
        out.append((thr, int(ties_idx[need - 1]) if need > 0 else -1))
    return {"exact": out}


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


def dare(x: Arrays, w: list[float], ctx: Context, drop_rate: Any = 0.1, convention: str = "ptm") -> np.ndarray:
    """DARE (linear): drop each task-vector entry with probability p, rescale the rest by 1/(1-p) (convention
    "mergekit": by the unit's |tau|_1 / |tau kept|_1), then anchor + sum_k omega_k tau_k'. The mask of skill k at
    element i is a function of (seed, tensor name, k, i)."""
    out = np.array(_anchor(x), dtype=np.float32, copy=True)
    for t, wk in zip(_dare_taus(x, ctx, drop_rate, convention), w, strict=True):
        out += _f32(wk) * t
    return out


# ------------------------------------------------------------------------------- mergekit-family helpers
#
# The methods below follow mergekit's definitions (docs/merge.md cites each paper) but stay ptm functions: pure
# float32 math, elementwise given per-unit statistics, or "matrix" methods fed whole units. A unit is one layer
# slice of a stacked `layers.*` tensor (what one HF tensor is), else the whole tensor.


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


def gram_stats(stream: Callable[[], Iterable[tuple[Arrays, Any]]], numel: int, **_: Any) -> dict[str, Any]:
    """Gram matrix G_ij = <v_i, v_j> of the unit's vectors (float64 sums over the whole unit)."""
    g = None
    for x, _ in stream():
        vs = [v.astype(np.float64).ravel() for v in (_vectors(x) if "models" in x else _taus(x))]
        blk = np.array([[float(np.dot(a, b)) for b in vs] for a in vs])
        g = blk if g is None else g + blk
    return {"gram": g}


def _combine_linear(base: np.ndarray | None, vs: list[np.ndarray], coef: np.ndarray) -> np.ndarray:
    out = np.zeros_like(vs[0]) if base is None else np.array(base, dtype=np.float32, copy=True)
    for v, c in zip(vs, coef, strict=True):
        out += np.float32(c) * v
    return out


def _memo(ctx: Context, key: Any, make: Callable[[], Any]) -> Any:
    memo = ctx.unit.setdefault("_memo", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _norms(g: np.ndarray, eps: float) -> np.ndarray:
    return np.sqrt(np.maximum(np.diag(g), 0.0)).clip(min=eps)


def slerp_coefficients(g: np.ndarray, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995) -> np.ndarray:
    """(c0, c1) with slerp(v0, v1, t) = c0 v0 + c1 v1, from the Gram matrix of (v0, v1): the angle between the
    normalised vectors; linear interpolation when they are (anti)parallel within `dot_threshold`."""
    n = _norms(g, eps)
    dot = float(np.clip(g[0, 1] / (n[0] * n[1]), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return np.array([1.0 - t, t])
    th = math.acos(dot)
    s = math.sin(th)
    return np.array([math.sin((1.0 - t) * th) / s, math.sin(t * th) / s])


def slerp(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """Spherical interpolation models[0] -> models[1] by t = omega over the angle of the whole unit."""
    t = float(w[0])
    coef = _memo(ctx, ("slerp", t), lambda: slerp_coefficients(ctx.unit["gram"], t))
    return _combine_linear(None, list(x["models"]), coef)


def nuslerp(x: Arrays, w: list[float], ctx: Context, flatten: bool = True) -> np.ndarray:
    """SLERP with t = w_1 / (w_0 + w_1); with a base (`pre`), SLERP of the task vectors added to the base."""
    if not flatten:
        raise MergeError("nuslerp: only flatten = true (whole-tensor SLERP) is implemented")
    tot = w[0] + w[1]
    t = float(w[1] / tot) if tot != 0 else 0.5
    coef = _memo(ctx, ("nuslerp", t), lambda: slerp_coefficients(ctx.unit["gram"], t))
    return _combine_linear(x.get("pre"), _vectors(x), coef)


def _sphere_log_coef(gx: np.ndarray, a: np.ndarray, wn: np.ndarray) -> tuple[np.ndarray, float]:
    """In the basis of the unit vectors x_i (Gram gx): coefficients b of T = sum_i w_i log_m(x_i) at m = sum a_i x_i
    (|m| = 1), and |T|."""
    c = gx @ a  # <x_i, m>
    th = np.arccos(np.clip(c, -1.0, 1.0))
    f = np.where(th > 1e-12, th / np.where(np.sin(th) > 1e-300, np.sin(th), 1.0), 1.0)
    b = np.zeros_like(a)
    for i in range(len(a)):
        e = np.zeros_like(a)
        e[i] = 1.0
        b += wn[i] * f[i] * (e - c[i] * a)
    tn = float(np.sqrt(max(b @ gx @ b, 0.0)))
    return b, tn


def sphere_mean_coefficients(g: np.ndarray, w: list[float], iters: int, tol: float, eps: float,
                             normalize_weights: bool = True) -> np.ndarray:
    """Coefficients c (result = sum c_i v_i) of the weighted spherical mean of the unit vectors v_i/|v_i|,
    rescaled by the weighted mean norm: `iters` = 1 is multislerp (one tangent-space step from the normalised
    weighted Euclidean mean), more is the Karcher mean (Riemannian gradient steps until |T| < tol)."""
    n = _norms(g, eps)
    gx = g / np.outer(n, n)
    wn = np.asarray(w, np.float64)
    if normalize_weights:
        s = wn.sum()
        wn = wn / (s if abs(s) > eps else 1.0)
    a = wn.copy()
    a /= max(float(np.sqrt(max(a @ gx @ a, 0.0))), eps)
    for _ in range(iters):
        b, tn = _sphere_log_coef(gx, a, wn)
        if tn < tol:
            break
        a = math.cos(tn) * a + (math.sin(tn) / tn) * b
        a /= max(float(np.sqrt(max(a @ gx @ a, 0.0))), eps)
    scale = float(wn @ n) if normalize_weights else float(wn @ n) / max(float(np.sum(wn)), eps)
    return a / n * scale


def multislerp(x: Arrays, w: list[float], ctx: Context, normalize_weights: bool = True, eps: float = 1e-8
               ) -> np.ndarray:
    """Barycentric SLERP of several models (or task vectors, with `pre`) on the hypersphere."""
    key = ("multislerp", tuple(w))
    coef = _memo(ctx, key, lambda: sphere_mean_coefficients(ctx.unit["gram"], w, 1, 0.0, eps, normalize_weights))
    return _combine_linear(x.get("pre"), _vectors(x), coef)


def karcher(x: Arrays, w: list[float], ctx: Context, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Karcher (Riemannian / Frechet) mean of the normalised models, rescaled by their weighted mean norm."""
    key = ("karcher", tuple(w))
    coef = _memo(ctx, key, lambda: sphere_mean_coefficients(ctx.unit["gram"], w, int(max_iter), tol, 1e-8))
    return _combine_linear(None, list(x["models"]), coef)


def model_stock_t(g: np.ndarray, eps: float = 1e-8) -> float:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine of the task
    vectors (Eq. of arXiv 2403.19522)."""
    n = _norms(g, eps)
    k = len(n)
    cos = [g[i, j] / (n[i] * n[j]) for i in range(k) for j in range(i + 1, k)]
    c = float(np.mean(cos))
    return k * c / (1.0 + (k - 1) * c)


def model_stock(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """t * mean_k theta_k + (1 - t) * theta_pre = theta_pre + t mean_k tau_k."""
    k = len(x["skills"])
    t = _memo(ctx, "t", lambda: model_stock_t(ctx.unit["gram"]))
    return _combine_linear(x["pre"], _taus(x), np.full(k, t / k))


def metagpt(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """MetaGPT: theta_pre + sum_k lambda_k tau_k with lambda_k = |tau_k|^2 / sum_j |tau_j|^2 per unit."""
    def lam() -> np.ndarray:
        d = np.diag(ctx.unit["gram"])
        tot = d.sum()
        return d / tot if tot > 0 else np.full(len(d), 1.0 / len(d))

    return _combine_linear(x["pre"], _taus(x), _memo(ctx, "lambda", lam))


def nearswap(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """Per element, lerp base -> other by clamp(t / |base - other|, 0, 1) (1 where they are equal)."""
    a, b = x["models"]
    d = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        lw = np.where(d != 0, _f32(w[0]) / d, np.float32(1))
    lw = np.clip(np.nan_to_num(lw, nan=1.0, posinf=1.0, neginf=1.0), 0, 1).astype(np.float32)
    return a * (np.float32(1) - lw) + b * lw


def passthrough(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """The one model's tensor times `scale` = omega (1: a plain copy)."""
    out = np.array(x["models"][0], dtype=np.float32, copy=True)
    if w[0] != 1:
        out *= _f32(w[0])
    return out


def lines(x: Arrays, w: list[float], ctx: Context, alpha: float = 0.0, beta: float = 1.0) -> np.ndarray:
    """LiNeS: anchor + lambda(l) sum_k omega_k tau_k with lambda(l) = alpha + beta l / (L - 1) for layer l of L;
    non-layer tensors (embeddings, final norm, head) take alpha."""
    l_, n = ctx.layer, ctx.n_layers
    lam = alpha + (beta * l_ / (n - 1) if n > 1 else beta) if l_ is not None else alpha
    mixed = _consensus_sum(_taus(x), w, consensus=False, normalize=False)
    return np.array(_anchor(x), dtype=np.float32) + _f32(lam) * mixed


# ---- sparsifying task-vector methods (breadcrumbs, DARE-TIES, DELLA, SCE)


def breadcrumbs_stats(stream, numel: int, density: Any = 0.9, gamma: Any = 0.01, **_: Any) -> dict[str, Any]:
    """Per skill: drop the top `gamma` fraction of |tau| and the bottom 1 - density - gamma (so `density` remains;
    when gamma >= 1 - density only the top 1 - density is dropped). Keep lo <= |tau| < hi."""
    x0, _ = next(iter(stream()))
    out = []
    for k in range(len(x0["skills"])):
        d, gm = _per(density, k), _per(gamma, k)
        n_top = int(min(gm, 1.0 - d) * numel)
        n_keep = int(d * numel)
        taus = _stream_taus(stream, k)
        hi = kth_largest_abs(taus, n_top) if n_top > 0 else math.inf
        lo = kth_largest_abs(taus, n_top + n_keep) if 0 < n_top + n_keep < numel else 0.0
        if n_keep == 0:
            lo = math.inf
        out.append((lo, hi))
    return {"bounds": out}


def _breadcrumbs(consensus: bool):
    def fn(x: Arrays, w: list[float], ctx: Context, density: Any = 0.9, gamma: Any = 0.01, lambda_: float = 1.0,
           normalize: bool = False) -> np.ndarray:
        taus = []
        for t, (lo, hi) in zip(_taus(x), ctx.unit["bounds"], strict=True):
            a = np.abs(t)
            taus.append(np.where((a >= np.float32(lo)) & (a < np.float32(hi)), t, np.float32(0)))
        mixed = _consensus_sum(taus, w, consensus, normalize, "mergekit" if consensus else "ptm")
        return x["pre"] + _f32(lambda_) * mixed

    fn.__doc__ = "Model Breadcrumbs: drop the largest `gamma` and smallest |tau| (keep `density`), " + (
        "TIES sign election, " if consensus else "") + "then pre + lambda * sum_k w_k tau_k'."
    return fn


def dare_keep(seed: int, name: str, k: int, idx: np.ndarray, drop_rate: float) -> np.ndarray:
    return uniform_from_index(seed, name, k, idx) >= np.float32(drop_rate)


def _flat(ctx: Context, like: np.ndarray) -> np.ndarray:
    if ctx.flat_index is not None:
        return ctx.flat_index().reshape(like.shape)
    return np.arange(like.size, dtype=np.uint64).reshape(like.shape)


def dare_stats(stream, numel: int, drop_rate: Any = 0.1, convention: str = "ptm", seed: int = 0, name: str = "",
               **_: Any) -> dict[str, Any]:
    """convention "mergekit": per skill, the factor |tau|_1 / |tau kept|_1 that keeps the unit's L1 norm."""
    if convention != "mergekit":
        return {}
    tot: dict[int, list[float]] = {}
    for x, idx in stream():
        fi = idx()
        for k, s in enumerate(x["skills"]):
            a = np.abs(s - x["pre"])
            keep = dare_keep(seed, name, k, fi.reshape(a.shape), _per(drop_rate, k))
            t = tot.setdefault(k, [0.0, 0.0])
            t[0] += float(a.sum(dtype=np.float64))
            t[1] += float(np.where(keep, a, 0).sum(dtype=np.float64))
    return {"l1_scale": [a / b if b > 0 else 1.0 for a, b in (tot[k] for k in sorted(tot))]}


def _dare_taus(x: Arrays, ctx: Context, drop_rate: Any, convention: str) -> list[np.ndarray]:
    idx = _flat(ctx, x["pre"])
    out = []
    for k, t in enumerate(_taus(x)):
        p = _per(drop_rate, k)
        scale = _f32(ctx.unit["l1_scale"][k]) if convention == "mergekit" else np.float32(1.0) / np.float32(1.0 - p)
        out.append(np.where(dare_keep(ctx.seed, ctx.name, k, idx, p), t * scale, np.float32(0)))
    return out


def dare_ties(x: Arrays, w: list[float], ctx: Context, drop_rate: Any = 0.1, normalize: bool = True,
              lambda_: float = 1.0, convention: str = "ptm") -> np.ndarray:
    """DARE's random drop + rescale, then TIES' sign election and disjoint mean: pre + lambda * mixed."""
    taus = _dare_taus(x, ctx, drop_rate, convention)
    return x["pre"] + _f32(lambda_) * _consensus_sum(taus, w, True, normalize, convention)


def _della_probs(a: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probabilities from density - epsilon (smallest |tau| of a row) to density + epsilon (largest), linear
    in the rank within the row (last axis)."""
    c = a.shape[-1]
    if c <= 1:
        return np.full(a.shape, density, np.float32)
    ranks = np.argsort(np.argsort(a, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float32)
    return (np.float32(density - epsilon) + np.float32(2 * epsilon) * ranks / np.float32(c - 1)).astype(np.float32)


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


def _della(consensus: bool):
    def fn(x: Arrays, w: list[float], ctx: Context, density: Any = 0.7, epsilon: Any = 0.1, lambda_: float = 1.0,
           normalize: bool = True, rescale: bool = True) -> np.ndarray:
        shape = x["pre"].shape
        m2 = as_matrix(shape) if len(shape) >= 2 else (1, max(1, math.prod(shape)))
        idx = _flat(ctx, x["pre"]).reshape(m2)
        taus = []
        for k, t in enumerate(_taus(x)):
            d, e = _per(density, k), _per(epsilon, k)
            if not (0 < d - e and d + e <= 1):
                raise MergeError(f"della: need 0 < density - epsilon and density + epsilon <= 1 (got {d}, {e})")
            t2 = t.reshape(m2)
            p = _della_probs(np.abs(t2), d, e)
            keep = uniform_from_index(ctx.seed, ctx.name, k, idx) < p
            v = np.where(keep, t2 / p if rescale else t2, np.float32(0)).astype(np.float32)
            taus.append(v.reshape(shape))
        mixed = _consensus_sum(taus, w, consensus, normalize, "mergekit")
        return x["pre"] + _f32(lambda_) * mixed

    fn.__doc__ = "DELLA (MAGPRUNE): keep each tau entry with a probability linear in its magnitude rank within its " \
        "row, rescale by 1/p, " + ("TIES sign election, " if consensus else "") + "pre + lambda * mixed."
    return fn


def sce_stats(stream, numel: int, select_topk: float = 1.0, **_: Any) -> dict[str, Any]:
    """SCE: the variance threshold keeping the top `select_topk` positions (variance of the task vectors across
    models), then per model sum of tau^2 over the kept positions (normalised: the matrix-level weights)."""
    def var_blocks() -> Iterable[np.ndarray]:
        for x, _ in stream():
            yield np.var(np.stack(_taus(x)), axis=0).astype(np.float32)

    k = int(select_topk * numel)
    thr = 0.0 if select_topk >= 1.0 else (kth_largest_abs(var_blocks, k) if k > 0 else math.inf)
    ss = None
    for x, _ in stream():
        taus = _taus(x)
        keep = np.var(np.stack(taus), axis=0).astype(np.float32) >= np.float32(thr) if thr > 0 else None
        v = np.array([float(np.square(np.where(keep, t, 0) if keep is not None else t, dtype=np.float64).sum())
                      for t in taus])
        ss = v if ss is None else ss + v
    tot = float(ss.sum())
    return {"var_threshold": thr, "weights": list(ss / tot) if tot > 0 else [1.0 / len(ss)] * len(ss)}


def sce(x: Arrays, w: list[float], ctx: Context, select_topk: float = 1.0, lambda_: float = 1.0) -> np.ndarray:
    """SCE (FuseChat): Select positions by task-vector variance, Calculate matrix-level weights from mean tau^2,
    Erase by TIES sign election; pre + lambda * (sum of agreeing weighted taus / sum of their weights)."""
    taus = _taus(x)
    thr = ctx.unit["var_threshold"]
    if thr > 0:
        keep = np.var(np.stack(taus), axis=0).astype(np.float32) >= np.float32(thr)
        taus = [np.where(keep, t, np.float32(0)) for t in taus]
    mixed = _consensus_sum(taus, ctx.unit["weights"], True, True, "mergekit")
    return x["pre"] + _f32(lambda_) * mixed


# ---- interference-aware per-matrix methods (TSV-Merge, Iso-C, Iso-CTS)


def _orthogonalise(a: np.ndarray) -> np.ndarray:
    """The nearest matrix with orthonormal columns (Procrustes / polar factor): P Q^T of a = P S Q^T."""
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def _matrix_taus(x: Arrays) -> tuple[list[np.ndarray], tuple[int, ...], tuple[int, int] | None]:
    shape = x["pre"].shape
    taus = [t.astype(np.float32) for t in _taus(x)]
    return taus, shape, (as_matrix(shape) if len(shape) >= 2 else None)


def tsv(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0) -> np.ndarray:
    """TSV-Merge (arXiv 2412.00081): per matrix, SVD of each task vector, keep its top 1/T singular triplets,
    orthogonalise the concatenated U and V (Procrustes), rebuild sum U' S V'^T; vectors take the mean task vector.
    pre + alpha * that."""
    taus, shape, m2 = _matrix_taus(x)
    n = len(taus)
    if m2 is None or min(m2) < n:
        return x["pre"] + _f32(alpha) * (sum(taus) / np.float32(n))
    k = max(1, min(m2) // n)
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vt = np.linalg.svd(t.reshape(m2), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    u, s, v = _orthogonalise(np.concatenate(us, 1)), np.concatenate(ss), _orthogonalise(np.concatenate(vs, 1))
    delta = (u * s) @ v.T
    return x["pre"] + _f32(alpha) * delta.reshape(shape).astype(np.float32)


def iso_c(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0) -> np.ndarray:
    """Iso-C (arXiv 2502.04959): SVD of the summed task vector U S V^T, flatten the spectrum to its mean:
    pre + alpha * mean(S) U V^T per matrix (vectors: pre + alpha * sum tau)."""
    taus, shape, m2 = _matrix_taus(x)
    total = sum(taus)
    if m2 is None:
        return x["pre"] + _f32(alpha) * total
    u, s, vt = np.linalg.svd(total.reshape(m2), full_matrices=False)
    delta = np.float32(s.mean()) * (u @ vt)
    return x["pre"] + _f32(alpha) * delta.reshape(shape).astype(np.float32)


def iso_cts(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0, common_fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS (arXiv 2502.04959): the top `common_fraction` of the summed task vector's singular directions, plus
    for each task the top (1 - common_fraction)/T directions of its task vector with the common subspace
    projected out; orthogonalise U and V, flatten the spectrum to the mean singular value."""
    taus, shape, m2 = _matrix_taus(x)
    n = len(taus)
    total = sum(taus)
    if m2 is None:
        return x["pre"] + _f32(alpha) * total
    r = min(m2)
    k_cm = max(1, int(common_fraction * r))
    k_t = (r - k_cm) // n
    u, s, vt = np.linalg.svd(total.reshape(m2), full_matrices=False)
    ucm, scm, vcm = u[:, :k_cm], s[:k_cm], vt[:k_cm].T
    us, ss, vs = [ucm], [scm], [vcm]
    if k_t > 0:
        for t in taus:
            t2 = t.reshape(m2)
            t2 = t2 - ucm @ (ucm.T @ t2)
            ut, st, vtt = np.linalg.svd(t2, full_matrices=False)
            us.append(ut[:, :k_t]), ss.append(st[:k_t]), vs.append(vtt[:k_t].T)
    uu, vv = _orthogonalise(np.concatenate(us, 1)), _orthogonalise(np.concatenate(vs, 1))
    delta = np.float32(np.concatenate(ss).mean()) * (uu @ vv.T)
    return x["pre"] + _f32(alpha) * delta.reshape(shape).astype(np.float32)


def _count(role: str, lo: int, hi: int | None = None):
    def check(inputs: dict[str, Any]) -> str | None:
        n = len(inputs.get(role) or [])
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return f"takes {want} {role} (got {n})"
        return None

    return check


_GTA = ("pre", "skills")
register(Method("slerp", slerp, ("models",), (), "omega", {}, unit_stats=gram_stats,
                check_inputs=_count("models", 2, 2),
                doc="spherical interpolation models[0] -> models[1] by t = omega (whole-unit angle)"))
register(Method("nuslerp", nuslerp, ("models",), ("pre",), "models", {"flatten": True}, unit_stats=gram_stats,
                check_inputs=_count("models", 2, 2), doc="SLERP with t = w1/(w0+w1); task vectors with pre"))
register(Method("multislerp", multislerp, ("models",), ("pre",), "models", {"normalize_weights": True, "eps": 1e-8},
                unit_stats=gram_stats, check_inputs=_count("models", 2),
                doc="barycentric SLERP on the hypersphere (tangent space at the weighted mean)"))
register(Method("karcher", karcher, ("models",), (), "models", {"max_iter": 10, "tol": 1e-5}, unit_stats=gram_stats,
                check_inputs=_count("models", 2), doc="Karcher mean of the normalised models"))
register(Method("model_stock", model_stock, _GTA, (), "none", {}, unit_stats=gram_stats,
                check_inputs=_count("skills", 2), doc="pre + t mean(tau), t = N cos/(1+(N-1)cos)"))
register(Method("metagpt", metagpt, _GTA, (), "none", {}, unit_stats=gram_stats, check_inputs=_count("skills", 1),
                doc="pre + sum lambda_k tau_k, lambda_k = |tau_k|^2 / sum |tau_j|^2"))
register(Method("nearswap", nearswap, ("models",), (), "omega", {}, check_inputs=_count("models", 2, 2),
                doc="lerp by clamp(t/|a-b|, 0, 1)"))
register(Method("passthrough", passthrough, ("models",), (), "omega", {}, check_inputs=_count("models", 1, 1),
                doc="one model's tensors times scale = omega"))
register(Method("lines", lines, _GTA, ("general",), "skills", {"alpha": 0.0, "beta": 1.0},
                doc="anchor + (alpha + beta l/(L-1)) sum w tau"))
for _name, _cons in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register(Method(_name, _breadcrumbs(_cons), _GTA, (), "skills",
                    {"density": 0.9, "gamma": 0.01, "lambda_": 1.0, "normalize": False},
                    unit_stats=breadcrumbs_stats, doc="drop largest gamma and smallest |tau|" +
                    (", sign election" if _cons else "")))
register(Method("dare_ties", dare_ties, _GTA, (), "skills",
                {"drop_rate": 0.1, "normalize": False, "lambda_": 1.0, "convention": "ptm"},
                unit_stats=dare_stats, doc="DARE drop/rescale + TIES sign election"))
for _name, _cons in (("della", True), ("della_linear", False)):  # normalize defaults as in mergekit 0.1.5
    register(Method(_name, _della(_cons), _GTA, (), "skills",
                    {"density": 0.7, "epsilon": 0.1, "lambda_": 1.0, "normalize": _cons, "rescale": True},
                    kind="matrix", doc="magnitude-ranked keep probabilities per row" +
                    (", sign election" if _cons else "")))
register(Method("sce", sce, _GTA, (), "none", {"select_topk": 1.0, "lambda_": 1.0}, unit_stats=sce_stats,
                check_inputs=_count("skills", 1), doc="variance select, tau^2 weights, sign election"))
register(Method("tsv", tsv, _GTA, (), "none", {"alpha": 1.0}, kind="matrix", doc="TSV-Merge, per matrix"))
register(Method("iso_c", iso_c, _GTA, (), "none", {"alpha": 1.0}, kind="matrix", doc="Iso-C, per matrix"))
register(Method("iso_cts", iso_cts, _GTA, (), "none", {"alpha": 1.0, "common_fraction": 0.8}, kind="matrix",
                doc="Iso-CTS, per matrix"))


register(
    Method(
        "task_arithmetic",
        task_arithmetic,
        ("pre", "skills"),
        ("general",),
        "skills",
        {},
        doc="theta_G + sum_k omega_k (theta_k - theta_pre)",
        shared_fn=task_arithmetic_shared,
    )
)
register(
    Method(
        "linear_interpolation",
        linear_interpolation,
        ("pre", "general", "skills"),
        (),
        "omega",
        {},
        doc="theta_pre + omega tau_D + (1-omega) tau_G",
        check_inputs=lambda inputs: None if len(inputs.get("skills") or []) == 1 else "takes exactly one skill",
    )
)
register(
    Method(
        "wise_ft", wise_ft, ("general", "cft"), (), "omega", {}, doc="theta_G + omega (theta_CFT - theta_G)"
    )
)
register(
    Method("linear", linear, ("models",), (), "models", {"normalize": False}, doc="sum_i alpha_i theta_i",
           mergekit_defaults={"normalize": True})
)
register(
    Method(
        "ties",
        ties,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"density": 1.0, "normalize": True, "convention": "ptm"},
        stats=ties_stats,
        unit_stats=ties_unit_stats,
        doc="trim, elect sign, disjoint mean",
    )
)
register(
    Method(
        "dare",
        dare,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"drop_rate": 0.1, "convention": "ptm"},
        unit_stats=dare_stats,
        doc="random drop p, rescale 1/(1-p), task arithmetic",
    )
)




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
