"""Tensors whose leading axis has no useful divisor (a 32002-row embedding: 2 x 16001) are cut into ~16 MiB pieces
with a ragged last one, not into one-row pieces; Orbax outputs restore exactly, sharded or not."""

from __future__ import annotations

import numpy as np

from ptm.merge import engine
from ptm.merge.recipe import Recipe
from tests.merge.conftest import restore, save_orbax


def test_piece_shape():
    assert engine.piece_shape((32002, 2048)) == (2048, 2048)  # exact divisors would give (2, 2048)
    assert engine.piece_shape((32000, 2048)) == (2000, 2048)  # a good divisor: unchanged
    assert engine.piece_shape((22, 2048, 5632)) == (1, 512, 5632)
    assert engine.piece_shape((32002, 2048), (64004, 2048)) == (2, 2048)  # split across devices: exact only


def test_prime_rows_merge_exactly(tmp_path):
    import jax

    rng = np.random.default_rng(0)
    trees = [{"embed": {"embedding": rng.standard_normal((4099, 1024), np.float32)}} for _ in range(2)]
    a, b = (save_orbax(tmp_path / n, t) for n, t in zip("ab", trees, strict=True))
    outs = []
    for i, mesh in enumerate([None, jax.make_mesh((8,), ("d",))]):
        r = Recipe("linear", {"models": [a, b]}, weights=[0.25, 0.75], out=str(tmp_path / f"o{i}"))
        engine.merge(r, mesh=mesh, progress=False, summary=False)
        outs.append(restore(r.out)["embed.embedding"])
    want = np.float32(0.25) * trees[0]["embed"]["embedding"] + np.float32(0.75) * trees[1]["embed"]["embedding"]
    assert np.array_equal(outs[0], want) and np.array_equal(outs[1], want)
