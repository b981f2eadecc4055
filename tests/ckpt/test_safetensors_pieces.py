"""SafetensorsWriter writes any piece of a tensor where it belongs: contiguous runs with pwrite, many short runs
through a mapped assignment; read back with the safetensors library, every tensor equals the array it came from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from safetensors.numpy import load_file

from ptm.ckpt.dtypes import BF16
from ptm.ckpt.stores import TensorInfo
from ptm.ckpt.writers import SafetensorsWriter, contiguous_runs


def _flat(shape, index) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)[index].ravel()


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 6), (2, 3, 4, 5)])
def test_runs_enumerate_exactly_the_piece_in_c_order(shape):
    rng = np.random.default_rng(len(shape))
    for _ in range(40):
        index = []
        for d in shape:
            a = int(rng.integers(0, d))
            index.append(slice(a, int(rng.integers(a + 1, d + 1))) if rng.random() < 0.6 else slice(None))
        index = tuple(index[: int(rng.integers(0, len(shape) + 1))])  # trailing axes may be left out
        got = contiguous_runs(shape, index, itemsize=1 << 20)  # big items: never the mapped fallback
        assert got is not None
        offsets, length = got
        flat = np.concatenate([np.arange(o, o + length) for o in offsets])
        np.testing.assert_array_equal(flat, _flat(shape, index), err_msg=f"{shape} {index}")


def test_many_short_runs_fall_back_to_a_mapped_write():
    assert contiguous_runs((64, 64), (slice(None), slice(0, 8)), itemsize=4) is None  # 64 runs of 32 bytes
    assert contiguous_runs((4, 64), (slice(None), slice(0, 8)), itemsize=4) == ([0, 64, 128, 192], 8)
    offsets, length = contiguous_runs((22, 2048, 5632), (slice(3, 4), slice(512, 1024)), itemsize=2)
    assert offsets == [(3 * 2048 + 512) * 5632] and length == 512 * 5632  # a stacked layer's piece: one pwrite
    assert contiguous_runs((), ()) == ([0], 1)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_pieces_of_every_kind_read_back_whole(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((4, 6, 40)).astype(dtype),  # pieces along axes 0 and 1: pwrite runs
        "b": rng.standard_normal((64, 64)).astype(dtype),  # pieces along the last axis: mapped fallback
        "c": np.asarray(rng.standard_normal(), dtype=dtype),  # a scalar
        "d": rng.standard_normal((5, 3)).astype(dtype),  # whole
    }
    pieces = {
        "a": [(slice(i, i + 1), slice(j, j + 3)) for i, j in itertools.product(range(4), (0, 3))],
        "b": [(slice(None), slice(c, c + 8)) for c in range(0, 64, 8)],
        "c": [()],
        "d": [(slice(None),)],
    }
    infos = [TensorInfo(n, a.shape, np.dtype(dtype)) for n, a in arrays.items()]
    out = tmp_path / "out"
    w = SafetensorsWriter(str(out), infos, overwrite=False, max_shard_bytes=4096)  # several files
    w.prepare()
    w.open()
    order = [(n, ix) for n, ixs in pieces.items() for ix in ixs]
    rng.shuffle(order)
    for n, ix in order:
        w.write(n, ix, arrays[n][ix])
    w.commit()
    back = {}
    for f in sorted(out.glob("*.safetensors")):
        back.update(load_file(str(f)))
    assert sorted(back) == sorted(arrays) and len(list(out.glob("*.safetensors"))) > 1
    for n, a in arrays.items():
        np.testing.assert_array_equal(back[n].reshape(-1).view(np.uint8), np.asarray(a).reshape(-1).view(np.uint8),
                                      err_msg=n)
        assert back[n].shape == a.shape, n


def test_chunk_shape_is_the_largest_exact_tiling_under_the_target():
    """Checked against the definition, by brute force over every divisor, on shapes like real tensors'."""
    from ptm.ckpt.writers import chunk_shape

    def brute(shard, itemsize, target):
        chunk = list(shard)
        for ax in range(len(chunk)):
            if np.prod(chunk, dtype=np.int64) * itemsize <= target:
                break
            rest = int(np.prod(chunk[ax + 1:], dtype=np.int64)) * itemsize
            fits = [d for d in range(1, chunk[ax] + 1) if chunk[ax] % d == 0 and d * rest <= target]
            chunk[ax] = max(fits, default=1)
        return tuple(max(c, 1) for c in chunk)

    rng = np.random.default_rng(0)
    dims = [0, 1, 2, 3, 7, 22, 97, 512, 2048, 5632, 32000, 32002, 128256]
    for _ in range(3000):
        shard = tuple(int(d) for d in rng.choice(dims, int(rng.integers(0, 4))))
        itemsize, target = int(rng.choice([1, 2, 4])), int(rng.choice([1, 1000, 1 << 16, 16 << 20, 1 << 30]))
        got = chunk_shape(shard, itemsize, target)
        assert got == brute(shard, itemsize, target), (shard, itemsize, target)
        assert all(d % c == 0 for d, c in zip(shard, got, strict=True) if d)
