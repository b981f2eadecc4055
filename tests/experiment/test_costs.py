"""Cost accounting as the paper counts it, on hand-computed cases."""

from __future__ import annotations

import pytest

from ptm.errors import ConfigError
from ptm.experiment import costs as C


def test_paper_formulas_by_hand():
    # |G| = 1000, D_i = 100, 200, 400 (n = 3), |D| = 400
    assert C.cft_examples([100, 200, 400]) == 700
    assert C.rt_examples(1000, [100, 200, 400]) == 3 * 1000 + 700
    assert C.ptm_examples(400) == 400
    assert C.ptm_examples([400, 300]) == 700  # two skills merged: one run each
    # the paper's science row: RT 11,766 steps vs PTM 479 -> PTM about 4% of RT
    assert 479 / 11766 == pytest.approx(0.0407, abs=1e-4)


def test_measured_costs_sum_the_runs_each_method_uses():
    runs = {
        "skill_sci": C.RunCost(examples=400, examples_seen=800, steps=25),
        "cft_sci_100": C.RunCost(100, 200, 7),
        "cft_sci_200": C.RunCost(200, 400, 13),
        "cft_sci_400": C.RunCost(400, 800, 25),
        "rt_sci_100": C.RunCost(1100, 2200, 69),
        "rt_sci_200": C.RunCost(1200, 2400, 75),
        "rt_sci_400": C.RunCost(1400, 2800, 88),
    }
    plan = C.method_runs(
        "sci", [100, 200, 400], "cft_sci_400", ["task_arithmetic", "linear_interpolation", "wise_ft"]
    )
    got = C.method_costs(runs, plan)
    assert (got["cft"].examples, got["cft"].examples_seen, got["cft"].steps) == (700, 1400, 45)
    assert (got["rt"].examples, got["rt"].steps) == (3 * 1000 + 700, 69 + 75 + 88)
    assert (got["task_arithmetic"].examples, got["task_arithmetic"].steps) == (400, 25)
    assert got["linear_interpolation"].runs == ["skill_sci"]
    assert (got["wise_ft"].examples, got["wise_ft"].steps) == (400, 25)  # one CFT run on the whole D
    # measured examples agree with the paper's formulas
    assert got["cft"].examples == C.cft_examples([100, 200, 400])
    assert got["rt"].examples == C.rt_examples(1000, [100, 200, 400])
    assert got["task_arithmetic"].examples == C.ptm_examples(400)


def test_a_run_counts_once_and_unknown_runs_fail():
    runs = {"a": C.RunCost(10, 20, 3)}
    assert C.total(runs, ["a", "a"]).steps == 3
    with pytest.raises(ConfigError, match="'b'"):
        C.total(runs, ["a", "b"])


def test_run_json_parsing():
    rc = C.RunCost.from_run_json({"steps": 12, "data": {"train_examples": 90, "examples_seen": 180}})
    assert rc == C.RunCost(90, 180, 12)
    with pytest.raises(ConfigError, match="r/run.json"):
        C.RunCost.from_run_json({"steps": 12}, "r/run.json")
