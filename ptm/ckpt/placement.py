"""Where an output is built and how it replaces what was there: one rule for every writer, local or gs://.

Guarantee (docs/merge.md, "What a killed merge leaves"): at every instant a complete version of the output
exists — the old one at OUT, or the new one at its staging place — and the next write to OUT (or any reader of
OUT, for the local case) finishes or undoes an interrupted switch. Nothing is ever
replaced without `overwrite`, and an output may never be, contain or lie inside an input or a training run.

- Local: the output is built in the hidden sibling `.NAME.ptm-merge-tmp`; commit renames an existing OUT to
  `NAME.ptm-merge-old`, renames the new one in, and removes the old. A run killed between the two renames
  leaves only `NAME.ptm-merge-old`: `recover()` renames it back.
- gs:// (no rename): the output is built under the sibling prefix `.NAME.ptm-merge-tmp/`; when it is complete a
  marker `.ptm-staged` is written there; then the old objects at OUT are deleted, the staged ones copied in
  (server-side, the files that make a checkpoint look complete last) and the staging prefix removed. A commit
  killed after the marker is rolled forward by `recover()`; one killed before it left only garbage in the
  staging prefix, which is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from ptm.ckpt.format import OLD_SUFFIX, STAGED_MARKER, TMP_SUFFIX
from ptm.ckpt.stores import gcs_fs, is_gcs
from ptm.errors import OutputError

# Files whose presence makes an output look complete to readers: copied last on gs://.
COMPLETION_FILES = ("params/_METADATA", "model.safetensors.index.json", "model.safetensors")


def normalize(path: str) -> str:
    """A comparable form of a path: real path (symlinks resolved) locally, `gs://bucket/prefix` on GCS."""
    s = str(path)
    if is_gcs(s):
        return "gs://" + "/".join(p for p in s[5:].split("/") if p)
    return os.path.realpath(os.path.abspath(s))


def _inside(a: str, b: str) -> bool:
    """a equals b or lies below it (both normalized)."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def staging_path(path: str) -> str:
    head, tail = (path.rstrip("/").rsplit("/", 1) if is_gcs(path) else os.path.split(os.path.abspath(path)))
    return f"{head}/.{tail}{TMP_SUFFIX}" if is_gcs(path) else os.path.join(head, f".{tail}{TMP_SUFFIX}")


def old_path(path: str) -> str:
    return os.path.abspath(path) + OLD_SUFFIX


def _run_dir_of(path: str) -> str | None:
    """The training run dir that `path` is, or lies inside (a dir with `checkpoints/` and `run.json` or
    `config.gin`), else None. Normalized paths only."""
    from etils import epath

    p = epath.Path(path)
    for cand in [p, *p.parents]:
        s = str(cand)
        if s in ("/", "gs:", "gs://") or s.count("/") < (3 if is_gcs(s) else 1):
            break
        if (cand / "checkpoints").is_dir() and ((cand / "run.json").exists() or (cand / "config.gin").exists()):
            return normalize(s)
    return None


def check_disjoint(out: str, inputs: Sequence[str]) -> None:
    """Refuse an output that equals, contains or lies inside an input, an input's training run, or any
    training run (it would become that run's newest step)."""
    o = normalize(out)
    protected: dict[str, str] = {}
    for i in inputs:
        n = normalize(i)
        protected[n] = f"input {i}"
        run = _run_dir_of(n)
        if run:
            protected[run] = f"the training run {run} of input {i}"
    out_run = _run_dir_of(o)
    if out_run:
        protected[out_run] = f"the training run {out_run}"
    for p, what in protected.items():
        if _inside(o, p) or _inside(p, o):
            rel = "is" if o == p else ("lies inside" if _inside(o, p) else "contains")
            raise OutputError(f"{out}: the output {rel} {what}; choose an output path outside it")


def _gcs_objects(prefix: str) -> list[str]:
    fs = gcs_fs()
    fs.invalidate_cache()
    try:
        return sorted("gs://" + p for p in fs.find(prefix.rstrip("/") + "/"))
    except FileNotFoundError:
        return []


def exists(path: str) -> bool:
    """Anything at all at `path` (a file, a dir, any object under the gs:// prefix)."""
    if is_gcs(path):
        return bool(_gcs_objects(path)) or gcs_fs().exists(path.rstrip("/"))
    return os.path.lexists(path)


def recover(path: str, say=None) -> None:
    """Finish or undo an interrupted commit of `path` (see the module doc). Safe to call at any time."""
    say = say or (lambda s: None)
    if is_gcs(path):
        stage = staging_path(path)
        objs = _gcs_objects(stage)
        if not objs:
            return
        if f"{stage}/{STAGED_MARKER}" in objs:
            say(f"ptm: finishing an interrupted commit of {path} from {stage}")
            _gcs_switch(stage, path)
        else:
            gcs_fs().rm([o for o in objs], recursive=False)
        return
    old = old_path(path)
    if os.path.lexists(old):
        if os.path.lexists(path):
            _rm_local(old)
        else:
            os.rename(old, path)
            say(f"ptm: restored {path} from {old} (a replacement was interrupted)")
    _rm_local(staging_path(path))


def check(path: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse an output that overlaps an input or a training run, or that exists without `overwrite` (on gs://:
    any object under the prefix). Reads only."""
    check_disjoint(path, inputs)
    if exists(path) and not overwrite:
        raise OutputError(f"{path}: output exists (pass --overwrite / overwrite=True to replace it)")


def prepare(path: str, overwrite: bool, inputs: Sequence[str] = (), is_leader: bool = True) -> str:
    """Finish an interrupted commit, check that `path` may be written (`check`), and return the staging place
    to build it in (emptied by the leader)."""
    if is_leader:
        recover(path, say=_stderr)
    check(path, overwrite, inputs)
    stage = staging_path(path)
    if is_leader:
        if is_gcs(path):
            objs = _gcs_objects(stage)
            if objs:
                gcs_fs().rm(objs)
        else:
            _rm_local(stage)
            os.makedirs(os.path.dirname(stage), exist_ok=True)
    return stage


def commit(stage: str, path: str) -> None:
    """Make the complete output at `stage` the output at `path` (leader only)."""
    if is_gcs(path):
        with gcs_fs().open(f"{stage}/{STAGED_MARKER}", "w") as f:
            f.write(json.dumps({"target": path}))
        _gcs_switch(stage, path)
        return
    _fsync_tree(stage)
    if os.path.lexists(path):
        old = old_path(path)
        _rm_local(old)
        os.rename(path, old)
        os.rename(stage, path)
        _rm_local(old)
    else:
        os.rename(stage, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def abort(stage: str) -> None:
    """Remove a staging place (never the output)."""
    try:
        if is_gcs(stage):
            objs = _gcs_objects(stage)
            if objs and f"{stage}/{STAGED_MARKER}" not in objs:
                gcs_fs().rm(objs)
        else:
            _rm_local(stage)
    except OSError:
        pass


def _gcs_switch(stage: str, path: str) -> None:
    fs = gcs_fs()
    staged = [o for o in _gcs_objects(stage) if not o.endswith("/" + STAGED_MARKER)]
    old = _gcs_objects(path)
    if old:
        fs.rm(old)
    rel = [o[len(stage) + 1 :] for o in staged]
    order = sorted(rel, key=lambda r: (r in COMPLETION_FILES, r))
    for r in order:
        _copy_object(fs, f"{stage}/{r}", f"{path}/{r}")
    fs.rm(staged + [f"{stage}/{STAGED_MARKER}"])
    fs.invalidate_cache()


def _copy_object(fs, src: str, dst: str) -> None:
    """Server-side copy of one GCS object (no download)."""
    fs.copy(src, dst)


def _rm_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_tree(root: str) -> None:
    """Flush every file and dir of a finished output before it is renamed into place (so a crash of the machine
    cannot leave a renamed output with missing data)."""
    for d, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stderr(s: str) -> None:
    import sys

    print(s, file=sys.stderr, flush=True)
