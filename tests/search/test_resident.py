"""`ptm.merge.resident.weighted_sum_fn`, on its own: the jitted weighted sum of a stacked pool equals the merge
engine's in-memory merge (`engine.merge_to_tree`) of the same recipe bit for bit, with per-layer weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptm.ckpt.params import load_params
from ptm.ckpt.tree import flatten
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from ptm.merge.resident import weighted_sum_fn


def _u32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).view(np.uint32)


@pytest.mark.parametrize("kind", ["linear", "task_arithmetic"])
def test_weighted_sum_equals_engine_bit_for_bit(pool_dir, kind):
    members = pool_dir["members"]
    rows = members + ([pool_dir["base"]] if kind == "task_arithmetic" else [])
    flats = [flatten(load_params(p)[0]) for p in rows]
    names = list(flats[0])
    stacked = {k: jnp.asarray(np.stack([np.asarray(f[k]) for f in flats])) for k in names}
    infos = {k: np.asarray(flats[0][k]) for k in names}  # anything with .shape and .dtype
    n, n_layers = len(members), pool_dir["model"]["num_layers"]
    layer_group = [0, 1][:n_layers]  # one weight row per layer, then a row for everything else
    other = 2
    w = np.random.default_rng(3).uniform(-0.7, 1.3, (3, n)).astype(np.float32)
    fn = weighted_sum_fn(infos, n, kind, layer_group, other)
    got = fn(stacked, w, np.uint32(0))

    specs = [{"layers": [float(w[g, i]) for g in layer_group], "default": float(w[other, i])} for i in range(n)]
    inputs = {"models": members} if kind == "linear" else {"pre": pool_dir["base"], "skills": members}
    want = flatten(engine.merge_to_tree(Recipe(method=kind, inputs=inputs, weights=specs)))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert np.array_equal(_u32(got[k]), _u32(want[k])), k
    # a real merge, not a copy of the first row
    assert not np.array_equal(_u32(got["layers.mlp.w_up"]), _u32(flats[0]["layers.mlp.w_up"]))


def test_unknown_kind_is_refused():
    from ptm.errors import MergeError

    with pytest.raises(MergeError, match="kind 'ties'"):
        weighted_sum_fn({}, 1, "ties", [0], 0)
