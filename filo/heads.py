"""FiLo heads: linear and multi-shape-convolution (MMCI) patch heads, and the global adapter.

State-dict names follow the research code: ``decoder_linear.fc.{i}``,
``decoder_cov.fc_{11,33,55,77,15,51}.{i}``, ``adapter.fc.{0,2}``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from filo.errors import FiloError

# (name, kernel) of the six MMCI convolutions, in the order they are summed.
MMCI_KERNELS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("fc_11", (1, 1)),
    ("fc_33", (3, 3)),
    ("fc_55", (5, 5)),
    ("fc_77", (7, 7)),
    ("fc_15", (1, 5)),
    ("fc_51", (5, 1)),
)


def _patch_grid(n_tokens: int) -> int:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise FiloError(f"{n_tokens} patch tokens do not form a square grid")
    return side


class LinearHeads(nn.Module):
    """One ``Linear(width, embed)`` per tap, applied to the patch tokens (class token dropped)."""

    def __init__(self, dim_in: int, dim_out: int, n_taps: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(dim_in, dim_out) for _ in range(n_taps)])

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(taps) != len(self.fc):
            raise ValueError(f"expected {len(self.fc)} taps, got {len(taps)}")
        return [fc(tap[:, 1:, :]) for fc, tap in zip(self.fc, taps, strict=True)]


class MMCIHeads(nn.Module):
    """Per tap: six Conv2d (1x1, 3x3, 5x5, 7x7, 1x5, 5x1, padding "same") over the patch grid, summed."""

    def __init__(self, dim_in: int, dim_out: int, n_taps: int) -> None:
        super().__init__()
        self.n_taps = n_taps
        for name, kernel in MMCI_KERNELS:
            convs = nn.ModuleList(
                [nn.Conv2d(dim_in, dim_out, kernel_size=kernel, padding="same") for _ in range(n_taps)]
            )
            self.add_module(name, convs)

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(taps) != self.n_taps:
            raise ValueError(f"expected {self.n_taps} taps, got {len(taps)}")
        out = []
        for i, tap in enumerate(taps):
            patches = tap[:, 1:, :]
            b, n, c = patches.shape
            side = _patch_grid(n)
            grid = patches.reshape(b, side, side, c).permute(0, 3, 1, 2)
            summed = sum(getattr(self, name)[i](grid) for name, _ in MMCI_KERNELS)
            out.append(summed.permute(0, 2, 3, 1).reshape(b, n, -1))
        return out


class Adapter(nn.Module):
    """``x + SiLU(W2 ReLU(W1 x))`` with no biases (research names ``fc.0`` and ``fc.2``)."""

    def __init__(self, dim: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)
