"""What the environment says about a multi-process run, read without importing jax (0.6-1 s of start-up that a
single-process command such as `ptm merge` does not need)."""

from __future__ import annotations

import glob
import os

from ptm.errors import ConfigError

ENV_COORDINATOR = "PTM_COORDINATOR"
ENV_NUM_PROCESSES = "PTM_NUM_PROCESSES"
ENV_PROCESS_ID = "PTM_PROCESS_ID"
ENV_TPU_VM = "PTM_TPU_VM"  # "1" forces, "0" disables TPU VM auto-detection


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM worker: TPU device nodes exist (v2-v4 `/dev/accel*`, v5+ `/dev/vfio/N`)."""
    forced = os.environ.get(ENV_TPU_VM)
    if forced is not None:
        return forced == "1"
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not an integer") from e


def cluster_requested() -> bool:
    """Whether `distributed.initialize()` could join a cluster: a TPU VM, or any of the PTM_* variables set
    (initialize() itself validates them). False means one process, and jax need not be imported to know it."""
    return on_tpu_vm() or any(os.environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
