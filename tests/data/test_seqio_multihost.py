"""A seqio LM source in a real 2-process JAX cluster: each host builds pipelines for its own shard only (planning
included), and gets exactly the batches and stats of the single-process plan over both shards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed (pip install -e .[seqio])")

import seqio_mp_worker  # noqa: E402  (its CONFIG; importing it outside a cluster is a single process)
import seqio_tasks  # noqa: E402

from ptm.data.pipeline import build_train_data  # noqa: E402
from ptm.data.tokenizers import load_tokenizer  # noqa: E402
from tests.scale.cluster import spawn, wait_all  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_each_host_plans_only_its_own_shard(tmp_path):
    extra = {"PTM_SEQIO_TEST_DIR": str(seqio_tasks.DIR),
             "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = spawn([sys.executable, str(HERE / "seqio_mp_worker.py"), str(tmp_path)], tmp_path / "log",
                  devices_per_process=1, env_extra=extra)
    wait_all(procs, tmp_path / "log", timeout=300)

    tok = load_tokenizer(seqio_tasks.SPM_PATH)
    for pid in range(2):
        got = json.loads((tmp_path / f"result_{pid}.json").read_text())
        assert got["shards"] == [pid, pid]  # one pipeline to plan, one to train: both this host's shard
        it, ref = build_train_data(seqio_mp_worker.CONFIG, tok, process_index=pid, process_count=2)  # plans both
        assert got["stats"] == json.loads(json.dumps(ref.to_dict())) and got["cum"] == ref._cum.tolist()
        batches = np.load(tmp_path / f"batches_{pid}.npz")
        want = list(it)
        assert got["batches"] == len(want) == ref.num_batches > 0
        for i, b in enumerate(want):
            for k, v in b.items():
                np.testing.assert_array_equal(batches[f"{i}_{k}"], v, err_msg=f"process {pid} batch {i} {k}")
