"""Float32 linear layers through oneDNN on the CPU (inference only).

Why this exists: on the CPU, ``F.linear`` calls the BLAS PyTorch was built with (MKL in the
official wheels). On some CPUs MKL's float32 GEMM runs far below the machine's speed -- measured
on the benchmark machine (AMD EPYC, AVX-512, 2 cores): ~200 GFLOP/s -- while oneDNN, shipped in
the same wheel for convolutions, reaches ~430 GFLOP/s on the same products. A linear layer is a
1x1 convolution over its rows, so :func:`linear` runs it as one. The arithmetic is the same
float32 multiply-adds; only the summation order differs (~1e-6 relative, like any other BLAS).

Used only where it is safe and worth it: CPU, float32, autograd off (training keeps
``F.linear``), a layer of at least ``MIN_MACS`` multiply-adds. Everything else -- CUDA, other
dtypes, small layers -- goes to ``F.linear`` unchanged.

``linear`` is the function the FiLo towers call (:mod:`filo.backbone`, :mod:`filo.text`);
:func:`use_onednn_linears` swaps the ``nn.Linear`` modules of a model we do not write the forward
of (the transformers GroundingDINO) for :class:`OneDNNLinear`, which shares their parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_MACS = 1 << 16  # below this the call overhead of a convolution outweighs the faster kernel


def onednn_applies(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    min_macs: int = MIN_MACS,
) -> bool:
    """True when :func:`linear` takes the oneDNN route for these arguments."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    return (
        rows > 0
        and rows * in_features * out_features >= min_macs
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    min_macs: int = MIN_MACS,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on the CPU in float32 without autograd, as a oneDNN 1x1 conv.

    x [..., in], weight [out, in], bias [out] -> [..., out].
    """
    if not onednn_applies(x, weight, bias, min_macs=min_macs):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    # rows as the height of a one-pixel-wide image whose channels are the features; the
    # permuted view is channels-last, which oneDNN reads without a copy and also writes
    grid = x.reshape(1, rows, 1, in_features).permute(0, 3, 1, 2)
    y = F.conv2d(grid, weight.reshape(out_features, in_features, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], out_features)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` inside ``model`` by an :class:`OneDNNLinear`, in place.

    The new modules hold the very same ``Parameter`` objects (tied weights stay tied, the state
    dict is unchanged). Subclasses of ``nn.Linear`` (e.g. the attention's ``out_proj``, whose
    owner reads its weight directly) are left alone. Returns how many modules were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            new = OneDNNLinear.__new__(OneDNNLinear)
            nn.Module.__init__(new)
            new.in_features, new.out_features = child.in_features, child.out_features
            new.register_parameter("weight", child.weight)
            new.register_parameter("bias", child.bias)
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced
