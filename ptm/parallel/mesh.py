"""Device mesh (data × fsdp × tensor) and logical-axis rules, MaxText style.

Every parameter and activation carries logical axis names (see `ptm.model.llama`; the parameters' shardings
are built in `ptm.model.sharding`); a rules table — configured
with gin — maps them to mesh axes. A mesh axis is used at most once per array: flax gives it to the first rule
in the table that claims it, so order matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        free = [i for i, s in enumerate(sizes) if s == -1]
        if len(free) > 1:
            raise ConfigError(f"MeshConfig{tuple(sizes)}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"MeshConfig{tuple(sizes)}: sizes must be positive or -1")
        fixed = math.prod(s for s in sizes if s != -1)
        if free:
            if num_devices % fixed:
                raise ConfigError(f"{num_devices} devices are not divisible by data*fsdp*tensor={fixed}")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
                f"but {num_devices} are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all global devices), axis order data, fsdp, tensor.

    The tensor axis is innermost so tensor-parallel collectives stay on the fastest links.
    """
    devs = list(devices) if devices is not None else jax.devices()
    shape = config.resolve(len(devs))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devs)
    except Exception:  # CPU / compile-only topologies without a physical layout: plain order is fine
        arr = np.array(devs).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical: PartitionSpec, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical), rules))


def tree_shardings(logical_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Map a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: logical_to_sharding(spec, mesh, rules),
        logical_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of [batch, length] input arrays: batch over the data-parallel axes."""
    return logical_to_sharding(PartitionSpec("batch", "length"), mesh, rules)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(params_abstract, shardings) -> None:
    """Fail early, naming the tensor, when a sharded dimension does not divide the mesh axis size."""
    problems = []
    flat_p = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s, strict=True):
        for dim, axes in zip(leaf.shape, sh.spec, strict=False):
            if axes is None:
                continue
            names = (axes,) if isinstance(axes, str) else axes
            n = math.prod(sh.mesh.shape[a] for a in names)
            if dim % n:
                problems.append(f"{jax.tree_util.keystr(path)}: dim {dim} not divisible by mesh {names}={n}")
    if problems:
        raise ConfigError("parameter shapes do not fit the mesh:\n  " + "\n  ".join(problems))
