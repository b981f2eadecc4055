"""Uncompressed Orbax arrays read like safetensors: each chunk's bytes memory-mapped where they lie on disk.

Why: an uncompressed zarr v2 chunk *is* the array's raw C-order bytes, and OCDBT stores such a value unchanged
in one of its data files (OCDBT's `compression` applies to its B+tree and version nodes only). Knowing where each
chunk lies (file, offset, length), a reader serves views of file-backed pages (no copy, no private memory, no
decode) instead of tensorstore's read into fresh buffers. The locations come from tensorstore's own dump of the
OCDBT database (`tensorstore.ocdbt.dump`: the manifest, then the B+tree nodes, whose leaf entries are inline
values or `value:<base>:<relative>:<offset>:<length>` references); for the plain zarr layout (ptm's merge outputs)
a chunk is a file of its own.

Only when every condition holds (local directory; zarr v2; no compressor and no filters; C order; a
little-endian or single-byte integer, float or complex dtype, or bfloat16; a chunk of exactly the chunk shape's
bytes, inside its file); anything else — gs://, zarr3 (Orbax's zarr3 arrays use the `sharding_indexed` codec),
zstd, a missing or odd-sized chunk — returns None here, and the caller reads through tensorstore, which also owns
every error message and the fill value of a missing chunk.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np

from ptm.ckpt.dtypes import BF16

Index = tuple[slice, ...]

# tensorstore's LabeledIndirectDataReference: label, percent-encoded base and relative path, offset, length
_REF = re.compile(r"([^:]+):([^:]*):([^:]*):([0-9]+):([0-9]+)")


@dataclass(frozen=True)
class ChunkRef:
    """Where one stored value lies: `length` bytes at `offset` of `file` (an absolute path)."""

    file: str
    offset: int
    length: int


Located = ChunkRef | bytes  # bytes: a value stored inline in a B+tree leaf


def _relative_ok(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts


def ocdbt_index(root: str) -> dict[bytes, Located] | None:
    """Every key of the latest version of the local OCDBT database at `root` and where its value lies, or None
    when the database cannot be walked (the caller then reads through tensorstore)."""
    import tensorstore as ts

    try:
        base = ts.KvStore.open("file://" + os.path.abspath(root).rstrip("/") + "/").result()
        manifest = ts.ocdbt.dump(base).result()
        versions = manifest.get("versions") or []
        if not versions:
            return {}
        latest = max(versions, key=lambda v: int(v["generation_number"]))
        out: dict[bytes, Located] = {}
        loc = latest.get("root", {}).get("location")
        if loc:
            _walk(ts, base, root, loc, b"", out)
        return out
    except (ValueError, KeyError, TypeError, OSError, RuntimeError):
        return None


def _walk(ts, base, root: str, location: str, prefix: bytes, out: dict[bytes, Located]) -> None:
    """Collect the leaf entries under B+tree node `location`. A child node stores its keys without its
    subtree's common prefix (`subtree_common_prefix` in the parent's dump, relative to the parent's prefix)."""
    node = ts.ocdbt.dump(base, location).result()
    for e in node["entries"]:
        if "location" in e:  # interior entry
            _walk(ts, base, root, e["location"], prefix + bytes(e["subtree_common_prefix"]), out)
            continue
        key = prefix + bytes(e["key"])
        if "inline_value" in e:
            out[key] = bytes(e["inline_value"])
            continue
        m = _REF.fullmatch(e["indirect_value"])
        if m is None or m.group(1) != "value":
            raise ValueError(f"unexpected OCDBT value reference {e['indirect_value']!r}")
        rel = unquote(m.group(2)) + unquote(m.group(3))
        if not _relative_ok(rel):
            raise ValueError(f"OCDBT data file outside the database: {rel!r}")
        out[key] = ChunkRef(os.path.join(root, rel), int(m.group(4)), int(m.group(5)))


def _dtype(s: Any) -> np.dtype | None:
    if s == "bfloat16":
        return np.dtype(BF16)
    if not isinstance(s, str) or s[:1] not in ("<", "|"):
        return None
    try:
        dt = np.dtype(s)
    except TypeError:
        return None
    # not bool: a stored byte other than 0/1 would read raw here but normalised by tensorstore
    return dt if dt.kind in "iufc" and dt.fields is None and dt.subdtype is None else None


@dataclass(frozen=True)
class RawLayout:
    """A zarr v2 array whose stored chunks are its raw bytes: how to find and view them."""

    dtype: np.dtype
    chunks: tuple[int, ...]
    separator: str


def raw_layout(metadata: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...]) -> RawLayout | None:
    """The layout when the zarr v2 `metadata` (as tensorstore reports it) stores chunks as raw C-order bytes of
    `dtype` (the dtype tensorstore reads); else None."""
    if metadata.get("zarr_format") != 2 or metadata.get("compressor") is not None:
        return None
    if metadata.get("filters") not in (None, []) or metadata.get("order", "C") != "C":
        return None
    dt = _dtype(metadata.get("dtype"))
    chunks = metadata.get("chunks")
    sep = metadata.get("dimension_separator", ".")
    if dt is None or dt != dtype or sep not in (".", "/") or not isinstance(chunks, list):
        return None
    if len(chunks) != len(shape) or not all(isinstance(c, int) and c > 0 for c in chunks):
        return None
    return RawLayout(dt, tuple(chunks), sep)


class Files:
    """Read-only maps of the data files, shared by the arrays of one checkpoint. At most `keep` stay open (each
    map holds a file descriptor; a plain zarr layout has one file per chunk); a view handed out keeps its own map
    alive, so closing one here never invalidates a piece in use."""

    def __init__(self, keep: int = 64) -> None:
        self._maps: OrderedDict[str, mmap.mmap | None] = OrderedDict()
        self._keep = keep

    def get(self, path: str) -> mmap.mmap | None:
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError:
            mm = None
        self._maps[path] = mm
        while len(self._maps) > self._keep:
            self._maps.popitem(last=False)
        return mm


class MappedArray:
    """One array's chunks as views of mapped files. `read` returns None for anything it cannot serve exactly."""

    def __init__(self, shape: tuple[int, ...], layout: RawLayout, locate, files: Files):
        self.shape, self.layout, self._locate, self._files = shape, layout, locate, files

    def _key(self, cell: tuple[int, ...]) -> str:
        return self.layout.separator.join(str(i) for i in cell) if cell else "0"

    def _chunk(self, cell: tuple[int, ...]) -> np.ndarray | None:
        """The whole stored chunk `cell` (edge chunks are stored at the full chunk shape), or None."""
        lay = self.layout
        ref = self._locate(self._key(cell))
        n = math.prod(lay.chunks)
        if isinstance(ref, bytes):
            if len(ref) != n * lay.dtype.itemsize:
                return None
            return np.frombuffer(ref, dtype=lay.dtype).reshape(lay.chunks)
        if ref is None or ref.length != n * lay.dtype.itemsize:
            return None
        mm = self._files.get(ref.file)
        if mm is None or ref.offset + ref.length > len(mm):
            return None
        return np.frombuffer(mm, dtype=lay.dtype, count=n, offset=ref.offset).reshape(lay.chunks)

    def read(self, index: Index) -> np.ndarray | None:
        """The region `index` (explicit bounded unit-step slices): a view when it lies in one chunk, else a copy
        assembled from the chunks; None when a chunk is missing or not raw (tensorstore decides then)."""
        chunks = self.layout.chunks
        if any(s.stop <= s.start for s in index):
            return np.empty(tuple(s.stop - s.start for s in index), self.layout.dtype)
        lo = [s.start // c for s, c in zip(index, chunks, strict=True)]
        hi = [(s.stop - 1) // c for s, c in zip(index, chunks, strict=True)]
        if lo == hi:
            ch = self._chunk(tuple(lo))
            if ch is None or not index:  # a 0-d array: the chunk itself (indexing by () would give a scalar)
                return ch
            return ch[tuple(slice(s.start - i * c, s.stop - i * c) for s, i, c in zip(index, lo, chunks, strict=True))]
        out = np.empty(tuple(s.stop - s.start for s in index), self.layout.dtype)
        for cell in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi, strict=True))):
            ch = self._chunk(cell)
            if ch is None:
                return None
            src, dst = [], []
            for s, i, c in zip(index, cell, chunks, strict=True):
                a, b = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - s.start, b - s.start))
            out[tuple(dst)] = ch[tuple(src)]
        return out


def open_arrays(params_dir: str, ocdbt: bool, arrays: dict[str, tuple[dict[str, Any], np.dtype, tuple[int, ...]]]
                ) -> dict[str, MappedArray]:
    """Mapped readers for the arrays of the local Orbax params dir `params_dir` (`arrays`: name -> zarr metadata
    as tensorstore reports it, dtype, shape) that qualify; the rest are left to tensorstore."""
    layouts = {n: lay for n, (md, dt, shape) in arrays.items() if (lay := raw_layout(md, dt, shape)) is not None}
    if not layouts:
        return {}
    files = Files()
    if ocdbt:
        index = ocdbt_index(params_dir)
        if index is None:
            return {}

        def locator(name: str):
            return lambda key: index.get(f"{name}/{key}".encode())
    else:
        def locator(name: str):
            def loc(key: str) -> ChunkRef | None:
                p = os.path.join(params_dir, name, key)
                try:
                    return ChunkRef(p, 0, os.path.getsize(p))
                except OSError:
                    return None
            return loc
    return {n: MappedArray(arrays[n][2], lay, locator(n), files) for n, lay in layouts.items()}
