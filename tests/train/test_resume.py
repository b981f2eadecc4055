"""Exact resume: a run SIGKILLed at an arbitrary point and restarted ends bitwise equal to an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from ptm.ckpt.params import load_params

from .conftest import write_reverse_task

TINY_FLAGS = [
    "--gin_file=models/tiny.gin",
    "--gin_file=meshes/cpu.gin",
    "--gin_file=runs/sft.gin",
    "--gin_file=runs/toy.gin",
    "--gin.BASE_CKPT=None",
    "--gin.ModelConfig.embed_dim=32",
    "--gin.ModelConfig.num_heads=2",
    "--gin.ModelConfig.num_kv_heads=1",
    "--gin.ModelConfig.head_dim=16",
    "--gin.ModelConfig.mlp_dim=64",
    "--gin.ModelConfig.dtype='float32'",
    "--gin.DataConfig.seq_len=48",
    "--gin.DataConfig.global_batch_size=8",
    "--gin.DataConfig.num_epochs=3",
    "--gin.train.save_every=3",
    "--gin.train.log_every=1",
]


def _cmd(data, run_dir):
    return [
        sys.executable,
        "-m",
        "ptm.cli",
        "train",
        *TINY_FLAGS,
        f"--gin.GENERAL_DATA='{data}'",
        f"--run_dir={run_dir}",
    ]


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]  # a replayed step overwrites the pre-kill record
    return out


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    data = write_reverse_task(tmp_path / "d.jsonl", n=160)  # ~60 steps: the kill lands before the end
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, ref), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill at an arbitrary point after the first checkpoint exists (mid-step or mid-save).
    deadline = time.time() + 300
    while not (run / "checkpoints" / "3").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at, "the run was killed before any checkpoint was committed"
    assert not (run / "run.json").exists(), "killed too late: the run had already finished"

    subprocess.run(_cmd(data, run), check=True, env=env, capture_output=True, timeout=600)
    a, meta_a = load_params(ref)
    b, meta_b = load_params(run)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta_a["data"] == meta_b["data"]
    assert meta_a["step"] == meta_b["step"]
    # Same examples in the same order: every step's loss is identical.
    assert _losses(ref) == _losses(run)
