"""Reading the TOML files users write (merge recipes, search and experiment configs) with errors that name them."""

from __future__ import annotations

import tomllib
from typing import Any

from ptm.errors import ConfigError


def load_toml(path: str, what: str) -> dict[str, Any]:
    """Parse `path`; a missing file or bad TOML is a ConfigError naming the file (`what` says what it should be)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such {what}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: bad TOML ({e})") from e
