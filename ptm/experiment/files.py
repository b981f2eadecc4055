"""The results dir's I/O, local or gs://: every read and write of `ptm experiment`'s results dir goes through here.

Why one layer: on a pod slice the results dir is usually a bucket (`--results-dir gs://bucket/x`) that every host
sees, so `open()` and `os.path` cannot be used on it. Paths are plain strings; gs:// is read through etils.epath
(gcsfs underneath, as `ptm.ckpt` does). Writes are process 0's (`ptm.parallel.sync`) and atomic: locally
write-then-rename, on gs:// one object upload (an object appears whole or not at all). Reads of gs:// drop
every gcsfs instance's cached listings first, so a file another host (or Orbax) wrote since is seen.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from etils import epath

from ptm.ckpt.format import invalidate_gcs_listings, is_gcs
from ptm.errors import ConfigError
from ptm.parallel import sync


def join(root: str, *parts: str) -> str:
    """`root/part/...`; gs:// stays a URL (posix separators), a local root stays a local path."""
    return posixpath.join(root, *parts) if is_gcs(root) else os.path.join(root, *parts)


def _fresh(path: str) -> epath.Path:
    if is_gcs(path):
        invalidate_gcs_listings()  # gcsfs caches listings per instance; another host may have written since
    return epath.Path(path)


def exists(path: str) -> bool:
    return _fresh(path).exists()


def try_json(path: str) -> dict[str, Any] | None:
    """The JSON object at `path`, or None if it is absent or unreadable (e.g. a local write killed midway)."""
    try:
        d = json.loads(_fresh(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_json(path: str) -> dict[str, Any]:
    """The JSON at `path`; a ConfigError naming the file if it is absent or unreadable."""
    try:
        return json.loads(_fresh(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e


def read_text(path: str) -> str:
    return _fresh(path).read_text()


def names(path: str, pattern: str = "*") -> list[str]:
    """Sorted names of the entries of directory `path` that match `pattern` ([] if there is none)."""
    p = _fresh(path)
    return sorted(q.name for q in p.glob(pattern)) if p.exists() else []


def makedirs(path: str) -> None:
    """Process 0 creates a local directory; gs:// has no directories (objects create their prefixes)."""
    if sync.is_writer() and not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def write_json(path: str, obj: Any) -> None:
    """Process 0 only, atomic: a crash leaves the old file or the new one, never half of one."""
    sync.write_json(path, obj)


def write_text(path: str, text: str) -> None:
    sync.write_text(path, text)


def write_bytes(path: str, data: bytes) -> None:
    sync.write_bytes(path, data)


def put_tree(local_dir: str, remote_dir: str, last: str) -> None:
    """Process 0 copies every file under `local_dir` to `remote_dir`, the file `last` (a relative path) at the end:
    its presence then says the whole tree is there, so a copy killed midway is redone, never half used."""
    rels = []
    for d, _, fs in os.walk(local_dir):
        rels += [os.path.relpath(os.path.join(d, f), local_dir) for f in fs]
    for rel in sorted(rels, key=lambda r: r == last):
        with open(os.path.join(local_dir, rel), "rb") as f:
            write_bytes(join(remote_dir, *rel.split(os.sep)), f.read())

