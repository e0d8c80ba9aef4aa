"""PatchCore's patch-feature aggregation computed as small convolutions (docs/design.md §13.4).

The reference definition (unfold every layer into ``C*p*p`` planes, upsample the deeper layers'
planes, pool each position's vector with ``adaptive_avg_pool1d`` twice) is linear in the
feature maps and every pooled value averages a contiguous window of the ``(channel, ky, kx)``
vector. The whole chain is therefore one fixed linear map per layer, ``W_l`` of shape
``[target_dim, C_l, p, p]`` applied at the layer's own grid, followed by the bilinear upsampling
(which is linear per plane and so commutes with the pooling). :func:`pooling_weights` builds the
``W_l`` exactly; :func:`grouped_kernels` finds their block structure: for the reference
dimensions (``layer2`` 512 and ``layer3`` 1024 channels, 1024/1024 dims, ``p = 3``) ``layer2``'s
half of the output is one depthwise 3 x 3 kernel per channel and ``layer3``'s half averages
channel pairs over 3 x 3, i.e. 512 output planes per layer instead of 4,608 + 9,216 unfolded
ones.

:func:`fast_aggregate` runs grouped ``conv2d`` with those kernels when the structure is narrow
(few input channels per output) and otherwise the general pool-then-upsample path: unfold at
the layer's own grid, pool to ``pretrain_dim``, upsample the pooled planes (``pretrain_dim``
instead of ``C*p*p``), pool the stacked layers to ``target_dim``. Both equal the reference
within float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LayerKernel", "adaptive_pool_matrix", "fast_aggregate", "grouped_kernels",
           "patch_grid", "pooling_weights"]

# a grouped kernel is used when every output plane reads at most this many input channels
_MAX_CHANNELS_PER_GROUP = 8


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 matrix of ``adaptive_avg_pool1d(n_in -> n_out)``.

    Output ``i`` averages inputs ``floor(i * n_in / n_out)`` up to ``ceil((i + 1) * n_in /
    n_out)`` (exclusive), PyTorch's windows.
    """
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def pooling_weights(channels: Sequence[int], patchsize: int, pretrain_dim: int,
                    target_dim: int) -> list[np.ndarray]:
    """Per layer ``W_l`` ``[target_dim, C_l * p * p]`` (float64): the two pooling steps as one
    linear map of the layer's unfolded vector (order channel, ky, kx)."""
    final = adaptive_pool_matrix(len(channels) * pretrain_dim, target_dim)
    out = []
    for li, c in enumerate(channels):
        first = adaptive_pool_matrix(c * patchsize * patchsize, pretrain_dim)
        out.append(final[:, li * pretrain_dim:(li + 1) * pretrain_dim] @ first)
    return out


def patch_grid(h: int, w: int, patchsize: int = 3, stride: int = 1) -> tuple[int, int]:
    """Grid of neighbourhood centres of an ``h x w`` map (zero padding ``(patchsize-1)//2``)."""
    pad = (patchsize - 1) // 2
    return ((h + 2 * pad - patchsize) // stride + 1, (w + 2 * pad - patchsize) // stride + 1)


@dataclass
class LayerKernel:
    """One layer's share of the output: ``rows`` (output dims it feeds), a grouped conv
    ``weight`` ``[len(rows), C/groups, p, p]`` with ``groups``."""

    rows: np.ndarray
    weight: torch.Tensor
    groups: int


def _windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool1d(n_in -> n_out)`` windows ``[lo, hi)`` (PyTorch's)."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def _sparse_rows(channels: Sequence[int], patchsize: int, pretrain_dim: int, target_dim: int
                 ) -> list[dict[int, tuple[int, np.ndarray]]]:
    """Per layer: output row -> (first flat index, weights over the following flat indices)
    of that row of :func:`pooling_weights` (every row's support is contiguous)."""
    p2 = patchsize * patchsize
    firsts = [_windows(c * p2, pretrain_dim) for c in channels]
    layers: list[dict[int, tuple[int, np.ndarray]]] = [{} for _ in channels]
    for j, (a, b) in enumerate(_windows(len(channels) * pretrain_dim, target_dim)):
        wf = 1.0 / (b - a)
        for li in range(a // pretrain_dim, (b - 1) // pretrain_dim + 1):
            idx = range(max(a, li * pretrain_dim) - li * pretrain_dim,
                        min(b, (li + 1) * pretrain_dim) - li * pretrain_dim)
            lo, hi = firsts[li][idx[0]][0], firsts[li][idx[-1]][1]
            vals = np.zeros(hi - lo)
            for i in idx:
                s, e = firsts[li][i]
                vals[s - lo:e - lo] += wf / (e - s)
            layers[li][j] = (lo, vals)
    return layers


@lru_cache(maxsize=16)  # a pure function of its arguments
def grouped_kernels(channels: tuple[int, ...], patchsize: int, pretrain_dim: int,
                    target_dim: int) -> list[LayerKernel] | None:
    """Grouped-conv form of :func:`pooling_weights`, or None when some layer needs more than
    ``_MAX_CHANNELS_PER_GROUP`` input channels per output plane (the general path is then
    cheaper). The groups are the largest ``g`` for which output block ``i`` of ``g`` reads
    only channel block ``i``."""
    p2 = patchsize * patchsize
    kernels = []
    for c, layer in zip(channels, _sparse_rows(channels, patchsize, pretrain_dim, target_dim),
                        strict=True):
        rows = np.array(sorted(layer), dtype=np.int64)
        n = len(rows)
        lo = np.array([layer[r][0] for r in rows]) // p2
        hi = np.array([layer[r][0] + len(layer[r][1]) - 1 for r in rows]) // p2
        found = None
        for g in range(math.gcd(c, n), 0, -1):
            cg = c // g
            if c % g or n % g or cg > _MAX_CHANNELS_PER_GROUP:
                continue
            block = np.arange(n) // (n // g)
            if (lo >= block * cg).all() and (hi < (block + 1) * cg).all():
                found = g
                break
        if found is None:
            return None
        cg = c // found
        weight = np.zeros((n, cg * p2))
        for k, r in enumerate(rows):
            start, vals = layer[r]
            off = start - (k // (n // found)) * cg * p2
            weight[k, off:off + len(vals)] = vals
        kernels.append(LayerKernel(rows, torch.from_numpy(
            weight.reshape(n, cg, patchsize, patchsize)), found))
    return kernels


def fast_aggregate(features: Sequence[torch.Tensor], patchsize: int = 3,
                   pretrain_dim: int = 1024, target_dim: int = 1024, stride: int = 1, *,
                   out: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Same result as the reference :func:`filo.memory.patchcore.aggregate` (module docstring).

    The kernels are built once per channel layout and dimensions (memoised). ``out``: an optional ``[B*H0*W0, target_dim]`` tensor of the features' device to write into
    (any float dtype: the rows are converted as they are written).
    """
    if not features:
        raise ValueError("aggregate: no feature maps")
    batch = features[0].shape[0]
    for feat in features:
        if feat.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] feature map, got shape "
                             f"{tuple(feat.shape)}")
        if feat.shape[0] != batch:
            raise ValueError("aggregate: the layers disagree on the batch size")
    ref = patch_grid(features[0].shape[-2], features[0].shape[-1], patchsize, stride)
    kernels = (grouped_kernels(tuple(int(f.shape[1]) for f in features), int(patchsize),
                               int(pretrain_dim), int(target_dim))
               if stride == 1 and patchsize % 2 == 1 else None)
    if kernels is None:
        planes = _pool_then_upsample(features, patchsize, pretrain_dim, target_dim, stride, ref)
    else:
        planes = _grouped(features, kernels, patchsize, target_dim, ref)
    rows = planes.permute(0, 2, 3, 1).reshape(-1, target_dim)  # [B*H0*W0, D]
    if out is not None:
        out.copy_(rows)
        return out, ref
    return rows.contiguous(), ref


def _grouped(features, kernels: list[LayerKernel], patchsize: int, target_dim: int,
             ref: tuple[int, int]) -> torch.Tensor:
    f0 = features[0]
    result = None
    disjoint = sum(len(k.rows) for k in kernels) == target_dim
    if disjoint:
        order = np.concatenate([k.rows for k in kernels])
        disjoint = bool((order == np.arange(target_dim)).all())
    parts = []
    for feat, k in zip(features, kernels, strict=True):
        w = k.weight.to(device=feat.device, dtype=feat.dtype)
        y = F.conv2d(feat, w, padding=(patchsize - 1) // 2, groups=k.groups)
        if tuple(y.shape[-2:]) != ref:
            y = F.interpolate(y, size=ref, mode="bilinear", align_corners=False)
        if disjoint:
            parts.append(y)
        else:
            if result is None:
                result = f0.new_zeros(f0.shape[0], target_dim, *ref)
            result[:, torch.from_numpy(k.rows).to(f0.device)] += y
    return torch.cat(parts, dim=1) if disjoint else result


def _pool_then_upsample(features, patchsize: int, pretrain_dim: int, target_dim: int,
                        stride: int, ref: tuple[int, int]) -> torch.Tensor:
    """General dimensions: pool each layer's unfolded vectors at its own grid, then upsample
    the ``pretrain_dim`` pooled planes (pooling and bilinear upsampling commute)."""
    batch = features[0].shape[0]
    pooled = []
    for feat in features:
        cols = F.unfold(feat, kernel_size=patchsize, stride=stride,
                        padding=(patchsize - 1) // 2)  # [B, C*p*p, gh*gw]
        grid = patch_grid(feat.shape[-2], feat.shape[-1], patchsize, stride)
        width = cols.shape[1]
        rows = cols.transpose(1, 2).reshape(-1, 1, width)
        p = F.adaptive_avg_pool1d(rows, pretrain_dim).reshape(batch, *grid, pretrain_dim)
        p = p.permute(0, 3, 1, 2)
        if grid != ref:
            p = F.interpolate(p, size=ref, mode="bilinear", align_corners=False)
        pooled.append(p)
        del cols, rows
    stacked = torch.cat(pooled, dim=1)  # [B, L*pre, H0, W0]
    flat = stacked.permute(0, 2, 3, 1).reshape(-1, 1, stacked.shape[1])
    return (F.adaptive_avg_pool1d(flat, target_dim)
            .reshape(batch, *ref, target_dim).permute(0, 3, 1, 2))
