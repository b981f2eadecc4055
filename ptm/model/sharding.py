"""Shardings of the model's parameters: their logical axes (`ptm.ckpt.tree.tensor_table`) through the mesh rules."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptm.model.llama import abstract_params, logical_axes
from ptm.parallel.mesh import DEFAULT_RULES, Rules, tree_shardings


def param_shardings(model_config, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for the parameter tree of `model_config`.

    A dimension that its mesh axes do not divide (e.g. 2 KV heads on tensor=4) is replicated instead of failing,
    so small models run on any mesh; big configs are checked by `tools/aot_check.py`.
    """
    shardings = tree_shardings(logical_axes(model_config), mesh, rules)
    return jax.tree.map(_fit, abstract_params(model_config), shardings)


def _fit(leaf, sh: NamedSharding) -> NamedSharding:
    spec = []
    for dim, axes in zip(
        leaf.shape, tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec)), strict=True
    ):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        n = math.prod(sh.mesh.shape[a] for a in names)
        spec.append(axes if n and dim % n == 0 else None)
    return NamedSharding(sh.mesh, PartitionSpec(*spec))
