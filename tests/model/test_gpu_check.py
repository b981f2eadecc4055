"""tools/gpu_check.sh: shell syntax, and its --dry-run (CPU, tiny config) end to end. The GPU figures themselves
come from running it on a GPU machine (docs/benchmarks.md); CI never needs one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU machine
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--steps", "1", "--batch", "1"], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "DRY RUN" in out and "device: cpu" in out
    # cudnn cannot run on CPU: it says so once and runs blockwise; both settings report throughput and MFU.
    assert "== attention=cudnn (runs as blockwise)" in out and "cudnn needs an NVIDIA GPU" in out
    assert "== attention=blockwise (runs as blockwise)" in out
    assert out.count("tokens/s, ") == 2 and "MFU n/a (unknown peak)" in out
