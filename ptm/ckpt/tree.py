"""Tensor names of the parameter tree, and the model's tensor table (see docs/checkpoint-format.md).

A tensor's name is its path in the nested parameter dict joined with `.` (`layers.attention.wq`). Layers are
stacked on axis 0 of every `layers.*` tensor; Hugging Face style names carry the layer index instead
(`model.layers.3.mlp.up_proj.weight`). Jax-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from ptm.model.config import ModelConfig


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names (ptm.parallel.mesh rules map them to mesh axes)


def tensor_table(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every parameter of the Llama decoder for `cfg`: name -> (shape, logical axes). The model
    (`ptm.model.llama`) creates exactly these; tests check that it does."""
    L, V, E, H, KV, D, M = (cfg.num_layers, cfg.vocab_size, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.mlp_dim)
    t = {
        "embed.embedding": TensorSpec((V, E), ("vocab", "embed")),
        "layers.attention_norm.scale": TensorSpec((L, E), ("layers", "norm")),
        "layers.attention.wq": TensorSpec((L, E, H, D), ("layers", "embed", "heads", "head_dim")),
        "layers.attention.wk": TensorSpec((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim")),
        "layers.attention.wv": TensorSpec((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim")),
        "layers.attention.wo": TensorSpec((L, H, D, E), ("layers", "heads", "head_dim", "embed")),
        "layers.mlp_norm.scale": TensorSpec((L, E), ("layers", "norm")),
        "layers.mlp.w_gate": TensorSpec((L, E, M), ("layers", "embed", "mlp")),
        "layers.mlp.w_up": TensorSpec((L, E, M), ("layers", "embed", "mlp")),
        "layers.mlp.w_down": TensorSpec((L, M, E), ("layers", "mlp", "embed")),
        "final_norm.scale": TensorSpec((E,), ("norm",)),
    }
    if not cfg.tie_embeddings:
        t["lm_head.kernel"] = TensorSpec((E, V), ("embed", "vocab"))
    return t


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: s.shape for n, s in tensor_table(cfg).items()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a.b": x}` (leaves are whatever is not a Mapping)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a.b": x}` -> `{"a": {"b": x}}`: tensor names back into the parameter tree."""
    tree: dict[str, Any] = {}
    for name, v in flat.items():
        d = tree
        *head, last = name.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v
    return tree


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Layer index of an unstacked (HF-style) tensor name such as `model.layers.3.mlp.up_proj.weight`."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_stacked_layer(name: str) -> bool:
    """A ptm tensor whose axis 0 is the layer axis."""
    return name.startswith("layers.")
