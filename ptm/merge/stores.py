"""Tensor stores for the merge engine: read/write single tensors (or slices) without loading a whole model.

Two kinds, local or gs://:
- Orbax PyTree checkpoints (ptm model checkpoints and any Orbax pytree checkpoint): read with tensorstore
straight
  from the zarr arrays (OCDBT or not), names are the tree paths joined with `.`.
- Hugging Face safetensors (one file, a dir with `model.safetensors`, or sharded with
  `model.safetensors.index.json`): the header is parsed here (bf16 via ml_dtypes; `safetensors.numpy`
  refuses it),
  checked against the file size, and local files are memory-mapped so reads cost no private memory.

Writers commit atomically: local outputs are written into a temp sibling and renamed; on gs:// (no rename)
the file
that makes the output look complete (`params/_METADATA`, the safetensors index or single file) is written
last.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from ptm import ckpt_format
from ptm.errors import CheckpointError, MergeError

Index = tuple[slice, ...]

_ST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith("gs://")


def _gcsfs():
    import gcsfs

    return gcsfs.GCSFileSystem()


def _kvstore_url(path: str | epath.Path) -> str:
    s = str(path).rstrip("/") + "/"
    return s if is_gcs(s) else "file://" + os.path.abspath(s) + "/"


def parse_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(ml_dtypes.bfloat16) if name in ("bfloat16", "bf16") else np.dtype(name)
    except TypeError as e:
        raise MergeError(f"unknown dtype {name!r}") from e


# -------------------------------------------------------------------------------------------------- readers


class InputStore:
    """A read-only set of named tensors."""

    kind: str
    path: str
    meta: dict[str, Any] | None = None  # ptm/metadata when the input is a ptm checkpoint

    def tensors(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str, index: Index) -> np.ndarray:
        """The slice `index` of tensor `name` (may be a read-only view)."""
        return self.read_async(name, index).result()

    def read_async(self, name: str, index: Index):
        """Start reading; returns an object with `.result()`, so reads overlap with compute."""
        raise NotImplementedError

    def keys(self, name: str) -> list[dict[str, Any]] | None:
        """Orbax key metadata of `name` (to mirror an input's tree structure), if any."""
        return None


class _Done:
    def __init__(self, value):
        self._v = value

    def result(self):
        return self._v


class _TsRead:
    """A tensorstore read future whose errors become CheckpointErrors naming the tensor."""

    def __init__(self, fut, where: str):
        self._f, self._where = fut, where

    def result(self) -> np.ndarray:
        try:
            return self._f.result()
        except Exception as e:  # tensorstore raises ValueError/OSError subclasses for corrupt data
            raise CheckpointError(f"{self._where}: cannot read ({e})") from e


def _big_allocs_via_mmap(threshold: int = 4 << 20) -> None:
    """Make glibc serve allocations >= 4 MiB with mmap (returned to the OS on free). Decoded Orbax chunks are
    23-65 MB; glibc's default threshold adapts upwards to 32 MiB, after which such buffers come from per-thread
    heap arenas that keep the freed memory (measured reading 3 chunked TinyLlama inputs: 1.18 GB private in
    12.5 s by default, 1.05 GB / 13.2 s with a 20 MiB threshold, 0.65 GB / 20.8 s with 4 MiB: fresh mmap pages
    cost page faults). Process-wide; a no-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class OrbaxStore(InputStore):
    kind = "orbax"

    def __init__(self, path: str | epath.Path):
        ck = ckpt_format.resolve(path)
        self.path, self.meta, self.params_path = str(path), ck.meta, ck.params_path
        mfile = ck.params_path / "_METADATA"
        try:
            md = json.loads(mfile.read_text())
            tree = md["tree_metadata"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{mfile}: unreadable Orbax tree metadata ({e})") from e
        self._zarr3 = bool(md.get("use_zarr3", False))
        self._ocdbt = (ck.params_path / "manifest.ocdbt").exists()
        self._keys: dict[str, list[dict[str, Any]]] = {}
        for entry in tree.values():
            keys = entry["key_metadata"]
            self._keys[".".join(str(k["key"]) for k in keys)] = keys
        self._handles: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] | None = None
        self._ctx = None

    def _spec(self, name: str) -> dict[str, Any]:
        base = _kvstore_url(self.params_path)
        kv: Any = {"driver": "ocdbt", "base": base, "path": name + "/"} if self._ocdbt else base + name + "/"
        return {"driver": "zarr3" if self._zarr3 else "zarr", "kvstore": kv}

    def _handle(self, name: str):
        import tensorstore as ts

        if name not in self._handles:
            try:
                kw = {"context": self._ctx} if self._ctx is not None else {}
                self._handles[name] = ts.open(self._spec(name), open=True, read=True, **kw).result()
            except Exception as e:
                raise CheckpointError(
                    f"{self.params_path}: tensor {name!r} is missing or corrupt ({e})"
                ) from e
        return self._handles[name]

    def tensors(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {}
            biggest = 0
            for name in sorted(self._keys):
                h = self._handle(name)
                self._infos[name] = TensorInfo(
                    name, tuple(int(d) for d in h.shape), np.dtype(h.dtype.numpy_dtype)
                )
                chunk = h.chunk_layout.read_chunk.shape or h.shape
                biggest = max(biggest, math.prod(chunk) * h.dtype.numpy_dtype.itemsize)
            # Orbax writes one chunk per unsharded array: without a cache, each piece of a tensor would
            # decode the whole chunk again. Keep one decoded chunk per input (memory: its largest tensor).
            import tensorstore as ts

            _big_allocs_via_mmap()
            # Chunked inputs (ptm training checkpoints: <= 64 MiB chunks): room for two chunks, as a piece may
            # straddle a chunk boundary; an unchunked foreign input costs its largest decoded tensor.
            limit = int(biggest * 1.05) + (1 << 20) + (biggest if biggest <= 64 << 20 else 0)
            self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": limit}})
            self._handles = {}
        return self._infos

    def read_async(self, name: str, index: Index):
        return _TsRead(self._handle(name)[index].read(), f"{self.params_path} tensor {name!r}")

    def keys(self, name: str) -> list[dict[str, Any]] | None:
        return self._keys.get(name)


@dataclass
class _StEntry:
    info: TensorInfo
    file: str
    start: int  # absolute byte offset in the file


def _read_st_header(f, where: str, size: int) -> tuple[dict[str, Any], int]:
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{where}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100_000_000:
        raise CheckpointError(f"{where}: safetensors header length {n} exceeds the file size {size}")
    try:
        header = json.loads(f.read(n))
    except ValueError as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    return header, 8 + n


def _parse_st_entries(header: dict[str, Any], data_start: int, size: int, where: str) -> list[_StEntry]:
    out = []
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: bad header entry for tensor {name!r}: {e!r} ({err})") from err
        need = math.prod(shape) * dtype.itemsize
        if end - b != need or b < 0:
            raise CheckpointError(
                f"{where}: header of tensor {name!r} claims bytes [{b}, {end}) = {end - b} bytes, but "
                f"{e['dtype']}{list(shape)} needs {need}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{where}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes "
                "(truncated file or lying header)"
            )
        spans.append((b, end, name))
        out.append(_StEntry(TensorInfo(name, shape, dtype), where, data_start + b))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(f"{where}: tensors {n0!r} and {n1!r} overlap in the safetensors header")
    return out


class SafetensorsStore(InputStore):
    kind = "safetensors"

    def __init__(self, path: str | epath.Path):
        self.path = str(path).rstrip("/")
        self._gcs = is_gcs(self.path)
        self._fs = _gcsfs() if self._gcs else None
        files = self._files()
        self._entries: dict[str, _StEntry] = {}
        self._maps: dict[str, Any] = {}
        for f in files:
            size = self._size(f)
            with self._open(f) as fh:
                header, start = _read_st_header(fh, f, size)
            for e in _parse_st_entries(header, start, size, f):
                if e.info.name in self._entries:
                    raise CheckpointError(
                        f"{f}: tensor {e.info.name!r} also appears in {self._entries[e.info.name].file}"
                    )
                self._entries[e.info.name] = e
        self.meta = None

    def _exists(self, p: str) -> bool:
        return self._fs.exists(p) if self._gcs else os.path.exists(p)

    def _size(self, p: str) -> int:
        return int(self._fs.info(p)["size"]) if self._gcs else os.path.getsize(p)

    def _open(self, p: str):
        return self._fs.open(p, "rb") if self._gcs else open(p, "rb")

    def _files(self) -> list[str]:
        p = self.path
        if p.endswith(".safetensors"):
            if not self._exists(p):
                raise CheckpointError(f"{p}: no such file")
            return [p]
        idx = f"{p}/{ST_INDEX}"
        if self._exists(idx):
            try:
                with self._open(idx) as fh:
                    wm = json.loads(fh.read())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{idx}: corrupt safetensors index ({e})") from e
            files = sorted(set(wm.values()))
            missing = [f for f in files if not self._exists(f"{p}/{f}")]
            if missing:
                raise CheckpointError(f"{idx}: shard files missing: {', '.join(missing)}")
            return [f"{p}/{f}" for f in files]
        if self._exists(f"{p}/{ST_SINGLE}"):
            return [f"{p}/{ST_SINGLE}"]
        raise CheckpointError(f"{p}: no {ST_SINGLE} or {ST_INDEX}")

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: self._entries[n].info for n in sorted(self._entries)}

    def _view(self, e: _StEntry) -> np.ndarray:
        if e.file not in self._maps:
            with open(e.file, "rb") as fh:
                self._maps[e.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        n = math.prod(e.info.shape)
        return np.frombuffer(self._maps[e.file], dtype=e.info.dtype, count=n, offset=e.start).reshape(
            e.info.shape
        )

    def read_async(self, name: str, index: Index):
        e = self._entries[name]
        if not self._gcs:
            return _Done(self._view(e)[index])
        # gs://: fetch the rows of axis 0 that cover the slice (contiguous bytes), then slice the rest.
        shape = e.info.shape
        r0, r1 = (
            (index[0].start or 0, index[0].stop if index[0].stop is not None else shape[0])
            if shape
            else (0, 1)
        )
        row = math.prod(shape[1:]) * e.info.dtype.itemsize
        buf = self._fs.cat_file(e.file, start=e.start + r0 * row, end=e.start + r1 * row)
        arr = np.frombuffer(buf, dtype=e.info.dtype).reshape((r1 - r0, *shape[1:]) if shape else ())
        return _Done(arr[(slice(None), *index[1:])] if shape else arr)


def _looks_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    if is_gcs(path):
        fs = _gcsfs()
        return fs.exists(f"{path}/{ST_INDEX}") or fs.exists(f"{path}/{ST_SINGLE}")
    return os.path.exists(f"{path}/{ST_INDEX}") or os.path.exists(f"{path}/{ST_SINGLE}")


def open_store(path: str | os.PathLike) -> InputStore:
    """Open an input by sniffing: safetensors file/dir, else a ptm/Orbax checkpoint (via
    ckpt_format.resolve)."""
    p = str(path).rstrip("/")
    if _looks_safetensors(p):
        return SafetensorsStore(p)
    return OrbaxStore(p)


# -------------------------------------------------------------------------------------------------- writers


def chunk_shape(shard: Sequence[int], itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """Largest chunk that tiles `shard` exactly and holds at most `target_bytes` (splitting leading axes
    first).

    Chunks divide the shard, so a shard never shares a chunk with another: each process writes whole chunks
    only.
    """
    chunk = list(shard)
    for ax in range(len(chunk)):
        if math.prod(chunk) * itemsize <= target_bytes:
            break
        rest = math.prod(chunk[ax + 1 :]) * itemsize
        fits = [d for d in range(1, chunk[ax] + 1) if chunk[ax] % d == 0 and d * rest <= target_bytes]
        chunk[ax] = max(fits) if fits else 1
    return tuple(max(c, 1) for c in chunk)


class OutputWriter:
    """Writes one merge output. Life cycle: prepare() -> write()* -> commit(meta) | abort()."""

    path: str

    def prepare(self, is_leader: bool) -> None: ...
    def open(self) -> None: ...
    def write(self, name: str, index: Index, arr: np.ndarray) -> None: ...
    def flush(self) -> None: ...
    def commit(self, meta: dict[str, Any], is_leader: bool) -> None: ...
    def abort(self) -> None: ...


def _tmp_sibling(path: str) -> str:
    # Deterministic, so every process of a multi-host merge writes into the same one and a rerun removes
    # leftovers.
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.ptm-merge-tmp")


def _swap_in(work: str, path: str) -> None:
    """Commit a finished local output by rename; an existing `path` (only with overwrite) is moved aside first."""
    if os.path.lexists(path):
        old = path + ".ptm-merge-old"
        _rm(old)
        os.rename(path, old)
        os.rename(work, path)
        _rm(old)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.rename(work, path)


def _rm(path: str) -> None:
    if is_gcs(path):
        fs = _gcsfs()
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def orbax_complete(path: str) -> bool:
    p = epath.Path(path)
    return (p / ckpt_format.PARAMS_ITEM / "_METADATA").exists()


class OrbaxWriter(OutputWriter):
    """A ptm model checkpoint (`params/` Orbax PyTree in the non-OCDBT zarr layout, `ptm/metadata`).

    Orbax's restore reads this layout natively; it is used because each tensor (each chunk) is an independent
    file, so tensors can be written one by one and processes can write disjoint chunks without coordination.
    """

    def __init__(
        self,
        path: str,
        infos: list[TensorInfo],
        chunks: dict[str, tuple[int, ...]],
        keys: dict[str, list[dict[str, Any]]],
        overwrite: bool,
    ):
        self.path = str(path).rstrip("/")
        self.infos, self.chunks, self.keys, self.overwrite = infos, chunks, keys, overwrite
        self.gcs = is_gcs(self.path)
        self.work = self.path if self.gcs else _tmp_sibling(self.path)
        self._arrays: dict[str, Any] = {}
        self._pending: list[Any] = []

    def exists(self) -> bool:
        if self.gcs:
            return orbax_complete(self.path)
        return os.path.lexists(self.path)

    def prepare(self, is_leader: bool) -> None:
        if self.exists() and not self.overwrite:
            raise MergeError(f"{self.path}: output exists (pass --overwrite / overwrite=True to replace it)")
        if not is_leader:
            return
        if self.gcs:
            _rm(self.path)  # an old output (overwrite) or an incomplete one left by a killed merge
        else:
            _rm(self.work)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._create_arrays(create=True)

    def _spec(self, info: TensorInfo, create: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {"driver": "zarr", "kvstore": _kvstore_url(f"{self.work}/params/{info.name}")}
        if create:
            dt = "bfloat16" if info.dtype == np.dtype(ml_dtypes.bfloat16) else info.dtype.str
            spec["metadata"] = {
                "shape": list(info.shape),
                "chunks": list(self.chunks[info.name]),
                "dtype": dt,
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
        if len(self._pending) > 4:  # bound the memory held by in-flight writes
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
        md = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        ckpt_format.write_meta(self.work, meta)
        (params / "_CHECKPOINT_METADATA").write_text(
            json.dumps(
                {
                    "item_handlers": _PYTREE_HANDLER,
                    "metrics": {},
                    "performance_metrics": {},
                    "custom_metadata": {},
                }
            )
        )
        (params / "commit_success.txt").write_text("written by ptm merge")
        (params / "_METADATA").write_text(json.dumps(md))  # last: makes the checkpoint look complete
        if not self.gcs:
            _swap_in(self.work, self.path)

    def abort(self) -> None:
        self._pending.clear()
        try:
            _rm(self.work)
        except OSError:
            pass


class SafetensorsWriter(OutputWriter):
    """A Hugging Face safetensors dir with one `model.safetensors` (single process only).

    The file is pre-sized so pieces can land in any order; gs:// outputs are built in a local temp
    file and uploaded at commit (a GCS object appears only when its upload completes).
    """

    DROP_EVERY = 256 << 20  # bytes written between flush-and-drop-from-page-cache (see _drop_written)

    def __init__(self, path: str, infos: list[TensorInfo], overwrite: bool):
        self.path = str(path).rstrip("/")
        self.infos, self.overwrite = infos, overwrite
        self.gcs = is_gcs(self.path)
        self.work = tempfile.mkdtemp(prefix="ptm-merge-st-") if self.gcs else _tmp_sibling(self.path)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        self._offsets: dict[str, int] = {}
        for i in infos:
            header[i.name] = {
                "dtype": _ST_NAMES[i.dtype],
                "shape": list(i.shape),
                "data_offsets": [off, off + i.nbytes],
            }
            self._offsets[i.name] = off
            off += i.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self._head = struct.pack("<Q", len(raw)) + raw
        self._size = len(self._head) + off
        self._fd: int | None = None

    def exists(self) -> bool:
        if self.gcs:
            return _gcsfs().exists(f"{self.path}/{ST_SINGLE}")
        return os.path.lexists(self.path)

    def prepare(self, is_leader: bool) -> None:
        if self.exists() and not self.overwrite:
            raise MergeError(f"{self.path}: output exists (pass --overwrite / overwrite=True to replace it)")
        _rm(self.work)
        os.makedirs(self.work)
        self._file = f"{self.work}/{ST_SINGLE}.partial"
        with open(self._file, "wb") as fh:
            fh.write(self._head)
            fh.truncate(self._size)

    def open(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._by = {i.name: i for i in self.infos}
        self._fd = os.open(self._file, os.O_RDWR)
        # Writes go to one background thread (pwrite releases the GIL), so writing overlaps with combining;
        # at most 4 pieces queued bounds the memory (as for Orbax outputs).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptm-st-write")
        self._pending: list[Any] = []

    def write(self, name: str, index: Index, arr: np.ndarray) -> None:
        self._pending.append(self._pool.submit(self._write, name, index, arr))
        if len(self._pending) > 4:
            self._pending.pop(0).result()

    def flush(self) -> None:
        while getattr(self, "_pending", None):
            self._pending.pop(0).result()

    def _write(self, name: str, index: Index, arr: np.ndarray) -> None:
        info = self._by[name]
        start = len(self._head) + self._offsets[name]
        shape = info.shape
        full_rest = all(
            (s.start or 0) == 0 and (s.stop is None or s.stop == d)
            for s, d in zip(index[1:], shape[1:], strict=False)
        )
        if (
            full_rest
        ):  # rows of axis 0: one contiguous byte range, written with pwrite (no dirty mapped pages)
            r0 = (index[0].start or 0) if shape else 0
            row = math.prod(shape[1:]) * info.dtype.itemsize
            os.pwrite(
                self._fd, np.ascontiguousarray(arr, dtype=info.dtype).view(np.uint8).data, start + r0 * row
            )
            self._drop_written(arr.size * info.dtype.itemsize)
            return
        mm = np.memmap(self._file, dtype=info.dtype, mode="r+", offset=start, shape=shape)
        mm[index] = arr
        mm.flush()
        del mm

    def _drop_written(self, nbytes: int) -> None:
        """Every 256 MiB: flush this output to disk and drop its pages from the page cache. A sweep writes
        several model-sized outputs; left in the cache they evict the memory-mapped inputs, which are then
        read from disk again (measured: the 5-omega sweep spent most of its time re-faulting input pages)."""
        self._unsynced = getattr(self, "_unsynced", 0) + nbytes
        if self._unsynced >= self.DROP_EVERY and hasattr(os, "posix_fadvise"):
            os.fdatasync(self._fd)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._unsynced = 0

    def commit(self, meta: dict[str, Any], is_leader: bool) -> None:
        self.flush()
        self._pool.shutdown()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self._file, f"{self.work}/{ST_SINGLE}")
        if self.gcs:
            fs = _gcsfs()
            if fs.exists(self.path):
                fs.rm(self.path, recursive=True)
            fs.put(f"{self.work}/{ST_SINGLE}", f"{self.path}/{ST_SINGLE}")
            shutil.rmtree(self.work, ignore_errors=True)
            return
        _swap_in(self.work, self.path)

    def abort(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # no thread may write after the fd closes
            self._pending = []
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.work, ignore_errors=True)
