"""Training checkpoints store big arrays in <= 64 MiB chunks (stacked layers: one layer per chunk), so the merge
engine decodes pieces instead of whole 500 MB arrays; merging them gives the same bits as merging in memory."""

from __future__ import annotations

import numpy as np

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import stores as S
from ptm.merge import engine, methods
from ptm.merge.recipe import Recipe
from ptm.train.checkpoint import RunCheckpointer
from tests.merge.conftest import BF16

LIMIT = 64 << 20


def _tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(BF16)

    # Just over 64 MiB each in bf16: a stacked layer array and a plain (embedding-like) one; plus a small one.
    return {
        "layers": {"w": r(2, 4096, 4100)},
        "embed": {"embedding": r(8200, 4096)},
        "final_norm": {"scale": r(64)},
    }


def _save(run: str, tree: dict) -> None:
    ck = RunCheckpointer(run, save_every=1, async_save=False)
    meta = ckpt_format.make_meta({}, step=0)
    ck.save(0, {"params": tree, "opt_state": {"count": np.zeros((), np.int32)}}, None, meta, force=True)
    ck.manager.wait_until_finished()
    ck.manager.close()


def test_training_checkpoint_is_chunked_and_merges_exactly(tmp_path):
    trees = [_tree(i) for i in range(2)]
    runs = [str(tmp_path / f"run{i}") for i in range(2)]
    for run, t in zip(runs, trees, strict=True):
        _save(run, t)
    st = S.OrbaxStore(runs[0])
    st.tensors()
    chunk = {n: tuple(st._handle(n).chunk_layout.read_chunk.shape) for n in st.tensors()}
    assert chunk["layers.w"] == (1, 4096, 4100)  # one layer per chunk (axis 0 first)
    emb = chunk["embed.embedding"]
    assert np.prod(emb) * 2 <= LIMIT and emb[1] == 4096  # split along the leading axis only
    assert chunk["final_norm.scale"] == (64,)  # small arrays keep one chunk

    r = Recipe("task_arithmetic", {"pre": runs[0], "skills": [runs[1]]}, weights=0.3)
    out = engine.merge_to_tree(r)
    for key in ("layers", "embed"):
        name = next(iter(trees[0][key]))
        a, b = trees[0][key][name], trees[1][key][name]
        want = methods.task_arithmetic(
            {"pre": a.astype(np.float32), "skills": [b.astype(np.float32)]}, [0.3], methods.Context()
        ).astype(BF16)
        assert np.array_equal(out[key][name].view(np.uint16), want.view(np.uint16))
