"""Normal-image statistics, thresholds and score normalisation (docs/design.md section 13.2).

One home for what a calibration computes from the scores of normal images and how fused modes
use it:

* :func:`image_statistics` / :func:`pixel_statistics`: mean, standard deviation (ddof 0) and the
  quantile threshold. The deviation is floored at :data:`STD_FLOOR` times the absolute mean
  (and at least :data:`STD_EPS`), with a warning that names the class: one or two calibration
  images, or identical scores, give a deviation of 0 that would turn every z-score into
  +-infinity. The measured value stays in the record (``image_std_measured``).
* :func:`zscore` divides by the floored deviation of a record, also for records written before
  the floor existed.
* :func:`squash`: ``1/2 + z / (2 (1 + |z|))``, monotonic from R onto (0, 1), 1/2 at the normal
  mean. It has no ``exp`` (nothing overflows) and does not saturate: z = 1e6 is still below 1 in
  float64, so fused scores keep their order instead of collapsing to 0 and 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MIN_CALIBRATION_IMAGES", "STD_EPS", "STD_FLOOR", "floored_std", "image_statistics",
           "pixel_statistics", "squash", "zscore"]

# a calibration needs this many images; fewer held-out images mean leave-one-out instead
MIN_CALIBRATION_IMAGES = 3
STD_FLOOR = 0.05  # relative to |mean|
STD_EPS = 1e-6


def floored_std(mean: float, std: float) -> float:
    """``max(std, STD_FLOOR * |mean|, STD_EPS)``."""
    return float(max(float(std), STD_FLOOR * abs(float(mean)), STD_EPS))


def _check_floor(mean: float, std: float, what: str, cls_name: str | None, n: int) -> float:
    floor = floored_std(mean, std)
    if floor > std:
        logger.warning("class %s: the %s of its %d calibration image(s) have std %.4g, below the "
                       "floor %.4g (%g x |mean|); z-scores use the floor. More calibration images "
                       "(--calib_dir, or more normal train images) give a measured spread",
                       cls_name or "?", what, n, std, floor, STD_FLOOR)
    return floor


def image_statistics(scores: Sequence[float] | np.ndarray, quantile: float,
                     cls_name: str | None = None) -> dict[str, Any]:
    """Image-score statistics of normal images: threshold (``quantile``), mean, floored std, the
    measured std and every score (fused thresholds are computed from them at use time)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) == 0:
        return {"n_images": 0}
    mean, std = float(s.mean()), float(s.std())
    return {"n_images": int(len(s)), "image_threshold": float(np.quantile(s, quantile)),
            "image_quantile": float(quantile), "image_mean": mean,
            "image_std": _check_floor(mean, std, "image scores", cls_name, len(s)),
            "image_std_measured": std, "image_scores": [float(v) for v in s]}


def pixel_statistics(maps: np.ndarray, quantile: float | None, cls_name: str | None = None,
                     n_images: int = 0) -> dict[str, Any]:
    """Pixel statistics of normal maps: threshold (``quantile``, None: no threshold), mean,
    floored std and the measured std."""
    pixels = np.asarray(maps, dtype=np.float64).reshape(-1)
    if len(pixels) == 0:
        return {}
    mean, std = float(pixels.mean()), float(pixels.std())
    out = {"pixel_mean": mean,
           "pixel_std": _check_floor(mean, std, "map pixels", cls_name, n_images),
           "pixel_std_measured": std}
    if quantile is not None:
        out.update(pixel_threshold=float(np.quantile(pixels, quantile)),
                   pixel_quantile=float(quantile))
    return out


def zscore(values, record: dict[str, Any], kind: str) -> np.ndarray:
    """``(values - mean) / floored std`` with the ``kind`` ("image" or "pixel") statistics of a
    calibration record, float64."""
    mean = float(record[f"{kind}_mean"])
    std = floored_std(mean, float(record[f"{kind}_std"]))
    return (np.asarray(values, dtype=np.float64) - mean) / std


def squash(z) -> np.ndarray:
    """``1/2 + z / (2 (1 + |z|))`` (module docstring), float64."""
    z = np.asarray(z, dtype=np.float64)
    return 0.5 + 0.5 * z / (1.0 + np.abs(z))
