"""Per-matrix spectral methods (engine kind "matrix"): TSV-Merge, Iso-C and Iso-CTS, on each layer slice."""

from __future__ import annotations

import numpy as np

from ptm.merge.methods.base import (
    _GTA,
    Arrays,
    Context,
    Method,
    _f32,
    _taus,
    as_matrix,
    register,
)


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


register(Method("tsv", tsv, _GTA, (), "none", {"alpha": 1.0}, kind="matrix", doc="TSV-Merge, per matrix"))
register(Method("iso_c", iso_c, _GTA, (), "none", {"alpha": 1.0}, kind="matrix", doc="Iso-C, per matrix"))
register(Method("iso_cts", iso_cts, _GTA, (), "none", {"alpha": 1.0, "common_fraction": 0.8}, kind="matrix",
                doc="Iso-CTS, per matrix"))
