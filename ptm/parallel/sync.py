"""What an SPMD command needs besides the mesh: barriers with a timeout, process-0 decisions every host shares,
and writes that happen once (process 0), atomically, local or gs://.

Every host runs the same program, so every host makes the same decisions from the same inputs; where an input
is the shared filesystem (a cached score, a stage marker) process 0 reads it and broadcasts what it saw through
the coordination service's key-value store, so a file appearing between two hosts' reads can never split them.

Failure: a process that dies (SIGKILL, preemption) stops sending heartbeats; the JAX coordination service
notices within `PTM_HEARTBEAT_TIMEOUT` seconds (`ptm.parallel.distributed.initialize`) and aborts every other
process with "The following tasks are unhealthy (stopped sending heartbeats): <ids>". A barrier or a broadcast
that waits longer than `PTM_BARRIER_TIMEOUT` seconds (a hung peer) raises `ClusterError` naming the processes
that did not arrive. Either way the command exits non-zero and relaunching it on every host resumes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax

from ptm.errors import PtmError

ENV_BARRIER_TIMEOUT = "PTM_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT_S = 3600.0  # a peer may legitimately be busy (process 0 writing a report) for long

_counter: dict[str, int] = {}


class ClusterError(PtmError):
    """A peer process is dead or hung (barrier or broadcast timed out)."""


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Only process 0 writes reports, tables, plots, JSON/CSV and stage markers."""
    return jax.process_index() == 0


def barrier_timeout_s() -> float:
    raw = os.environ.get(ENV_BARRIER_TIMEOUT)
    return float(raw) if raw else DEFAULT_BARRIER_TIMEOUT_S


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _unique(name: str) -> str:
    n = _counter.get(name, 0)
    _counter[name] = n + 1
    return f"ptm/{name}/{n}"


def _dead_peers(msg: str) -> str:
    ids = sorted(set(re.findall(r"task[: ]+(\d+)", msg)) - {str(jax.process_index())}, key=int)
    if ids:
        return "process(es) " + ", ".join(ids)
    return "another process"


def _cluster_error(what: str, timeout: float, e: Exception) -> ClusterError:
    msg = str(e)
    return ClusterError(
        f"{what}: {_dead_peers(msg)} did not arrive within {timeout:.0f} s or failed (killed or preempted?); "
        f"process {jax.process_index()} of {jax.process_count()} stops here. Relaunch the same command on every "
        f"host to resume from the last completed stage. ({msg.splitlines()[0][:300] if msg else type(e).__name__})"
    )


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() <= 1:
        return
    timeout = barrier_timeout_s() if timeout_s is None else timeout_s
    try:
        _client().wait_at_barrier(_unique(name), int(timeout * 1000))
    except Exception as e:  # JaxRuntimeError: DEADLINE_EXCEEDED, or the peer's task is in error
        raise _cluster_error(f"barrier {name!r}", timeout, e) from e


def broadcast_json(name: str, value: Any = None, timeout_s: float | None = None) -> Any:
    """Process 0's `value` (JSON-able) on every process; the others' `value` is ignored."""
    if jax.process_count() <= 1:
        return value
    timeout = barrier_timeout_s() if timeout_s is None else timeout_s
    key = _unique(f"bcast/{name}")
    client = _client()
    try:
        if is_writer():
            client.key_value_set(key, json.dumps(value, default=str))
            return json.loads(json.dumps(value, default=str))
        return json.loads(client.blocking_key_value_get(key, int(timeout * 1000)))
    except Exception as e:
        raise _cluster_error(f"broadcast {name!r}", timeout, e) from e


def gather_ints(values: list[int]) -> list[list[int]]:
    """Each process's list of ints (same length everywhere), by process: for per-host statistics."""
    if jax.process_count() <= 1:
        return [list(values)]
    import numpy as np
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return np.asarray(got).reshape(jax.process_count(), -1).tolist()


# ------------------------------------------------------------------------------------------- writes


def write_text(path: str, text: str) -> None:
    """Atomic write (process 0 only, a no-op elsewhere): local via rename, gs:// as one object upload."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """`write_text` for bytes (plots)."""
    if not is_writer():
        return
    write_bytes_any_process(path, data)


def write_bytes_any_process(path: str, data: bytes) -> None:
    p = str(path)
    if p.startswith("gs://"):
        from etils import epath

        epath.Path(p).write_bytes(data)  # a GCS object appears whole or not at all
        return
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def stage_done(name: str, marker: str | None = None, obj: Any = None) -> None:
    """End of a stage: wait until every process has finished it, then process 0 writes its marker."""
    barrier(f"stage/{name}")
    if marker is not None:
        write_json(marker, obj if obj is not None else {"stage": name, "complete": True})
    barrier(f"stage/{name}/marker")
