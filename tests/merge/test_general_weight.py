"""A weight on the base-side model (`general_weight`: anchor = pre + w_G (general - pre)) for task arithmetic,
TIES and DARE; w_G = 1 stays bit-identical to the plain anchor, and without a general input it is an error."""

from __future__ import annotations

import numpy as np
import pytest

from ptm.errors import MergeError
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from tests.merge.conftest import f32, restore


def test_general_weight(ckpts, tmp_path):
    for method in ("task_arithmetic", "ties", "dare"):  # one fixture for all three: it is the slow part
        _check(ckpts, tmp_path / method, method)


def _check(ckpts, tmp_path, method: str) -> None:
    paths, t = ckpts
    inputs = {"pre": paths["pre"], "general": paths["general"], "skills": [paths["s1"]]}
    opts = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare": {"drop_rate": 0.3}}[method]
    outs = {}
    for wg in (1.0, 0.4):
        r = Recipe(method, inputs, weights=0.7, out=str(tmp_path / f"o{wg}"), output_dtype="float32",
                   method_options={**opts, "general_weight": wg})
        engine.merge(r, progress=False, summary=False)
        outs[wg] = restore(r.out)
    n = "layers.mlp.w_up"
    pre, g = f32(t["pre"][n]), f32(t["general"][n])
    # the same sparsified task vector on top of either anchor: the difference is exactly (w_G - 1)(G - pre)
    np.testing.assert_allclose(outs[0.4][n] - outs[1.0][n], np.float32(0.4 - 1) * (g - pre), atol=2e-6)
    if method == "task_arithmetic":
        want = pre + np.float32(0.4) * (g - pre) + np.float32(0.7) * (f32(t["s1"][n]) - pre)
        np.testing.assert_allclose(outs[0.4][n], want, atol=1e-6)
        plain = Recipe(method, inputs, weights=0.7, out=str(tmp_path / "plain"), output_dtype="float32")
        engine.merge(plain, progress=False, summary=False)
        assert np.array_equal(restore(plain.out)[n], outs[1.0][n])


def test_general_weight_needs_general(ckpts, tmp_path):
    paths, _ = ckpts
    r = Recipe("task_arithmetic", {"pre": paths["pre"], "skills": [paths["s1"]]}, weights=0.5,
               out=str(tmp_path / "o"), method_options={"general_weight": 0.5})
    with pytest.raises(MergeError, match="general_weight"):
        engine.merge(r, progress=False, summary=False)
    assert not (tmp_path / "o").exists()
