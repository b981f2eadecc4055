"""Start a local multi-process JAX cluster on CPU (loopback coordinator, free port) running mp_worker.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("mp_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cluster(
    scenario: str,
    out: Path,
    *args: str,
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout: float = 150,
) -> list[dict[str, np.ndarray]]:
    """Run `scenario` in `num_processes` processes; return each process's result arrays (by process id)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(
            {
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
                "PTM_COORDINATOR": f"127.0.0.1:{port}",
                "PTM_NUM_PROCESSES": str(num_processes),
                "PTM_PROCESS_ID": str(pid),
            }
        )
        if num_processes == 1:
            for k in ("PTM_COORDINATOR", "PTM_NUM_PROCESSES", "PTM_PROCESS_ID"):
                env.pop(k)
        log = open(out / f"log_{pid}.txt", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, str(out), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    failed = []
    try:
        for pid, (p, _) in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append((pid, rc))
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failed:
        logs = "\n".join(
            f"--- process {pid} (rc={rc}) ---\n" + (out / f"log_{pid}.txt").read_text()[-3000:]
            for pid, rc in failed
        )
        raise AssertionError(f"cluster run {scenario!r} failed:\n{logs}")
    return [dict(np.load(out / f"result_{pid}.npz")) for pid in range(num_processes)]


def start_cli(
    args: list[str],
    logs: Path,
    *,
    num_processes: int = 2,
    devices_per_process: int = 4,
    env_extra: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> list[subprocess.Popen]:
    """Start `python -m ptm.cli ARGS` as one SPMD program of `num_processes` processes on localhost (the same
    command line in every process, the cluster from PTM_* variables, as tools/launch_tpu.py does on a slice).
    Each process logs to `logs`_<pid>.txt."""
    port = free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(
            {
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
                "PTM_COORDINATOR": f"127.0.0.1:{port}",
                "PTM_NUM_PROCESSES": str(num_processes),
                "PTM_PROCESS_ID": str(pid),
                "PTM_HEARTBEAT_TIMEOUT": "10",
                "PYTHONUNBUFFERED": "1",
                **(env_extra or {}),
            }
        )
        if num_processes == 1:
            for k in ("PTM_COORDINATOR", "PTM_NUM_PROCESSES", "PTM_PROCESS_ID"):
                env.pop(k)
        log = open(f"{logs}_{pid}.txt", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ptm.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
            )
        )
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float) -> None:
    """Wait for every process; on a failure or timeout kill the rest and raise with the logs' tails."""
    failed = []
    try:
        for pid, p in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append((pid, rc))
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        tails = "\n".join(
            f"--- process {pid} (rc={rc}) ---\n" + Path(f"{logs}_{i}.txt").read_text()[-4000:]
            for pid, rc in failed
            for i in range(len(procs))
        )
        raise AssertionError(f"cluster command failed:\n{tails}")
