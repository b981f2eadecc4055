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


def cluster_env(pid: int, num_processes: int, port: int, devices_per_process: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `pid` of a localhost cluster: CPU devices, the PTM_* cluster variables (none for a
    single process, so it runs without a coordinator), unbuffered output, then `extra`."""
    env = dict(os.environ)
    for k in ("PTM_COORDINATOR", "PTM_NUM_PROCESSES", "PTM_PROCESS_ID"):
        env.pop(k, None)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"})
    if num_processes > 1:
        env.update({"PTM_COORDINATOR": f"127.0.0.1:{port}", "PTM_NUM_PROCESSES": str(num_processes),
                    "PTM_PROCESS_ID": str(pid)})
    env.update(extra or {})
    return env


def spawn(cmd: list[str], logs: Path | str, *, num_processes: int = 2, devices_per_process: int = 4,
          env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> list[subprocess.Popen]:
    """Start `cmd` as one SPMD program of `num_processes` processes on localhost (the same command line in every
    process, the cluster from PTM_* variables, as tools/launch_tpu.py does on a slice); process i logs to
    `logs`_i.txt."""
    port = free_port()
    procs = []
    for pid in range(num_processes):
        with open(f"{logs}_{pid}.txt", "w") as log:
            procs.append(subprocess.Popen(
                cmd, env=cluster_env(pid, num_processes, port, devices_per_process, env_extra), stdout=log,
                stderr=subprocess.STDOUT, cwd=cwd))
    return procs


def start_cli(args: list[str], logs: Path, *, env_extra: dict[str, str] | None = None, **kw) -> list[subprocess.Popen]:
    """`python -m ptm.cli ARGS` as one SPMD program (see `spawn`); a short heartbeat timeout, so that the
    survivors of a killed process fail within seconds (the kill-and-resume tests rely on it)."""
    return spawn([sys.executable, "-m", "ptm.cli", *args], logs,
                 env_extra={"PTM_HEARTBEAT_TIMEOUT": "10", **(env_extra or {})}, **kw)


def run_cluster(scenario: str, out: Path, *args: str, num_processes: int = 2, devices_per_process: int = 4,
                timeout: float = 150) -> list[dict[str, np.ndarray]]:
    """Run mp_worker.py's `scenario` in `num_processes` processes; return each process's result arrays."""
    out.mkdir(parents=True, exist_ok=True)
    procs = spawn([sys.executable, str(WORKER), scenario, str(out), *args], out / "log",
                  num_processes=num_processes, devices_per_process=devices_per_process)
    wait_all(procs, out / "log", timeout)
    return [dict(np.load(out / f"result_{pid}.npz")) for pid in range(num_processes)]


def wait_all(procs: list[subprocess.Popen], logs: Path | str, timeout: float) -> None:
    """Wait for every process; on a failure or timeout kill the rest and raise with every process's log tail."""
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
        pid, rc = failed[0]
        tails = "\n".join(f"--- process {i}{f' (rc={rc})' if i == pid else ''} ---\n"
                          + Path(f"{logs}_{i}.txt").read_text()[-4000:] for i in range(len(procs)))
        raise AssertionError(f"cluster command failed (process {pid}, rc={rc}):\n{tails}")
