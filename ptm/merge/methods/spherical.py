"""Geometric methods on the Gram matrix of a unit's inputs: SLERP, NuSLERP, multi-SLERP, Karcher mean, Model
Stock and MetaGPT's closed-form weights. Each is a linear combination with coefficients from the Gram matrix,
so it stays elementwise and streamed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from ptm.ckpt.dtypes import FLOAT32_EXACT
from ptm.errors import MergeError
from ptm.merge.methods.base import (
    _GTA,
    Arrays,
    Context,
    Method,
    _count,
    _memo,
    _taus,
    _vectors,
    register,
)
from ptm.merge.methods.select import sub_blocks

GRAM_SUB = 1 << 17  # entries per sub-block of the Gram pass (32K: a few % more wall in per-call overhead)
_BLAS: ThreadpoolController | None = None  # found once: looking up the loaded libraries costs ~1 ms a call


def _one_blas_thread() -> Any:
    """A context with OpenBLAS on one thread: it threads a sub-block's dot itself, 2x the CPU for 1.3x less wall
    (measured), and the engine already runs this pass beside the combine."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def gram_stats(stream: Callable[[], Iterable[tuple[Arrays, Any]]], numel: int, **_: Any) -> dict[str, Any]:
    """Gram matrix G_ij = <v_i, v_j> of the unit's vectors (the models, or their differences from `pre`), summed
    in float64 over sub-blocks of GRAM_SUB entries. The stream gives the stored dtype (`stored_dtype_units`):
    converting whole pieces to float32 and then float64 cost ~3x the sums themselves. Without `pre`, values
    that float32 holds exactly go to float64 in one cast (0.16 ns per entry less). One thread: two were slower
    on this 2-core machine (2.6-3.0 against 2.2 ns per entry, memory-bound)."""
    g: np.ndarray | None = None
    f32 = p32 = t64 = None
    with _one_blas_thread():
        for x, _ in stream():
            ms = [np.ascontiguousarray(m).reshape(-1) for m in (x["models"] if "models" in x else x["skills"])]
            pre = np.ascontiguousarray(x["pre"]).reshape(-1) if "pre" in x else None
            k = len(ms)
            if g is None:
                g = np.zeros((k, k))
                f32, p32 = np.empty((k, GRAM_SUB), np.float32), np.empty(GRAM_SUB, np.float32)
                t64 = np.empty((k, GRAM_SUB))
            for sl in sub_blocks(ms[0].size, GRAM_SUB):
                m = sl.stop - sl.start
                t = t64[:, :m]
                if pre is None and all(a.dtype in FLOAT32_EXACT for a in ms):
                    for i, a in enumerate(ms):
                        t[i] = a[sl]
                else:  # in float32 (differences too), as the methods' fn computes them
                    f = f32[:, :m]
                    for i, a in enumerate(ms):
                        f[i] = a[sl]
                    if pre is not None:
                        p32[:m] = pre[sl]
                        np.subtract(f, p32[:m], out=f)
                    t[...] = f
                for i in range(k):  # k(k+1)/2 dots: BLAS gemm on a k x 32K block is ~5x slower for small k
                    for j in range(i, k):
                        g[i, j] += float(np.dot(t[i], t[j]))
    if g is None:
        return {"gram": None}
    return {"gram": np.triu(g) + np.triu(g, 1).T}


def _combine_linear(base: np.ndarray | None, vs: list[np.ndarray], coef: np.ndarray) -> np.ndarray:
    """base + sum_i coef_i vs_i in float32, in place; without a base the first term starts the sum (no zero fill;
    as in torch, a sum of -0.0 terms stays -0.0)."""
    terms = list(zip(vs, coef, strict=True))
    if base is None:
        v0, c0 = terms.pop(0)
        out = np.multiply(np.float32(c0), v0, dtype=np.float32)
    else:
        out = np.array(base, dtype=np.float32, copy=True)
    tmp = np.empty_like(out)
    for v, c in terms:
        out += np.multiply(np.float32(c), v, out=tmp)
    return out


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


def sphere_mean_coefficients(g: np.ndarray, w: list[float], iters: int, tol: float, eps: float) -> np.ndarray:
    """Coefficients c (result = sum c_i v_i) of the weighted Karcher mean of the unit vectors v_i/|v_i|, rescaled
    by the weighted mean norm: Riemannian gradient steps from the normalised weighted Euclidean mean until
    |T| < tol or `iters` steps (Buss & Fillmore 2001, algorithm A1)."""
    n = _norms(g, eps)
    gx = g / np.outer(n, n)
    wn = np.asarray(w, np.float64)
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
    return a / n * float(wn @ n)


def multislerp_coefficients(g: np.ndarray, w: list[float], eps: float = 1e-8, normalize_weights: bool = True
                            ) -> np.ndarray:
    """Coefficients c (result = sum c_i v_i) of mergekit's multi-SLERP: the direction of the weighted mean of the
    unit vectors x_i = v_i/|v_i| (the extrinsic mean on the sphere: the weighted mean of the x_i projected onto
    the tangent space at that direction is zero), times sum_i w_i |v_i|; weights sum to 1 unless
    `normalize_weights` is false. Norms below `eps` are clamped to it (a zero vector contributes nothing)."""
    n = _norms(g, eps)
    wn = np.asarray(w, np.float64)
    if normalize_weights:
        s = wn.sum()
        wn = wn / (s if abs(s) > eps else 1.0)
    a = wn / n  # the mean sum_i wn_i x_i in the basis of the v_i
    mean_norm = float(np.sqrt(max(a @ g @ a, 0.0)))
    return a / max(mean_norm, eps) * float(wn @ n)


def multislerp(x: Arrays, w: list[float], ctx: Context, normalize_weights: bool = True, eps: float = 1e-8
               ) -> np.ndarray:
    """Barycentric interpolation of several models (or task vectors, with `pre`) on the hypersphere, as mergekit
    0.1.5 computes it: normalised weighted mean of the unit vectors, rescaled by the weighted sum of norms."""
    key = ("multislerp", tuple(w))
    coef = _memo(ctx, key, lambda: multislerp_coefficients(ctx.unit["gram"], w, eps, normalize_weights))
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


_GRAM = {"unit_stats": gram_stats, "stored_dtype_units": True}
register(Method("slerp", slerp, ("models",), (), "omega", {}, **_GRAM, check_inputs=_count("models", 2, 2),
                doc="spherical interpolation models[0] -> models[1] by t = omega (whole-unit angle)"))
register(Method("nuslerp", nuslerp, ("models",), ("pre",), "models", {"flatten": True}, **_GRAM,
                check_inputs=_count("models", 2, 2), doc="SLERP with t = w1/(w0+w1); task vectors with pre"))
register(Method("multislerp", multislerp, ("models",), ("pre",), "models", {"normalize_weights": True, "eps": 1e-8},
                **_GRAM, check_inputs=_count("models", 2),
                doc="normalised weighted mean of the unit vectors times the weighted norm (as mergekit)"))
register(Method("karcher", karcher, ("models",), (), "models", {"max_iter": 10, "tol": 1e-5}, **_GRAM,
                check_inputs=_count("models", 2), doc="Karcher mean of the normalised models"))
register(Method("model_stock", model_stock, _GTA, (), "none", {}, **_GRAM,
                check_inputs=_count("skills", 2), doc="pre + t mean(tau), t = N cos/(1+(N-1)cos)"))
register(Method("metagpt", metagpt, _GTA, (), "none", {}, **_GRAM, check_inputs=_count("skills", 1),
                doc="pre + sum lambda_k tau_k, lambda_k = |tau_k|^2 / sum |tau_j|^2"))
