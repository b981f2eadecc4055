"""Gin glue (t5x conventions): the library stays free of gin; this module registers its functions/classes.

`ptm train --gin_file=A.gin --gin_file=B.gin --gin.NAME=VALUE`: files are parsed in order, then bindings, so later
files and flags win. Files are looked up as given, then relative to the search path: `$PTM_GIN_PATH`
(colon-separated) and the packaged `ptm/gin/` directory (`gin/` at the repository root links to it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gin
from ptm.errors import ConfigError

_REGISTERED = False
GIN_DIR = Path(__file__).resolve().parent / "gin"  # shipped in the package (repo-root gin/ links here)


def register() -> None:
    """Register the configurable library objects with gin (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ptm.data.pipeline import DataConfig, SourceConfig
    from ptm.model.config import ModelConfig
    from ptm.parallel.mesh import MeshConfig
    from ptm.train.loop import train
    from ptm.train.optimizer import OptimizerConfig

    for obj in (train, ModelConfig, DataConfig, SourceConfig, OptimizerConfig, MeshConfig):
        gin.external_configurable(obj, name=obj.__name__)
    _REGISTERED = True


def _safe_exists(check):
    def exists(path: str) -> bool:
        try:
            return check(path)
        except TypeError:  # a namespace package has no origin: not a gin resource
            return False

    return exists


def _guard_gin_resource_reader() -> None:
    """gin resolves `include 'runs/sft.gin'` also as a resource of a Python package `runs`; a plain directory
    `runs/` in the working directory (where users put their runs) is found as a *namespace* package without a
    file, and gin crashes with a TypeError instead of moving on to the search path. Wrap its existence checks
    so that case counts as "not here" (gin-config 0.5: `gin.config._FILE_READERS`; left alone if that changes)."""
    readers = getattr(gin.config, "_FILE_READERS", None)
    if not isinstance(readers, list):
        return
    for i, entry in enumerate(readers):
        if isinstance(entry, tuple) and len(entry) == 2 and not getattr(entry[1], "_ptm_safe", False):
            safe = _safe_exists(entry[1])
            safe._ptm_safe = True
            readers[i] = (entry[0], safe)


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("PTM_GIN_PATH", "").split(":") if p]
    return [*extra, GIN_DIR]


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parse files then bindings; unknown configurables or parameters become ConfigError naming the culprit."""
    register()
    _guard_gin_resource_reader()
    gin.clear_config()
    for p in search_path():
        if p.is_dir():
            gin.add_config_file_search_path(str(p))
    for f in gin_files:
        try:
            with _quiet_gin():
                gin.parse_config_file(_find(f))
        except OSError as e:
            raise ConfigError(
                f"gin file {f!r} not found (searched: {[str(p) for p in search_path()]})"
            ) from e
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"gin file {f!r}: {e}") from e
    for b in bindings:
        try:
            gin.parse_config(b)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"gin binding {b!r}: {e}") from e


def _find(f: str) -> str:
    """Resolve a gin file against the cwd, then the search path (so gin need not log its misses)."""
    for base in [Path.cwd(), *search_path()]:
        if (base / f).is_file():
            return str(base / f)
    return f


class _quiet_gin:
    """Gin logs an ERROR for every search-path prefix an `include` misses before it finds the file."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger()
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull t5x-style `--gin.NAME=VALUE` flags out of argv; returns (bindings, rest)."""
    bindings, rest = [], []
    for a in argv:
        if a.startswith("--gin."):
            name, sep, value = a[len("--gin.") :].partition("=")
            if not sep:
                raise ConfigError(f"{a!r}: expected --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(a)
    return bindings, rest
