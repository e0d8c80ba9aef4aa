"""Feature backbones of the PatchCore memory-bank mode.

* :func:`build_wide_resnet` builds torchvision's WideResNet-50-2 / -101-2 without downloading
  anything and loads ImageNet weights from a local torchvision model file.
* BatchNorm quirk (on by default): the original PatchCore measures its feature sizes with one
  forward of a ``1 x 3 x S x S`` tensor of ones (S = its input size, 224 in the reference run)
  while the freshly built backbone is still in train mode. Every BatchNorm it passes through
  (stem and layers up to the deepest one used) updates its running mean and variance once
  (momentum 0.1) before inference runs in eval mode with those statistics. The published
  PatchCore numbers include it; ``bn_quirk=False`` keeps the ImageNet statistics.
* :class:`WideResNetFeatures` returns the feature maps of the requested layers (the forward
  stops after the deepest one).
* :class:`ClipTowerFeatures` returns the ordinary (ori) residual stream of a FiLo checkpoint's
  CLIP vision tower after the requested blocks, patch tokens as ``[B, C, g, g]`` maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from filo.backbone import block_mlp, block_out_proj, block_qkv, vision_embed
from filo.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from filo.errors import FiloError
from filo.weights import clean_state_dict, read_weights, unwrap

__all__ = ["WIDE_RESNET_ARCHS", "WIDE_RESNET_LAYERS", "ClipTowerFeatures", "FeatureSpec",
           "WideResNetFeatures", "apply_bn_quirk", "build_wide_resnet",
           "load_wide_resnet_weights"]

# arch -> (torchvision constructor, torchvision weight file name)
WIDE_RESNET_ARCHS = {
    "wrn50": ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
    "wrn101": ("wide_resnet101_2", "wide_resnet101_2-32ee1156.pth"),
}
WIDE_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class FeatureSpec:
    """What produced a bank's features (recorded with the bank)."""

    backbone: str
    layers: tuple[str, ...]
    weights: str | None = None
    weights_sha256: str | None = None


# --------------------------------------------------------------------------------------------
# WideResNet


def _arch(arch: str) -> tuple[str, str]:
    if arch not in WIDE_RESNET_ARCHS:
        raise FiloError(f"unknown WideResNet {arch!r}; use one of {', '.join(WIDE_RESNET_ARCHS)}")
    return WIDE_RESNET_ARCHS[arch]


def _weights_hint(arch: str) -> str:
    file = _arch(arch)[1]
    return (f"download torchvision's ImageNet weights {file} (python -m filo download) and put "
            f"them at ckpt/{file}, or pass their path")


def load_wide_resnet_weights(model: nn.Module, path: str | Path, arch: str) -> None:
    """Strictly load a torchvision WideResNet state dict from ``path`` into ``model``.

    Raises a one-line :class:`FiloError` naming the file and the first missing, unexpected and
    wrongly shaped keys when the file does not fit ``arch``.
    """
    name, _ = _arch(arch)
    hint = _weights_hint(arch)
    obj = read_weights(path, what=f"{name} weights", hint=hint)
    state, _ = unwrap(obj, ("state_dict", "model"))
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FiloError(f"{path}: not a state dict of tensors, so not {name} weights; {hint}")
    state = clean_state_dict(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape, e.g. {'; '.join(shapes[:3])}")
        raise FiloError(f"{path}: the weights do not fit torchvision {name} "
                        f"({'; '.join(parts)}); {hint}")
    model.load_state_dict(state, strict=True)


def _stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def _forward_layers(model: nn.Module, x: torch.Tensor, wanted: Sequence[str]
                    ) -> dict[str, torch.Tensor]:
    """Run the stem and the residual stages up to the deepest of ``wanted``."""
    last = max(WIDE_RESNET_LAYERS.index(n) for n in wanted)
    out: dict[str, torch.Tensor] = {}
    x = _stem(model, x)
    for name in WIDE_RESNET_LAYERS[: last + 1]:
        x = getattr(model, name)(x)
        if name in wanted:
            out[name] = x
    return out


def apply_bn_quirk(model: nn.Module, size: int = 224, last_layer: str = "layer3") -> None:
    """One train-mode, no-grad forward of ``ones(1, 3, size, size)`` up to ``last_layer``.

    This is the original's feature-size probe (module docstring): every BatchNorm it reaches
    updates its running statistics once. The model is left in eval mode.
    """
    _check_layers([last_layer])
    p = next(model.parameters())
    model.train()
    with torch.no_grad():
        _forward_layers(model, torch.ones(1, 3, size, size, device=p.device, dtype=p.dtype),
                        [last_layer])
    model.eval()


def build_wide_resnet(arch: str, weights: str | Path | None, *, bn_quirk: bool = True,
                      quirk_size: int = 224, quirk_last_layer: str = "layer3") -> nn.Module:
    """torchvision ``wide_resnet50_2`` (``"wrn50"``) or ``wide_resnet101_2`` (``"wrn101"``).

    ``weights``: a local torchvision model file (strict load), None keeps the random init
    (tests). ``bn_quirk``: apply :func:`apply_bn_quirk` with ``quirk_size`` (the original uses
    its input size, 224 in the reference run) up to ``quirk_last_layer`` (the deepest layer the
    features use). Returns the model on the CPU in eval mode without gradients.
    """
    name, _ = _arch(arch)
    model = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        load_wide_resnet_weights(model, weights, arch)
    if bn_quirk:
        apply_bn_quirk(model, quirk_size, quirk_last_layer)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_layers(layers: Sequence[str]) -> None:
    bad = [n for n in layers if n not in WIDE_RESNET_LAYERS]
    if bad or not layers:
        raise FiloError(f"WideResNet feature layers {list(layers)}: use names among "
                        f"{', '.join(WIDE_RESNET_LAYERS)}")


class WideResNetFeatures(nn.Module):
    """Feature maps of a WideResNet's residual stages, in the order of ``layers``.

    At 224 px, WideResNet-50-2 gives ``layer2`` 512 x 28 x 28 and ``layer3`` 1024 x 14 x 14.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, model: nn.Module, layers: Sequence[str] = ("layer2", "layer3")) -> None:
        super().__init__()
        layers = tuple(layers)
        _check_layers(layers)
        self.model = model
        self.layers = layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p = next(self.model.parameters())
        out = _forward_layers(self.model, x.to(device=p.device, dtype=p.dtype), self.layers)
        return [out[n] for n in self.layers]


# --------------------------------------------------------------------------------------------
# CLIP vision tower


class ClipTowerFeatures(nn.Module):
    """Patch tokens of an open_clip ``VisionTransformer``'s ori stream after given blocks.

    ``visual`` is ``filo_model.clip_model.visual``; ``blocks`` are 1-based. The blocks run the
    ordinary CLIP forward (the ori stream of docs/design.md section 2) and stop after the deepest
    requested block. ``forward`` returns per block ``[B, width, g, g]`` (class token dropped).
    Inputs use the OpenAI CLIP mean/std (:attr:`mean`, :attr:`std`) at the tower's image size.
    """

    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, visual: nn.Module, blocks: Sequence[int] = (12, 18)) -> None:
        super().__init__()
        n = len(visual.transformer.resblocks)
        blocks = tuple(int(b) for b in blocks)
        if not blocks or any(not 1 <= b <= n for b in blocks):
            raise FiloError(f"CLIP feature blocks {list(blocks)}: use 1-based block numbers "
                            f"in 1..{n}")
        self.visual = visual
        self.blocks = blocks

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        visual = self.visual
        p = visual.conv1.weight
        x = x.to(device=p.device)
        stride = visual.conv1.stride
        gh, gw = x.shape[-2] // stride[0], x.shape[-1] // stride[1]
        tokens = vision_embed(visual, x)
        wanted = set(self.blocks)
        found: dict[int, torch.Tensor] = {}
        for idx, block in enumerate(visual.transformer.resblocks[: max(self.blocks)], start=1):
            q, k, v = block_qkv(block, block.ln_1(tokens))
            tokens = tokens + block.ls_1(
                block_out_proj(block, F.scaled_dot_product_attention(q, k, v)))
            tokens = tokens + block.ls_2(block_mlp(block, block.ln_2(tokens)))
            if idx in wanted:
                found[idx] = tokens
        out = []
        for b in self.blocks:
            t = found[b][:, 1:]
            if t.shape[1] != gh * gw:
                raise FiloError(f"CLIP tower: {t.shape[1]} patch tokens do not form a "
                                f"{gh}x{gw} grid")
            out.append(t.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)
                       .contiguous())
        return out
