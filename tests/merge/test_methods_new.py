"""The mergekit-family and interference-aware methods: sharded == unsharded (per-unit statistics and matrix methods
are computed over whole units whatever the sharding), engine == the method applied to whole units, formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptm.ckpt.tree import flatten
from ptm.merge import engine
from ptm.merge import methods as M
from ptm.merge.recipe import Recipe
from tests.merge.conftest import BF16, f32, restore

CASES = {
    "slerp": ({"models": ["s1", "s2"]}, {"weights": 0.3}),
    "nuslerp": ({"pre": "pre", "models": ["s1", "s2"]}, {"weights": [0.4, 0.6]}),
    "multislerp": ({"pre": "pre", "models": ["s1", "s2", "cft"]}, {"weights": [1.0, 2.0, 1.0]}),
    "karcher": ({"models": ["s1", "s2", "cft"]}, {}),
    "model_stock": ({"pre": "pre", "skills": ["s1", "s2", "cft"]}, {}),
    "metagpt": ({"pre": "pre", "skills": ["s1", "s2"]}, {}),
    "nearswap": ({"models": ["pre", "s1"]}, {"weights": 0.5}),
    "passthrough": ({"models": ["s1"]}, {"weights": 0.5}),
    "lines": ({"pre": "pre", "skills": ["s1", "s2"]}, {"weights": [0.5, 0.5]}),
    "breadcrumbs": ({"pre": "pre", "skills": ["s1", "s2"]}, {"method_options": {"density": 0.5, "gamma": 0.1}}),
    "breadcrumbs_ties": ({"pre": "pre", "skills": ["s1", "s2"]},
                         {"method_options": {"density": [0.5, 0.7], "gamma": 0.1}}),
    "dare_ties": ({"pre": "pre", "skills": ["s1", "s2"]}, {"drop_rate": 0.3, "seed": 2}),
    "dare_ties-mk": ({"pre": "pre", "skills": ["s1", "s2"]}, {"drop_rate": 0.3, "seed": 2, "convention": "mergekit"}),
    "dare-mk": ({"pre": "pre", "skills": ["s1", "s2"]}, {"drop_rate": 0.3, "convention": "mergekit"}),
    "ties-mk": ({"pre": "pre", "skills": ["s1", "s2"]}, {"density": 0.4, "convention": "mergekit"}),
    "della": ({"pre": "pre", "skills": ["s1", "s2"]}, {"method_options": {"density": 0.5, "epsilon": 0.1}}),
    "della_linear": ({"pre": "pre", "skills": ["s1", "s2"]}, {"method_options": {"density": 0.5, "epsilon": 0.2}}),
    "sce": ({"pre": "pre", "skills": ["s1", "s2", "cft"]}, {"method_options": {"select_topk": 0.5}}),
    "tsv": ({"pre": "pre", "skills": ["s1", "s2"]}, {}),
    "iso_c": ({"pre": "pre", "skills": ["s1", "s2"]}, {"method_options": {"alpha": 1.3}}),
    "iso_cts": ({"pre": "pre", "skills": ["s1", "s2"]}, {"method_options": {"common_fraction": 0.5}}),
}


def _recipe(case: str, paths: dict, out: str) -> Recipe:
    inputs, kw = CASES[case]
    ins = {k: ([paths[p] for p in v] if isinstance(v, list) else paths[v]) for k, v in inputs.items()}
    return Recipe(case.split("-")[0], ins, out=out, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_unsharded(tmp_path, ckpts, case):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    paths, _ = ckpts
    r = _recipe(case, paths, str(tmp_path / "plain"))
    engine.merge(r, progress=False, summary=False)
    r.out = str(tmp_path / "sharded")
    engine.merge(r, mesh=mesh, progress=False, summary=False)
    plain = restore(str(tmp_path / "plain"))
    assert _same(plain, restore(str(tmp_path / "sharded")))
    tree = flatten(engine.merge_to_tree(r, mesh=mesh))
    assert all(np.array_equal(np.asarray(tree[n]).view(np.uint16), plain[n].view(np.uint16)) for n in plain)
    assert all(np.isfinite(f32(a)).all() for a in plain.values())


def _reference(case: str, trees: dict) -> dict[str, np.ndarray]:
    """The method applied to whole units directly (no engine, no blocks)."""
    inputs, kw = CASES[case]
    m = M.get(case.split("-")[0])
    opts = M.check_options(m, {**kw.get("method_options", {}), **{k: kw[k] for k in ("density", "drop_rate",
                                                                                      "convention") if k in kw}})
    seed = kw.get("seed", 0)
    w = kw.get("weights", 1.0)
    out = {}
    for name, ref in trees["pre"].items():
        stacked = name.startswith("layers.")
        units = range(ref.shape[0]) if stacked else [None]
        res = []
        for layer in units:
            def sl(a, layer=layer):
                return f32(a[layer] if layer is not None else a)

            x = {k: ([sl(trees[p][name]) for p in v] if isinstance(v, list) else sl(trees[v][name]))
                 for k, v in inputs.items()}
            shape = ref.shape
            lo = (layer * math.prod(shape[1:])) if layer is not None else 0
            idx = (np.arange(x[next(iter(x))][0].size if isinstance(x[next(iter(x))], list) else
                             x[next(iter(x))].size, dtype=np.uint64) + np.uint64(lo))
            ushape = shape[1:] if layer is not None else shape
            unit = {}
            if m.unit_stats is not None:
                unit = m.unit_stats(lambda x=x, idx=idx: iter([(x, lambda: idx)]), idx.size, seed=seed, name=name,
                                    **opts)
            stats = {}
            if m.stats is not None:
                taus = [f32(trees[s][name]) - f32(trees["pre"][name]) for s in inputs["skills"]]
                stats = m.stats(lambda k, taus=taus: (lambda: iter([taus[k]])), len(taus), ref.size, **opts)
            n_w = m.n_weights({k: v for k, v in inputs.items()})
            ws = (list(w) if isinstance(w, list) else [w] * n_w) if m.weighted != "omega" else [w]
            ctx = M.Context(name=name, seed=seed, stats=stats, flat_index=lambda idx=idx, u=ushape: idx.reshape(u),
                            unit=unit, layer=layer, n_layers=ref.shape[0] if stacked else 3)
            res.append(np.asarray(m.fn(x, ws, ctx, **opts), np.float32))
        out[name] = (np.stack(res) if stacked else res[0]).astype(BF16)
    return out


@pytest.mark.parametrize("case", ["slerp", "model_stock", "sce", "della", "tsv", "iso_cts", "dare-mk", "ties-mk",
                                  "breadcrumbs_ties", "lines"])
def test_engine_equals_whole_unit_reference(tmp_path, ckpts, case):
    paths, trees = ckpts
    r = _recipe(case, paths, str(tmp_path / "out"))
    engine.merge(r, progress=False, summary=False)
    got = restore(r.out)
    ref = _reference(case, trees)
    for n in got:
        if case == "lines" and not n.startswith("layers."):
            continue  # the reference has no layer for non-layer tensors: alpha applies (checked below)
        assert np.array_equal(got[n].view(np.uint16), ref[n].view(np.uint16)), n


def test_formulas(ckpts):
    _, t = ckpts
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)  # (slerp's coefficients act on the unnormalised vectors)
    g = np.array([[a @ a, a @ b], [b @ a, b @ b]], np.float64)
    # slerp: endpoints exact, the midpoint's angle to both ends equal
    assert np.allclose(M.slerp_coefficients(g, 0.0), [1, 0]) and np.allclose(M.slerp_coefficients(g, 1.0), [0, 1])
    c = M.slerp_coefficients(g, 0.5)
    mid = c[0] * a + c[1] * b

    def cos(u, v):
        return u @ v / np.linalg.norm(u) / np.linalg.norm(v)

    assert abs(cos(mid, a) - cos(mid, b)) < 1e-5
    # two models: karcher == multislerp == slerp direction at t=0.5 (equal norms)
    an, bn = a / np.linalg.norm(a), b / np.linalg.norm(b)
    gn = np.array([[1, an @ bn], [an @ bn, 1]])
    k = M.sphere_mean_coefficients(gn, [1, 1], 10, 1e-9, 1e-8)
    s = M.slerp_coefficients(gn, 0.5)
    assert np.allclose(k, s, atol=1e-6)
    # model stock: t = N cos / (1 + (N-1) cos)
    cs = 0.3
    gg = np.array([[1, cs, cs], [cs, 1, cs], [cs, cs, 1]])
    assert abs(M.model_stock_t(gg) - 3 * cs / (1 + 2 * cs)) < 1e-12
    # Iso-C flattens the spectrum: every singular value of the task-vector change equals their mean
    pre = rng.standard_normal((12, 10)).astype(np.float32)
    sk = [pre + rng.standard_normal((12, 10)).astype(np.float32) for _ in range(2)]
    out = M.iso_c({"pre": pre, "skills": sk}, [], M.Context())
    sv = np.linalg.svd(out - pre, compute_uv=False)
    tot = np.linalg.svd(sk[0] + sk[1] - 2 * pre, compute_uv=False)
    assert np.allclose(sv, tot.mean(), rtol=1e-4)
    # TSV with one task keeps it (full rank, already orthogonal)
    one = M.tsv({"pre": pre, "skills": sk[:1]}, [], M.Context())
    assert np.allclose(one, sk[0], atol=1e-4)
    # TSV with two tasks: the rebuilt change has orthonormal singular vectors and the kept singular values
    two = M.tsv({"pre": pre, "skills": sk}, [], M.Context()) - pre
    kept = np.sort(np.concatenate([np.linalg.svd(s_ - pre, compute_uv=False)[:5] for s_ in sk]))
    assert np.allclose(np.sort(np.linalg.svd(two, compute_uv=False)), kept, rtol=1e-4)
    # matrix view of stacked ptm tensors
    assert M.as_matrix((16, 2, 8)) == (16, 16) and M.as_matrix((2, 8, 16)) == (16, 16)
    assert M.as_matrix((2048, 4, 64)) == (2048, 256)
    # nearswap: equal entries take the other model's value, far ones keep the base
    ns = M.nearswap({"models": [np.array([0.0, 0.0, 1.0], np.float32), np.array([0.0, 10.0, 1.001], np.float32)]},
                    [0.01], M.Context())
    assert ns[0] == 0 and abs(ns[1] - 0.01) < 1e-6 and abs(ns[2] - 1.001) < 1e-6


def test_gram_stats_is_exact():
    """The Gram methods' statistics from stored-dtype (bf16) pieces of uneven size: the float64 Gram of the float32
    differences the methods combine (or of the models, without a base), to 1e-12."""
    import ml_dtypes

    from ptm.merge.methods import spherical
    from ptm.merge.methods.select import SUB

    rng = np.random.default_rng(1)
    n = 3 * SUB + 1234
    pre, *ms = (rng.standard_normal(n).astype(ml_dtypes.bfloat16) for _ in range(4))
    cuts = [0, 1000, SUB + 7, n]

    def stream(role):
        def gen():
            for a, b in zip(cuts, cuts[1:], strict=False):
                yield {"pre": pre[a:b], role: [m[a:b] for m in ms]}, None
        return gen

    vs = np.stack([(m.astype(np.float32) - pre.astype(np.float32)).astype(np.float64) for m in ms])
    want = vs @ vs.T
    got = [spherical.gram_stats(stream(r), n)["gram"] for r in ("models", "skills")]
    for g in got:
        assert g.shape == (3, 3) and np.array_equal(g, g.T)
        assert np.allclose(g, want, rtol=1e-12, atol=0)
    plain = spherical.gram_stats(lambda: iter([({"models": ms}, None)]), n)["gram"]  # no base: the models themselves
    mf = np.stack([m.astype(np.float64) for m in ms])
    assert np.allclose(plain, mf @ mf.T, rtol=1e-12, atol=0)
    # float64 inputs: the Gram of the float32 values the methods combine, not of the float64 ones
    m64 = [rng.standard_normal(n) * (1 + 1e-9) for _ in range(2)]
    g64 = spherical.gram_stats(lambda: iter([({"models": m64}, None)]), n)["gram"]
    r32 = np.stack([m.astype(np.float32).astype(np.float64) for m in m64])
    assert np.allclose(g64, r32 @ r32.T, rtol=1e-12, atol=0)
    exact = np.stack(m64)
    assert not np.allclose(g64, exact @ exact.T, rtol=1e-12, atol=0)


def test_ties_mergekit_keeps_exactly_k(ckpts):
    """convention mergekit: exactly int(density n) entries of each unit survive the trim, ties by flat index."""
    x = {"pre": np.zeros(10, np.float32), "skills": [np.array([1, 2, 2, 2, 3, -4, 0.5, 2, 5, 1], np.float32)]}
    stream = lambda: iter([(x, lambda: np.arange(10, dtype=np.uint64))])  # noqa: E731
    st = M.ties_unit_stats(stream, 10, density=0.5, convention="mergekit")
    thr, cut = st["exact"][0]
    assert thr == 2 and cut == 2  # 3 entries above 2 (3, -4, 5); keep 2 of the four 2s: indices 1 and 2
    ctx = M.Context(unit=st, flat_index=lambda: np.arange(10, dtype=np.uint64))
    out = M.ties(x, [1.0], ctx, density=0.5, convention="mergekit")
    assert np.count_nonzero(out) == 5 and out[1] == 2 and out[2] == 2 and out[3] == 0
    # zero vote: mergekit elects "+", ptm keeps nothing
    y = {"pre": np.zeros(2, np.float32), "skills": [np.array([1, 1], np.float32), np.array([-1, 1], np.float32)]}
    one = lambda: iter([(y, lambda: np.arange(2, dtype=np.uint64))])  # noqa: E731
    st = M.ties_unit_stats(one, 2, density=1.0, convention="mergekit")
    mk = M.ties(y, [1.0, 1.0], M.Context(unit=st), convention="mergekit")
    pt = M.ties(y, [1.0, 1.0], M.Context(), convention="ptm")
    assert mk[0] == 1 and pt[0] == 0


def test_convention_sets_normalize_and_options(tmp_path, ckpts):
    paths, trees = ckpts
    r = Recipe("linear", {"models": [paths["s1"], paths["s2"]]}, weights=[1.0, 3.0], convention="mergekit",
               out=str(tmp_path / "mk"))
    engine.merge(r, progress=False, summary=False)
    got = restore(r.out)
    n = "final_norm.scale"
    want = ((f32(trees["s1"][n]) + 3 * f32(trees["s2"][n])) / 4).astype(BF16)
    assert np.array_equal(got[n].view(np.uint16), want.view(np.uint16))


def test_bad_counts_and_options(ckpts):
    from ptm.errors import MergeError

    paths, _ = ckpts
    with pytest.raises(MergeError, match="exactly 2 models"):
        engine.plan([Recipe("slerp", {"models": [paths["s1"]]}, weights=0.5)])
    with pytest.raises(MergeError, match="takes no option"):
        engine.plan([Recipe("tsv", {"pre": paths["pre"], "skills": [paths["s1"]]}, method_options={"beta": 1})])
    with pytest.raises(MergeError, match="convention"):
        engine.plan([Recipe("ties", {"pre": paths["pre"], "skills": [paths["s1"]]}, method_options={
            "convention": "x"})])
