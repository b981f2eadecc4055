"""Weighted sums of checkpoints kept resident on the devices: one jitted function, bit-identical to the engine.

A merge search evaluates thousands of candidate weightings of the same pool. Instead of reading the inputs for
every candidate (`engine.merge_to_tree`), the caller stacks each tensor of the pool once as a jax Array
`[M, ...]` (rows 0..n-1: the models; row n: the base for task arithmetic) and calls the function built here with
a new weight matrix each time; the weights are an argument, so it compiles once.

The result equals the engine's `linear` / `task_arithmetic` merge of the same weights bit for bit: the same
operation order (linear: 0 + w_0 x_0 + w_1 x_1 ...; task arithmetic: base + w_0 (x_0 - base) + ...), each step
rounded to float32 as numpy does (see `_rounded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ptm.ckpt.tree import is_stacked_layer
from ptm.errors import MergeError

KINDS = ("linear", "task_arithmetic")


def _rounded(p, zero):
    """`p` forced through memory as float32: XLA (CPU and GPU) would contract multiply+add into an FMA and
    differ from numpy in the last bit. Routing the product through an integer OR with a runtime zero is opaque
    to the compiler and costs one integer op."""
    import jax
    import jax.numpy as jnp

    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(p, jnp.uint32) | zero, jnp.float32)


def weighted_sum_fn(infos: Mapping[str, Any], n: int, kind: str, layer_group: Sequence[int] | np.ndarray,
                    other_group: int, shardings: Mapping[str, Any] | None = None) -> Callable:
    """The jitted merge `f(stacked, weights, zero) -> {name: merged tensor}`.

    infos: tensor name -> info with `.shape` and `.dtype` (an input store's TensorInfo); the output has these
    names, shapes and dtypes. stacked: name -> jax Array [M, *shape] (M = n, or n + 1 with the base last for
    task arithmetic). weights: float32 [groups, n]. zero: `np.uint32(0)` (a runtime zero, see `_rounded`).
    kind: "linear" (sum_i w_i x_i) or "task_arithmetic" (base + sum_i w_i (x_i - base)).
    layer_group: the weight row of each layer, for stacked `layers.*` tensors (axis 0 = layer); every other
    tensor (embeddings, final norm, lm_head) uses row `other_group`. shardings: name -> output sharding.
    """
    import jax
    import jax.numpy as jnp

    if kind not in KINDS:
        raise MergeError(f"resident weighted sum: kind {kind!r} not in {KINDS}")
    names = list(infos)
    lg = np.asarray(layer_group, dtype=np.int64)

    def coefficients(w, shape: tuple[int, ...], name: str) -> list:
        if is_stacked_layer(name) and len(shape) > 0:
            wt = w[jnp.asarray(lg)]  # [L, n]
            return [wt[:, i].reshape((-1,) + (1,) * (len(shape) - 1)) for i in range(n)]
        return [w[other_group, i] for i in range(n)]

    def merge(stacked, w, zero):
        out = {}
        for name in names:
            x, info = stacked[name], infos[name]
            coef = coefficients(w, tuple(info.shape), name)
            if kind == "linear":
                acc = jnp.zeros(info.shape, jnp.float32)
                for i in range(n):
                    acc = acc + _rounded(coef[i] * x[i].astype(jnp.float32), zero)
            else:
                base = x[n].astype(jnp.float32)
                acc = base
                for i in range(n):
                    acc = acc + _rounded(coef[i] * (x[i].astype(jnp.float32) - base), zero)
            out[name] = acc.astype(info.dtype)
        return out

    return jax.jit(merge, out_shardings=dict(shardings) if shardings else None)
