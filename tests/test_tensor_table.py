"""The model's tensor table (ptm.ckpt.tree) is what the flax model actually creates: names, shapes, logical axes."""

from __future__ import annotations

import pytest

from ptm.ckpt.tree import flatten, tensor_table
from ptm.model.config import from_preset
from ptm.model.llama import abstract_params, logical_axes


@pytest.mark.parametrize("name,tie", [("tiny", False), ("tiny", True), ("llama2_7b", False), ("toy_2m", False)])
def test_tensor_table_matches_the_model(name, tie):
    cfg = from_preset(name, tie_embeddings=tie)
    table = tensor_table(cfg)
    shapes = {n: tuple(a.shape) for n, a in flatten(abstract_params(cfg)).items()}
    axes = {n: tuple(spec) for n, spec in flatten(logical_axes(cfg)).items()}
    assert shapes == {n: s.shape for n, s in table.items()}
    assert axes == {n: s.axes for n, s in table.items()}
    assert ("lm_head.kernel" in table) is (not tie)
