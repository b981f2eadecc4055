"""Sandboxed code execution on several JAX processes: each process runs its share of the samples and every
process gets every status (real processes on localhost, gloo; tests/scale/mp_worker.py `code_exec`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.scale.cluster import run_cluster


def test_executions_split_over_processes_and_statuses_equal_one_process(tmp_path):
    two = run_cluster("code_exec", tmp_path / "two", num_processes=2, devices_per_process=1)
    (one,) = run_cluster("code_exec", tmp_path / "one", num_processes=1, devices_per_process=1)
    want = ["passed", "failed", "failed", "failed", "passed"]
    assert one["statuses"].tolist() == want and one["by_host"].tolist() == [5]
    for r in two:
        assert r["statuses"].tolist() == want  # every process has every status
        assert r["pass1"] == one["pass1"] == pytest.approx((0.5 + 0 + 1) / 3)
        assert r["by_host"].tolist() == [3, 2]
        np.testing.assert_array_equal(r["he"], one["he"])  # the eval-set `humaneval` scorer too
    # what each process actually ran: executions 0, 2, 4 on process 0 and 1, 3 on process 1; of the scorer's
    # 3 samples 2 and 1
    assert [int(r["ran_scored"]) for r in two] == [3, 2] and int(one["ran_scored"]) == 5
    assert [int(r["ran_total"]) for r in two] == [5, 3] and int(one["ran_total"]) == 8
