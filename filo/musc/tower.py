"""The CLIP vision tower MuSc runs, and what it taps (docs/design.md section 16.1).

:func:`load_tower` builds filo's open_clip CLIP (:func:`filo.backbone.build_clip`) at the MuSc
input size from a local file: an OpenAI ``ViT-*.pt``, an open_clip state dict, or a FiLo
checkpoint (its ``clip_model``). The MLP activation follows the rule of the original's CLIP
factory: QuickGELU when the input size equals the weights' native size, exact GELU otherwise
(OpenAI weights rebuilt at another size lose the QuickGELU flag). :class:`MuscTower` returns the
raw residual stream after the tapped blocks (class row included) and the L2-normalised image
feature ``ln_post(cls) @ proj`` of the last block. Attention is the explicit
``softmax(q k^T / sqrt(d)) v`` the original's ``need_weights=True`` call computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from filo.backbone import (
    CLIP_ACTS,
    NATIVE_CLIP_SIZE,
    ClipConfig,
    block_mlp,
    build_clip,
    load_clip_state_dict,
    normalize_clip_state_dict,
    vision_embed,
)
from filo.errors import FiloError
from filo.musc.config import default_layers
from filo.weights import clean_state_dict, read_weights, unwrap

HINT = ("give --musc_clip an OpenAI CLIP file (e.g. ckpt/ViT-L-14-336px.pt), an open_clip "
        "state dict or a FiLo checkpoint")


@dataclass
class TowerSource:
    """Where the weights came from (recorded in pools and the cache key)."""

    path: str
    kind: str  # 'clip' (OpenAI / open_clip file) or 'filo' (a FiLo checkpoint's CLIP)
    native_size: int
    act: str


def read_tower_state(path: str | Path) -> tuple[dict, dict | None, str]:
    """(open_clip-named CLIP state dict, saved FiLo clip config or None, kind)."""
    obj = read_weights(path, what="CLIP weights", hint=HINT, torchscript=True)
    state, container = unwrap(obj, ("filo", "state_dict", "model"))
    if not isinstance(state, dict):
        raise FiloError(f"{path} holds no CLIP weights; {HINT}")
    state = clean_state_dict(state)
    kind = "filo" if container == "filo" or any(
        isinstance(k, str) and k.startswith("clip_model.") for k in state) else "clip"
    if kind == "filo":
        state = {k[len("clip_model."):]: v for k, v in state.items()
                 if isinstance(k, str) and k.startswith("clip_model.")}
    state = normalize_clip_state_dict(state)
    if "visual.conv1.weight" not in state:
        raise FiloError(f"{path} holds no CLIP vision weights (no visual.conv1.weight); {HINT}")
    saved = None
    if isinstance(obj, dict) and isinstance(obj.get("filo_config"), dict):
        saved = obj["filo_config"].get("clip")
    return state, saved, kind


def _depth(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def config_from_state(state: dict, image_size: int, act: str,
                      saved: dict | None = None) -> ClipConfig:
    """ClipConfig of the weights at ``image_size`` (saved FiLo config, else from shapes with
    OpenAI's 64-wide heads)."""
    if saved is not None:
        cfg = ClipConfig.from_dict(saved)
        cfg.image_size, cfg.act = int(image_size), act
        return cfg
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    tok = state.get("token_embedding.weight")
    text_width = tok.shape[1] if tok is not None else 512
    return ClipConfig(
        embed_dim=state["visual.proj"].shape[1], image_size=int(image_size), patch_size=patch,
        vision_width=width, vision_layers=_depth(state, "visual.transformer.resblocks."),
        vision_heads=max(width // 64, 1),
        text_context_length=state["positional_embedding"].shape[0]
        if "positional_embedding" in state else 77,
        text_vocab_size=tok.shape[0] if tok is not None else 49408, text_width=text_width,
        text_heads=max(text_width // 64, 1),
        text_layers=_depth(state, "transformer.resblocks.") or 1, act=act)


def native_size(state: dict, kind: str) -> int:
    """The input size the weights were made for: their position grid x patch (a FiLo
    checkpoint stores its CLIP at its own size; its CLIP is OpenAI's ViT-L/14@336)."""
    if kind == "filo":
        return NATIVE_CLIP_SIZE
    rows = state["visual.positional_embedding"].shape[0] - 1
    return int(round(math.sqrt(rows))) * state["visual.conv1.weight"].shape[-1]


def load_tower(path: str | Path, image_size: int, *, act: str | None = None,
               layers: Sequence[int] | None = None, device: str | torch.device = "cpu"
               ) -> MuscTower:
    """The MuSc tower of the CLIP in ``path`` at ``image_size`` (float32, eval mode)."""
    if act is not None and act not in CLIP_ACTS:
        raise FiloError(f"--clip_act {act!r}: use one of {', '.join(CLIP_ACTS)}")
    state, saved, kind = read_tower_state(path)
    patch = state["visual.conv1.weight"].shape[-1]
    if image_size % patch:
        raise FiloError(f"--image_size {image_size} is not a multiple of the patch size {patch} "
                        f"of {path}; use e.g. {image_size - image_size % patch}")
    native = native_size(state, kind)
    act = act or ("quick_gelu" if int(image_size) == native else "gelu")
    clip = build_clip(config_from_state(state, image_size, act, saved))
    missing = [k for k in clip.state_dict() if k.startswith("visual.") and k not in state]
    if missing:
        raise FiloError(f"{path}: CLIP vision weights lack {missing[0]}; {HINT}")
    load_clip_state_dict(clip, state, source=str(path), strict=False)
    tower = MuscTower(clip.visual.float(), layers)
    tower.source = TowerSource(str(path), kind, native, act)
    return tower.to(device).eval()


def explicit_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block.attn(x, x, x, need_weights=True)[0]`` written out: scaled q, softmax, v."""
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    q = q * math.sqrt(1.0 / float(w // heads))
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, w)
    return torch.nn.functional.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class MuscTower(nn.Module):
    """An open_clip ``VisionTransformer`` with MuSc's taps (0-based ``layers``)."""

    source: TowerSource | None = None

    def __init__(self, visual: nn.Module, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.visual = visual
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(int(b) for b in (layers or default_layers(depth)))
        if any(not 0 <= b < depth for b in self.layers):
            raise FiloError(f"--musc_layers {','.join(map(str, self.layers))}: 0-based blocks "
                            f"of a {depth}-block tower must be in 0..{depth - 1}")

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.conv1.weight.shape[0])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(taps: per layer in block order ``[B, 1 + L, C]`` float32, image features ``[B, E]``
        L2-normalised)."""
        visual = self.visual
        p = visual.conv1.weight
        x = vision_embed(visual, images.to(device=p.device, dtype=p.dtype))
        wanted = set(self.layers)
        taps = []
        for idx, block in enumerate(visual.transformer.resblocks):
            x = x + block.ls_1(explicit_attention(block, block.ln_1(x)))
            x = x + block.ls_2(block_mlp(block, block.ln_2(x)))
            if idx in wanted:
                taps.append(x)
        feat = visual.ln_post(x[:, 0]) @ visual.proj
        feat = feat / feat.norm(dim=-1, keepdim=True)
        return taps, feat
