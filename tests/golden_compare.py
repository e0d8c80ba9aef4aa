"""How far a golden run may drift from the recording, and how far it did.

Float results differ in the last bits between CPUs, BLAS/oneDNN code paths, instruction sets and
thread counts (the summation order of every reduction changes). ``differences(got, want)``
measures a run against the recording per kind of value; ``tests/fixtures/golden/tolerances.json``
holds the largest differences measured across thread counts, both ``--kernels`` and the MKL /
oneDNN instruction-set paths (``python tests/golden_runs.py --spread``) and the tolerance each
comparison allows, derived from them. Discrete outputs (position words, counted-box flags,
phrases, the set of kept boxes) must be equal; a box may only appear or disappear when its score
lies within the box-score tolerance of the box threshold (a near-tie).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOLERANCES = Path(__file__).resolve().parent / "fixtures" / "golden" / "tolerances.json"
BOX_THRESHOLD = 0.25  # the golden runs use the default --box_threshold

# Kinds of values compared with a tolerance (each one's largest absolute difference).
KINDS = ("map", "image_score", "box_coord", "box_score", "table_test", "table_detect")


def load_tolerances(path: Path = TOLERANCES) -> dict[str, float]:
    return {k: float(v) for k, v in json.loads(path.read_text())["tolerance"].items()}


def _boxes_of(rec: dict) -> list[tuple]:
    return sorted(zip(rec["scores"], [tuple(b) for b in rec["boxes"]], rec["phrases"],
                      rec["matched"], strict=True), key=lambda t: (-t[0], t[1]))


def _match_boxes(got: dict, want: dict, diffs: dict, problems: list, name: str,
                 tol: dict[str, float] | None) -> None:
    g, w = _boxes_of(got), _boxes_of(want)
    if got["position"] != want["position"]:
        problems.append(f"{name}: position {got['position']!r} != {want['position']!r}")
    unused = list(range(len(g)))
    coord_tol = (tol or {}).get("box_coord", np.inf)
    score_tol = (tol or {}).get("box_score", np.inf)
    for ws, wb, wp, wm in w:
        # the got box with the same phrase and flag nearest in coordinates and score
        best, best_d = None, None
        for i in unused:
            gs, gb, gp, gm = g[i]
            if gp != wp or gm != wm:
                continue
            dc, dsc = float(np.max(np.abs(np.subtract(gb, wb)))), abs(gs - ws)
            if dc > coord_tol or dsc > score_tol:
                continue
            d = dc + dsc
            if best_d is None or d < best_d:
                best, best_d = i, d
        if best is None:
            if abs(ws - BOX_THRESHOLD) > score_tol:
                problems.append(f"{name}: box {wb} ({wp!r}, score {ws}) missing")
            continue
        gs, gb, _, _ = g[best]
        unused.remove(best)
        diffs["box_coord"] = max(diffs["box_coord"], float(np.max(np.abs(np.subtract(gb, wb)))))
        diffs["box_score"] = max(diffs["box_score"], abs(gs - ws))
    for i in unused:
        gs, gb, gp, _ = g[i]
        if abs(gs - BOX_THRESHOLD) > score_tol:
            problems.append(f"{name}: extra box {gb} ({gp!r}, score {gs})")


def differences(got: dict, want: dict, tol: dict[str, float] | None = None
                ) -> tuple[dict[str, float], list[str]]:
    """({kind: largest absolute difference}, [discrete mismatches]) of a golden run against the
    recording. With ``tol`` given, boxes are paired within it and near-ties are allowed."""
    diffs = dict.fromkeys(KINDS, 0.0)
    problems: list[str] = []
    for run in want:
        g_run, w_run = got.get(run, {}), want[run]
        if sorted(g_run.get("maps", {})) != sorted(w_run.get("maps", {})):
            problems.append(f"{run}: map files differ")
        for name, arr in w_run.get("maps", {}).items():
            if name in g_run.get("maps", {}):
                other = np.asarray(g_run["maps"][name], np.float64)
                if other.shape != np.shape(arr):
                    problems.append(f"{run}/{name}: map shape {other.shape} != {np.shape(arr)}")
                    continue
                diffs["map"] = max(diffs["map"], float(np.max(np.abs(other - arr))))
        if "scores" in w_run:
            if sorted(g_run.get("scores", {})) != sorted(w_run["scores"]):
                problems.append(f"{run}: scored images differ")
            for name, v in w_run["scores"].items():
                if name in g_run.get("scores", {}):
                    diffs["image_score"] = max(diffs["image_score"],
                                               abs(g_run["scores"][name] - v))
        if "boxes" in w_run:
            if sorted(g_run.get("boxes", {})) != sorted(w_run["boxes"]):
                problems.append(f"{run}: box files differ")
            for name, rec in w_run["boxes"].items():
                if name in g_run.get("boxes", {}):
                    _match_boxes(g_run["boxes"][name], rec, diffs, problems, f"{run}/{name}", tol)
    # tables: test.py's (4 decimals) and the detector-only run's printed table (1 decimal)
    if "test" in want and "table" in want["test"]:
        for part in ("classes", "mean"):
            g, w = got["test"]["table"][part], want["test"]["table"][part]
            rows = w.items() if part == "classes" else [("mean", w)]
            for cls, cols in rows:
                grow = g.get(cls) if part == "classes" else g
                if grow is None:
                    problems.append(f"test table: class {cls} missing")
                    continue
                for col, v in cols.items():
                    if col == "n_images":
                        if grow.get(col) != v:
                            problems.append(f"test table: {cls} n_images {grow.get(col)} != {v}")
                        continue
                    if grow.get(col) is None or v is None:
                        if grow.get(col) != v:
                            problems.append(f"test table: {cls}.{col} {grow.get(col)} != {v}")
                        continue
                    diffs["table_test"] = max(diffs["table_test"], abs(grow[col] - v))
    if "detect" in want and "table" in want["detect"]:
        table = {n.replace("_", " "): c for n, c in got["detect"]["table"].items()}
        for row, cols in want["detect"]["table"].items():
            grow = table.get(row.replace("_", " "))
            if grow is None:
                problems.append(f"detect table: row {row} missing")
                continue
            for col, v in cols.items():
                if col not in grow:
                    problems.append(f"detect table: {row}.{col} missing")
                    continue
                diffs["table_detect"] = max(diffs["table_detect"], abs(grow[col] - v))
    return diffs, problems
