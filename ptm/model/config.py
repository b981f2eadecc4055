"""The decoder's configuration, and the named model presets (jax-free, so every layer can use it cheaply).

Presets are the gin files under `ptm/gin/models/` (`tiny`, `llama2_7b`, ...): each is defined once there and
referred to by name from gin (`--gin_file=models/NAME.gin`) and from experiment/search TOML (`model = "NAME"`).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots", "save_dots")
# Attention implementations (ptm.model.attention); "blockwise" may carry block sizes: "blockwise:256" or
# "blockwise:256x512" (query block x key block).
ATTENTION_IMPLS = ("reference", "blockwise", "splash", "cudnn", "auto")
PRESET_DIR = Path(__file__).resolve().parent.parent / "gin" / "models"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of the decoder. Defaults are a tiny CPU model."""

    vocab_size: int = 259  # the built-in byte tokenizer
    embed_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots | save_dots
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    max_seq_len: int = 2048
    attention: str = "reference"  # reference | blockwise[:Q[xK]] | splash | cudnn | auto (ptm.model.attention)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        parse_attention(self.attention)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    # Fields that change the parameter tree (resuming or merging across a change in these is an error).
    def shape_dict(self) -> dict[str, Any]:
        keys = (
            "vocab_size",
            "embed_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "tie_embeddings",
        )
        return {k: getattr(self, k) for k in keys}


def parse_attention(name: str) -> tuple[str, int | None, int | None]:
    """`ModelConfig.attention` -> (implementation, query block, key block); the blocks are None unless given."""
    if not isinstance(name, str):
        raise ValueError(f"attention={name!r}; choose one of {list(ATTENTION_IMPLS)}")
    impl, sep, blocks = name.partition(":")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={name!r}; choose one of {list(ATTENTION_IMPLS)}")
    if not sep:
        return impl, None, None
    parts = blocks.split("x")
    if impl != "blockwise" or len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"attention={name!r}: only 'blockwise' takes block sizes, as 'blockwise:N' or 'blockwise:QxK'"
        )
    bq = int(parts[0])
    return impl, bq, int(parts[-1])


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.gin"))


def preset_fields(name: str) -> dict[str, Any]:
    """The `ModelConfig.FIELD = VALUE` bindings of `ptm/gin/models/NAME.gin`, read without gin (the library
    stays free of it). Those files hold only Python literals; any other ModelConfig line is refused here, and a
    test checks that gin itself reads the same values."""
    path = PRESET_DIR / f"{name}.gin"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r} (presets: {', '.join(preset_names())})")
    out: dict[str, Any] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line.startswith("ModelConfig."):
            continue
        key, sep, value = line[len("ModelConfig."):].partition("=")
        if not sep:
            raise ConfigError(f"{path}:{i}: expected ModelConfig.FIELD = VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"{path}:{i}: preset values must be literals ({e})") from e
    return out


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with some fields changed (e.g. `dtype="float32"` for a CPU run)."""
    fields = {**preset_fields(name), **overrides}
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model preset {name!r} with {overrides}: {e}") from e


def from_spec(spec: Any, where: str) -> ModelConfig:
    """A model as experiment/search TOML names it: a preset name (`model = "toy_2m"`), or a table with
    `preset = "NAME"` plus fields to change, or (for a model no preset describes) a table of every field."""
    if isinstance(spec, str):
        try:
            return from_preset(spec)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: model must be a preset name or a table, got {spec!r}")
    fields = dict(spec)
    preset = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown ModelConfig field(s) {unknown} (known: {sorted(known)})")
    if preset is not None:
        try:
            return from_preset(str(preset), **fields)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
