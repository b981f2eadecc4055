"""Per-slice parameters in mergekit YAML (`slices[i].parameters`, `slices[i].sources[j].parameters`): each slice's
output layers take that slice's weights (a gradient interpolated within the slice), the embedding the first
slice's, the other non-layer tensors the last slice's; other parameters must agree across slices."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ptm.ckpt import stores
from ptm.errors import ConfigError
from ptm.merge import engine, mergekit_yaml

pytest.importorskip("transformers")


def _src(m, a, b, p=None):
    return {"model": m, "layer_range": [a, b], **({"parameters": p} if p else {})}


def test_translation_to_layer_schedules():
    cfg = {"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 0.1}, "slices": [
        {"sources": [_src("b", 0, 3), _src("x", 0, 3, {"weight": [0.0, 1.0]}), _src("y", 0, 3)],
         "parameters": {"weight": 0.7}},
        {"sources": [_src("b", 1, 3), _src("x", 1, 3, {"weight": 0.5}), _src("y", 1, 3)]}]}
    (r,) = mergekit_yaml.translate(cfg)
    # x: its own gradient in slice 0, 0.5 in slice 1; y: slice 0's slice-level 0.7, then the global 0.1
    assert r.weights == [{"layers": [0.0, 0.5, 1.0, 0.5, 0.5], "default": 0.5},
                         {"layers": [0.7, 0.7, 0.7, 0.1, 0.1], "default": 0.1}]
    assert r.overrides == [{"pattern": "re:embed", "weights": [0.0, 0.7]}]
    same = {**cfg, "slices": [{"sources": [_src("b", 0, 2), _src("x", 0, 2, {"weight": 0.3}), _src("y", 0, 2)]},
                              {"sources": [_src("b", 1, 3), _src("x", 1, 3, {"weight": 0.3}), _src("y", 1, 3)]}]}
    (r,) = mergekit_yaml.translate(same)  # the same weights in every slice: plain model-level weights
    assert r.weights == [0.3, 0.1] and r.overrides == []
    (r,) = mergekit_yaml.translate({"merge_method": "slerp", "base_model": "b", "slices": [
        {"sources": [_src("b", 0, 2), _src("x", 0, 2)], "parameters": {"t": [0.0, 1.0]}},
        {"sources": [_src("b", 2, 3), _src("x", 2, 3)], "parameters": {"t": 0.2}}]})
    assert r.weights == {"layers": [0.0, 1.0, 0.2], "default": 0.2} and r.overrides[0]["weights"] == 0.0
    (r,) = mergekit_yaml.translate({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.9}, "slices": [
        {"sources": [_src("b", 0, 2), _src("x", 0, 2)], "parameters": {"t": [0.1, 0.3]}}]})
    assert r.weights == {"anchors": [0.1, 0.3], "default": 0.1} and r.overrides == []  # one slice: its own t


def test_what_stays_refused_names_the_key():
    def two(p0, p1, sp1=None):
        return {"merge_method": "ties", "base_model": "b", "slices": [
            {"sources": [_src("b", 0, 1), _src("x", 0, 1, p0)]},
            {"sources": [_src("b", 1, 2), _src("x", 1, 2, p1)], **({"parameters": sp1} if sp1 else {})}]}

    for cfg, msg in [
        (two({"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.7}), "'density' of x differs"),
        (two({"density": 0.5}, {}, {"density": 0.7}), "'density'"),
        (two({"density": 0.5}, {"density": 0.5}, {"lambda": 2}), "unsupported parameter 'lambda'"),
        (two({"density": 0.5}, {"density": 0.5, "t": 2}), "unsupported parameter 't'"),
        (two({"density": 0.5}, {"density": 0.5}, {"weight": [{"filter": "mlp", "value": 2}]}), "filter"),
        ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [_src("b", 0, 1)], "foo": 1}]},
         r"slices\[0\]"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            mergekit_yaml.translate(cfg)


def _layer_src(name: str, n_out: int, slices: list[tuple[int, int]]) -> tuple[str, int]:
    """Output layer n of an HF tensor name -> (the source tensor name, its slice)."""
    m = re.search(r"layers\.(\d+)\.", name)
    j = int(m.group(1))
    for s, (a, b) in enumerate(slices):
        if j < b - a:
            return re.sub(r"layers\.\d+\.", f"layers.{a + j}.", name, count=1), s
        j -= b - a
    raise AssertionError(name)


def test_engine_applies_each_slices_weights(tmp_path):
    from tests.merge.test_mergekit import _deep
    from tests.merge.test_vocab import WORDS, _hf

    tok = _hf(tmp_path / "tok", 0, WORDS)
    d = [_deep(tmp_path / f"d{i}", i, tok) for i in range(3)]
    ranges = [(0, 3), (1, 3)]
    cfg = {"merge_method": "task_arithmetic", "base_model": d[0], "slices": [
        {"sources": [_src(d[0], 0, 3), _src(d[1], 0, 3, {"weight": [0.0, 1.0]}), _src(d[2], 0, 3, {"weight": 0.3})]},
        {"sources": [_src(d[0], 1, 3), _src(d[1], 1, 3, {"weight": 0.5}), _src(d[2], 1, 3, {"weight": [1.0, 0.2]})]}]}
    engine.merge(mergekit_yaml.translate(cfg, out=str(tmp_path / "o")), progress=False, summary=False)
    out, ins = stores.open_store(str(tmp_path / "o")), [stores.open_store(p) for p in d]
    w = [[[0.0, 0.5, 1.0], [0.5, 0.5]], [[0.3, 0.3, 0.3], [1.0, 0.2]]]  # per model, per slice, per layer
    assert sum(1 for n in out.tensors() if "q_proj" in n) == 5
    for n in out.tensors():
        if "layers." in n:
            src, s = _layer_src(n, 5, ranges)
            j = int(re.search(r"layers\.(\d+)\.", src).group(1)) - ranges[s][0]
            w1, w2 = w[0][s][j], w[1][s][j]
        else:  # the embedding: the first slice's first values; the rest: the last slice's
            src, (w1, w2) = n, ((0.0, 0.3) if "embed" in n else (0.5, 1.0))
        x0, x1, x2 = (np.asarray(st.read(src, ()), np.float32) for st in ins)
        want = x0 + np.float32(w1) * (x1 - x0) + np.float32(w2) * (x2 - x0)
        np.testing.assert_allclose(np.asarray(out.read(n, ()), np.float32), want, atol=1e-6, err_msg=n)
