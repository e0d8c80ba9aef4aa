"""CLIP backbone with the two-stream ("v-v", CLIP-surgery) vision forward used by FiLo.

The model *definition* is open_clip's (``open_clip.model.CLIP``) built from a local config
dict, so state-dict names follow the OpenAI / open_clip layout. No download ever happens:
weights come from a local file (:func:`load_clip_weights`).

The vision forward is written out block by block (:func:`encode_image_two_stream`):

* ori stream: the ordinary CLIP block,
  ``mid_k = ori_{k-1} + attn_k(ln1_k(ori_{k-1}))``, ``ori_k = mid_k + mlp_k(ln2_k(mid_k))``.
* vv stream, for blocks after ``dual_start``:
  ``vv_k = vv_{k-1} + out_proj(vvattn(ln1_k(ori_{k-1})))`` with ``vv_{dual_start} = ori_{dual_start}``;
  v-v attention uses the block's value projection as query, key and value.

Reference taps (what the released FiLo heads were trained on, see docs/design.md section 2):
linear heads ``[V, M_a, M_b, O_L]``, MMCI heads ``[V, V, V]``, with ``V`` the final vv stream,
``M_k`` the mid-block state of block ``k`` and ``O_L`` the final ori stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from filo.assets import OPENAI_CLIP_L14_336_SHA256, ChecksumCache
from filo.errors import FiloError
from filo.script_archive import is_torchscript_archive
from filo.weights import clean_state_dict, fit_pos_embed, read_weights, unwrap

logger = logging.getLogger(__name__)

LinearFn = Callable[..., torch.Tensor]  # (x, weight, bias) -> x @ weight.T + bias

CLIP_WEIGHTS_HINT = (
    "download OpenAI's ViT-L-14-336px.pt (the file open_clip/OpenAI CLIP fetch for "
    "'ViT-L/14@336px') and put it at ckpt/ViT-L-14-336px.pt, or pass its path"
)

# OpenAI TorchScript archives carry these scalars besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# Key names the research code's surgery attention used for blocks after the dual-path start.
_SURGERY_KEY_MAP = {
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight",
    "attn.proj.bias": "attn.out_proj.bias",
}


CLIP_ACTS = ("gelu", "quick_gelu")
NATIVE_CLIP_SIZE = 336  # the input size OpenAI's ViT-L/14@336 was trained at


def research_clip_act(image_size: int) -> str:
    """The activation the research code's CLIP factory gives OpenAI weights at ``image_size``.

    At CLIP's native 336 px it returns the QuickGELU model; at any other size it rebuilds the
    model from a config without the QuickGELU flag, so both towers run exact GELU
    (docs/design.md section 1.1). The released checkpoints (518 px) therefore expect 'gelu'.
    """
    return "quick_gelu" if int(image_size) == NATIVE_CLIP_SIZE else "gelu"


@dataclass
class ClipConfig:
    """open_clip CLIP hyper-parameters (defaults: ViT-L-14-336 at FiLo's 518 px input)."""

    embed_dim: int = 768
    image_size: int = 518
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    # MLP activation of both towers: 'quick_gelu' (x * sigmoid(1.702 x), what OpenAI trained
    # with) or 'gelu' (exact erf GELU, what the released FiLo checkpoints were trained on at
    # 518; docs/design.md section 1.1)
    act: str = "quick_gelu"

    @classmethod
    def vit_l_14_336(cls, image_size: int = 518, act: str | None = None) -> ClipConfig:
        """ViT-L-14-336 at ``image_size``; ``act`` None follows :func:`research_clip_act`."""
        return cls(image_size=image_size, act=act or research_clip_act(image_size))

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        """Inverse of :meth:`to_dict`; also reads configs saved before ``act`` existed
        (``quick_gelu: bool``)."""
        d = dict(d)
        legacy = d.pop("quick_gelu", None)
        if "act" not in d and legacy is not None:
            d["act"] = "quick_gelu" if legacy else "gelu"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FiloError(f"clip config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    @property
    def quick_gelu(self) -> bool:
        return self.act == "quick_gelu"

    def validate(self) -> None:
        if self.act not in CLIP_ACTS:
            raise FiloError(f"clip config: act must be one of {', '.join(CLIP_ACTS)}, got "
                            f"{self.act!r}")

    @classmethod
    def tiny(cls) -> ClipConfig:
        """A few-hundred-kilobyte CLIP for tests: 4 vision blocks of width 64, 4x4 patch grid."""
        return cls(
            embed_dim=32,
            image_size=32,
            patch_size=8,
            vision_width=64,
            vision_layers=4,
            vision_heads=4,
            text_width=32,
            text_heads=4,
            text_layers=2,
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def open_clip_dict(self) -> dict:
        """The open_clip model-config dict (same shape as ``model_configs/ViT-L-14-336.json``)."""
        self.validate()
        if self.vision_width % self.vision_heads:
            raise FiloError(
                f"clip config: vision_width {self.vision_width} is not divisible by "
                f"vision_heads {self.vision_heads}"
            )
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "head_width": self.vision_width // self.vision_heads,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.text_context_length,
                "vocab_size": self.text_vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TapConfig:
    """Which residual-stream states feed the heads.

    ``mode="reference"`` (default) reproduces the taps of the released checkpoints;
    ``mode="true"`` returns the per-layer features the research code meant to use
    (ori at ``true_layers`` for the linear heads, vv at ``true_layers[1:]`` for MMCI).
    Layers and blocks are 1-based.
    """

    dual_start: int = 6
    mid_tap_blocks: tuple[int, ...] = (13, 19)
    true_layers: tuple[int, ...] = (6, 12, 18, 24)
    mode: str = "reference"
    n_mmci: int = 3

    @classmethod
    def for_depth(cls, layers: int, mode: str = "reference") -> TapConfig:
        """The reference pattern scaled to ``layers`` blocks (24 -> 6, (13, 19), (6, 12, 18, 24))."""
        q = layers // 4
        if q < 1:
            raise FiloError(f"tap config: need at least 4 vision blocks, got {layers}")
        return cls(
            dual_start=q,
            mid_tap_blocks=(2 * q + 1, 3 * q + 1),
            true_layers=(q, 2 * q, 3 * q, 4 * q),
            mode=mode,
        )

    @property
    def n_linear(self) -> int:
        return len(self.mid_tap_blocks) + 2 if self.mode == "reference" else len(self.true_layers)

    def validate(self, layers: int) -> None:
        if self.mode not in ("reference", "true"):
            raise FiloError(f"tap config: mode must be 'reference' or 'true', got {self.mode!r}")
        if not 0 <= self.dual_start < layers:
            raise FiloError(
                f"tap config: dual_start {self.dual_start} must be in [0, {layers - 1}]"
            )
        for b in self.mid_tap_blocks:
            if not 1 <= b <= layers:
                raise FiloError(f"tap config: mid tap block {b} outside 1..{layers}")
        for b in self.true_layers:
            if not 1 <= b <= layers:
                raise FiloError(f"tap config: true tap layer {b} outside 1..{layers}")
        if self.mode == "true":
            vv = [b for b in self.true_layers if b > self.dual_start]
            if len(vv) != self.n_mmci:
                raise FiloError(
                    f"tap config: true taps give {len(vv)} vv features, n_mmci is {self.n_mmci}"
                )


@dataclass
class VisionFeatures:
    """Outputs of the two-stream forward; every tap is ``[B, 1 + N, width]`` (class token first)."""

    linear_taps: list[torch.Tensor]
    mmci_taps: list[torch.Tensor]
    global_tokens: torch.Tensor  # [B, 1 + N, embed_dim] = ln_post(ori_L) @ proj
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def build_clip(config: ClipConfig) -> nn.Module:
    """Construct ``open_clip.model.CLIP`` from the local config (random init, no download)."""
    from open_clip.model import CLIP

    cfg = config.open_clip_dict()
    model = CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=cfg["quick_gelu"],
    )
    want = "quick_gelu" if config.quick_gelu else "gelu"
    for block in (*model.visual.transformer.resblocks, *model.transformer.resblocks):
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise FiloError("open_clip built a custom attention block; FiLo needs the standard one")
        if mlp_act(block) != want:  # both towers must follow the configured activation
            raise FiloError(f"open_clip built a {mlp_act(block)} MLP, the config asks for {want}")
    return model


def mlp_act(block: nn.Module) -> str:
    """'quick_gelu' or 'gelu' (exact): the activation module of an open_clip block's MLP."""
    act = block.mlp.gelu
    if _is_quick_gelu(act):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise FiloError(f"unsupported CLIP MLP activation {act!r}")


# --------------------------------------------------------------------------------------------
# two-stream forward


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, w = x.shape
    return x.reshape(b, n, heads, w // heads).transpose(1, 2)  # [B, H, N, d]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def block_qkv(
    block: nn.Module, h: torch.Tensor, linear: LinearFn = F.linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of an open_clip block for (already ln_1-normalised) tokens ``h`` [B, N, W]."""
    attn: nn.MultiheadAttention = block.attn
    qkv = linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    heads = attn.num_heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def block_out_proj(block: nn.Module, heads_out: torch.Tensor, linear: LinearFn = F.linear
                   ) -> torch.Tensor:
    """The attention's output projection of per-head results [B, H, N, d] -> [B, N, W]."""
    out_proj = block.attn.out_proj
    return linear(_merge_heads(heads_out), out_proj.weight, out_proj.bias)


def _is_quick_gelu(module: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU  # imported with the model; lazy for light CLIs

    return isinstance(module, QuickGELU)


def block_mlp(block: nn.Module, x: torch.Tensor, linear: LinearFn = F.linear) -> torch.Tensor:
    """``c_proj(act(c_fc(x)))`` of an open_clip block, ``act`` its own activation module
    (exact GELU or QuickGELU, as the config built it).

    Without autograd, QuickGELU ``h * sigmoid(1.702 h)`` is computed in place on the hidden
    activations (the same operations, one temporary instead of three of the widest tensor);
    exact GELU always runs as the module's ``F.gelu``.
    """
    mlp = block.mlp
    h = linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    if _is_quick_gelu(mlp.gelu) and not torch.is_grad_enabled():
        h = h.mul_(torch.sigmoid_(h * 1.702))
    else:
        h = mlp.gelu(h)
    return linear(h, mlp.c_proj.weight, mlp.c_proj.bias)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` per head (fused kernel; tests check it against matmuls)."""
    return F.scaled_dot_product_attention(q, k, v)


def vision_embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + position embedding + ln_pre -> [B, 1 + N, W]."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, w, gh, gw = x.shape
    pos = visual.positional_embedding
    if pos.shape[0] != gh * gw + 1:
        raise FiloError(
            f"input of {images.shape[-2]}x{images.shape[-1]} px gives a {gh}x{gw} patch grid but the "
            f"model's position embedding has {pos.shape[0] - 1} patches; build the model with "
            f"image_size={images.shape[-1]} (positions are resized when weights are loaded)"
        )
    x = x.reshape(b, w, gh * gw).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, w).expand(b, 1, w)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    return visual.ln_pre(x)


def encode_image_two_stream(
    visual: nn.Module,
    images: torch.Tensor,
    taps: TapConfig | None = None,
    *,
    linear: LinearFn = F.linear,
) -> VisionFeatures:
    """Run the vision tower with the ori and vv streams; return head taps and global tokens.

    ``linear`` computes every linear layer of the blocks (``F.linear``, or
    :func:`filo.kernels.linear` for the faster CPU route).
    """
    blocks = visual.transformer.resblocks
    n_layers = len(blocks)
    taps = taps or TapConfig.for_depth(n_layers)
    taps.validate(n_layers)

    ori = vision_embed(visual, images)
    vv: torch.Tensor | None = None
    mids: dict[int, torch.Tensor] = {}
    ori_at: dict[int, torch.Tensor] = {}
    vv_at: dict[int, torch.Tensor] = {}

    for idx, block in enumerate(blocks, start=1):
        h = block.ln_1(ori)
        q, k, v = block_qkv(block, h, linear)
        attn_out = block_out_proj(block, _attend(q, k, v), linear)
        mid = ori + block.ls_1(attn_out)
        if idx > taps.dual_start:
            if vv is None:
                vv = ori  # vv_{dual_start} = ori_{dual_start}
            vv_out = block_out_proj(block, _attend(v, v, v), linear)
            vv = vv + block.ls_1(vv_out)
        ori = mid + block.ls_2(block_mlp(block, block.ln_2(mid), linear))
        if idx in taps.mid_tap_blocks:
            mids[idx] = mid
        if idx in taps.true_layers:
            ori_at[idx] = ori
            if vv is not None:
                vv_at[idx] = vv

    if vv is None:  # dual_start == n_layers cannot happen after validate(); keep types honest
        vv = ori
    if taps.mode == "reference":
        linear = [vv] + [mids[b] for b in taps.mid_tap_blocks] + [ori]
        mmci = [vv] * taps.n_mmci
    else:
        linear = [ori_at[b] for b in taps.true_layers]
        mmci = [vv_at[b] for b in taps.true_layers if b > taps.dual_start]

    global_tokens = visual.ln_post(ori) @ visual.proj
    return VisionFeatures(
        linear_taps=linear, mmci_taps=mmci, global_tokens=global_tokens, extras={"ori": ori, "vv": vv}
    )


# --------------------------------------------------------------------------------------------
# weights


def normalize_clip_state_dict(state: dict) -> dict:
    """Bring a CLIP state dict to open_clip names.

    Accepts OpenAI / open_clip layouts, ``module.`` or ``clip_model.`` prefixes and the
    research code's surgery attention names (``attn.qkv.*``, ``attn.proj.*``).
    """
    out = {}
    for key, value in clean_state_dict(state).items():
        if key in _OPENAI_EXTRA_KEYS or not isinstance(value, torch.Tensor):
            continue
        if key.startswith("clip_model."):
            key = key[len("clip_model."):]
        for old, new in _SURGERY_KEY_MAP.items():
            if key.endswith("." + old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def read_clip_state_dict(path: str | Path) -> dict:
    """Read CLIP weights from a local file: OpenAI TorchScript ``.pt`` or a (open_clip) state dict.

    Returns the raw state dict (``module.`` prefixes stripped); :func:`normalize_clip_state_dict`
    brings it to open_clip names. An OpenAI archive is read without running its code
    (docs/design.md §2.1) and logged as the official file when its sha256 is
    ``OPENAI_CLIP_L14_336_SHA256``; any other file is only as good as its keys and shapes, which
    :func:`load_clip_state_dict` checks against the open_clip layout.
    """
    obj = read_weights(path, what="CLIP weights", hint=CLIP_WEIGHTS_HINT, torchscript=True)
    if is_torchscript_archive(path):
        digest = ChecksumCache().sha256(Path(path))
        if digest == OPENAI_CLIP_L14_336_SHA256:
            logger.info("CLIP weights %s: the official OpenAI ViT-L/14@336px archive (sha256 %s...)",
                        path, digest[:8])
        else:
            logger.info("CLIP weights %s: a TorchScript archive that is not OpenAI's ViT-L/14@336px "
                        "file (sha256 %s...); keys and shapes are checked against the open_clip "
                        "layout", path, digest[:8])
    state, _ = unwrap(obj, ("state_dict", "model"))
    state = clean_state_dict(state) if isinstance(state, dict) else None
    if state is None or not any(str(k).split(".", 1)[0] in ("visual", "clip_model") for k in state):
        raise FiloError(f"{path} holds no CLIP vision weights (no 'visual.*' keys); "
                        f"{CLIP_WEIGHTS_HINT}")
    return state


def load_clip_weights(clip: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load CLIP weights from ``path`` into ``clip`` (position grid resized to the model's)."""
    state = normalize_clip_state_dict(read_clip_state_dict(path))
    load_clip_state_dict(clip, state, source=str(path), strict=strict)


def load_clip_state_dict(
    clip: nn.Module, state: dict, *, source: str = "<state dict>", strict: bool = True
) -> None:
    """Load an open_clip-named state dict; resizes ``visual.positional_embedding`` if needed."""
    state = dict(state)
    fit_pos_embed(state, "visual.positional_embedding", clip.visual.positional_embedding,
                  tuple(clip.visual.grid_size))
    own = clip.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad:
        raise FiloError(
            f"{source}: CLIP weights do not fit the configured model ({'; '.join(bad[:3])}); "
            "use ViT-L-14-336 weights or change the clip config"
        )
    result = clip.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise FiloError(
            f"{source}: CLIP weights do not match open_clip ViT layout "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
            f"{CLIP_WEIGHTS_HINT}"
        )

