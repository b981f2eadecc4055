"""The kill-and-resume skeleton shared by the exact-resume tests (tests/train/test_resume.py,
tests/data/test_seqio_resume.py): run a command to the end, run it again and SIGKILL it at an arbitrary point
after its first checkpoint, restart it, and compare the two runs bitwise."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

from ptm.ckpt.params import load_params


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (a step replayed after a restart overwrites the pre-kill record)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def kill_after_checkpoint(cmd: list[str], run: Path, env: dict, *, step: int = 3, jitter_s: float = 1.5,
                          tries: int = 4) -> None:
    """Start `cmd`, SIGKILL it a random 0..jitter_s seconds after checkpoint `step` appears (mid-step or mid-save),
    and check the kill landed between the first committed checkpoint and the end of the run. A tiny run can end
    within the jitter (seen on a loaded 2-core CI machine): then it is run again from scratch, the jitter halved."""
    for _ in range(tries):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (run / "checkpoints" / str(step)).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random().uniform(0.0, jitter_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert killed_at, "the run was killed before any checkpoint was committed"
        if not (run / "run.json").exists():
            return
        shutil.rmtree(run)
        jitter_s /= 2
    raise AssertionError(f"killed too late {tries} times: the run had always finished")


def assert_same_run(ref: Path, run: Path) -> tuple[dict, dict]:
    """Bitwise-equal parameters, equal data metadata and step, identical per-step losses; returns both metas."""
    a, meta_a = load_params(ref)
    b, meta_b = load_params(run)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta_a["data"] == meta_b["data"]
    assert meta_a["step"] == meta_b["step"]
    assert losses(ref) == losses(run)  # same examples in the same order
    return meta_a, meta_b
