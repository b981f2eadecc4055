"""Each method against an independent plain-numpy reference, through the real engine (Orbax in, Orbax out)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptm.merge import engine, methods
from ptm.merge.recipe import Recipe
from tests.merge.conftest import BF16, L, f32, restore


def bf16_close(got, ref):
    """Equal up to one bf16 rounding step (the reference rounds float32 math once; so does the engine)."""
    g, r = f32(got), f32(np.asarray(ref, np.float32).astype(BF16))
    ulp = np.maximum(np.abs(r), 1e-30) * 2.0**-7
    assert np.all(np.abs(g - r) <= ulp), float(np.max(np.abs(g - r) / ulp))


def run(tmp_path, recipe: Recipe, name="out"):
    recipe.out = str(tmp_path / name)
    engine.merge(recipe, progress=False, summary=False)
    return restore(recipe.out)


def test_task_arithmetic_multi_skill(tmp_path, ckpts):
    paths, t = ckpts
    r = Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"], paths["s2"]]},
        weights=[0.3, 0.7],
    )
    got = run(tmp_path, r)
    for n in t["pre"]:
        ref = (
            f32(t["general"][n])
            + 0.3 * (f32(t["s1"][n]) - f32(t["pre"][n]))
            + 0.7 * (f32(t["s2"][n]) - f32(t["pre"][n]))
        )
        assert got[n].dtype == BF16
        bf16_close(got[n], ref)


def test_linear_interpolation_and_wise_ft(tmp_path, ckpts):
    paths, t = ckpts
    got = run(
        tmp_path,
        Recipe(
            "linear_interpolation",
            {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
            weights=0.25,
            output_dtype="float32",
        ),
    )
    for n in t["pre"]:
        p = f32(t["pre"][n])
        ref = p + 0.25 * (f32(t["s1"][n]) - p) + 0.75 * (f32(t["general"][n]) - p)
        assert got[n].dtype == np.float32
        np.testing.assert_allclose(got[n], ref, rtol=1e-6, atol=1e-6)
    got = run(
        tmp_path,
        Recipe(
            "wise_ft", {"general": paths["general"], "cft": paths["cft"]}, weights=0.4, output_dtype="float32"
        ),
        "w",
    )
    for n in t["pre"]:
        g = f32(t["general"][n])
        np.testing.assert_allclose(got[n], g + 0.4 * (f32(t["cft"][n]) - g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_soup(tmp_path, ckpts, normalize):
    paths, t = ckpts
    got = run(
        tmp_path,
        Recipe(
            "linear",
            {"models": [paths["s1"], paths["s2"], paths["cft"]]},
            weights=[0.5, 1.0, 1.5],
            normalize=normalize,
            output_dtype="float32",
        ),
    )
    for n in t["pre"]:
        ref = 0.5 * f32(t["s1"][n]) + 1.0 * f32(t["s2"][n]) + 1.5 * f32(t["cft"][n])
        np.testing.assert_allclose(got[n], ref / 3.0 if normalize else ref, rtol=1e-5, atol=1e-5)


def ties_ref(pre, skills, w, density, normalize=True):
    taus = []
    for s in skills:
        tau = f32(s) - f32(pre)
        k = math.ceil(density * tau.size)
        thr = np.sort(np.abs(tau).ravel())[::-1][k - 1]
        taus.append(np.where(np.abs(tau) >= thr, tau, 0) * w[len(taus)])
    taus = np.stack(taus)
    sign = np.sign(taus.sum(0))
    agree = (np.sign(taus) == sign) & (taus != 0)
    mixed = (taus * agree).sum(0)
    div = (np.asarray(w)[:, None] * agree.reshape(len(w), -1)).sum(0).reshape(mixed.shape)
    if normalize:
        div[np.abs(div) < 1e-8] = 1
        mixed = mixed / div
    return mixed


def test_ties(tmp_path, ckpts):
    paths, t = ckpts
    got = run(
        tmp_path,
        Recipe(
            "ties",
            {"pre": paths["pre"], "skills": [paths["s1"], paths["s2"]]},
            weights=[1.0, 0.5],
            density=0.3,
            output_dtype="float32",
        ),
    )
    for n in t["pre"]:
        ref = f32(t["pre"][n]) + ties_ref(t["pre"][n], [t["s1"][n], t["s2"][n]], [1.0, 0.5], 0.3)
        np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=1e-6)


def test_kth_largest_abs_exact():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_001).astype(np.float32)
    for k in (1, 17, 5000, 10_001):
        blocks = [x[i : i + 999] for i in range(0, x.size, 999)]
        assert methods.kth_largest_abs(lambda b=blocks: iter(b), k) == np.sort(np.abs(x))[::-1][k - 1]


def test_dare_statistics_and_reproducibility(tmp_path, ckpts):
    paths, t = ckpts
    rec = dict(weights=1.0, drop_rate=0.4, output_dtype="float32", seed=7)
    a = run(tmp_path, Recipe("dare", {"pre": paths["pre"], "skills": [paths["s1"]]}, **rec), "a")
    b = run(tmp_path, Recipe("dare", {"pre": paths["pre"], "skills": [paths["s1"]]}, **rec), "b")
    c = run(
        tmp_path, Recipe("dare", {"pre": paths["pre"], "skills": [paths["s1"]]}, **{**rec, "seed": 8}), "c"
    )
    n = "embed.embedding"
    assert np.array_equal(a[n], b[n]) and not np.array_equal(a[n], c[n])
    pre, tau = f32(t["pre"][n]), f32(t["s1"][n]) - f32(t["pre"][n])
    kept = ~np.isclose(a[n], pre, atol=0, rtol=0)
    assert abs(kept.mean() - 0.6) < 0.05
    # the reference: the same counter-based mask, computed on the whole tensor at once
    u = methods.uniform_from_index(7, n, 0, np.arange(tau.size, dtype=np.uint64)).reshape(tau.shape)
    np.testing.assert_allclose(a[n], pre + np.where(u >= 0.4, tau / 0.6, 0), rtol=1e-6, atol=1e-6)


def test_overrides_and_layer_schedule(tmp_path, ckpts):
    paths, t = ckpts
    sched = [0.1, 0.5, 0.9]
    r = Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]},
        weights={"layers": sched, "default": 0.2},
        overrides=[
            {"pattern": "layers.attention.*", "weights": 0.0},
            {"pattern": "re:^embed\\.", "weights": 1.0},
        ],
        output_dtype="float32",
    )
    got = run(tmp_path, r)
    for n in t["pre"]:
        g, tau = f32(t["general"][n]), f32(t["s1"][n]) - f32(t["pre"][n])
        if n.startswith("layers.attention."):
            w = np.zeros(L)
        elif n.startswith("embed."):
            w = 1.0
        elif n.startswith("layers."):
            w = np.array(sched)
        else:
            w = 0.2
        w = np.asarray(w, np.float32).reshape((-1,) + (1,) * (tau.ndim - 1)) if np.ndim(w) else np.float32(w)
        np.testing.assert_allclose(got[n], g + w * tau, rtol=1e-6, atol=1e-6)


def test_anchor_schedule_interpolates():
    from ptm.merge.recipe import schedule_values

    vals, default = schedule_values({"anchors": [0.0, 1.0]}, 5, "t")
    np.testing.assert_allclose(vals, [0, 0.25, 0.5, 0.75, 1.0])
    assert default == pytest.approx(0.5)


def test_heuristic_omega(tmp_path, ckpts):
    paths, t = ckpts
    r = Recipe(
        "task_arithmetic",
        {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"], paths["s2"]]},
        weights="heuristic",
        output_dtype="float32",
    )
    got = run(tmp_path, r)
    n = "final_norm.scale"
    ref = (
        f32(t["general"][n])
        + 0.3 * (f32(t["s1"][n]) - f32(t["pre"][n]))
        + 0.05 * (f32(t["s2"][n]) - f32(t["pre"][n]))
    )
    np.testing.assert_allclose(got[n], ref, rtol=1e-6, atol=1e-6)


def test_merge_to_tree_matches_written_output(tmp_path, ckpts):
    paths, _ = ckpts
    r = Recipe(
        "ties", {"pre": paths["pre"], "skills": [paths["s1"], paths["s2"]]}, weights=[0.6, 0.9], density=0.5
    )
    tree = engine.merge_to_tree(r)
    got = run(tmp_path, r)
    from ptm.ckpt.tree import flatten

    for n, a in flatten(tree).items():
        assert np.array_equal(a.view(np.uint16), got[n].view(np.uint16)), n
