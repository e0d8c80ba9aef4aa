"""The numpy half of a bundle's computation (docs/design.md §18): what runs after the graphs.

Every function reproduces one torch step of the pipeline with numpy (and scipy for PatchCore's
smoothing), in float32 unless stated:

* :func:`bilinear_matrix`: ``F.interpolate(mode="bilinear")`` along one axis as an
  ``[out, in]`` matrix (``align_corners`` True for FiLo's logits, False for PatchCore's grids);
* :func:`gaussian_blur`: FiLo's separable Gaussian blur with reflect padding
  (torchvision's kernel, docs/design.md section 5);
* :func:`filo_maps`: per-tap logits ``100 f.T``, upsampling, softmax, the abnormal
  probability ``(p1 - p0 + 1) / 2``, tap mean, blur, and the image score;
* :func:`aggregate`: PatchCore's 3x3 neighbourhoods, grid alignment and adaptive average
  pooling (``filo.memory.patchcore.aggregate``);
* :func:`knn_scores`: mean squared L2 distance to the ``k`` nearest bank rows, candidates by
  the BLAS form, re-ranked by sums of squared differences (``NearestNeighbourScorer``);
* :func:`memory_map`, :func:`image_scores`, :func:`to_full_geometry`: PatchCore's maps and
  scores in the pipeline's geometry (``filo.memory.scorer``).
"""

from __future__ import annotations

import math

import numpy as np


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """``[n_out, n_in]`` float32 weights of torch's bilinear resize along one axis (source
    coordinates and weights in float32, as torch's CPU kernel computes them)."""
    f32 = np.float32
    dst = np.arange(n_out, dtype=f32)
    if align_corners:
        scale = f32((n_in - 1) / (n_out - 1)) if n_out > 1 else f32(0.0)
        src = dst * scale
    else:
        scale = f32(n_in / n_out)
        src = np.maximum((dst + f32(0.5)) * scale - f32(0.5), f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0.astype(f32)).astype(f32)
    out = np.zeros((n_out, n_in), dtype=f32)
    rows = np.arange(n_out)
    np.add.at(out, (rows, i0), f32(1.0) - l1)
    np.add.at(out, (rows, i1), l1)
    return out


def resize_bilinear(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """``[..., h, w] -> [..., H, W]`` bilinear (torch semantics, no antialiasing)."""
    h, w = maps.shape[-2:]
    ah = bilinear_matrix(h, size[0], align_corners)
    aw = bilinear_matrix(w, size[1], align_corners)
    return np.matmul(np.matmul(ah, maps.astype(np.float32, copy=False)), aw.T)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """exp(-x^2 / 2 sigma^2) on x = -(k-1)/2 .. (k-1)/2, summed to 1 (float64)."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[..., H, W]`` with reflect padding (float32)."""
    k = gaussian_kernel1d(kernel_size, sigma).astype(np.float32)
    pad = kernel_size // 2
    widths = [(0, 0)] * (maps.ndim - 2) + [(pad, pad), (pad, pad)]
    x = np.pad(maps.astype(np.float32, copy=False), widths, mode="reflect")
    h, w = maps.shape[-2:]
    rows = sum(k[i] * x[..., :, i:i + w] for i in range(kernel_size))
    return sum(k[i] * rows[..., i:i + h, :] for i in range(kernel_size)).astype(np.float32)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def filo_maps(patch: np.ndarray, text: np.ndarray, image_feature: np.ndarray, size: int, *,
              logit_scale: float, blur_kernel: int, blur_sigma: float, score_mode: str
              ) -> tuple[np.ndarray, float]:
    """One image's (anomaly map [size, size], image score) from the graphs' outputs.

    ``patch`` [T, N, E] normalized head outputs, ``text`` [2, E] the text matrix, ``image_feature``
    [E] the normalized global feature (``FiLo.forward``, docs/design.md section 5).
    """
    t, n, _ = patch.shape
    side = math.isqrt(n)
    logits = np.float32(logit_scale) * np.einsum("tne,ke->tkn", patch, text, optimize=True)
    grid = logits.reshape(t, 2, side, side)
    up = resize_bilinear(grid, (size, size), align_corners=True)
    probs = _softmax(up, axis=1)
    p_abn = (probs[:, 1] - probs[:, 0] + 1) / 2
    amap = gaussian_blur(p_abn.mean(axis=0), blur_kernel, blur_sigma)
    cos = text @ image_feature
    if score_mode == "research":
        text_score = float(cos[1])
    else:  # the paper's softmax over the two row-normalized cosines
        rows = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
        text_score = float(_softmax(np.float32(logit_scale) * (rows @ image_feature), 0)[1])
    return amap, (text_score + float(amap.max())) / 2


# ---- PatchCore --------------------------------------------------------------------------------

def _unfold(feat: np.ndarray, p: int) -> np.ndarray:
    """``[C, H, W] -> [C*p*p, H*W]``: zero-padded p x p neighbourhoods, order (c, ky, kx)."""
    c, h, w = feat.shape
    pad = (p - 1) // 2
    x = np.pad(feat, ((0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((c, p, p, h, w), dtype=feat.dtype)
    for ky in range(p):
        for kx in range(p):
            cols[:, ky, kx] = x[:, ky:ky + h, kx:kx + w]
    return cols.reshape(c * p * p, h * w)


def adaptive_avg_pool(rows: np.ndarray, out_dim: int) -> np.ndarray:
    """``adaptive_avg_pool1d`` over the last axis: window i is ``[floor(i L / o), ceil((i+1) L / o))``."""
    length = rows.shape[-1]
    i = np.arange(out_dim)
    start = (i * length) // out_dim
    end = -((-(i + 1) * length) // out_dim)
    cs = np.concatenate([np.zeros(rows.shape[:-1] + (1,)), np.cumsum(rows, axis=-1,
                                                                      dtype=np.float64)], -1)
    return ((cs[..., end] - cs[..., start]) / (end - start)).astype(np.float32)


def aggregate(features: list[np.ndarray], patchsize: int, pretrain_dim: int, target_dim: int
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """One image's patch features ``[H0*W0, target_dim]`` and the grid (first layer's)."""
    pooled, ref = [], None
    for feat in features:
        feat = np.asarray(feat, dtype=np.float32)
        cols = _unfold(feat, patchsize)
        grid = feat.shape[-2:]
        if ref is None:
            ref = grid
        elif grid != ref:
            cols = resize_bilinear(cols.reshape(-1, *grid), ref, align_corners=False)
            cols = cols.reshape(cols.shape[0], -1)
        pooled.append(adaptive_avg_pool(cols.T, pretrain_dim))
    stacked = np.stack(pooled, axis=1).reshape(pooled[0].shape[0], -1)
    return adaptive_avg_pool(stacked, target_dim), (int(ref[0]), int(ref[1]))


def knn_scores(queries: np.ndarray, bank: np.ndarray, k: int, extra: int = 8) -> np.ndarray:
    """Patch scores ``[N]``: mean squared L2 distance to the ``k`` nearest rows of ``bank``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    kc = min(len(bank), k + extra)
    d2 = (-2 * (q @ bank.T) + (q * q).sum(1)[:, None]) + (bank * bank).sum(1)[None]
    cand = np.argpartition(d2, kc - 1, axis=1)[:, :kc] if kc < len(bank) else np.broadcast_to(
        np.arange(len(bank)), d2.shape)
    diff = q[:, None, :] - bank[cand]
    dist = np.sort((diff * diff).sum(-1), axis=1)[:, :k]
    return dist.mean(axis=1, dtype=np.float32) if k > 1 else dist[:, 0].astype(np.float32)


def memory_map(patch_scores: np.ndarray, grid: tuple[int, int], size: int,
               sigma: float = 4.0) -> np.ndarray:
    """Patch-score grid -> bilinear (align_corners False) to ``size`` -> scipy Gaussian filter."""
    from scipy import ndimage

    up = resize_bilinear(patch_scores.reshape(grid), (size, size), align_corners=False)
    return ndimage.gaussian_filter(up, sigma=sigma).astype(np.float32) if sigma > 0 else up


def image_scores(grid_scores: np.ndarray, rule: str, topk: int) -> float:
    """PatchCore's image score of one image's patch scores (float64 on the grid)."""
    s = np.asarray(grid_scores, dtype=np.float32).reshape(-1).astype(np.float64)
    if rule == "max":
        return float(np.float32(s.max()))
    if rule == "topk_mean":
        return float(np.float32(np.sort(s)[-min(int(topk), len(s)):].mean()))
    if rule == "mean":
        return float(np.float32(s.mean()))
    return float(np.float32(s.var()))


def crop_box(orig_size: tuple[int, int], resize: int, imagesize: int
             ) -> tuple[float, float, float, float]:
    """Where Resize(resize) + CenterCrop(imagesize) looks, as fractions of the image."""
    w, h = orig_size
    short, long_ = (w, h) if w <= h else (h, w)
    new_long = int(resize * long_ / short)
    rw, rh = (resize, new_long) if w <= h else (new_long, resize)
    left = int(round((rw - imagesize) / 2.0))
    top = int(round((rh - imagesize) / 2.0))
    return left / rw, top / rh, (left + imagesize) / rw, (top + imagesize) / rh


def to_full_geometry(amap: np.ndarray, size: int, crop, fill: float) -> np.ndarray:
    """A memory map at the bank's input size -> ``size x size`` over the whole image."""
    if crop is None:
        return resize_bilinear(amap, (size, size), align_corners=False)
    x0, y0, x1, y1 = (int(round(v * size)) for v in crop)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    out = np.full((size, size), fill, dtype=np.float32)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = resize_bilinear(amap, (y1 - y0, x1 - x0), align_corners=False)
    return out


def logistic(z):
    return 1.0 / (1.0 + np.exp(-z))
