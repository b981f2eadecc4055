"""Multi-controller start-up: one Python process per host, all running the same program (SPMD).

* TPU VM slices: `jax.distributed.initialize()` with no arguments; JAX reads the slice topology from the TPU
  metadata, so every worker can run the identical command line.
* Elsewhere (CPU clusters, GPU hosts without a scheduler JAX recognises, local tests): coordinator address,
  process count and id come from the arguments or from `PTM_COORDINATOR`, `PTM_NUM_PROCESSES`,
  `PTM_PROCESS_ID`. On CPU the cross-process collectives need gloo, which must be chosen before the CPU
  backend starts, so it is set here first.
* One process (no arguments, no environment, not a TPU VM): nothing to do.

Call `initialize()` before anything touches `jax.devices()`; jax refuses to join a cluster after its backends
have started, and we turn that into a `ConfigError` that says so.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import jax

from ptm.errors import ConfigError
from ptm.parallel.cluster_env import (  # noqa: F401  (re-exported: the variables are part of this API)
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_TPU_VM,
    on_tpu_vm,
)
from ptm.parallel.cluster_env import env_int as _env_int

# Seconds without heartbeats after which the coordination service declares a process dead and aborts all the
# others (fail fast after a SIGKILL or preemption instead of hanging in the next collective).
ENV_HEARTBEAT_TIMEOUT = "PTM_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


@dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    mode: str  # "single" | "tpu-vm" | "explicit"

    @property
    def is_coordinator(self) -> bool:
        return self.process_id == 0


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def _info(mode: str) -> ProcessInfo:
    return ProcessInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        mode=mode,
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Join (or start) the multi-process JAX cluster; idempotent; a no-op for a single process."""
    if jax.distributed.is_initialized():
        return _info("explicit" if not on_tpu_vm() else "tpu-vm")

    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None

    if not explicit:
        if not on_tpu_vm():
            return _info("single")
        _check_not_started("a TPU VM slice")
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=_heartbeat_s())
        return _info("tpu-vm")

    if num_processes == 1 and not coordinator_address:
        return _info("single")
    missing = [
        n
        for n, v in (
            (ENV_COORDINATOR, coordinator_address),
            (ENV_NUM_PROCESSES, num_processes),
            (ENV_PROCESS_ID, process_id),
        )
        if v is None
    ]
    if missing:
        raise ConfigError(
            f"multi-process start needs coordinator address, process count and id; missing: "
            f"{', '.join(missing)} (pass them as arguments or set the environment variables)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    if ":" not in coordinator_address:
        raise ConfigError(f"coordinator address {coordinator_address!r} must be host:port")
    if num_processes == 1:
        return _info("single")

    _check_not_started(f"coordinator {coordinator_address}")
    if _cpu_only():
        # Without this, cross-process collectives on CPU fail at run time ("no collectives implementation").
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=_heartbeat_s(),
    )
    return _info("explicit")


def _heartbeat_s() -> int:
    v = _env_int(ENV_HEARTBEAT_TIMEOUT)
    if v is not None and v < 1:
        raise ConfigError(f"{ENV_HEARTBEAT_TIMEOUT}={v} must be >= 1 second")
    return DEFAULT_HEARTBEAT_TIMEOUT_S if v is None else v


def _cpu_only() -> bool:
    platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not on_tpu_vm() and not glob.glob("/dev/nvidia[0-9]*")


def _check_not_started(what: str) -> None:
    if _backends_started():
        raise ConfigError(
            f"cannot join {what}: JAX devices were already initialised in this process; call "
            "ptm.parallel.distributed.initialize() before anything uses jax.devices() or arrays"
        )


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def sync(name: str) -> None:
    """Barrier across processes (no-op for one) with a timeout; use around filesystem steps every host must see."""
    from ptm.parallel.sync import barrier

    barrier(name)
