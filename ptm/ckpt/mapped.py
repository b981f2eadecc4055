"""Uncompressed Orbax arrays read like safetensors: each chunk's bytes memory-mapped where they lie on disk.

Why: an uncompressed zarr chunk *is* the array's raw C-order bytes, and OCDBT stores such a value unchanged in
one of its data files (OCDBT's `compression` applies to its B+tree and version nodes only). Knowing where each
chunk lies (file, offset, length), a reader serves views of file-backed pages (no copy, no private memory, no
decode) instead of tensorstore's read into fresh buffers. The locations come from tensorstore's own dump of the
OCDBT database (`tensorstore.ocdbt.dump`: the manifest, then the B+tree nodes, whose leaf entries are inline
values or `value:<base>:<relative>:<offset>:<length>` references); for the plain zarr layout (ptm's merge outputs)
a chunk is a file of its own. zarr3 arrays written by Orbax (`use_zarr3`) hold their chunks inside
`sharding_indexed` shards: an inner chunk is found through the shard's index, used only once its CRC-32C matches.

Only when every condition holds (local directory; zarr v2 with no compressor and no filters, C order, or zarr3
with only the `bytes` codec (little-endian), directly or inside `sharding_indexed` with a `bytes` + `crc32c`
index; a little-endian or single-byte integer, float or complex dtype, or bfloat16; a chunk of exactly the chunk
shape's bytes, inside its file or shard); anything else — gs://, zstd, a transpose codec, a missing or odd-sized
chunk, a shard index whose checksum fails — returns None here, and the caller reads through tensorstore, which
also owns every error message and the fill value of a missing chunk.
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
    """A zarr array whose stored chunks are its raw bytes: how to find and view them. `chunks` is the read chunk;
    with zarr3's `sharding_indexed` codec that is the inner chunk, stored inside a shard value of shape `shard`
    whose index (offset, length per inner chunk, uint64 LE, then a CRC-32C) lies at its end or start."""

    dtype: np.dtype
    chunks: tuple[int, ...]
    separator: str
    key_prefix: str = ""  # zarr3 "default" key encoding: "c" + separator before the indices ("c" for 0-d)
    shard: tuple[int, ...] | None = None
    index_at_end: bool = True

    def key(self, cell: tuple[int, ...]) -> str:
        if self.key_prefix:
            return self.key_prefix + "".join(self.separator + str(i) for i in cell)
        return self.separator.join(str(i) for i in cell) if cell else "0"


def _positive_ints(x: Any, rank: int) -> bool:
    return isinstance(x, list) and len(x) == rank and all(isinstance(c, int) and c > 0 for c in x)


def raw_layout(metadata: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...]) -> RawLayout | None:
    """The layout when the zarr `metadata` (as tensorstore reports it) stores chunks as raw C-order bytes of
    `dtype` (the dtype tensorstore reads); else None."""
    if metadata.get("zarr_format") == 3:
        return _raw_layout3(metadata, dtype, shape)
    if metadata.get("zarr_format") != 2 or metadata.get("compressor") is not None:
        return None
    if metadata.get("filters") not in (None, []) or metadata.get("order", "C") != "C":
        return None
    dt = _dtype(metadata.get("dtype"))
    chunks = metadata.get("chunks")
    sep = metadata.get("dimension_separator", ".")
    if dt is None or dt != dtype or sep not in (".", "/") or not _positive_ints(chunks, len(shape)):
        return None
    return RawLayout(dt, tuple(chunks), sep)


_ZARR3_TYPES = {f"{k}{b}" for k in ("int", "uint", "float") for b in (8, 16, 32, 64)} | {"complex64", "complex128"}


def _dtype3(name: Any) -> np.dtype | None:
    """A zarr3 `data_type` name as the little-endian numpy dtype of its raw bytes (not bool, as for v2)."""
    if name == "bfloat16":
        return np.dtype(BF16)
    if name not in _ZARR3_TYPES or name == "float8":
        return None
    return np.dtype(name).newbyteorder("<")


def _bytes_le(codecs: Any, itemsize: int) -> bool:
    """Exactly one `bytes` codec, little-endian (the endian may be left out for one-byte types)."""
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)):
        return False
    c = codecs[0]
    endian = (c.get("configuration") or {}).get("endian")
    return c.get("name") == "bytes" and (endian == "little" or (endian is None and itemsize == 1))


def _raw_layout3(md: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...]) -> RawLayout | None:
    dt = _dtype3(md.get("data_type"))
    grid, enc = md.get("chunk_grid") or {}, md.get("chunk_key_encoding") or {"name": "default"}
    outer = (grid.get("configuration") or {}).get("chunk_shape")
    if dt is None or dt != dtype or grid.get("name") != "regular" or not _positive_ints(outer, len(shape)):
        return None
    if md.get("storage_transformers") or enc.get("name") not in ("default", "v2"):
        return None
    default = enc["name"] == "default"
    sep = (enc.get("configuration") or {}).get("separator", "/" if default else ".")
    if sep not in (".", "/"):
        return None
    prefix = "c" if default else ""
    codecs = md.get("codecs")
    if _bytes_le(codecs, dt.itemsize):
        return RawLayout(dt, tuple(outer), sep, prefix)
    if not (isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"):
        return None
    cfg = codecs[0].get("configuration") or {}
    inner, idx_codecs = cfg.get("chunk_shape"), cfg.get("index_codecs")
    if not _positive_ints(inner, len(shape)) or any(o % i for o, i in zip(outer, inner, strict=True)):
        return None
    if not _bytes_le(cfg.get("codecs"), dt.itemsize) or not isinstance(idx_codecs, list) or len(idx_codecs) != 2:
        return None
    if not _bytes_le(idx_codecs[:1], 8) or idx_codecs[1].get("name") != "crc32c" or _crc32c() is None:
        return None
    at = cfg.get("index_location", "end")
    if at not in ("end", "start"):
        return None
    return RawLayout(dt, tuple(inner), sep, prefix, tuple(outer), at == "end")


def _crc32c():
    """google-crc32c's `value` (installed with gcsfs's google-cloud-storage), or None: a shard index is used only
    after its checksum matches, as tensorstore does."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c.value


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


_MISSING = 2**64 - 1  # a shard index entry (offset, length) for an inner chunk that is not stored


class MappedArray:
    """One array's chunks as views of mapped files. `read` returns None for anything it cannot serve exactly."""

    def __init__(self, shape: tuple[int, ...], layout: RawLayout, locate, files: Files):
        self.shape, self.layout, self._locate, self._files = shape, layout, locate, files
        self._indices: OrderedDict[str, np.ndarray | None] = OrderedDict()  # parsed shard indices (a few)

    def _value(self, key: str) -> tuple[Any, int, int] | None:
        """(buffer, offset, length) of the stored value `key`, inside its buffer, or None."""
        ref = self._locate(key)
        if isinstance(ref, bytes):
            return ref, 0, len(ref)
        if ref is None:
            return None
        mm = self._files.get(ref.file)
        if mm is None or ref.offset + ref.length > len(mm):
            return None
        return mm, ref.offset, ref.length

    def _shard_index(self, key: str, buf, off: int, length: int, per: list[int]) -> np.ndarray | None:
        if key in self._indices:
            self._indices.move_to_end(key)
            return self._indices[key]
        size = math.prod(per) * 16 + 4
        idx = None
        if length >= size:
            at = off + length - size if self.layout.index_at_end else off
            raw = bytes(memoryview(buf)[at:at + size])
            if _crc32c()(raw[:-4]) == int.from_bytes(raw[-4:], "little"):
                idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(*per, 2)
        self._indices[key] = idx
        while len(self._indices) > 16:
            self._indices.popitem(last=False)
        return idx

    def _chunk(self, cell: tuple[int, ...]) -> np.ndarray | None:
        """The whole stored chunk `cell` (edge chunks are stored at the full chunk shape), or None."""
        lay = self.layout
        n = math.prod(lay.chunks)
        nbytes = n * lay.dtype.itemsize
        if lay.shard is None:
            v = self._value(lay.key(cell))
            if v is None or v[2] != nbytes:
                return None
            buf, at = v[0], v[1]
        else:
            per = [s // c for s, c in zip(lay.shard, lay.chunks, strict=True)]
            key = lay.key(tuple(i // p for i, p in zip(cell, per, strict=True)))
            v = self._value(key)
            if v is None:
                return None
            buf, off, length = v
            idx = self._shard_index(key, buf, off, length, per)
            if idx is None:
                return None
            start, size = (int(x) for x in idx[tuple(i % p for i, p in zip(cell, per, strict=True))])
            if start == _MISSING or size != nbytes or start + size > length:
                return None
            at = off + start
        return np.frombuffer(buf, dtype=lay.dtype, count=n, offset=at).reshape(lay.chunks)

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
