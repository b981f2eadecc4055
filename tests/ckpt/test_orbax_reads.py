"""Orbax reads at safetensors speed: pieces are served as views of whole decoded chunks with the next chunk read
ahead, a bounded number of chunks is held, and any other piece layout still reads exactly. Training checkpoints
store params without zstd (optimizer state keeps it) and resume from either codec."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import stores as S
from ptm.train.checkpoint import RunCheckpointer
from tests.merge.conftest import BF16


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32)).astype(BF16)

    return {"layers": {"w": r(3, 40, 24)}, "embed": {"embedding": r(50, 24)}, "norm": {"scale": r(24)}}


def _save(run, tree, **kw) -> None:
    ck = RunCheckpointer(run, save_every=1, async_save=False, **kw)
    ck.save(0, {"params": tree, "opt_state": {"mu": np.ones((8,), np.float32)}}, None,
            ckpt_format.make_meta({}, step=0), force=True)
    ck.close()


def _codec(params_dir, name: str):
    h = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": S.kvstore_url(params_dir),
                                               "path": name + "/"}}).result()
    return h.spec().to_json()["metadata"]["compressor"]


def test_params_uncompressed_by_default_and_optional_zstd(tmp_path):
    t = _tree()
    _save(tmp_path / "raw", t)
    _save(tmp_path / "z", t, compress_params=True)
    step = "checkpoints/0"
    assert _codec(tmp_path / "raw" / step / "params", "layers.w") is None
    assert _codec(tmp_path / "z" / step / "params", "layers.w")["id"] == "zstd"
    assert _codec(tmp_path / "raw" / step / "opt_state", "mu")["id"] == "zstd"  # optimizer state: Orbax default
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for run in ("raw", "z"):  # both read back identically, through the store and through a training restore
        st = S.OrbaxStore(tmp_path / run)
        for n, a in (("layers.w", t["layers"]["w"]), ("embed.embedding", t["embed"]["embedding"])):
            assert np.array_equal(np.asarray(st.read(n, ())).view(np.uint16), a.view(np.uint16))
        ck = RunCheckpointer(tmp_path / run, save_every=1, async_save=False)
        abstract = {
            "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t),
            "opt_state": {"mu": jax.ShapeDtypeStruct((8,), np.float32, sharding=sh)},
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=sh),
        }
        state, meta = ck.restore(0, abstract, None)
        ck.close()
        assert meta["step"] == 0
        assert np.array_equal(np.asarray(state["params"]["layers"]["w"]).view(np.uint16),
                              t["layers"]["w"].view(np.uint16))


@pytest.fixture
def chunked(tmp_path):
    """An Orbax array with a 4 x 3 grid of chunks (written with tensorstore's own layout option)."""
    rng = np.random.default_rng(1)
    data = {"a": rng.standard_normal((40, 30)).astype(np.float32),
            "b": rng.standard_normal((12, 30)).astype(np.float32),
            "c": rng.standard_normal((7,)).astype(np.float32)}
    d = tmp_path / "ck"
    ocp.PyTreeCheckpointer().save(d, data, save_args={"a": ocp.SaveArgs(chunk_byte_size=10 * 10 * 4),
                                                      "b": ocp.SaveArgs(), "c": ocp.SaveArgs()})
    st = S.OrbaxStore(d)
    st.tensors()
    assert st._chunk_of["a"] == (10, 10)  # noqa: SLF001 (the layout the test relies on)
    return st, data


def test_pieces_inside_chunks_are_views_with_read_ahead(chunked):
    st, data = chunked
    # the engine's order: C order over the chunk grid, then the next tensor
    got = st.read_async("a", (slice(0, 5), slice(0, 10))).result()
    assert np.array_equal(got, data["a"][0:5, 0:10])
    assert got.base is not None and not got.flags.owndata  # a view of the decoded chunk, no copy
    assert set(st._cells) == {("a", (0, 0)), ("a", (0, 1))}  # noqa: SLF001 current + read ahead
    for i in range(4):
        for j in range(3):
            for r0 in (0, 5):
                idx = (slice(10 * i + r0, 10 * i + r0 + 5), slice(10 * j, 10 * j + 10))
                assert np.array_equal(st.read("a", idx), data["a"][idx])
                assert len(st._cells) <= S._CELLS_MAX  # noqa: SLF001 bounded
    assert ("b", (0, 0)) in st._cells  # noqa: SLF001 the last chunk of "a" read the next tensor ahead
    assert np.array_equal(st.read("b", (slice(3, 9), slice(None))), data["b"][3:9])
    assert np.array_equal(st.read("c", ()), data["c"])


def test_pieces_across_chunks_and_odd_indices_read_exactly(chunked):
    st, data = chunked
    for idx in [(slice(5, 25), slice(3, 27)), (), (slice(None), slice(29, 30)), (slice(39, 40),),
                (slice(0, 0), slice(None))]:
        want = data["a"][idx]
        assert np.array_equal(st.read("a", idx), want), idx
    with pytest.raises(ValueError, match="strided"):
        st.read("a", (slice(0, 10, 2),))
