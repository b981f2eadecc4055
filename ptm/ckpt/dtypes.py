"""Dtype names as users, Orbax/zarr and safetensors spell them (bf16 through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ptm.errors import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
# Float dtypes whose every value float32 holds exactly (the merge computes in float32).
FLOAT32_EXACT = frozenset({BF16, np.dtype(np.float16), np.dtype(np.float32)})

# safetensors header names <-> numpy dtypes (`safetensors.numpy` refuses bf16, hence our own table).
SAFETENSORS: dict[str, np.dtype] = {
    "BF16": BF16,
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
_SAFETENSORS_NAME = {v: k for k, v in SAFETENSORS.items()}
_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "f32": "float32", "f16": "float16"}


def parse_dtype(name: str | np.dtype) -> np.dtype:
    """'bfloat16' / 'bf16' / 'float32' / 'fp16' / a numpy dtype -> np.dtype; unknown names are a ConfigError."""
    if isinstance(name, np.dtype):
        return name
    name = _ALIASES.get(str(name), str(name))
    if name == "bfloat16":
        return BF16
    try:
        return np.dtype(name)
    except TypeError as e:
        raise ConfigError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)") from e


def dtype_name(dt: np.dtype) -> str:
    """The name `parse_dtype` reads back ('bfloat16', 'float32', ...)."""
    return "bfloat16" if np.dtype(dt) == BF16 else np.dtype(dt).name


def safetensors_name(dt: np.dtype) -> str:
    """The safetensors header name of a dtype ('BF16', 'F32', ...)."""
    try:
        return _SAFETENSORS_NAME[np.dtype(dt)]
    except KeyError as e:
        raise ConfigError(f"dtype {dt} cannot be stored in safetensors") from e
