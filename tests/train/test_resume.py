"""Exact resume: a run SIGKILLed at an arbitrary point and restarted ends bitwise equal to an uninterrupted run."""

import os
import subprocess
import sys

from tests.resume import assert_same_run, kill_after_checkpoint

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


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    data = write_reverse_task(tmp_path / "d.jsonl", n=160)  # ~60 steps: the kill lands before the end
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, ref), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    kill_after_checkpoint(_cmd(data, run), run, env, step=3, jitter_s=1.5)
    subprocess.run(_cmd(data, run), check=True, env=env, capture_output=True, timeout=600)
    assert_same_run(ref, run)
