"""Per-matrix spectral methods (engine kind "matrix"): TSV-Merge, Iso-C and Iso-CTS, on each layer slice."""

from __future__ import annotations

import numpy as np

from ptm.merge.methods.base import (
    _GTA,
    Arrays,
    Context,
    Method,
    _f32,
    as_matrix,
    register,
)

_BLOCK_ROWS = 4096  # rows of a tall matrix converted to float64 at a time (bounds the float64 copies)


def _gram(a: np.ndarray) -> np.ndarray:
    """a^T a in float64 for a tall a (rows >= cols), accumulated over row blocks so no float64 copy of a exists."""
    g = np.zeros((a.shape[1], a.shape[1]), np.float64)
    for i in range(0, a.shape[0], _BLOCK_ROWS):
        b = a[i : i + _BLOCK_ROWS].astype(np.float64)
        g += b.T @ b
    return g


def _times(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """a @ m computed in float64 (a tall, m small) by row blocks, returned as float32 (the methods' precision)."""
    out = np.empty((a.shape[0], m.shape[1]), np.float32)
    for i in range(0, a.shape[0], _BLOCK_ROWS):
        out[i : i + _BLOCK_ROWS] = a[i : i + _BLOCK_ROWS].astype(np.float64) @ m
    return out


def _eig_desc(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, q = np.linalg.eigh(g)
    return np.sqrt(np.maximum(lam[::-1], 0.0)), q[:, ::-1]


def _null(s: np.ndarray) -> np.ndarray:
    """Singular values too small to carry a direction in float64 Gram arithmetic (relative 1e-7 of the largest:
    below that the direction is noise of the float32 input; an exact SVD's choice there is arbitrary too)."""
    return s <= (s[0] if s.size else 0.0) * 1e-7


def svd(a: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD u, s, vt of a float32 matrix (top `k` triplets if given), through the eigendecomposition of the
    smaller Gram matrix in float64. Why: LAPACK's float32 gesdd took 142 s for one 2048x5632 matrix on this
    2-core CPU; the Gram route is ~10x faster and, in float64, still exact to float32 precision for every
    singular value above 1e-7 of the largest (smaller ones get zero vectors: their directions are rounding
    noise). u and vt in float32, s in float64."""
    if a.shape[0] < a.shape[1]:
        v, s, ut = svd(a.T, k)
        return ut.T, s, v.T
    s, q = _eig_desc(_gram(a))
    if k is not None:
        s, q = s[:k], q[:, :k]
    keep = ~_null(s)
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return _times(a, q * inv), s, q.T.astype(np.float32)


def polar(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest matrix with orthonormal columns (rows, if wide) to a = P S Q^T, i.e. P Q^T (Procrustes), and
    S: a (a^T a)^(-1/2) from one float64 eigendecomposition; null directions (see `_null`) map to zero."""
    if a.shape[0] < a.shape[1]:
        p, s = polar(a.T)
        return p.T, s
    s, q = _eig_desc(_gram(a))
    keep = ~_null(s)
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return _times(a, (q * inv) @ q.T), s


def _tau(x: Arrays, k: int) -> np.ndarray:
    """Task vector k in float32 from the stored-dtype unit (`stored_dtype_units`: a float32 copy of every input of
    a 32000 x 2048 embedding is 0.8 GB; one task vector at a time is 0.26 GB)."""
    t = x["skills"][k].astype(np.float32)
    np.subtract(t, x["pre"], out=t)  # pre is cast in numpy's buffered chunks: no float32 copy of it
    return t


def _total(x: Arrays) -> np.ndarray:
    """sum_k tau_k in float32, in the order `sum(taus)` adds them."""
    total = _tau(x, 0)
    for k in range(1, len(x["skills"])):
        total += _tau(x, k)
    return total


def _plus_pre(x: Arrays, alpha: float, delta: np.ndarray) -> np.ndarray:
    """pre + alpha * delta (float32, the unit's shape), in place in delta."""
    d = np.ascontiguousarray(delta, np.float32).reshape(x["pre"].shape)
    d *= _f32(alpha)
    return np.add(d, x["pre"], out=d)


def _matrix(x: Arrays) -> tuple[int, int] | None:
    shape = x["pre"].shape
    return as_matrix(shape) if len(shape) >= 2 else None


def tsv(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0) -> np.ndarray:
    """TSV-Merge (arXiv 2412.00081): per matrix, SVD of each task vector, keep its top 1/T singular triplets,
    orthogonalise the concatenated U and V (Procrustes), rebuild sum U' S V'^T; vectors take the mean task vector.
    pre + alpha * that."""
    m2, n = _matrix(x), len(x["skills"])
    if m2 is None or min(m2) < n:
        return _plus_pre(x, alpha, _total(x) / np.float32(n))
    k = max(1, min(m2) // n)
    us, ss, vs = [], [], []
    for i in range(n):
        u, s, vt = svd(_tau(x, i).reshape(m2), k)
        us.append(u), ss.append(s), vs.append(vt.T)
    cat = np.concatenate(us, 1)
    del us  # the factors of a 32000 x 2048 embedding are 0.26 GB a copy: keep at most two alive
    u = polar(cat)[0]
    del cat
    s, v = np.concatenate(ss), polar(np.concatenate(vs, 1))[0]
    u *= s.astype(np.float32)
    return _plus_pre(x, alpha, u @ v.T)  # float32 GEMM: the factors are float32-exact


def iso_c(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0) -> np.ndarray:
    """Iso-C (arXiv 2502.04959): SVD of the summed task vector U S V^T, flatten the spectrum to its mean:
    pre + alpha * mean(S) U V^T per matrix (vectors: pre + alpha * sum tau)."""
    m2, total = _matrix(x), _total(x)
    if m2 is None:
        return _plus_pre(x, alpha, total)
    pol, s = polar(total.reshape(m2))  # U V^T and S of the summed task vector from one eigendecomposition
    del total
    pol *= np.float32(s.mean())
    return _plus_pre(x, alpha, pol)


def iso_cts(x: Arrays, w: list[float], ctx: Context, alpha: float = 1.0, common_fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS (arXiv 2502.04959): the top `common_fraction` of the summed task vector's singular directions, plus
    for each task the top (1 - common_fraction)/T directions of its task vector with the common subspace
    projected out; orthogonalise U and V, flatten the spectrum to the mean singular value."""
    m2, n, total = _matrix(x), len(x["skills"]), _total(x)
    if m2 is None:
        return _plus_pre(x, alpha, total)
    r = min(m2)
    k_cm = max(1, int(common_fraction * r))
    k_t = (r - k_cm) // n
    ucm, scm, vcmt = svd(total.reshape(m2), k_cm)
    del total
    vcm = vcmt.T
    us, ss, vs = [ucm], [scm], [vcm]
    if k_t > 0:
        for i in range(n):
            t2 = _tau(x, i).reshape(m2)
            t2 = t2 - ucm @ (ucm.T @ t2)
            ut, st, vtt = svd(t2, k_t)
            us.append(ut), ss.append(st), vs.append(vtt.T)
    uu, vv = polar(np.concatenate(us, 1))[0], polar(np.concatenate(vs, 1))[0]
    delta = uu @ vv.T
    delta *= np.float32(np.concatenate(ss).mean())
    return _plus_pre(x, alpha, delta)


_UNITS = {"kind": "matrix", "stored_dtype_units": True}
register(Method("tsv", tsv, _GTA, (), "none", {"alpha": 1.0}, **_UNITS, doc="TSV-Merge, per matrix"))
register(Method("iso_c", iso_c, _GTA, (), "none", {"alpha": 1.0}, **_UNITS, doc="Iso-C, per matrix"))
register(Method("iso_cts", iso_cts, _GTA, (), "none", {"alpha": 1.0, "common_fraction": 0.8}, **_UNITS,
                doc="Iso-CTS, per matrix"))
