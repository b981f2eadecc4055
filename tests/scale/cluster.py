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
