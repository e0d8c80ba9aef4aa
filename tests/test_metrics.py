"""Tests for filo.metrics against independent computations (sklearn, slow loops, hand values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

import filo.metrics as M

# --------------------------------------------------------------------------------------------
# Data and independent reference implementations
# --------------------------------------------------------------------------------------------


def blobs(seed: int, n: int = 3, size: int = 16, levels: int | None = None, dtype=np.float64):
    """Random blob masks (some images all normal) and noisy maps correlated with them."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    masks = field > np.quantile(field, 0.85)
    masks[0] = False  # one all-normal image
    maps = 0.6 * masks + rng.normal(scale=0.4, size=masks.shape)
    maps = ndimage.gaussian_filter(maps, sigma=(0, 0.7, 0.7))
    if levels is not None:  # heavy ties
        maps = np.round((maps - maps.min()) / (maps.max() - maps.min()) * (levels - 1))
    return masks, maps.astype(dtype)


def slow_exact_aupro(masks, maps, limit=0.3):
    """Plain loop over every distinct threshold (positive: score >= threshold)."""
    structure = np.ones((3, 3), dtype=int)
    labelled = [ndimage.label(m, structure=structure) for m in masks]
    normal = ~masks
    n_normal = normal.sum()
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        overlaps = []
        for (lab, n), p in zip(labelled, pred, strict=True):
            for r in range(1, n + 1):
                region = lab == r
                overlaps.append((p & region).sum() / region.sum())
        xs.append((pred & normal).sum() / n_normal)
        ys.append(float(np.mean(overlaps)))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for i in range(1, len(xs)):
        if xs[i] <= limit:
            area += (xs[i] - xs[i - 1]) * (ys[i] + ys[i - 1]) / 2
        else:
            y_lim = ys[i - 1] + (ys[i] - ys[i - 1]) * (limit - xs[i - 1]) / (xs[i] - xs[i - 1])
            area += (limit - xs[i - 1]) * (ys[i - 1] + y_lim) / 2
            break
    return area / limit


def slow_legacy_aupro(masks, maps, steps=200, expect_fpr=0.3):
    """The research-code definition, written as a plain loop with skimage regionprops."""
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / steps
    regions = [measure.regionprops(measure.label(m)) for m in masks]
    inverse = ~masks
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        binary = maps > th
        overlaps = []
        for img_regions, b in zip(regions, binary, strict=True):
            for region in img_regions:
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(b[rows, cols].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


def sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    den = p + r
    f1 = np.divide(2 * p * r, den, out=np.zeros_like(den), where=den > 0)
    return f1.max()


# --------------------------------------------------------------------------------------------
# Pixel AUROC / AP / F1 against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,levels,dtype",
    [(0, None, np.float64), (1, None, np.float32), (2, 5, np.float64), (3, 9, np.float32)],
)
def test_pixel_classification_matches_sklearn(seed, levels, dtype):
    masks, maps = blobs(seed, levels=levels, dtype=dtype)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_float32_path_handles_negative_and_signed_zero():
    rng = np.random.default_rng(5)
    masks = rng.random((2, 8, 8)) < 0.3
    values = np.array([-2.5, -1.0, -0.0, 0.0, 0.5, 3.0], np.float32)
    maps = rng.choice(values, size=masks.shape).astype(np.float32)
    # -0.0 == 0.0 must be ONE tie group: anomalous pixels at -0.0, normal pixels at +0.0
    masks[1, :2] = True
    maps[1, :2] = -0.0
    masks[1, 2:4] = False
    maps[1, 2:4] = 0.0
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(sk_f1_max(y, s), abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(slow_exact_aupro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunk_boundaries(monkeypatch, dtype):
    """Tiny chunks force carries and tie groups split across chunks (both sort paths)."""
    masks, maps = blobs(7, levels=6, dtype=dtype)
    if dtype == np.float64:
        maps = maps + 1e-9 * np.pi  # not exactly float32: argsort path
    expected = {
        "auroc_px": roc_auc_score(masks.ravel(), maps.ravel()),
        "ap_px": average_precision_score(masks.ravel(), maps.ravel()),
        "f1_px": sk_f1_max(masks.ravel(), maps.ravel()),
        "aupro": slow_exact_aupro(masks, maps),
    }
    monkeypatch.setattr(M, "_CHUNK", 7)
    got = M.pixel_metrics(masks, maps, legacy=False)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert M.aupro(masks, maps) == pytest.approx(expected["aupro"], abs=1e-12)


def test_float32_fast_path_is_used_for_float32_representable_float64():
    _, maps = blobs(1, dtype=np.float32)
    assert M._fits_float32(maps.astype(np.float64))
    assert not M._fits_float32(maps.astype(np.float64) + 1e-12)


# --------------------------------------------------------------------------------------------
# Exact AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,levels,dtype",
    [(0, None, np.float64), (1, None, np.float32), (4, 4, np.float64), (6, 12, np.float32)],
)
def test_exact_aupro_matches_slow_loop(seed, levels, dtype):
    masks, maps = blobs(seed, levels=levels, dtype=dtype)
    assert M.aupro(masks, maps) == pytest.approx(slow_exact_aupro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_exact_aupro_other_limits(limit):
    masks, maps = blobs(8)
    expected = slow_exact_aupro(masks, maps, limit=limit)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def _one_region_case():
    # 4x4, anomalous region A=(1,1), B=(1,2) (one region); normal N1=(3,3); rest normal.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 1] = 1.0  # A
    maps[0, 3, 3] = 0.8  # N1
    return masks, maps


def test_exact_aupro_hand_value_no_interpolation_needed():
    masks, maps = _one_region_case()
    maps[0, 1, 2] = 0.4  # B
    # thresholds 1.0 / 0.8 / 0.4 / 0.0 -> points (0, .5), (1/14, .5), (1/14, 1), (1, 1)
    # area up to 0.3: 0.5 * 1/14 + 1.0 * (0.3 - 1/14)
    expected = (0.5 / 14 + (0.3 - 1 / 14)) / 0.3
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.880952381, abs=1e-9)


def test_exact_aupro_hand_value_with_interpolation():
    masks, maps = _one_region_case()  # B = 0.0 ties with the 13 other normal pixels
    # points (0, .5), (1/14, .5), (1, 1): the last segment crosses FPR 0.3
    y_at_limit = 0.5 + 0.5 * (0.3 - 1 / 14) / (1 - 1 / 14)
    expected = (0.5 / 14 + (0.5 + y_at_limit) / 2 * (0.3 - 1 / 14)) / 0.3
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.546886, abs=1e-6)


def test_regions_are_8_connected_and_averaged_per_region():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: ONE region under 8-connectivity
    masks[0, 3, 2] = masks[0, 3, 3] = True  # a second region
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    # curve (0, 0) -> (0, 0.25) -> (1, 1): PRO 0.25 (4-connectivity would give 1/3)
    y_at_limit = 0.25 + 0.75 * 0.3
    assert M.aupro(masks, maps) == pytest.approx((0.25 + y_at_limit) / 2, abs=1e-12)


def test_pro_weights_regions_not_pixels():
    # big region (6 px) fully found, small region (1 px) missed: PRO 0.5, not 6/7
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 0, :] = True
    masks[0, 5, 5] = True
    maps = np.zeros((1, 6, 6))
    maps[0, 0, :] = 1.0
    # curve (0, 0) -> (0, 0.5) -> (1, 1)
    expected = (0.5 + (0.5 + 0.5 * 0.3)) / 2
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_exact_aupro_single_region_perfect_and_worst():
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 2:5, 3:6] = True
    perfect = masks.astype(float)
    assert M.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_auroc(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    worst = 1.0 - perfect
    # region only found at FPR 1: curve (0,0) -> (1, 0) -> (1, 1), zero area below 0.3
    assert M.aupro(masks, worst) == pytest.approx(0.0, abs=1e-12)
    assert M.aupro(masks, worst) == pytest.approx(slow_exact_aupro(masks, worst), abs=1e-12)


def test_monotone_transform_invariance():
    masks, maps = blobs(9, levels=40)
    transformed = np.exp(maps / 7.0) * 3.0 - 11.0
    assert M.aupro(masks, transformed) == pytest.approx(M.aupro(masks, maps), abs=1e-12)
    assert M.pixel_auroc(masks, transformed) == pytest.approx(M.pixel_auroc(masks, maps), abs=1e-12)
    assert M.pixel_ap(masks, transformed) == pytest.approx(M.pixel_ap(masks, maps), abs=1e-12)
    # a non-monotone transform must change it (guard against a test that cannot fail)
    assert M.aupro(masks, -maps) != pytest.approx(M.aupro(masks, maps), abs=1e-6)


def test_constant_maps():
    masks, _ = blobs(10)
    const = np.full(masks.shape, 0.25, np.float32)
    assert M.aupro(masks, const) == pytest.approx(0.15, abs=1e-12)  # diagonal curve
    assert M.pixel_auroc(masks, const) == pytest.approx(0.5, abs=1e-12)
    assert M.pixel_ap(masks, const) == pytest.approx(masks.mean(), abs=1e-12)
    prevalence = masks.mean()
    assert M.pixel_f1_max(masks, const) == pytest.approx(2 * prevalence / (1 + prevalence))
    assert math.isnan(M.aupro_legacy(masks, const))


# --------------------------------------------------------------------------------------------
# Legacy AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,levels,dtype",
    [
        (0, None, np.float64),
        (1, None, np.float32),
        (11, 7, np.float32),
        (12, None, np.float32),
        (18, 201, np.float64),  # integer scores 0..200: thresholds hit scores exactly (> vs >=)
        (19, 201, np.float32),
    ],
)
def test_legacy_aupro_matches_plain_loop(seed, levels, dtype):
    masks, maps = blobs(seed, levels=levels, dtype=dtype)
    assert M.aupro_legacy(masks, maps) == pytest.approx(slow_legacy_aupro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed,steps", [(20, 4), (21, 8), (22, 4)])
def test_legacy_coarse_thresholds_hit_scores(seed, steps):
    """Integer scores 0..4 with 4 or 8 steps: thresholds equal scores, so '>' vs '>=' matters."""
    masks, maps = blobs(seed, levels=5)
    expected = slow_legacy_aupro(masks, maps, steps=steps)
    assert M.aupro_legacy(masks, maps, max_step=steps) == pytest.approx(expected, abs=1e-12)


def test_legacy_differs_from_exact():
    masks, maps = blobs(13)
    assert M.aupro_legacy(masks, maps) != pytest.approx(M.aupro(masks, maps), abs=1e-3)


def test_legacy_hand_value():
    # 1 x 2 x 5: region = the two pixels of column 0; scores 0..9 spread so thresholds are known
    masks = np.zeros((1, 2, 5), bool)
    masks[0, :, 0] = True
    maps = np.array([[[9.0, 3.0, 2.0, 1.0, 0.0], [8.0, 4.0, 5.0, 6.0, 7.0]]])
    # thresholds th = 0.045 * k; normal pixels are 0..7 (8 of them), region pixels 8 and 9.
    # FPR(th) = #{normal > th} / 8 < 0.3 needs at most 2 normal pixels above th -> th >= 5.
    # kept thresholds th in [5, 9): FPR 2/8 on [5, 6), 1/8 on [6, 7), 0 on [7, 9);
    # PRO = 1 below 8, 0.5 on [8, 9). Rescaled FPR: 1, 0.5, 0 -> area from FPR 0 to 1:
    # 0.5 * (PRO 1 between 0.5 and 1) + 0.5 * (PRO 1 between 0 and 0.5) = 1.0 (PRO is 1 at FPR 0
    # for th in [7, 8), and the points at PRO 0.5 sit at rescaled FPR 0: zero width).
    assert M.aupro_legacy(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert slow_legacy_aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    # swap the scores of a region pixel and the best normal pixel: region found later
    maps2 = maps.copy()
    maps2[0, 1, 0], maps2[0, 1, 4] = 7.0, 8.0
    assert M.aupro_legacy(masks, maps2) == pytest.approx(slow_legacy_aupro(masks, maps2), abs=1e-12)
    assert M.aupro_legacy(masks, maps2) < 1.0


def test_legacy_hand_value_fpr_exactly_at_limit():
    # region = column 0 with scores 11 and 7.5; the 10 normal pixels score 0..9
    masks = np.zeros((1, 2, 6), bool)
    masks[0, :, 0] = True
    maps = np.array([[[11.0, 0, 1, 2, 3, 4], [7.5, 5, 6, 7, 8, 9]]])
    # FPR: 0.3 on th in [6, 7) (exactly 0.3: NOT kept, the rule is FPR < 0.3), 0.2 on [7, 8),
    # 0.1 on [8, 9), 0 on [9, 11). PRO: 1 below 7.5, 0.5 from 7.5 on.
    # kept points, rescaled by 0.2: (1, 1), (1, .5), (.5, .5), (0, .5) -> area 0.5
    # (keeping FPR <= 0.3 would add (0.3, 1) and give 1/3 + 2/3 * 0.5 = 2/3)
    assert M.aupro_legacy(masks, maps) == pytest.approx(0.5, abs=1e-12)
    assert slow_legacy_aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


def test_all_normal_class_gives_nan():
    rng = np.random.default_rng(14)
    masks = np.zeros((2, 8, 8), bool)
    maps = rng.random(masks.shape)
    for fn in (M.pixel_auroc, M.pixel_ap, M.pixel_f1_max, M.aupro, M.aupro_legacy):
        assert math.isnan(fn(masks, maps)), fn.__name__
    assert all(math.isnan(v) for v in M.pixel_metrics(masks, maps).values())


def test_all_anomalous_gives_nan():
    masks = np.ones((1, 4, 4), bool)
    maps = np.arange(16.0).reshape(1, 4, 4)
    for fn in (M.pixel_auroc, M.pixel_ap, M.pixel_f1_max, M.aupro, M.aupro_legacy):
        assert math.isnan(fn(masks, maps)), fn.__name__


def test_pixel_metrics_matches_single_functions():
    masks, maps = blobs(15, dtype=np.float32)
    got = M.pixel_metrics(masks, maps)
    assert got["auroc_px"] == M.pixel_auroc(masks, maps)
    assert got["ap_px"] == M.pixel_ap(masks, maps)
    assert got["f1_px"] == M.pixel_f1_max(masks, maps)
    assert got["aupro"] == pytest.approx(M.aupro(masks, maps), abs=1e-14)
    assert got["aupro_legacy"] == M.aupro_legacy(masks, maps)


def test_input_shapes_and_validation():
    masks, maps = blobs(16, n=2)
    masks, maps = masks[1:], maps[1:]  # image 0 of blobs() is all normal
    ref = M.aupro(masks, maps)
    assert not math.isnan(ref)
    assert M.aupro(masks[0], maps[0]) == ref  # H x W
    assert M.aupro(masks[:, None], maps[:, None]) == ref  # N x 1 x H x W
    assert M.aupro(masks.astype(np.uint8), maps) == ref  # 0/1 numbers
    with pytest.raises(ValueError, match="same shape"):
        M.aupro(masks, maps[:, :-1])
    with pytest.raises(ValueError, match="0 and 1"):
        M.pixel_auroc(masks * 2.0 - 0.5, maps)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_ap(masks, bad)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(masks, maps, fpr_limit=0.0)


# --------------------------------------------------------------------------------------------
# Image metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(ties):
    rng = np.random.default_rng(17)
    labels = rng.random(40) < 0.4
    scores = rng.normal(size=40) + labels
    if ties:
        scores = np.round(scores)
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert M.image_f1_max(labels, scores) == pytest.approx(sk_f1_max(labels, scores), abs=1e-12)


def test_image_metrics_hand_values():
    labels = [0, 1, 0, 1]
    scores = [0.1, 0.9, 0.8, 0.4]
    # pairs (pos, neg): (.9>.1) (.9>.8) (.4>.1) (.4<.8) -> 3/4
    assert M.image_auroc(labels, scores) == pytest.approx(0.75)
    # descending: .9 (pos) P=1 R=.5; .8 (neg); .4 (pos) P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert M.image_ap(labels, scores) == pytest.approx(0.5 + 1 / 3)
    # F1: at .9 -> 2*1*.5/1.5 = 2/3; at .4 -> 2*(2/3)*1/(5/3) = 0.8
    assert M.image_f1_max(labels, scores) == pytest.approx(0.8)


def test_image_metrics_single_class_nan():
    for labels in ([0, 0, 0], [1, 1, 1]):
        for fn in (M.image_auroc, M.image_ap, M.image_f1_max):
            assert math.isnan(fn(labels, [0.2, 0.5, 0.1])), fn.__name__
