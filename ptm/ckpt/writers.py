"""Output writers: a ptm model checkpoint (Orbax per-tensor zarr) or a safetensors model dir (one file or
Hugging Face shards with an index), written tensor by tensor (or piece by piece) and committed through
`ptm.ckpt.placement`, so an output appears complete or not at all. Life cycle:
`prepare(is_leader) -> open() -> write()* -> flush() -> commit(meta, is_leader) | abort()`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import placement
from ptm.ckpt.dtypes import BF16, safetensors_name
from ptm.ckpt.stores import ST_INDEX, ST_SINGLE, Index, TensorInfo, gcs_fs, is_gcs, kvstore_url

_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
MAX_PENDING = 4  # pieces in flight per output: bounds the memory held by asynchronous writes


def chunk_shape(shard: Sequence[int], itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """Largest chunk that tiles `shard` exactly and holds at most `target_bytes` (splitting leading axes first).

    Chunks divide the shard, so a shard never shares a chunk with another: each process writes whole chunks only.
    """
    chunk = list(shard)
    for ax in range(len(chunk)):
        if math.prod(chunk) * itemsize <= target_bytes:
            break
        rest = math.prod(chunk[ax + 1 :]) * itemsize
        chunk[ax] = _largest_divisor(chunk[ax], target_bytes // rest)
    return tuple(max(c, 1) for c in chunk)


def _largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of `n` that is at most `cap`, else 1 (pairs up to sqrt(n): called for every unit)."""
    best, i = 1, 1
    while i * i <= n:
        if n % i == 0:
            best = max([best, *(d for d in (i, n // i) if d <= cap)])
        i += 1
    return best


MIN_RUN_BYTES = 64 << 10  # below this (with more than MAX_SMALL_RUNS runs) a mapped write beats many pwrites
MAX_SMALL_RUNS = 16


def contiguous_runs(shape: Sequence[int], index: Index, itemsize: int = 1) -> tuple[list[int], int] | None:
    """Where the piece `index` (unit-step slices, C order) of an array of `shape` lies in its row-major bytes:
    (element offset of each run, elements per run), the runs in the piece's own C order; None when there are more
    than MAX_SMALL_RUNS runs shorter than MIN_RUN_BYTES (`itemsize` bytes per element)."""
    n = len(shape)
    if n == 0:
        return [0], 1
    sl = [(s.start or 0, d if s.stop is None else s.stop)
          for s, d in zip(tuple(index) + (slice(None),) * (n - len(index)), shape, strict=True)]
    k = max((j for j, (a, b) in enumerate(sl) if (a, b) != (0, shape[j])), default=0)
    stride = [math.prod(shape[j + 1:]) for j in range(n)]
    length = (sl[k][1] - sl[k][0]) * stride[k]
    outer = [range(a, b) for a, b in sl[:k]]
    count = math.prod(len(r) for r in outer)
    if count > MAX_SMALL_RUNS and length * itemsize < MIN_RUN_BYTES:
        return None
    base = sl[k][0] * stride[k]
    offsets = [base]
    for j, r in enumerate(outer):  # expand axis by axis, outer axes first: the piece's C order
        offsets = [o + i * stride[j] for o in offsets for i in r]
    return offsets, length

class OutputWriter:
    """Writes one output at `path`, staged where `ptm.ckpt.placement` says."""

    path: str
    inputs: Sequence[str] = ()

    def prepare(self, is_leader: bool) -> None: ...
    def open(self) -> None: ...
    def write(self, name: str, index: Index, arr: np.ndarray) -> None: ...
    def flush(self) -> None: ...
    def commit(self, meta: dict[str, Any], is_leader: bool) -> None: ...
    def abort(self) -> None: ...


class OrbaxWriter(OutputWriter):
    """A ptm model checkpoint (`params/` Orbax PyTree in the non-OCDBT zarr layout, `ptm/metadata`).

    Orbax's restore reads this layout natively; it is used because each tensor (each chunk) is an independent
    file, so tensors can be written one by one and processes can write disjoint chunks without coordination.
    """

    def __init__(self, path: str, infos: list[TensorInfo], chunks: dict[str, tuple[int, ...]],
                 keys: dict[str, list[dict[str, Any]]], overwrite: bool, inputs: Sequence[str] = ()):
        self.path = str(path).rstrip("/")
        self.infos, self.chunks, self.keys, self.overwrite = infos, chunks, keys, overwrite
        self.inputs = list(inputs)
        self.work = placement.staging_path(self.path)
        self._arrays: dict[str, Any] = {}
        self._pending: list[Any] = []

    def prepare(self, is_leader: bool) -> None:
        self.work = placement.prepare(self.path, self.overwrite, self.inputs, is_leader)
        if is_leader:
            self._create_arrays(create=True)

    def _spec(self, info: TensorInfo, create: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {"driver": "zarr", "kvstore": kvstore_url(f"{self.work}/params/{info.name}")}
        if create:
            spec["metadata"] = {
                "shape": list(info.shape),
                "chunks": list(self.chunks[info.name]),
                "dtype": "bfloat16" if info.dtype == BF16 else info.dtype.str,
                "compressor": None,
                "fill_value": None,
                "order": "C",
                "dimension_separator": ".",
            }
            spec["create"] = True
        else:
            spec["open"] = True
        spec["store_data_equal_to_fill_value"] = True  # every chunk is a file: reruns give identical trees
        return spec

    def _create_arrays(self, create: bool) -> None:
        import tensorstore as ts

        futs = {i.name: ts.open(self._spec(i, create)) for i in self.infos}
        self._arrays = {n: f.result() for n, f in futs.items()}

    def open(self) -> None:
        if not self._arrays:
            self._create_arrays(create=False)

    def write(self, name: str, index: Index, arr: np.ndarray) -> None:
        self._pending.append(self._arrays[name][index].write(arr))
        if len(self._pending) > MAX_PENDING:
            self._pending.pop(0).result()

    def flush(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def commit(self, meta: dict[str, Any], is_leader: bool) -> None:
        self.flush()
        if not is_leader:
            return
        params = epath.Path(self.work) / ckpt_format.PARAMS_ITEM
        tree = {}
        for i in self.infos:
            keys = self.keys.get(i.name) or [{"key": k, "key_type": 2} for k in i.name.split(".")]
            tree[str(tuple(k["key"] for k in keys))] = {
                "key_metadata": keys,
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
        md = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
              "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        ckpt_format.write_meta(self.work, meta)
        (params / "_CHECKPOINT_METADATA").write_text(json.dumps(
            {"item_handlers": _PYTREE_HANDLER, "metrics": {}, "performance_metrics": {}, "custom_metadata": {}}))
        (params / "commit_success.txt").write_text("written by ptm")
        (params / "_METADATA").write_text(json.dumps(md))  # last: makes the checkpoint look complete
        placement.commit(self.work, self.path)

    def abort(self) -> None:
        self._pending.clear()
        placement.abort(self.work)


class SafetensorsWriter(OutputWriter):
    """A safetensors model dir: `model.safetensors`, or Hugging Face shards `model-0000k-of-0000n.safetensors`
    with `model.safetensors.index.json` when the tensors exceed `max_shard_bytes` (single process only).

    Shard boundaries and headers are fixed up front and the files pre-sized, so pieces can land in any order.
    Files are built in a local temp dir (for gs://, uploaded at commit: a GCS object appears only when its upload
    completes); `extra_files` (config.json, tokenizer files) are added at commit.
    """

    DROP_EVERY = 256 << 20  # bytes written between flush-and-drop-from-page-cache (see _drop_written)

    def __init__(self, path: str, infos: list[TensorInfo], overwrite: bool, *, max_shard_bytes: int | None = None,
                 inputs: Sequence[str] = ()):
        self.path = str(path).rstrip("/")
        self.infos, self.overwrite, self.inputs = infos, overwrite, list(inputs)
        self.gcs = is_gcs(self.path)
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for i in infos:
            if max_shard_bytes is not None and shards[-1] and size + i.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += i.nbytes
        k = len(shards)
        self.files = [ST_SINGLE] if k == 1 else [f"model-{n + 1:05d}-of-{k:05d}.safetensors" for n in range(k)]
        self._where: dict[str, tuple[int, int]] = {}  # tensor -> (file index, absolute byte offset)
        self._heads: list[bytes] = []
        self._sizes: list[int] = []
        for fi, sh in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for i in sh:
                header[i.name] = {"dtype": safetensors_name(i.dtype), "shape": list(i.shape),
                                  "data_offsets": [off, off + i.nbytes]}
                off += i.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
            head = struct.pack("<Q", len(raw)) + raw
            for i in sh:
                self._where[i.name] = (fi, len(head) + header[i.name]["data_offsets"][0])
            self._heads.append(head)
            self._sizes.append(len(head) + off)
        self.weight_map = {i.name: self.files[fi] for fi, sh in enumerate(shards) for i in sh}
        self.total = sum(i.nbytes for i in infos)
        self.stage = placement.staging_path(self.path)
        self.work = ""
        self._fds: list[int] = []
        self._unsynced = 0

    def prepare(self, is_leader: bool = True) -> None:
        self.stage = placement.prepare(self.path, self.overwrite, self.inputs, is_leader)
        self.work = tempfile.mkdtemp(prefix="ptm-st-") if self.gcs else self.stage
        os.makedirs(self.work, exist_ok=True)
        for name, head, size in zip(self.files, self._heads, self._sizes, strict=True):
            with open(f"{self.work}/{name}.partial", "wb") as fh:
                fh.write(head)
                fh.truncate(size)

    def open(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._by = {i.name: i for i in self.infos}
        self._fds = [os.open(f"{self.work}/{n}.partial", os.O_RDWR) for n in self.files]
        # Writes go to one background thread (pwrite releases the GIL), so writing overlaps with combining.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptm-st-write")
        self._pending: list[Any] = []

    def write(self, name: str, index: Index, arr: np.ndarray) -> None:
        self._pending.append(self._pool.submit(self._write, name, index, arr))
        if len(self._pending) > MAX_PENDING:
            self._pending.pop(0).result()

    def flush(self) -> None:
        while getattr(self, "_pending", None):
            self._pending.pop(0).result()

    def _write(self, name: str, index: Index, arr: np.ndarray) -> None:
        info = self._by[name]
        fi, start = self._where[name]
        item = info.dtype.itemsize
        runs = contiguous_runs(info.shape, index, item)
        if runs is None:  # many short runs (a piece split along the last axes): one mapped assignment
            mm = np.memmap(f"{self.work}/{self.files[fi]}.partial", dtype=info.dtype, mode="r+", offset=start,
                           shape=info.shape)
            mm[tuple(index)] = arr
            mm.flush()
            del mm
            return
        # Each run is one contiguous byte range of the file, written with pwrite: no mapped pages to fault in and
        # dirty (a (1, 512, 5632) piece of a stacked layer through np.memmap cost 10x the CPU of one pwrite).
        offsets, length = runs
        data = np.ascontiguousarray(arr, dtype=info.dtype).reshape(len(offsets), length).view(np.uint8)
        for r, off in enumerate(offsets):
            os.pwrite(self._fds[fi], data[r].data, start + off * item)
        self._drop_written(fi, arr.size * item)

    def _drop_written(self, fi: int, nbytes: int) -> None:
        """Every 256 MiB: flush this output to disk and drop its pages from the page cache. A sweep writes
        several model-sized outputs; left in the cache they evict the memory-mapped inputs, which are then
        read from disk again (measured: the 5-omega sweep spent most of its time re-faulting input pages)."""
        self._unsynced += nbytes
        if self._unsynced >= self.DROP_EVERY and hasattr(os, "posix_fadvise"):
            os.fdatasync(self._fds[fi])
            os.posix_fadvise(self._fds[fi], 0, 0, os.POSIX_FADV_DONTNEED)
            self._unsynced = 0

    def commit(self, meta: dict[str, Any] | None = None, is_leader: bool = True,
               extra_files: dict[str, bytes] | None = None) -> None:
        self.flush()
        self._pool.shutdown()
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        for n in self.files:
            os.rename(f"{self.work}/{n}.partial", f"{self.work}/{n}")
        for n, data in (extra_files or {}).items():
            with open(f"{self.work}/{n}", "wb") as f:
                f.write(data)
        if len(self.files) > 1:
            with open(f"{self.work}/{ST_INDEX}", "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)
        if self.gcs:
            fs = gcs_fs()
            names = sorted(os.listdir(self.work))
            for n in names:
                fs.put(f"{self.work}/{n}", f"{self.stage}/{n}")
            shutil.rmtree(self.work, ignore_errors=True)
        placement.commit(self.stage, self.path)

    def abort(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # no thread may write after the fd closes
            self._pending = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.work and self.work != self.stage:
            shutil.rmtree(self.work, ignore_errors=True)
        placement.abort(self.stage)
