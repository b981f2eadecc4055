"""Tensor stores: read single tensors (or slices) of a checkpoint without loading the whole model.

Two kinds, local or gs://:
- Orbax PyTree checkpoints (ptm model checkpoints and any Orbax pytree checkpoint): uncompressed local arrays
  are served as views of the memory-mapped files (`ptm.ckpt.mapped`), everything else is read with tensorstore
  straight from the zarr arrays (OCDBT or not); names are the tree paths joined with `.`.
- Hugging Face safetensors (one file, a dir with `model.safetensors`, or sharded with
  `model.safetensors.index.json`): the header is parsed here (bf16 via ml_dtypes; `safetensors.numpy` refuses
  it), checked against the file size, and local files are memory-mapped so reads cost no private memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import mapped as M
from ptm.ckpt.dtypes import SAFETENSORS
from ptm.ckpt.format import is_gcs
from ptm.errors import CheckpointError

Index = tuple[slice, ...]

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def gcs_fs():
    """A gcsfs filesystem (credentials and emulator from the environment, as gcsfs resolves them)."""
    import gcsfs

    return gcsfs.GCSFileSystem()


def kvstore_url(path: str | epath.Path) -> str:
    """A tensorstore kvstore URL for a local or gs:// directory."""
    s = str(path).rstrip("/") + "/"
    return s if is_gcs(s) else "file://" + os.path.abspath(s) + "/"


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

    def reads_are_views(self, name: str) -> bool:
        """Whether reads of `name` are views of memory-mapped local files (no decode, no buffer held)."""
        return False

    def keys(self, name: str) -> list[dict[str, Any]] | None:
        """Orbax key metadata of `name` (to mirror an input's tree structure), if any."""
        return None


def _full_index(index: Index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` (unit-step slices, possibly open or fewer than the rank) as explicit bounded slices."""
    out = []
    for ax, d in enumerate(shape):
        start, stop, step = (index[ax] if ax < len(index) else slice(None)).indices(d)
        if step != 1:
            raise ValueError(f"strided index {index} is not supported")
        out.append(slice(start, max(stop, start)))
    return tuple(out)


class _Done:
    def __init__(self, value):
        self._v = value

    def result(self):
        return self._v


class _TsRead:
    """A tensorstore read future whose errors become CheckpointErrors naming the tensor (and the chunk)."""

    def __init__(self, fut, where: str):
        self._f, self._where = fut, where

    def result(self) -> np.ndarray:
        try:
            return self._f.result()
        except Exception as e:  # tensorstore raises ValueError/OSError subclasses for corrupt data
            msg = str(e)
            if msg.startswith("NOT_FOUND") and "is missing" in msg:
                # "NOT_FOUND: chunk {0, 0, 0} stored at local file ".../0.0.0" is missing"
                raise CheckpointError(
                    f"{self._where}: {msg.removeprefix('NOT_FOUND: ')}: the checkpoint is incomplete or corrupt "
                    "(its writer stores every chunk; the gap is not read as zeros)"
                ) from e
            raise CheckpointError(f"{self._where}: cannot read ({e})") from e


_MALLOC_TUNED = False


def _reuse_freed_memory() -> None:
    """Let glibc keep and reuse freed chunk buffers: one malloc arena for all threads (M_ARENA_MAX = 1), every
    allocation from the heap (M_MMAP_THRESHOLD 1 GiB) and freed heap memory kept up to 512 MiB (M_TRIM_THRESHOLD).
    Why: each chunk read allocates fresh 20-64 MB buffers; served as new mmap pages they cost ~4 page faults
    per KiB read (merging 3 uncompressed TinyLlama checkpoints: 2.6M faults, 9 s of system time; with this
    0.4M faults, 3 s). Private memory stays bounded by the peak of live buffers (the held chunks, below), as
    the heap is reused. Process-wide, set on the first read through tensorstore only (mapped arrays allocate
    nothing); a no-op without glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param, value in ((-8, 1), (-3, 1 << 30), (-1, 512 << 20)):  # ARENA_MAX, MMAP_THRESHOLD, TRIM_THRESHOLD
            libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
    except (OSError, AttributeError):
        pass


_CELLS_MAX = 2  # decoded chunks kept per input: the one being read and the next (read ahead)
_CELL_BYTES = 2 * (64 << 20)  # ... and their bytes (a bigger unchunked array is held alone)
_AHEAD_BYTES = 96 << 20  # read the next chunk ahead only while it and the current one fit in this (memory)


class _Cell:
    """A piece that lies inside one decoded chunk: a view of it (no copy) once the chunk has been read."""

    def __init__(self, chunk: _TsRead, local: Index):
        self._chunk, self._local = chunk, local

    def result(self) -> np.ndarray:
        return self._chunk.result()[self._local]


class OrbaxStore(InputStore):
    kind = "orbax"

    def __init__(self, path: str | epath.Path, *, mapped: bool = True):
        """`mapped`: serve uncompressed local arrays as views of the mapped files (`ptm.ckpt.mapped`); False
        reads everything through tensorstore (the reference the mapped reader is tested against)."""
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
        # A missing chunk reads as the fill value (zeros) unless tensorstore is told otherwise. It is corruption
        # when the writer stores every chunk: Orbax records that as `store_array_data_equal_to_fill_value`
        # (ptm's merge outputs and Orbax >= 0.5 checkpoints; Orbax's restore refuses the gap then), and an
        # array whose zarr fill_value is null has every written chunk stored too (checked per tensor on open).
        self._strict = bool(md.get("store_array_data_equal_to_fill_value", False))
        self._strict_of: dict[str, bool] = {}
        self._keys: dict[str, list[dict[str, Any]]] = {}
        for entry in tree.values():
            keys = entry["key_metadata"]
            self._keys[".".join(str(k["key"]) for k in keys)] = keys
        self._handles: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] | None = None
        self._ctx = None
        self._cells: OrderedDict[tuple[str, tuple[int, ...]], tuple[_TsRead, int]] = OrderedDict()
        self._order: list[str] = []
        self._chunk_of: dict[str, tuple[int, ...]] = {}
        self._map = mapped and not is_gcs(str(ck.params_path))
        self._mapped: dict[str, M.MappedArray] = {}

    def _spec(self, name: str, strict: bool) -> dict[str, Any]:
        base = kvstore_url(self.params_path)
        kv: Any = {"driver": "ocdbt", "base": base, "path": name + "/"} if self._ocdbt else base + name + "/"
        return {"driver": "zarr3" if self._zarr3 else "zarr", "kvstore": kv, "fill_missing_data_reads": not strict}

    def _handle(self, name: str):
        import tensorstore as ts

        if name not in self._handles:
            try:
                kw = {"context": self._ctx} if self._ctx is not None else {}
                strict = self._strict_of.get(name, self._strict)
                h = ts.open(self._spec(name, strict), open=True, read=True, **kw).result()
                if not strict and h.fill_value is None:  # no fill value: every written chunk is stored
                    strict = True
                    h = ts.open(self._spec(name, strict), open=True, read=True, **kw).result()
                self._strict_of[name] = strict
                self._handles[name] = h
            except Exception as e:
                raise CheckpointError(
                    f"{self.params_path}: tensor {name!r} is missing or corrupt ({e})"
                ) from e
        return self._handles[name]

    def tensors(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {}
            for name in sorted(self._keys):
                h = self._handle(name)
                self._infos[name] = TensorInfo(
                    name, tuple(int(d) for d in h.shape), np.dtype(h.dtype.numpy_dtype)
                )
            # Pieces are served from whole decoded chunks held here (read once, sliced without copies, the next
            # chunk read ahead while the current one is combined), so tensorstore itself caches nothing.
            import tensorstore as ts

            self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
            self._handles = {}
            self._order = list(self._infos)
            zarr_md = {}
            for n in self._order:
                h = self._handle(n)
                c = h.chunk_layout.read_chunk.shape
                self._chunk_of[n] = tuple(int(x) for x in c) if c is not None else self._infos[n].shape
                if self._map:
                    zarr_md[n] = (h.spec().to_json().get("metadata", {}), self._infos[n].dtype, self._infos[n].shape)
            if zarr_md:
                self._mapped = M.open_arrays(str(self.params_path), self._ocdbt, zarr_md)
        return self._infos

    def mapped(self) -> list[str]:
        """The tensors served from mapped files (the rest are read through tensorstore)."""
        self.tensors()
        return sorted(self._mapped)

    def reads_are_views(self, name: str) -> bool:
        self.tensors()
        return name in self._mapped

    def _cell_of(self, name: str, index: Index) -> tuple[tuple[int, ...], Index] | None:
        """The chunk-grid cell holding all of `index` and the index inside it, or None if it spans cells."""
        shape, chunk = self._infos[name].shape, self._chunk_of[name]
        if len(chunk) != len(shape):
            return None
        cell, local = [], []
        for sl, c, d in zip(_full_index(index, shape), chunk, shape, strict=True):
            i = sl.start // c
            if sl.stop > min((i + 1) * c, d) or sl.stop <= sl.start:
                return None
            cell.append(i)
            local.append(slice(sl.start - i * c, sl.stop - i * c))
        return tuple(cell), tuple(local)

    def _chunk(self, key: tuple[str, tuple[int, ...]]) -> _TsRead:
        """The (started) read of one whole chunk, from the held ones or newly issued."""
        if key in self._cells:
            self._cells.move_to_end(key)
            return self._cells[key][0]
        name, cell = key
        shape, chunk = self._infos[name].shape, self._chunk_of[name]
        region = tuple(slice(i * c, min((i + 1) * c, d)) for i, c, d in zip(cell, chunk, shape, strict=True))
        fut = _TsRead(self._handle(name)[region].read(), f"{self.params_path} tensor {name!r}")
        nbytes = math.prod(r.stop - r.start for r in region) * self._infos[name].dtype.itemsize
        self._cells[key] = (fut, nbytes)
        return fut

    def _chunk_bytes(self, name: str) -> int:
        return math.prod(self._chunk_of[name]) * self._infos[name].dtype.itemsize

    def _evict(self, keep: set) -> None:
        """Drop the least recently used chunks beyond the count and byte bounds (never those in `keep`)."""
        for key in list(self._cells):
            if len(self._cells) <= _CELLS_MAX and sum(b for _, b in self._cells.values()) <= _CELL_BYTES:
                return
            if key not in keep:
                del self._cells[key]

    def _next_cell(self, name: str, cell: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
        """The chunk read after `cell` in the merge order (C order within a tensor, then the next tensor)."""
        grid = [math.ceil(d / c) for d, c in zip(self._infos[name].shape, self._chunk_of[name], strict=True)]
        nxt = list(cell)
        for ax in reversed(range(len(nxt))):
            nxt[ax] += 1
            if nxt[ax] < grid[ax]:
                return name, tuple(nxt)
            nxt[ax] = 0
        i = self._order.index(name) + 1
        if i < len(self._order):
            n2 = self._order[i]
            if len(self._chunk_of[n2]) == len(self._infos[n2].shape):
                return n2, (0,) * len(self._chunk_of[n2])
        return None

    def read_async(self, name: str, index: Index):
        if self._infos is None:
            self.tensors()
        m = self._mapped.get(name)
        if m is not None:
            arr = m.read(_full_index(index, self._infos[name].shape))
            if arr is not None:
                return _Done(arr)
        _reuse_freed_memory()
        at = self._cell_of(name, index)
        if at is None:  # spans chunks (a foreign layout): tensorstore assembles it
            return _TsRead(self._handle(name)[index].read(), f"{self.params_path} tensor {name!r}")
        cell, local = at
        keep = {(name, cell)}
        fut = self._chunk((name, cell))
        nxt = self._next_cell(name, cell)
        ahead = nxt is not None and nxt[0] not in self._mapped  # a mapped tensor needs no read ahead
        if ahead and self._cells[(name, cell)][1] + self._chunk_bytes(nxt[0]) <= _AHEAD_BYTES:
            self._chunk(nxt)
            keep.add(nxt)
        self._evict(keep)
        return _Cell(fut, local)

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


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_st_entries(header: dict[str, Any], data_start: int, size: int, where: str) -> list[_StEntry]:
    out = []
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS[e["dtype"]]
            raw_shape, offsets = e["shape"], e["data_offsets"]
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{where}: bad header entry for tensor {name!r}: {e!r} ({err})") from err
        # JSON integers only: int() would accept -64 (a product of two negative dims passes the size check),
        # 2.5 or "3"; bool is an int subclass in Python.
        if not isinstance(raw_shape, list) or not all(_is_uint(d) for d in raw_shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {raw_shape!r} in the safetensors header; a shape is a list "
                "of non-negative integers"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(x) for x in offsets)):
            raise CheckpointError(
                f"{where}: tensor {name!r} has data_offsets {offsets!r} in the safetensors header; expected "
                "[begin, end] with non-negative integers"
            )
        shape = tuple(raw_shape)
        b, end = offsets
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
        self._fs = gcs_fs() if self._gcs else None
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

    def reads_are_views(self, name: str) -> bool:
        return not self._gcs

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
        fs = gcs_fs()
        return fs.exists(f"{path}/{ST_INDEX}") or fs.exists(f"{path}/{ST_SINGLE}")
    return os.path.exists(f"{path}/{ST_INDEX}") or os.path.exists(f"{path}/{ST_SINGLE}")


def open_store(path: str | os.PathLike) -> InputStore:
    """Open an input by sniffing: safetensors file/dir, else a ptm/Orbax checkpoint (via
    ckpt_format.resolve)."""
    p = str(path).rstrip("/")
    if _looks_safetensors(p):
        return SafetensorsStore(p)
    return OrbaxStore(p)
