"""The Gram-eigendecomposition SVD and polar factor behind TSV / Iso-C / Iso-CTS agree with an exact float64
LAPACK SVD to float32 precision, also on ill-conditioned and wide/tall matrices, and the methods built on them
agree with the exact-SVD formulation."""

from __future__ import annotations

import numpy as np
import pytest

from ptm.merge import methods as M
from ptm.merge.methods import spectral as S


def _mat(rows: int, cols: int, cond: float, seed: int) -> np.ndarray:
    """A float32 matrix with singular values spread log-uniformly over [1/cond, 1]."""
    rng = np.random.default_rng(seed)
    r = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, r)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, r)))
    s = np.logspace(0, -np.log10(cond), r)
    return ((u * s) @ v.T).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64)])
@pytest.mark.parametrize("cond", [10.0, 1e4])
def test_svd_and_polar_match_lapack(shape, cond):
    a = _mat(*shape, cond, seed=shape[0])
    u0, s0, vt0 = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    u, s, vt = S.svd(a)
    assert np.allclose(s, s0, rtol=1e-5, atol=1e-7 * s0[0])
    assert np.allclose((u * s) @ vt, a, atol=1e-6)
    k = min(shape) // 3
    uk, sk, vtk = S.svd(a, k)
    assert uk.shape == (shape[0], k) and vtk.shape == (k, shape[1])
    assert np.allclose(sk, s0[:k], rtol=1e-6)
    # the top-k subspaces (sign/rotation free): equal projectors
    assert np.allclose(uk @ uk.T, u0[:, :k] @ u0[:, :k].T, atol=1e-5)
    assert np.allclose(vtk.T @ vtk, vt0[:k].T @ vt0[:k], atol=1e-5)
    p, sp = S.polar(a)
    assert np.allclose(p, u0 @ vt0, atol=2e-5 if cond > 100 else 1e-6)
    assert np.allclose(sp, s0, rtol=1e-5, atol=1e-7 * s0[0])


def test_rank_deficient_has_no_spurious_directions():
    a = _mat(30, 50, 10.0, 1)
    a[:, :] = np.outer(a[:, 0], np.ones(50, np.float32))  # rank 1
    p, s = S.polar(a)
    assert np.count_nonzero(s > 1e-6 * s[0]) == 1
    assert np.linalg.matrix_rank(p, tol=1e-3) == 1 and np.isfinite(p).all()


# The exact formulation (LAPACK SVD in float64), as the methods were first written.
def _exact_svd(a):
    return np.linalg.svd(a.astype(np.float64), full_matrices=False)


def _exact_polar(a):
    u, _, vt = _exact_svd(a)
    return u @ vt


def _tsv_exact(pre, sk):
    taus = [s - pre for s in sk]
    k = min(pre.shape) // len(taus)
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vt = _exact_svd(t)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    u, s, v = _exact_polar(np.concatenate(us, 1)), np.concatenate(ss), _exact_polar(np.concatenate(vs, 1))
    return pre + ((u * s) @ v.T)


def _iso_c_exact(pre, sk):
    u, s, vt = _exact_svd(sum(s - pre for s in sk))
    return pre + s.mean() * (u @ vt)


def _iso_cts_exact(pre, sk, cf):
    taus = [s - pre for s in sk]
    r = min(pre.shape)
    k_cm = max(1, int(cf * r))
    k_t = (r - k_cm) // len(taus)
    u, s, vt = _exact_svd(sum(taus))
    ucm = u[:, :k_cm]
    us, ss, vs = [ucm], [s[:k_cm]], [vt[:k_cm].T]
    for t in taus:
        ut, st, vtt = _exact_svd(t - ucm @ (ucm.T @ t))
        us.append(ut[:, :k_t]), ss.append(st[:k_t]), vs.append(vtt[:k_t].T)
    uu, vv = _exact_polar(np.concatenate(us, 1)), _exact_polar(np.concatenate(vs, 1))
    return pre + np.concatenate(ss).mean() * (uu @ vv.T)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_methods_match_exact_svd(shape):
    rng = np.random.default_rng(3)
    pre = rng.standard_normal(shape).astype(np.float32)
    sk = [pre + _mat(*shape, 100.0, seed=i) for i in range(3)]
    x = {"pre": pre, "skills": sk}
    scale = 1.0  # task vectors have singular values <= 1: compare the change at that scale
    for got, ref in [
        (M.tsv(x, [], M.Context()), _tsv_exact(pre, sk)),
        (M.iso_c(x, [], M.Context()), _iso_c_exact(pre, sk)),
        (M.iso_cts(x, [], M.Context(), common_fraction=0.5), _iso_cts_exact(pre, sk, 0.5)),
    ]:
        assert got.dtype == np.float32
        assert np.abs(got - ref).max() <= 2e-6 * max(scale, np.abs(pre).max())
