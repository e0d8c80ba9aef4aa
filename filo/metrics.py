"""Evaluation metrics for anomaly segmentation and detection (docs/design.md section 8).

Inputs
------
- ``masks``: ground truth, ``N x H x W`` of bool (or 0/1 numbers). ``H x W`` (one image) and
  ``N x 1 x H x W`` are accepted too.
- ``maps``: anomaly scores of the same shape (any real dtype, finite values only).
- ``labels``: image labels, 0/1 (or bool), shape ``N``; ``scores``: image scores, shape ``N``.

Every metric is a Python ``float`` in [0, 1] (the table multiplies by 100).

Public functions
----------------
- :func:`pixel_auroc`, :func:`pixel_ap`, :func:`pixel_f1_max` over all pixels of a class.
- :func:`aupro`: exact AUPRO of the MVTec AD reference: 8-connected ground-truth regions per
  image (3x3 structure); every distinct score is a threshold (a pixel is positive when its score
  is >= the threshold); PRO = per-region overlap averaged over all regions of the class; FPR
  over all normal pixels of the class; the curve (0, 0) -> ... -> (1, 1) is integrated with the
  trapezoid rule up to ``fpr_limit`` (linear interpolation at exactly ``fpr_limit``) and
  divided by ``fpr_limit``.
- :func:`aupro_legacy`: the 200-threshold AUPRO reported by the FiLo, AnomalyCLIP and
  APRIL-GAN papers: thresholds ``np.arange(min, max, (max - min) / 200)`` (``min``/``max`` of
  the maps; float rounding can give 201 values, as in the research code), a pixel is positive
  when its score is > the threshold, PRO = mean over all 8-connected regions, FPR = false
  positives / normal pixels, keep thresholds with FPR < 0.3, min-max rescale those FPRs to
  [0, 1], trapezoid. The comparison is done in float64 (NumPy >= 2 promotion; NumPy 1.x first
  rounded the threshold to the map dtype, which only differs for pixels within one float32 ulp
  of a threshold).
- :func:`image_auroc`, :func:`image_ap`, :func:`image_f1_max` on image scores.
- :func:`pixel_metrics`: all pixel metrics of a class with a single sort (what an evaluation
  loop should call).

Definitions follow scikit-learn: AUROC is the trapezoidal area under the ROC curve at the
distinct thresholds (ties count one half); AP = sum over distinct thresholds (descending) of
(R_k - R_{k-1}) * P_k; F1-max = max over the precision-recall curve of 2PR / (P + R) (a 0/0
point counts as 0). All curves only have points at distinct score values, so tied scores are
handled exactly.

Edge cases (NaN is returned, never an exception)
------------------------------------------------
- No anomalous pixel (an all-normal class) or no normal pixel: every pixel metric, ``aupro``
  and ``aupro_legacy`` are NaN.
- Image metrics with only one label class present: NaN.
- ``aupro_legacy`` is also NaN when the maps are constant (no threshold step), when fewer than
  two thresholds have FPR < 0.3, or when those FPRs are all equal (the min-max rescale is 0/0;
  the research code crashes in these cases).
- ``aupro`` of a constant map is 0.15 for ``fpr_limit = 0.3`` (the curve is the diagonal
  (0, 0) -> (1, 1)); the exact sweep is invariant to strictly increasing transforms of the
  scores.

Memory and speed (per class)
----------------------------
Fast path (float32 maps, or float16 / small integers, or float64 maps whose values are all
exactly representable in float32): each pixel becomes one uint64 = (order-preserving 32-bit
key of the score << 32) | (region id, 0 for normal pixels), sorted in place once and walked
in chunks of 2**16 pixels. Working memory: **8 bytes per pixel** plus fixed temporaries (one
image and one chunk at a time, about 10 MB), on top of the caller's arrays (float32 maps
4 B/px, bool masks 1 B/px). 100 images of 518 x 518 (26.8 M pixels): about 215 MB (measured
peak 8.3 B/px). Other float64 maps use an argsort path: about 20 bytes per pixel (float64
copy + int64 order + uint32 payload) and roughly 10x the time.
``aupro_legacy`` works image by image (searchsorted into the thresholds, bincounts per region):
memory is one image of temporaries plus n_regions x 201 int64 counts.
Measured with ``benchmarks/bench_metrics.py`` on the 2-core machine (100 x 518 x 518 float32
maps): aupro 0.4 s, pixel_auroc / ap / f1 0.4-0.8 s each, aupro_legacy 0.6 s, pixel_metrics
(all five) 1.2 s; scikit-learn's roc_auc_score alone takes 10 s. The argsort path (float64
maps not representable in float32) takes about 5.5 s for exact AUPRO.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

__all__ = [
    "aupro",
    "aupro_legacy",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_metrics",
]

_CHUNK = 1 << 16
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)
_LOW32 = np.uint64(0xFFFFFFFF)
_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_images(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be N x H x W (got shape {arr.shape})")
    return arr


def _as_bool(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
        raise ValueError(f"{name} must be boolean or 0/1 numbers (got dtype {arr.dtype})")
    out = arr != 0
    if not np.all(out | (arr == 0)) or not np.all(arr[out] == 1):
        raise ValueError(f"{name} must contain only 0 and 1")
    return out


def _check_scores(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real numbers (got dtype {arr.dtype})")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _prepare_pixels(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks = _as_images(np.asarray(masks), "masks")
    maps = _as_images(np.asarray(maps), "maps")
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must have the same shape")
    return _as_bool(masks, "masks"), _check_scores(maps, "maps")


def _prepare_images(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must have the same length"
        )
    return _as_bool(labels, "labels"), _check_scores(scores, "scores")


def _fits_float32(maps: np.ndarray) -> bool:
    """True when every score converts to float32 without changing value (so ties are kept)."""
    dt = maps.dtype
    if dt in (np.float32, np.float16):
        return True
    if np.issubdtype(dt, np.integer):
        return dt.itemsize <= 2
    if dt == np.float64:
        return all(np.array_equal(m.astype(np.float32), m) for m in maps)
    return False


# --------------------------------------------------------------------------------------------
# Region labelling
# --------------------------------------------------------------------------------------------


def _label_image(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one mask: (int32 labels, 0 = normal; count)."""
    lab, n = ndimage.label(mask, structure=_STRUCTURE_8)
    return lab.astype(np.int32, copy=False), int(n)


class _Payloads:
    """Per-image payload (uint32): global 1-based region id, or the mask bit when not labelling.

    Called once per image in order; collects the region areas on the way.
    """

    def __init__(self, label: bool):
        self.label = label
        self.offset = 0
        self._areas: list[np.ndarray] = []

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if not self.label:
            return mask.ravel().astype(np.uint32)
        lab, n = _label_image(mask)
        flat = lab.ravel()
        pay = flat.astype(np.uint32)
        if n:
            pay[flat > 0] += np.uint32(self.offset)
            self._areas.append(np.bincount(flat, minlength=n + 1)[1:].astype(np.int64))
        self.offset += n
        return pay

    def areas(self) -> np.ndarray:
        return np.concatenate(self._areas) if self._areas else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------------------
# One sort, streamed in descending score order
# --------------------------------------------------------------------------------------------


def _desc_key32(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of the float32 values."""
    f = values.astype(np.float32) + np.float32(0.0)  # copy; turns -0.0 into +0.0
    u = f.view(np.uint32)
    neg = (u >> np.uint32(31)).astype(bool)
    return np.where(neg, u, ~u & np.uint32(0x7FFFFFFF))


def _group_ends(keys: np.ndarray, next_key, last: bool) -> np.ndarray:
    ends = np.empty(keys.shape[0], dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=ends[:-1])
    ends[-1] = True if last else bool(next_key != keys[-1])
    return ends


def _stream_packed(maps: np.ndarray, masks: np.ndarray, payloads: _Payloads) -> Iterator:
    """Pack (score key, payload) into uint64 and sort once (now); return the chunk iterator."""
    per_image = maps[0].size
    packed = np.empty(maps.shape[0] * per_image, dtype=np.uint64)
    for i in range(maps.shape[0]):
        dst = packed[i * per_image : (i + 1) * per_image]
        np.left_shift(_desc_key32(maps[i].ravel()).astype(np.uint64), np.uint64(32), out=dst)
        dst |= payloads(masks[i])
    packed.sort()
    return _iter_packed(packed)


def _iter_packed(packed: np.ndarray) -> Iterator:
    """Yield chunks (payload, group_end) of the sorted packed array."""
    n = packed.shape[0]
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        chunk = packed[s:e]
        keys = chunk >> np.uint64(32)
        nxt = packed[e] >> np.uint64(32) if e < n else None
        yield (chunk & _LOW32).astype(np.intp), _group_ends(keys, nxt, e == n)


def _stream_argsort(scores: np.ndarray, payload: np.ndarray) -> Iterator:
    """Generic path: stable argsort of float64 scores, walked from the highest score."""
    flat = scores.astype(np.float64, copy=True).reshape(-1)
    flat += 0.0  # in place on our copy: -0.0 becomes +0.0
    order = np.argsort(flat, kind="stable")[::-1]
    n = order.shape[0]
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        idx = order[s:e]
        keys = flat[idx]
        nxt = flat[order[e]] if e < n else None
        yield payload[idx].astype(np.intp), _group_ends(keys, nxt, e == n)


def _pixel_stream(masks: np.ndarray, maps: np.ndarray, payloads: _Payloads) -> Iterator:
    """Sort all pixels of the class (eagerly, so ``payloads.areas()`` is complete after)."""
    if _fits_float32(maps):
        return _stream_packed(maps, masks, payloads)
    payload = np.concatenate([payloads(mask) for mask in masks])
    return _stream_argsort(maps, payload)


# --------------------------------------------------------------------------------------------
# Curve sweep
# --------------------------------------------------------------------------------------------


class _Sweep:
    """Accumulates AUROC, AP, F1-max and (optionally) the exact PRO area over a sorted stream."""

    def __init__(self, n_pos: int, n_neg: int, areas: np.ndarray | None, fpr_limit: float):
        self.n_pos, self.n_neg = n_pos, n_neg
        self.seen = 0
        self.tp_carry = 0
        self.prev_tp = 0
        self.prev_fp = 0
        self.roc_area = 0.0  # in units of (false positives x true positives)
        self.ap_sum = 0.0  # sum of delta TP * precision
        self.f1_max = 0.0
        self.fpr_limit = fpr_limit
        self.pro_weights = None
        if areas is not None and areas.size:
            self.pro_weights = np.concatenate([[0.0], 1.0 / areas.astype(np.float64)])
        self.n_regions = 0 if areas is None else int(areas.size)
        self.pro_carry = 0.0
        self.pro_prev = (0.0, 0.0)
        self.pro_area = 0.0
        self.pro_done = False

    def update(self, payload: np.ndarray, ends: np.ndarray, classification: bool = True) -> None:
        m = payload.shape[0]
        pos_cum = np.cumsum(payload > 0, dtype=np.int64)
        tp = pos_cum[ends] + self.tp_carry
        fp = (np.flatnonzero(ends) + (self.seen + 1)) - tp
        if classification:
            self._update_classification(tp, fp)
        if self.pro_weights is not None and not self.pro_done:
            pro_cum = np.cumsum(self.pro_weights[payload])
            pro = pro_cum[ends] + self.pro_carry
            self._update_pro(fp, pro)
            self.pro_carry += float(pro_cum[-1])
        if tp.size:
            self.prev_tp, self.prev_fp = int(tp[-1]), int(fp[-1])
        self.tp_carry += int(pos_cum[-1])
        self.seen += m

    def _update_classification(self, tp: np.ndarray, fp: np.ndarray) -> None:
        if tp.size == 0:
            return
        tp_f = tp.astype(np.float64)
        fp_f = fp.astype(np.float64)
        tp_prev = np.concatenate([[float(self.prev_tp)], tp_f[:-1]])
        fp_prev = np.concatenate([[float(self.prev_fp)], fp_f[:-1]])
        self.roc_area += float(np.sum((fp_f - fp_prev) * (tp_f + tp_prev)) * 0.5)
        self.ap_sum += float(np.sum((tp_f - tp_prev) * (tp_f / (tp_f + fp_f))))
        f1 = 2.0 * tp_f / (tp_f + fp_f + self.n_pos)
        self.f1_max = max(self.f1_max, float(f1.max()))

    def _update_pro(self, fp: np.ndarray, pro: np.ndarray) -> None:
        if fp.size == 0:
            return
        x = np.clip(fp / self.n_neg, 0.0, 1.0)
        y = np.clip(pro / self.n_regions, 0.0, 1.0)
        self._add_pro_points(x, y)

    def _add_pro_points(self, x: np.ndarray, y: np.ndarray) -> None:
        x0, y0 = self.pro_prev
        xs = np.concatenate([[x0], x])
        ys = np.concatenate([[y0], y])
        lim = self.fpr_limit
        over = np.flatnonzero(xs > lim)
        if over.size:
            k = int(over[0])  # xs[k - 1] <= lim < xs[k]; k >= 1 because xs[0] <= lim
            self.pro_area += float(np.sum((xs[1:k] - xs[: k - 1]) * (ys[1:k] + ys[: k - 1])) * 0.5)
            xa, ya, xb, yb = xs[k - 1], ys[k - 1], xs[k], ys[k]
            y_lim = ya + (yb - ya) * (lim - xa) / (xb - xa)
            self.pro_area += 0.5 * (ya + y_lim) * (lim - xa)
            self.pro_done = True
        else:
            self.pro_area += float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) * 0.5)
            self.pro_prev = (float(xs[-1]), float(ys[-1]))

    # results ---------------------------------------------------------------------------
    def auroc(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return _NAN
        return self.roc_area / (float(self.n_pos) * float(self.n_neg))

    def ap(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return _NAN
        return self.ap_sum / self.n_pos

    def f1(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            return _NAN
        return self.f1_max

    def aupro(self) -> float:
        if self.n_regions == 0 or self.n_neg == 0:
            return _NAN
        if not self.pro_done:  # the reference closes the curve at (1, 1)
            self._add_pro_points(np.array([1.0]), np.array([1.0]))
        return self.pro_area / self.fpr_limit


def _check_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1] (got {fpr_limit})")
    return fpr_limit


def _pixel_sweep(masks, maps, *, with_pro: bool, classification: bool, fpr_limit: float = 0.3):
    masks, maps = _prepare_pixels(masks, maps)
    n_pos = int(np.count_nonzero(masks))
    n_neg = int(masks.size - n_pos)
    if n_pos == 0 or n_neg == 0:  # every metric is NaN
        return _Sweep(n_pos, n_neg, None, fpr_limit)
    payloads = _Payloads(label=with_pro)
    stream = _pixel_stream(masks, maps, payloads)
    sweep = _Sweep(n_pos, n_neg, payloads.areas() if with_pro else None, fpr_limit)
    for payload, ends in stream:
        sweep.update(payload, ends, classification=classification)
        if not classification and sweep.pro_done:
            break
    return sweep


# --------------------------------------------------------------------------------------------
# Public pixel metrics
# --------------------------------------------------------------------------------------------


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all pixels (NaN without anomalous or without normal pixels)."""
    return _pixel_sweep(masks, maps, with_pro=False, classification=True).auroc()


def pixel_ap(masks, maps) -> float:
    """Pixel-level average precision (scikit-learn definition; NaN if one class is absent)."""
    return _pixel_sweep(masks, maps, with_pro=False, classification=True).ap()


def pixel_f1_max(masks, maps) -> float:
    """Max over the pixel precision-recall curve of 2PR / (P + R) (NaN if one class is absent)."""
    return _pixel_sweep(masks, maps, with_pro=False, classification=True).f1()


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO (MVTec AD reference) up to ``fpr_limit``, normalised by ``fpr_limit``.

    NaN when the class has no anomalous region or no normal pixel.
    """
    fpr_limit = _check_limit(fpr_limit)
    return _pixel_sweep(
        masks, maps, with_pro=True, classification=False, fpr_limit=fpr_limit
    ).aupro()


def _legacy_from_prepared(
    masks: np.ndarray, maps: np.ndarray, max_step: int, expect_fpr: float
) -> float:
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    n_neg = int(masks.size - np.count_nonzero(masks))
    lo, hi = maps.min(), maps.max()
    if n_neg == 0 or not masks.any() or hi == lo:
        return _NAN
    delta = (hi - lo) / max_step
    thresholds = np.arange(lo, hi, delta)
    n_bins = thresholds.shape[0] + 1
    # bin b of a pixel = number of thresholds strictly below its score: positive for th_k, k < b
    fp_hist = np.zeros(n_bins, dtype=np.int64)
    region_hists: list[np.ndarray] = []
    for mask, amap in zip(masks, maps, strict=True):
        bins = np.searchsorted(thresholds, amap.ravel(), side="left")
        lab, n = _label_image(mask)
        lab = lab.ravel()
        fp_hist += np.bincount(bins[lab == 0], minlength=n_bins)
        if n:
            inside = lab > 0
            flat = (lab[inside].astype(np.int64) - 1) * n_bins + bins[inside]
            region_hists.append(np.bincount(flat, minlength=n * n_bins).reshape(n, n_bins))
    hists = np.concatenate(region_hists)
    areas = hists.sum(axis=1)
    # count of pixels with bin > k, for each threshold k = suffix sums starting at k + 1
    fp_above = np.cumsum(fp_hist[::-1])[::-1][1:]
    tp_above = np.cumsum(hists[:, ::-1], axis=1)[:, ::-1][:, 1:]
    fprs = fp_above / n_neg
    pros = (tp_above / areas[:, None]).mean(axis=0)
    keep = fprs < expect_fpr
    if np.count_nonzero(keep) < 2:
        return _NAN
    x, y = fprs[keep], pros[keep]
    span = x.max() - x.min()
    if span == 0:
        return _NAN
    x = (x - x.min()) / span
    # x is non-increasing with the threshold: integrate in increasing-x order
    return float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:])) * 0.5)


def aupro_legacy(masks, maps, *, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """AUPRO as computed by the FiLo / AnomalyCLIP / APRIL-GAN research code (see module doc).

    NaN for an all-normal class, no normal pixel, constant maps, fewer than two thresholds with
    FPR < ``expect_fpr``, or equal FPRs at all of them.
    """
    masks, maps = _prepare_pixels(masks, maps)
    return _legacy_from_prepared(masks, maps, int(max_step), float(expect_fpr))


def pixel_metrics(masks, maps, fpr_limit: float = 0.3, legacy: bool = True) -> dict[str, float]:
    """All pixel metrics of one class with one sort.

    Returns ``{"auroc_px", "ap_px", "f1_px", "aupro", "aupro_legacy"}`` (the last only when
    ``legacy``), each equal to the corresponding single-metric function.
    """
    fpr_limit = _check_limit(fpr_limit)
    masks, maps = _prepare_pixels(masks, maps)
    sweep = _pixel_sweep(masks, maps, with_pro=True, classification=True, fpr_limit=fpr_limit)
    out = {
        "auroc_px": sweep.auroc(),
        "ap_px": sweep.ap(),
        "f1_px": sweep.f1(),
        "aupro": sweep.aupro(),
    }
    if legacy:
        out["aupro_legacy"] = _legacy_from_prepared(masks, maps, 200, 0.3)
    return out


# --------------------------------------------------------------------------------------------
# Public image metrics
# --------------------------------------------------------------------------------------------


def _image_sweep(labels, scores) -> _Sweep:
    labels, scores = _prepare_images(labels, scores)
    n_pos = int(np.count_nonzero(labels))
    sweep = _Sweep(n_pos, int(labels.size - n_pos), None, 0.3)
    if sweep.n_pos and sweep.n_neg:
        for payload, ends in _stream_argsort(scores, labels.astype(np.uint32)):
            sweep.update(payload, ends)
    return sweep


def image_auroc(labels, scores) -> float:
    """Image-level AUROC (NaN when only one label class is present)."""
    return _image_sweep(labels, scores).auroc()


def image_ap(labels, scores) -> float:
    """Image-level average precision (NaN when only one label class is present)."""
    return _image_sweep(labels, scores).ap()


def image_f1_max(labels, scores) -> float:
    """Image-level F1-max over the precision-recall curve (NaN with one label class)."""
    return _image_sweep(labels, scores).f1()
