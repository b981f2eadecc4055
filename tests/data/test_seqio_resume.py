"""Exact resume on a seqio source: a `ptm train` run (t5x macro names, runs/t5x_compat.gin) SIGKILLed after its
first checkpoint and restarted ends bitwise equal to an uninterrupted run, step losses included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed (pip install -e .[seqio])")

from tests.resume import assert_same_run, kill_after_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
FLAGS = [
    "--gin_file=models/tiny.gin",
    "--gin_file=meshes/cpu.gin",
    "--gin_file=runs/t5x_compat.gin",
    "--seqio_module=seqio_tasks",
    "--gin.MIXTURE_OR_TASK_NAME='ptm_lm'",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 48}",
    "--gin.DataConfig.seq_len=48",
    "--gin.TRAIN_STEPS=12",
    "--gin.BATCH_SIZE=8",
    "--gin.RANDOM_SEED=5",
    "--gin.ModelConfig.vocab_size=320",
    "--gin.ModelConfig.embed_dim=32",
    "--gin.ModelConfig.num_heads=2",
    "--gin.ModelConfig.num_kv_heads=1",
    "--gin.ModelConfig.head_dim=16",
    "--gin.ModelConfig.mlp_dim=64",
    "--gin.ModelConfig.dtype='float32'",
    "--gin.OptimizerConfig.learning_rate=3e-3",
    "--gin.train.save_every=3",
    "--gin.train.log_every=1",
]


def _cmd(run_dir, spm):
    return [sys.executable, "-m", "ptm.cli", "train", *FLAGS, f"--gin.train.tokenizer='{spm}'",
            f"--gin.MODEL_DIR='{run_dir}'"]


def test_sigkill_and_resume_on_a_seqio_source_is_bitwise_identical(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PTM_SEQIO_TEST_DIR": str(data),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    spm = data / "spm.model"
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, spm), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    kill_after_checkpoint(_cmd(run, spm), run, env, step=3, jitter_s=1.0)
    out = subprocess.run(_cmd(run, spm), check=True, env=env, capture_output=True, text=True, timeout=600)
    assert "resumed at step" in out.stdout
    meta, _ = assert_same_run(ref, run)
    assert meta["step"] == 12 and meta["data"]["train_examples"] == 120
    state = json.loads(next((run / "checkpoints" / "12" / "data_iter").glob("process_*.json")).read_text())
    assert state["batches_done"] == 12 and state["source"] == "seqio:ptm_lm"
