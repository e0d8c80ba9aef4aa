"""LNAMD: local neighbourhood aggregation with multiple degrees (docs/design.md section 16.2).

Per image and tapped layer: drop the class row, put the patch tokens on their ``g x g`` grid,
layer-normalise the whole ``[C, g, g]`` block at once (one mean and variance per image, no
affine part), average every ``r x r`` neighbourhood per channel with zero padding counted, and
L2-normalise each patch vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from filo.errors import FiloError


def grid_of(tokens: torch.Tensor) -> int:
    """The side of the patch grid of ``[B, 1 + L, C]`` tokens."""
    n = tokens.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise FiloError(f"MuSc: {n} patch tokens do not form a square grid")
    return g


def layer_normed(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + L, C]`` -> ``[B, C, g, g]`` float32, layer-normalised over ``(C, g, g)``."""
    g = grid_of(tokens)
    b, _, c = tokens.shape
    x = tokens[:, 1:].float().reshape(b, g, g, c).permute(0, 3, 1, 2)
    return F.layer_norm(x, (c, g, g), eps=1e-5)


def aggregate(normed: torch.Tensor, r: int, *, exact: bool = False) -> torch.Tensor:
    """``[B, C, g, g]`` layer-normed maps -> ``[B, L, C]`` unit patch vectors of degree ``r``.

    ``exact`` uses unfold + ``adaptive_avg_pool1d`` (the original's summation order, bit-equal);
    the default ``avg_pool2d`` is the same mean to ~1e-7 with far less memory."""
    if r < 1 or r % 2 == 0:
        raise FiloError(f"MuSc degree r={r}: use odd degrees >= 1")
    b, c, g, _ = normed.shape
    pad = (r - 1) // 2
    if r == 1:
        x = normed.reshape(b, c, g * g).transpose(1, 2)
    elif exact:
        cols = F.unfold(normed, kernel_size=r, padding=pad, stride=1)  # [B, C*r*r, L]
        cols = cols.transpose(1, 2).reshape(b * g * g, 1, c * r * r)
        x = F.adaptive_avg_pool1d(cols, c).reshape(b, g * g, c)
    else:
        x = F.avg_pool2d(normed, r, stride=1, padding=pad, count_include_pad=True)
        x = x.reshape(b, c, g * g).transpose(1, 2)
    x = x.contiguous()
    return x / x.norm(dim=-1, keepdim=True)


def lnamd(tokens: torch.Tensor, r: int, *, exact: bool = False) -> torch.Tensor:
    """``[B, 1 + L, C]`` tapped tokens -> ``[B, L, C]`` unit LNAMD vectors of degree ``r``."""
    return aggregate(layer_normed(tokens), r, exact=exact)
