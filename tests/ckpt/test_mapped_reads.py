"""Uncompressed Orbax arrays served from the mapped files (`ptm.ckpt.mapped`) are bit-identical to tensorstore's
reads of the same checkpoint, and everything the mapped reader cannot serve exactly (zstd, a missing or corrupt
chunk) is left to tensorstore, with its fill values and its errors."""

from __future__ import annotations

import json
import mmap
import os

import jax
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import mapped as M
from ptm.ckpt import stores as S
from ptm.errors import CheckpointError
from ptm.train.checkpoint import RunCheckpointer
from tests.merge.conftest import BF16

STEP = "checkpoints/0"


def _tree() -> dict:
    """bf16 weights, one of them sharded over 8 devices (8 chunks), float32/int32 leaves, values small enough
    to be stored inline in the OCDBT B+tree, and a scalar."""
    rng = np.random.default_rng(3)
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    big = rng.standard_normal((64, 256), dtype=np.float32).astype(BF16)
    return {
        "proj": {"w": jax.device_put(big, NamedSharding(mesh, PartitionSpec("d", None)))},
        "layers": {"u": rng.standard_normal((3, 40, 24), dtype=np.float32).astype(BF16)},
        "embed": {"embedding": rng.standard_normal((50, 24), dtype=np.float32).astype(BF16)},
        "norm": {"scale": rng.standard_normal((24,), dtype=np.float32).astype(BF16)},  # 48 bytes: inline
        "f32": rng.standard_normal((5, 7), dtype=np.float32),
        "count": np.arange(6, dtype=np.int32),
        "scalar": np.float32(2.5),
    }


def _save(run, **kw) -> str:
    ck = RunCheckpointer(run, save_every=1, async_save=False, **kw)
    ck.save(0, {"params": _tree(), "opt_state": {"mu": np.ones((8,), np.float32)}}, None,
            ckpt_format.make_meta({}, step=0), force=True)
    ck.close()
    return str(run)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _indices(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Whole, inside one chunk, across chunks, empty."""
    if not shape:
        return [()]
    out = [(), (slice(0, 1),), (slice(shape[0] // 3, shape[0] - 1),), (slice(0, 0),)]
    if len(shape) > 1:
        out.append((slice(1, shape[0]), slice(shape[1] // 2, shape[1])))
    return out


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("raw") / "run")


def test_every_tensor_of_a_training_checkpoint_bit_identical_to_tensorstore(raw_run):
    fast, ref = S.OrbaxStore(raw_run), S.OrbaxStore(raw_run, mapped=False)
    infos = fast.tensors()
    assert fast.mapped() == sorted(infos)  # every params array qualifies
    assert ref.mapped() == []
    assert all(fast.reads_are_views(n) and not ref.reads_are_views(n) for n in infos)
    assert fast._chunk_of["proj.w"] == (8, 256)  # noqa: SLF001 sharded: one chunk per device
    for name, info in infos.items():
        for idx in _indices(info.shape):
            got, want = fast.read(name, idx), ref.read(name, idx)
            assert _same(got, want), (name, idx)
    t = _tree()
    assert _same(fast.read("proj.w", ()), np.asarray(t["proj"]["w"]))
    assert _same(fast.read("scalar", ()), np.asarray(t["scalar"]))


def test_pieces_are_views_of_the_mapped_data_file(raw_run):
    st = S.OrbaxStore(raw_run)
    st.tensors()
    v = st.read("proj.w", (slice(8, 12), slice(0, 256)))  # inside chunk 1 (4 KiB: not inline)
    assert not v.flags.owndata and not v.flags.writeable
    base = v
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap)  # file-backed pages, not a private buffer
    assert not st._cells  # noqa: SLF001 no tensorstore chunk held
    across = st.read("proj.w", (slice(6, 20),))  # spans three chunks: assembled
    assert across.flags.owndata and _same(across, np.asarray(_tree()["proj"]["w"])[6:20])


def test_zstd_params_fall_back_to_tensorstore(tmp_path):
    run = _save(tmp_path / "z", compress_params=True)
    st = S.OrbaxStore(run)
    infos = st.tensors()
    assert st.mapped() == []  # zstd: nothing is raw
    assert not any(st.reads_are_views(n) for n in infos)
    ref = S.OrbaxStore(_save(tmp_path / "raw"), mapped=False)
    for name in infos:
        assert _same(st.read(name, ()), ref.read(name, ()))


def _ocdbt_kv(params):
    return ts.KvStore.open({"driver": "ocdbt", "base": S.kvstore_url(params)}).result()


def test_missing_chunk_reads_the_fill_value_like_tensorstore(tmp_path):
    """An OCDBT array with a declared fill value and one chunk left out (a writer that skips fill chunks):
    the gap reads as the fill value, the stored chunks are still mapped."""
    run = _save(tmp_path / "r")
    params = tmp_path / "r" / STEP / "params"
    kv = _ocdbt_kv(params)
    z = json.loads(kv["proj.w/.zarray"])
    z["fill_value"] = 0.5
    kv["proj.w/.zarray"] = json.dumps(z).encode()
    del kv["proj.w/2.0"]
    md = json.loads((params / "_METADATA").read_text())
    md["store_array_data_equal_to_fill_value"] = False
    (params / "_METADATA").write_text(json.dumps(md))
    fast, ref = S.OrbaxStore(run), S.OrbaxStore(run, mapped=False)
    fast.tensors()
    assert "proj.w" in fast.mapped()
    whole = fast.read("proj.w", ())
    assert _same(whole, ref.read("proj.w", ()))
    assert (whole[16:24].astype(np.float32) == 0.5).all()
    assert _same(whole[:16], np.asarray(_tree()["proj"]["w"])[:16])
    assert not fast.read("proj.w", (slice(0, 8),)).flags.owndata  # a stored chunk: still a mapped view


def test_missing_chunk_without_fill_value_is_refused(tmp_path):
    run = _save(tmp_path / "r")
    params = tmp_path / "r" / STEP / "params"
    del _ocdbt_kv(params)["proj.w/3.0"]
    st = S.OrbaxStore(run)
    st.tensors()
    assert _same(st.read("proj.w", (slice(0, 8),)), np.asarray(_tree()["proj"]["w"])[:8])
    with pytest.raises(CheckpointError, match=r"tensor 'proj.w': chunk \{3, 0\} .* is missing"):
        st.read("proj.w", (slice(24, 32),))


def test_truncated_data_file_is_an_error_not_garbage(tmp_path):
    run = _save(tmp_path / "r")
    params = str(tmp_path / "r" / STEP / "params")
    index = M.ocdbt_index(params)
    refs = [(k, r) for k, r in index.items() if isinstance(r, M.ChunkRef) and not k.endswith(b".zarray")]
    key, last = max(refs, key=lambda kr: (kr[1].file, kr[1].offset))
    with open(last.file, "r+b") as f:
        f.truncate(last.offset + last.length - 2)
    st = S.OrbaxStore(run)
    name = key.decode().split("/")[0]
    st.tensors()
    with pytest.raises(CheckpointError, match=rf"tensor '{name}'"):
        st.read(name, ())


def test_ocdbt_index_walks_a_multi_level_btree(tmp_path):
    """Small nodes force interior B+tree nodes (keys stored without their subtree's common prefix); every key's
    located bytes equal what the OCDBT kvstore reads."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": S.kvstore_url(tmp_path / "db"),
                          "config": {"max_decoded_node_bytes": 256, "max_inline_value_bytes": 8}}).result()
    want = {}
    with ts.Transaction() as txn:
        for i in range(300):
            key = f"arr{i % 7}/chunk.{i:04d}".encode()
            want[key] = bytes([i % 251]) * (3 + i % 40)
            kv.with_transaction(txn)[key] = want[key]
    index = M.ocdbt_index(str(tmp_path / "db"))
    height = ts.ocdbt.dump(kv.base).result()["versions"][-1]["root_height"]
    assert height >= 1
    files = M.Files()
    got = {}
    for k, r in index.items():
        if isinstance(r, bytes):
            got[k] = r
        else:
            got[k] = bytes(files.get(r.file)[r.offset:r.offset + r.length])
    assert got == want
    assert any(isinstance(r, bytes) for r in index.values()) and any(
        isinstance(r, M.ChunkRef) for r in index.values())


def test_plain_zarr_layout_is_mapped_too(tmp_path):
    """ptm's merge outputs (one file per chunk, no OCDBT) qualify as well."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 6), dtype=np.float32)
    d = tmp_path / "p"
    spec = {"driver": "zarr", "kvstore": S.kvstore_url(d / "a"), "create": True,
            "metadata": {"shape": [20, 6], "chunks": [8, 6], "dtype": "<f4", "compressor": None,
                         "fill_value": None, "order": "C", "dimension_separator": "."}}
    ts.open(spec).result().write(a).result()
    md = {"tree_metadata": {"('a',)": {"key_metadata": [{"key": "a", "key_type": 2}],
                                       "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}},
          "use_ocdbt": False, "use_zarr3": False, "store_array_data_equal_to_fill_value": True}
    (d / "_METADATA").write_text(json.dumps(md))
    st = S.OrbaxStore(d)
    st.tensors()
    assert st.mapped() == ["a"]
    assert _same(st.read("a", ()), a) and _same(st.read("a", (slice(17, 20),)), a[17:])
    os.remove(d / "a" / "1.0")
    with pytest.raises(CheckpointError, match=r"chunk \{1, 0\}"):
        st.read("a", (slice(8, 16),))


@pytest.mark.parametrize("md", [
    {"zarr_format": 2, "compressor": {"id": "zstd"}, "dtype": "<f4", "chunks": [2], "order": "C"},
    {"zarr_format": 2, "compressor": None, "filters": [{"id": "delta"}], "dtype": "<f4", "chunks": [2]},
    {"zarr_format": 2, "compressor": None, "dtype": "<f4", "chunks": [2], "order": "F"},
    {"zarr_format": 2, "compressor": None, "dtype": ">f4", "chunks": [2], "order": "C"},
    {"zarr_format": 3, "codecs": [{"name": "bytes"}], "dtype": "<f4", "chunks": [2]},
    {"zarr_format": 2, "compressor": None, "dtype": "|b1", "chunks": [2], "order": "C"},
    {"zarr_format": 2, "compressor": None, "dtype": "<f4", "chunks": [2, 2], "order": "C"},
])
def test_layouts_that_are_not_raw_bytes_are_refused(md):
    assert M.raw_layout(md, np.dtype(md["dtype"].replace(">", "<")), (4,)) is None
    ok = {"zarr_format": 2, "compressor": None, "dtype": "<f4", "chunks": [2], "order": "C"}
    assert M.raw_layout(ok, np.dtype("<f4"), (4,)) is not None


def test_gcs_checkpoint_reads_through_tensorstore(gcs_bucket, raw_run):
    """gs:// has no files to map: the same training checkpoint there reads through tensorstore, identically."""
    run = _save(f"{gcs_bucket}/run")
    remote, local = S.OrbaxStore(run), S.OrbaxStore(raw_run)
    infos = remote.tensors()
    assert remote.mapped() == [] and local.mapped() == sorted(infos)
    assert not any(remote.reads_are_views(n) for n in infos)
    for name in infos:
        assert _same(remote.read(name, ()), local.read(name, ()))


def test_merges_from_mapped_inputs_equal_tensorstore_inputs(tmp_path):
    """The engine on mapped training checkpoints, unsharded and sharded over 8 devices (pieces that cut across
    the stored chunks), gives the same bits as on the same checkpoints read through tensorstore."""
    from ptm.merge import engine
    from ptm.merge.recipe import Recipe

    runs = {}
    for i, n in enumerate(("pre", "general", "skill")):
        t = jax.tree.map(lambda a, i=i: (np.asarray(a, np.float32) + i).astype(np.asarray(a).dtype), _tree())
        ck = RunCheckpointer(tmp_path / n, save_every=1, async_save=False)
        ck.save(0, {"params": t, "opt_state": {"mu": np.ones((8,), np.float32)}}, None,
                ckpt_format.make_meta({}, step=0), force=True)
        ck.close()
        runs[n] = str(tmp_path / n)
    r = Recipe("task_arithmetic", {"pre": runs["pre"], "general": runs["general"], "skills": [runs["skill"]]},
               weights=0.3)
    ref = engine.merge_to_tree(r, store_cache={p: S.OrbaxStore(p, mapped=False) for p in runs.values()})
    cache = {p: S.OrbaxStore(p) for p in runs.values()}
    got = engine.merge_to_tree(r, store_cache=cache)
    assert all(s.mapped() for s in cache.values())
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    sharded = engine.merge_to_tree(r, mesh=mesh, store_cache=cache)
    flat = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    for path, want in flat.items():
        node_g, node_s = got, sharded
        for k in path:
            node_g, node_s = node_g[k.key], node_s[k.key]
        assert _same(node_g, want) and _same(np.asarray(node_s), want), path


def test_open_maps_are_bounded_and_views_outlive_them(tmp_path):
    files = M.Files(keep=2)
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 16)
    views = [np.frombuffer(files.get(str(tmp_path / f"f{i}")), np.uint8) for i in range(5)]
    assert len(files._maps) == 2  # noqa: SLF001 (each map holds a file descriptor)
    assert [int(v[0]) for v in views] == [0, 1, 2, 3, 4]  # evicted maps stay valid while a view uses them


def _orbax_dir(d, names) -> None:
    """The `_METADATA` that makes `d` an Orbax PyTree checkpoint of the zarr arrays `names` (written here)."""
    tree = {str((n,)): {"key_metadata": [{"key": n, "key_type": 2}],
                        "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}} for n in names}
    md = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True}
    (d / "_METADATA").write_text(json.dumps(md))


@pytest.mark.parametrize("at", ["end", "start"])
def test_zarr3_shards_with_several_inner_chunks(tmp_path, at):
    """zarr3 `sharding_indexed` (what Orbax writes with use_zarr3): inner chunks are located through the shard's
    CRC-checked index; an inner chunk left out reads as the fill value, a corrupt index is tensorstore's error."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((20, 12), dtype=np.float32)
    d = tmp_path / "z3"
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    spec = {"driver": "zarr3", "kvstore": S.kvstore_url(d / "a"), "create": True, "metadata": {
        "shape": [20, 12], "data_type": "float32", "fill_value": 0.5,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 12]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [4, 6], "codecs": raw, "index_codecs": [*raw, {"name": "crc32c"}],
            "index_location": at}}]}}
    arr = ts.open(spec).result()
    for region in [(slice(0, 4), slice(None)), (slice(4, 8), slice(0, 6)), (slice(8, 20), slice(None))]:
        arr[region].write(a[region]).result()  # inner chunk (1, 1) of shard (0, 0) is never written
    _orbax_dir(d, ["a"])
    want = a.copy()
    want[4:8, 6:12] = 0.5
    fast, ref = S.OrbaxStore(d), S.OrbaxStore(d, mapped=False)
    assert fast.mapped() == ["a"] and fast._chunk_of["a"] == (4, 6)  # noqa: SLF001
    for idx in [(), (slice(0, 4), slice(6, 12)), (slice(16, 20), slice(0, 6)), (slice(3, 17), slice(2, 11))]:
        assert _same(fast.read("a", idx), ref.read("a", idx)) and _same(fast.read("a", idx), want[idx]), idx
    assert not fast.read("a", (slice(8, 12), slice(6, 12))).flags.owndata  # inside an inner chunk: a view
    shard = d / "a" / "c" / "1" / "0"
    b = bytearray(shard.read_bytes())
    i0 = len(b) - (4 * 16 + 4) if at == "end" else 0  # the index: 4 inner chunks x (offset, length), CRC-32C
    b[i0:i0 + 32] = b[i0 + 16:i0 + 32] + b[i0:i0 + 16]  # swap two entries: in bounds, but the wrong chunks
    shard.write_bytes(bytes(b))
    again = S.OrbaxStore(d)
    again.tensors()
    with pytest.raises(CheckpointError, match="tensor 'a'"):
        again.read("a", (slice(8, 12), slice(0, 6)))


def test_orbax_zarr3_checkpoint_bit_identical(tmp_path):
    import orbax.checkpoint as ocp

    t = _tree()
    for comp in (False, True):
        d = tmp_path / f"z3-{comp}"
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=comp)).save(
            d, args=ocp.args.PyTreeSave(t))
        fast, ref = S.OrbaxStore(d), S.OrbaxStore(d, mapped=False)
        infos = fast.tensors()
        assert fast.mapped() == ([] if comp else sorted(infos))  # zstd inside the shards: tensorstore
        for name, info in infos.items():
            for idx in _indices(info.shape):
                assert _same(fast.read(name, idx), ref.read(name, idx)), (comp, name, idx)
