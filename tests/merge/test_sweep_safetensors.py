"""A task-arithmetic sweep to safetensors (shared task vectors, background writes flushed and dropped from the
page cache as they go) gives, for every omega, the bits of methods.task_arithmetic on the whole tensors."""

from __future__ import annotations

import numpy as np

from ptm.ckpt import stores as S
from ptm.ckpt import writers as W
from ptm.merge import engine, methods
from ptm.merge.recipe import Recipe
from tests.merge.conftest import BF16, save_safetensors


def test_safetensors_sweep_matches_method(tmp_path, monkeypatch):
    monkeypatch.setattr(W.SafetensorsWriter, "DROP_EVERY", 1)  # flush + drop after every piece
    monkeypatch.setattr(engine, "PIECE_BYTES", 4096)  # many pieces per tensor, many queued writes
    trees = {}
    for i, n in enumerate(["pre", "g", "s1", "s2"]):
        rng = np.random.default_rng(i)
        trees[n] = {
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 48)).astype(BF16),
            "model.norm.weight": rng.standard_normal((48,)).astype(BF16),
        }
        save_safetensors(tmp_path / n, trees[n])
    inputs = {
        "pre": str(tmp_path / "pre"),
        "general": str(tmp_path / "g"),
        "skills": [str(tmp_path / "s1"), str(tmp_path / "s2")],
    }
    omegas = [0.1, 0.3, 1.0]
    # One pass: an omega sweep over s1 plus a two-skill recipe; all share the per-block task vectors.
    cases = [([w, 0.0], str(tmp_path / f"out-{w}")) for w in omegas] + [([0.7, -0.2], str(tmp_path / "two"))]
    engine.merge(
        [Recipe("task_arithmetic", dict(inputs), weights=ws, out=out) for ws, out in cases],
        progress=False,
        summary=False,
    )
    f32 = {n: {k: v.astype(np.float32) for k, v in t.items()} for n, t in trees.items()}
    for ws, out in cases:
        got = S.SafetensorsStore(out)
        for name in trees["pre"]:
            x = {"pre": f32["pre"][name], "general": f32["g"][name], "skills": [f32["s1"][name], f32["s2"][name]]}
            want = methods.task_arithmetic(x, ws, methods.Context()).astype(BF16)
            assert np.array_equal(np.asarray(got.read(name, ())).view(np.uint16), want.view(np.uint16)), (ws, name)
