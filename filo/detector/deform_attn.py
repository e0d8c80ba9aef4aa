"""Multi-scale deformable attention as one weighted gather (CPU speed, same result).

transformers' pure-PyTorch ``MultiScaleDeformableAttention`` (used whenever its CUDA kernel is
not loaded, always on the CPU) samples each feature level with ``grid_sample``, stacks the
samples of all levels, multiplies them by the attention weights and sums. Every output is a
weighted sum of value rows: for each query, head, level and point, the four bilinear corners,
each with weight ``bilinear corner weight x attention weight`` (zero for a corner outside the
map, as ``grid_sample(padding_mode="zeros")``). :class:`GatherDeformableAttention` computes those
indices and weights and lets ``F.embedding_bag(mode="sum")`` do all gathers and the weighted
sum in one call: no per-level sample tensors, no stack. Same arithmetic up to the summation
order (~1e-6 relative), about 2.5x faster for the encoder's 5,684 queries on the CPU.

Used for float32 inputs on the CPU; anything else runs the module it replaced.
:func:`use_gather_deformable_attention` swaps it into a loaded transformers model where the
attention is a ``MultiScaleDeformableAttention`` module (checked: transformers 4.57.6 and 5.24.0;
4.40.2 calls a function instead and is left unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HF_CLASS = "MultiScaleDeformableAttention"


def _corner_terms(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                  shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into the concatenated levels and weights, [B, Q, H, L * P * 4] each."""
    dtype, device = sampling_locations.dtype, sampling_locations.device
    levels = len(shapes)
    sizes = torch.tensor(shapes, dtype=torch.long, device=device)  # [L, 2] = (height, width)
    height = sizes[:, 0].view(1, 1, 1, levels, 1)
    width = sizes[:, 1].view(1, 1, 1, levels, 1)
    start = torch.cumsum(sizes[:, 0] * sizes[:, 1], 0) - sizes[:, 0] * sizes[:, 1]
    start = start.view(1, 1, 1, levels, 1)
    # grid_sample's unnormalisation (align_corners=False) of the grid 2 * loc - 1
    grid = 2 * sampling_locations - 1
    x = ((grid[..., 0] + 1) * width.to(dtype) - 1) / 2
    y = ((grid[..., 1] + 1) * height.to(dtype) - 1) / 2
    x0, y0 = torch.floor(x), torch.floor(y)
    x1, y1 = x0 + 1, y0 + 1
    indices, weights = [], []
    zero = torch.zeros((), dtype=dtype, device=device)
    for xc, yc, w in ((x0, y0, (x1 - x) * (y1 - y)), (x1, y0, (x - x0) * (y1 - y)),
                      (x0, y1, (x1 - x) * (y - y0)), (x1, y1, (x - x0) * (y - y0))):
        xi, yi = xc.long(), yc.long()
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        weights.append(torch.where(inside, w * attention_weights, zero))
        xi = torch.minimum(xi.clamp(min=0), width - 1)
        yi = torch.minimum(yi.clamp(min=0), height - 1)
        indices.append(start + yi * width + xi)
    b, q, h = sampling_locations.shape[:3]
    return (torch.stack(indices, -1).reshape(b, q, h, -1),
            torch.stack(weights, -1).reshape(b, q, h, -1))


def gather_deformable_attention(value: torch.Tensor, shapes: list[tuple[int, int]],
                                sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor) -> torch.Tensor:
    """value [B, S, H, C], locations [B, Q, H, L, P, 2] in [0, 1], weights [B, Q, H, L, P]
    -> [B, Q, H * C] (the layout transformers' module returns)."""
    b, s, h, c = value.shape
    q = sampling_locations.shape[1]
    index, weight = _corner_terms(sampling_locations, attention_weights, shapes)
    # one table of value rows for every (image, head): row (bi * H + hi) * S + si
    table = value.permute(0, 2, 1, 3).reshape(b * h * s, c)
    offset = (torch.arange(b * h, device=value.device) * s).view(b, 1, h, 1)
    index = (index + offset).reshape(b * q * h, -1)
    out = F.embedding_bag(index, table, per_sample_weights=weight.reshape(b * q * h, -1),
                          mode="sum")
    return out.view(b, q, h * c)


class GatherDeformableAttention(nn.Module):
    """Drop-in for transformers' ``MultiScaleDeformableAttention`` (same forward signature)."""

    def __init__(self, replaced: nn.Module) -> None:
        super().__init__()
        self.replaced = replaced

    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step):
        if (value.device.type != "cpu" or value.dtype != torch.float32
                or sampling_locations.dtype != torch.float32
                or attention_weights.dtype != torch.float32):
            return self.replaced(value, value_spatial_shapes, value_spatial_shapes_list,
                                 level_start_index, sampling_locations, attention_weights,
                                 im2col_step)
        shapes = [(int(hh), int(ww)) for hh, ww in value_spatial_shapes_list]
        return gather_deformable_attention(value, shapes, sampling_locations, attention_weights)


def use_gather_deformable_attention(model: nn.Module) -> int:
    """Swap every transformers ``MultiScaleDeformableAttention`` module for the gather version.

    The replaced module holds no parameters, so the state dict does not change. Returns how many
    modules were swapped (0 on transformers versions that call a function instead).
    """
    swapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, GatherDeformableAttention):  # already swapped
            continue
        for name, child in list(parent.named_children()):
            if type(child).__name__ == _HF_CLASS and type(child).__module__.startswith(
                    "transformers."):
                setattr(parent, name, GatherDeformableAttention(child))
                swapped += 1
    return swapped
