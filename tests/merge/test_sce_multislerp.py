"""multislerp (mergekit's construction) and SCE (Select conventions, unweighted sign vote): formulas on small
arrays, and sharded == unsharded == the method on whole units for the mergekit conventions."""

from __future__ import annotations

import numpy as np
import pytest

from ptm.errors import MergeError
from ptm.merge import engine
from ptm.merge import methods as M
from ptm.merge.methods import sparse, spherical
from ptm.merge.recipe import Recipe
from tests.merge.conftest import f32, restore


def _gram(vs: list[np.ndarray]) -> np.ndarray:
    return np.array([[float(a.astype(np.float64) @ b) for b in vs] for a in vs])


def test_multislerp_is_normalised_mean_direction_times_weighted_norm():
    rng = np.random.default_rng(0)
    vs = [rng.standard_normal(40) * s for s in (1.0, 3.0, 0.5)]
    w = np.array([1.0, 2.0, 0.5])
    for normalize in (True, False):
        wn = w / w.sum() if normalize else w
        c = M.multislerp_coefficients(_gram(vs), list(w), normalize_weights=normalize)
        got = sum(ci * v for ci, v in zip(c, vs, strict=True))
        ns = [np.linalg.norm(v) for v in vs]
        mean = sum(wi * v / n for wi, v, n in zip(wn, vs, ns, strict=True))
        want = mean / np.linalg.norm(mean) * float(wn @ ns)
        assert np.allclose(got, want, rtol=1e-10, atol=1e-12)
        # the weighted mean of the unit vectors projected onto the tangent space at the result is zero
        u = got / np.linalg.norm(got)
        tangent = sum(wi * (v / n - (u @ (v / n)) * u) for wi, v, n in zip(wn, vs, ns, strict=True))
        assert np.linalg.norm(tangent) < 1e-10
    # a zero vector (an unchanged tensor's task vector) contributes nothing: the other one, scaled by its weight
    z = [vs[0], np.zeros(40)]
    c = M.multislerp_coefficients(_gram(z), [1.0, 2.0])
    assert np.allclose(c[0] * vs[0], vs[0] / 3, rtol=1e-6) and np.isfinite(c).all()
    # not the Karcher mean (which ptm's earlier one-step construction approximated): they differ for 3 vectors
    k = M.sphere_mean_coefficients(_gram(vs), list(w), 10, 1e-12, 1e-8)
    assert not np.allclose(k, M.multislerp_coefficients(_gram(vs), list(w)), rtol=1e-3)


def test_multislerp_with_pre_uses_task_vectors():
    rng = np.random.default_rng(1)
    pre = rng.standard_normal(30).astype(np.float32)
    models = [pre + rng.standard_normal(30).astype(np.float32) for _ in range(2)]
    taus = [m - pre for m in models]
    ctx = M.Context(unit={"gram": _gram(taus)})
    got = spherical.multislerp({"pre": pre, "models": models}, [1.0, 1.0], ctx)
    c = M.multislerp_coefficients(_gram(taus), [1.0, 1.0])
    assert np.allclose(got, pre + c[0] * taus[0] + c[1] * taus[1], atol=1e-6)


def _stream(x: dict, n: int):
    return lambda: iter([(x, lambda: np.arange(n, dtype=np.uint64))])


def test_sce_select_conventions():
    """ptm: k = int(topk n), every variance >= the k-th largest kept; mergekit: k = int(topk * #(variance > 0)),
    exactly k (ties by flat index), zero variance never kept."""
    pre = np.zeros(8, np.float32)
    t1 = np.array([1, 2, 0, 3, 5, 1, 4, 0], np.float32)
    t2 = np.array([1, 0, 2, -3, 5, 3, 0, 0], np.float32)  # variances: 0, 1, 1, 9, 0, 1, 4, 0
    x = {"pre": pre, "skills": [t1, t2]}
    ptm = sparse.sce_stats(_stream(x, 8), 8, select_topk=0.5)  # k = 4: 9, 4 and the three 1s
    mk = sparse.sce_stats(_stream(x, 8), 8, select_topk=0.5, convention="mergekit")  # k = int(0.5 * 5) = 2: 9, 4
    mk3 = sparse.sce_stats(_stream(x, 8), 8, select_topk=0.7, convention="mergekit")  # k = 3: 9, 4, first 1
    idx = lambda: np.arange(8, dtype=np.uint64)  # noqa: E731
    keep = {name: sparse._sce_keep([t1, t2], st["select"], idx) for name, st in
            (("ptm", ptm), ("mk", mk), ("mk3", mk3))}
    assert keep["ptm"].tolist() == [False, True, True, True, False, True, True, False]
    assert keep["mk"].tolist() == [False, False, False, True, False, False, True, False]
    assert keep["mk3"].tolist() == [False, True, False, True, False, False, True, False]
    # weights: sum tau^2 over the kept positions, normalised
    s1, s2 = (t1[keep["mk"]] ** 2).sum(), (t2[keep["mk"]] ** 2).sum()
    assert np.allclose(mk["weights"], [s1 / (s1 + s2), s2 / (s1 + s2)])
    # select_topk = 1 keeps everything (zero variance included) in both conventions
    for conv in ("ptm", "mergekit"):
        assert sparse.sce_stats(_stream(x, 8), 8, select_topk=1.0, convention=conv)["select"] is None
    with pytest.raises(MergeError, match="select_topk"):
        sparse.sce_stats(_stream(x, 8), 8, select_topk=-0.1)


@pytest.mark.parametrize("convention", ["ptm", "mergekit"])
def test_sce_fast_paths_equal_the_plain_formulas(monkeypatch, convention):
    """Select's kept variances (a unit <= SCE_CACHE entries) give what recomputing them per pass gives, with
    runs and index arrays and threshold ties; the sub-blocked variance is np.var's bit for bit and Erase with
    masks by multiplication is the np.sign / np.where formula bit for bit (a NaN takes the plain path)."""
    rng = np.random.default_rng(3)
    n, cuts = 70_000, [0, 5_000, 41_000, 70_000]
    pre = rng.standard_normal(n).astype(np.float32)
    sk = [pre + np.round(rng.standard_normal(n), 1).astype(np.float32) for _ in range(3)]  # many equal variances

    def stream(runs: bool):
        def gen():
            for a, b in zip(cuts, cuts[1:], strict=False):
                make = lambda a=a, b=b: np.arange(a, b, dtype=np.uint64)  # noqa: E731
                yield ({"pre": pre[a:b], "skills": [t[a:b] for t in sk]},
                       M.FlatIndex(make, a if runs else None))
        return gen

    got = [sparse.sce_stats(stream(r), n, select_topk=0.4, convention=convention) for r in (True, False)]
    monkeypatch.setattr(sparse, "SCE_CACHE", 0)
    plain = sparse.sce_stats(stream(False), n, select_topk=0.4, convention=convention)
    assert got[0] == got[1] == plain
    taus = [t - pre for t in sk]
    ref = np.var(np.stack(taus).astype(np.float64), axis=0).astype(np.float32)
    assert np.array_equal(sparse._sce_var(taus).view(np.uint32), ref.view(np.uint32))
    keep = sparse._sce_keep(taus, plain["select"], lambda: np.arange(n, dtype=np.uint64))
    assert 0.3 < keep.mean() < 0.5

    def erase_ref(ts, w):
        total = sum(ts[1:], ts[0].copy())
        sign = np.where(total < 0, np.float32(-1), np.float32(1))
        mixed, div = np.zeros_like(total), np.zeros_like(total)
        for t, wk in zip(ts, w, strict=True):
            agree = np.sign(t) == sign
            mixed += np.where(agree, np.float32(wk) * t, np.float32(0))
            div += np.where(agree, np.float32(wk), np.float32(0))
        div[np.abs(div) < 1e-8] = 1
        return mixed / div

    for bad in (False, True):
        ts = [t.copy() for t in taus]
        if bad:
            ts[1][7] = np.nan
        masked = [sparse._masked(t, keep) for t in ts]
        for m, t in zip(masked, ts, strict=True):
            assert np.array_equal(m, np.where(keep, t, np.float32(0)), equal_nan=True)
        want = erase_ref([np.where(keep, t, np.float32(0)) for t in ts], plain["weights"])
        assert np.array_equal(sparse._sce_erase(masked, plain["weights"]).view(np.uint32), want.view(np.uint32))


def test_sce_sign_vote_is_unweighted():
    """Erase elects the sign of the plain sum of the selected task vectors (FuseChat; mergekit measured), not
    of the weighted sum: here the weights favour model 2 but model 1's larger entry wins the vote."""
    x = {"pre": np.zeros(2, np.float32), "skills": [np.array([-1.0, 0.0], np.float32),
                                                    np.array([0.9, 0.0], np.float32)]}
    out = sparse.sce(x, [1.0, 1.0], M.Context(unit={"select": None, "weights": [0.3, 0.7]}))
    assert out[0] == np.float32(-1.0) and out[1] == 0  # weighted vote (-0.3 + 0.63) would keep +0.9
    # a zero vote elects "+"
    y = {"pre": np.zeros(1, np.float32), "skills": [np.array([1.0], np.float32), np.array([-1.0], np.float32)]}
    assert sparse.sce(y, [1.0, 1.0], M.Context(unit={"select": None, "weights": [0.5, 0.5]}))[0] == 1.0


@pytest.mark.parametrize("method,inputs,kw", [
    ("sce", {"pre": "pre", "skills": ["s1", "s2", "cft"]},
     {"method_options": {"select_topk": 0.3}, "convention": "mergekit"}),
    ("multislerp", {"models": ["s1", "s2", "cft"]}, {"weights": [1.0, 2.0, 0.5]}),
])
def test_sharded_equals_unsharded_and_whole_units(tmp_path, ckpts, monkeypatch, method, inputs, kw):
    import jax
    from jax.sharding import Mesh

    from tests.merge.test_methods_new import CASES, _reference

    paths, trees = ckpts
    ins = {k: ([paths[p] for p in v] if isinstance(v, list) else paths[v]) for k, v in inputs.items()}
    r = Recipe(method, ins, out=str(tmp_path / "plain"), **kw)
    engine.merge(r, progress=False, summary=False)
    r.out = str(tmp_path / "sharded")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    engine.merge(r, mesh=mesh, progress=False, summary=False)
    plain, sharded = restore(str(tmp_path / "plain")), restore(str(tmp_path / "sharded"))
    assert plain.keys() == sharded.keys()
    assert all(np.array_equal(plain[n].view(np.uint16), sharded[n].view(np.uint16)) for n in plain)
    assert all(np.isfinite(f32(a)).all() for a in plain.values())
    monkeypatch.setitem(CASES, f"{method}-test", (inputs, kw))
    ref = _reference(f"{method}-test", trees)
    assert all(np.array_equal(plain[n].view(np.uint16), ref[n].view(np.uint16)) for n in plain)
