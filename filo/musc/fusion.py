"""MuSc combined with FiLo: the memory bank's rule (docs/design.md sections 13 and 16.5).

Each source's map and score are z-scored by that source's statistics (``pixel_mean`` /
``pixel_std``, ``image_mean`` / ``image_std``), combined by a weighted mean or the maximum and
squashed by a logistic (monotonic: the rankings are those of the combined z-scores).
"""

from __future__ import annotations

import numpy as np


def _z(x, stats: dict, kind: str) -> np.ndarray:
    return (np.asarray(x, dtype=np.float64) - stats[f"{kind}_mean"]) / max(
        stats[f"{kind}_std"], 1e-12)


def zscore_fuse(musc_maps, musc_scores, filo_maps, filo_scores, musc_stats: dict,
                filo_stats: dict, mode: str, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32, scores float64) in (0, 1); ``weight``: MuSc's share of ``mean``."""
    zm = (_z(musc_maps, musc_stats, "pixel"), _z(musc_scores, musc_stats, "image"))
    zf = (_z(filo_maps, filo_stats, "pixel"), _z(filo_scores, filo_stats, "image"))
    if mode == "mean":
        maps, scores = (weight * zm[0] + (1 - weight) * zf[0],
                        weight * zm[1] + (1 - weight) * zf[1])
    elif mode == "max":
        maps, scores = np.maximum(zm[0], zf[0]), np.maximum(zm[1], zf[1])
    else:
        raise ValueError(f"unknown MuSc fusion {mode!r}")
    return (1.0 / (1.0 + np.exp(-maps))).astype(np.float32), 1.0 / (1.0 + np.exp(-scores))
