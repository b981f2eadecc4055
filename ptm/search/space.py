"""The search space: how an unconstrained CMA-ES vector becomes merge weights (docs/search.md explains why
softmax is the default simplex parametrisation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptm.errors import ConfigError


def softmax_simplex(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: every row is strictly positive and sums to 1 (up to rounding)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def abs_simplex(x: np.ndarray) -> np.ndarray:
    """|x| / sum |x| row-wise (exact zeros reachable; all-zero rows map to uniform)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    s = a.sum(axis=-1, keepdims=True)
    n = a.shape[-1]
    return np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / n)


PARAMETRISATIONS = {"softmax": softmax_simplex, "abs": abs_simplex}


@dataclass(frozen=True)
class Space:
    """How a CMA-ES vector x (length groups * n) becomes a weight matrix [groups, n].

    kind "simplex": each row on the probability simplex via `parametrisation`; merge = sum_i w_i theta_i.
    kind "task_vector": rows are raw weights (CMA-ES box bounds [lo, hi]);
    merge = base + sum_i w_i (theta_i - base).
    groups = 1 (one weight per checkpoint) or layer_groups + 1: contiguous blocks of layers, then one group
    for every tensor outside `layers.*` (embeddings, final norm, lm_head).
    """

    n: int
    kind: str = "simplex"
    parametrisation: str = "softmax"
    layer_groups: int = 0
    bounds: tuple[float, float] = (-0.5, 1.5)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("the pool is empty")
        if self.kind not in ("simplex", "task_vector"):
            raise ConfigError(f"search space {self.kind!r}: use 'simplex' or 'task_vector'")
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"parametrisation {self.parametrisation!r}: "
                              f"use one of {sorted(PARAMETRISATIONS)}")
        if self.layer_groups < 0:
            raise ConfigError(f"layer_groups must be >= 0, got {self.layer_groups}")

    @property
    def groups(self) -> int:
        return 1 if self.layer_groups == 0 else self.layer_groups + 1

    @property
    def dim(self) -> int:
        return self.groups * self.n

    def weights(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(self.groups, self.n)
        if self.kind == "simplex":
            return PARAMETRISATIONS[self.parametrisation](x)
        return x.copy()

    def x0(self) -> np.ndarray:
        """Start at the uniform soup: logits 0 (softmax), all ones (abs), or 1/n task-vector weights."""
        if self.kind == "task_vector":
            return np.full(self.dim, 1.0 / self.n)
        return np.zeros(self.dim) if self.parametrisation == "softmax" else np.ones(self.dim)

    def default_sigma(self) -> float:
        if self.kind == "task_vector":
            return 0.3
        return 1.0 if self.parametrisation == "softmax" else 0.5

    def cma_bounds(self) -> np.ndarray | None:
        if self.kind != "task_vector":
            return None
        return np.tile(np.array(self.bounds, dtype=np.float64), (self.dim, 1))

    def layer_group_of(self, n_layers: int) -> np.ndarray:
        """Group index of each layer (contiguous, as equal as possible)."""
        if self.layer_groups == 0:
            return np.zeros(n_layers, dtype=np.int64)
        if self.layer_groups > max(n_layers, 1):
            raise ConfigError(f"layer_groups={self.layer_groups} exceeds the model's {n_layers} layers")
        blocks = np.array_split(np.arange(n_layers), self.layer_groups)
        return np.concatenate([np.full(len(a), g) for g, a in enumerate(blocks)]).astype(np.int64)

    @property
    def other_group(self) -> int:
        return self.groups - 1

