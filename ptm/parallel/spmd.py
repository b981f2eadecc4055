"""Start-up of an SPMD command: join the cluster first, then build the one global mesh all its stages use."""

from __future__ import annotations

from ptm.errors import ConfigError
from ptm.parallel import distributed


def parse_mesh_spec(spec: str):
    """'DATA,FSDP,TENSOR' (one may be -1) -> MeshConfig."""
    from ptm.parallel.mesh import MeshConfig

    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"--mesh {spec!r}: expected three integers DATA,FSDP,TENSOR, e.g. 1,-1,1") from None
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def cli_mesh(spec: str | None):
    """`initialize()`, then the mesh of a `--mesh DATA,FSDP,TENSOR` flag. Without the flag: no mesh for one
    process (as before), and data=1 x fsdp=all devices when the command runs on several processes (every
    process must take part in every computation)."""
    distributed.initialize()
    import jax

    from ptm.parallel.mesh import MeshConfig, make_mesh

    if spec is None:
        return make_mesh(MeshConfig()) if jax.process_count() > 1 else None
    return make_mesh(parse_mesh_spec(spec))


def is_writer() -> bool:
    from ptm.parallel.sync import is_writer as w

    return w()
