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
* :func:`calibration_files`: the normal images of ``--calib_dir`` for a class;
  :func:`read_record` / :func:`write_record`: the small JSON calibration records of runs without
  a memory bank (FiLo alone, the detector alone), cached under ``$FILO_CACHE_DIR/calibration/``
  by a key of the settings and the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filo.errors import FiloError

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_QUANTILE", "MIN_CALIBRATION_IMAGES", "PIXEL_QUANTILE", "STD_EPS", "STD_FLOOR",
           "calibration_files", "floored_std", "image_statistics", "pixel_statistics",
           "read_record", "record_key", "squash", "write_record", "zscore"]

# a calibration needs this many images; fewer held-out images mean leave-one-out instead
MIN_CALIBRATION_IMAGES = 3
STD_FLOOR = 0.05  # relative to |mean|
STD_EPS = 1e-6
# thresholds of runs without a memory bank (a bank records its own --calib_quantile etc.)
IMAGE_QUANTILE = 0.99
PIXEL_QUANTILE = 0.999


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


def calibration_files(calib_dir: str | Path, cls_name: str, n_classes: int = 1) -> list[Path]:
    """Sorted normal images of ``cls_name``: ``calib_dir/<class>/`` when that folder exists, else
    ``calib_dir`` itself (with ``n_classes > 1`` that is an error), searched recursively; at
    least :data:`MIN_CALIBRATION_IMAGES` or one :class:`FiloError` line."""
    from filo.data.layouts import IMAGE_EXTENSIONS

    root = Path(calib_dir)
    if not root.is_dir():
        raise FiloError(f"--calib_dir {root} is not a folder of normal images")
    folder = root / cls_name if (root / cls_name).is_dir() else root
    if folder == root and n_classes > 1:
        raise FiloError(f"--calib_dir {root} has no folder {cls_name}/: with several classes give "
                        f"one sub-folder of normal images per class")
    files = sorted(p.resolve() for p in folder.rglob("*") if p.is_file()
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < MIN_CALIBRATION_IMAGES:
        raise FiloError(f"--calib_dir {folder} holds {len(files)} image(s) for class {cls_name}; "
                        f"a calibration needs at least {MIN_CALIBRATION_IMAGES} normal images")
    return files


def record_key(settings: dict[str, Any], files: Sequence[Path]) -> str:
    """A hash of the settings that change predictions and of the images (path, size, mtime)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _record_path(key: str) -> Path:
    from filo.assets import default_checksum_cache

    return default_checksum_cache().parent / "calibration" / f"{key}.json"


def read_record(key: str) -> dict[str, Any] | None:
    """The cached record of ``key`` (None when absent or unreadable)."""
    try:
        return json.loads(_record_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(key: str, record: dict[str, Any]) -> Path | None:
    """Cache ``record`` (atomically); None when the cache folder is not writable."""
    from filo.fileio import atomic_write_text

    path = _record_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    except OSError as err:
        logger.warning("calibration record not cached (%s): %s", path, err)
        return None
    return path
