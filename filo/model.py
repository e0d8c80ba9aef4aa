"""FiLo: CLIP with the two-stream backbone, linear + MMCI heads, adapter and learned prompts.

``FiLo(config)(images, class_names, positions)`` returns, per image, the 7 per-tap 2-channel
probability maps, the final anomaly map and the image score (FILO_REFERENCE.md section 5).
Each image has its own class and position; ``None`` averages the abnormal prompts over all
positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from filo.backbone import (
    ClipConfig,
    TapConfig,
    build_clip,
    encode_image_two_stream,
    load_clip_weights,
)
from filo.device import resolve_device
from filo.errors import FiloError
from filo.heads import Adapter, LinearHeads, MMCIHeads
from filo.prompts import PromptTable, load_prompt_table
from filo.text import PromptLearner, PromptTokens, TextEncoder, class_text_features

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FiLoConfig:
    """Everything that defines a FiLo model (architecture + inference behaviour)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    taps: TapConfig = field(default_factory=TapConfig)
    n_ctx: int = 12
    use_adapter: bool = True  # the released checkpoints are evaluated with the adapter
    legacy_macaroni: bool = False  # True: macaroni1 uses macaroni2's phrases (research code)
    score_mode: str = "research"  # 'research': (t + max map) / 2; 'softmax': softmax text prob
    logit_scale: float = 100.0
    blur_kernel: int = 3
    blur_sigma: float = 4.0
    device: str | None = None  # None/'auto' -> CUDA if available else CPU (filo.device)
    dtype: str = "float32"

    @classmethod
    def vit_l_14_336(cls, image_size: int = 518, **overrides) -> FiLoConfig:
        return cls(clip=ClipConfig.vit_l_14_336(image_size), taps=TapConfig(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> FiLoConfig:
        clip = ClipConfig.tiny()
        return cls(clip=clip, taps=TapConfig.for_depth(clip.vision_layers), **overrides)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    def validate(self) -> None:
        if self.score_mode not in ("research", "softmax"):
            raise FiloError(f"score_mode must be 'research' or 'softmax', got {self.score_mode!r}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise FiloError(f"blur_kernel must be a positive odd number, got {self.blur_kernel}")
        if self.dtype not in _DTYPES:
            raise FiloError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        self.taps.validate(self.clip.vision_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taps"]["mid_tap_blocks"] = list(self.taps.mid_tap_blocks)
        d["taps"]["true_layers"] = list(self.taps.true_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FiLoConfig:
        d = dict(d)
        clip = ClipConfig(**d.pop("clip"))
        taps = dict(d.pop("taps"))
        taps["mid_tap_blocks"] = tuple(taps["mid_tap_blocks"])
        taps["true_layers"] = tuple(taps["true_layers"])
        return cls(clip=clip, taps=TapConfig(**taps), **d)


@dataclass
class FiLoOutput:
    tap_probs: torch.Tensor  # [B, 7, 2, S, S] softmax (normal, abnormal) per tap, before blur
    anomaly_map: torch.Tensor  # [B, S, S] mean of the blurred per-tap abnormal maps
    image_score: torch.Tensor  # [B]
    text_score: torch.Tensor  # [B] image-level text score before averaging with the map max


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's GaussianBlur kernel: exp(-x^2 / 2 sigma^2) on x = -(k-1)/2 .. (k-1)/2, summed to 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] with reflect padding (torchvision semantics)."""
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    k = gaussian_kernel1d(kernel_size, sigma).to(device=maps.device, dtype=maps.dtype)
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(shape)


class FiLo(nn.Module):
    """FiLo model; submodule names match the research checkpoints (``{"filo": state_dict}``)."""

    def __init__(self, config: FiLoConfig | None = None, prompts: PromptTable | None = None) -> None:
        super().__init__()
        self.config = config = config or FiLoConfig()
        config.validate()
        c = config.clip
        self.clip_model = build_clip(c)
        self.decoder_cov = MMCIHeads(c.vision_width, c.embed_dim, config.taps.n_mmci)
        self.decoder_linear = LinearHeads(c.vision_width, c.embed_dim, config.taps.n_linear)
        self.text_encoder = TextEncoder(self.clip_model)
        self.normal_prompt_learner = PromptLearner(config.n_ctx, c.text_width, c.embed_dim)
        self.abnormal_prompt_learner = PromptLearner(config.n_ctx, c.text_width, c.embed_dim)
        self.adapter = Adapter(c.embed_dim)
        self.clip_model.requires_grad_(False)
        self.set_prompt_table(prompts if prompts is not None else load_prompt_table())

    # ---- prompts -------------------------------------------------------------------------------
    def set_prompt_table(self, table: PromptTable) -> None:
        """Use another prompt table (e.g. a user's ``--prompts`` file); clears the token cache."""
        self.prompts = table.with_legacy_macaroni(self.config.legacy_macaroni)
        self.prompt_tokens = PromptTokens(
            self.prompts, self.config.n_ctx, self.config.clip.text_context_length
        )

    # ---- pieces --------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor):
        """(VisionFeatures, normalized global image feature [B, E] after the optional adapter)."""
        feats = encode_image_two_stream(self.clip_model.visual, images, self.config.taps)
        tokens = feats.global_tokens
        if self.config.use_adapter:
            tokens = self.adapter(tokens)
        return feats, F.normalize(tokens[:, 0], dim=-1)

    def text_features(
        self,
        image_features: torch.Tensor,
        class_names: list[str],
        positions: list[str | None],
        *,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Per-image ``T`` [B, 2, E] (normal, abnormal), Frobenius-normalized."""
        return class_text_features(
            text_encoder=self.text_encoder,
            token_embedding=self.clip_model.token_embedding,
            tokens=self.prompt_tokens,
            normal_learner=self.normal_prompt_learner,
            abnormal_learner=self.abnormal_prompt_learner,
            image_features=image_features,
            class_names=class_names,
            positions=positions,
            truncate=truncate,
        )

    def tap_probabilities(
        self, feats, text: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """[B, n_taps, 2, H, W]: per tap logits 100 f.T, bilinear upsample, then softmax."""
        patch = self.decoder_linear(feats.linear_taps) + self.decoder_cov(feats.mmci_taps)
        out = []
        for f in patch:
            f = F.normalize(f, dim=-1)
            logits = self.config.logit_scale * f @ text.transpose(1, 2)  # [B, N, 2]
            b, n, _ = logits.shape
            side = math.isqrt(n)
            grid = logits.transpose(1, 2).reshape(b, 2, side, side)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
            out.append(torch.softmax(grid, dim=1))
        return torch.stack(out, dim=1)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        class_names: list[str],
        positions: list[str | None] | None = None,
    ) -> FiLoOutput:
        b = images.shape[0]
        if len(class_names) != b:
            raise FiloError(f"{b} images but {len(class_names)} class names")
        positions = list(positions) if positions is not None else [None] * b
        if len(positions) != b:
            raise FiloError(f"{b} images but {len(positions)} positions")
        feats, img = self.image_features(images)
        text = self.text_features(img, class_names, positions)
        cos = torch.einsum("be,bke->bk", img, text)  # [B, 2]
        tap_probs = self.tap_probabilities(feats, text, tuple(images.shape[-2:]))
        p_abn = (tap_probs[:, :, 1] - tap_probs[:, :, 0] + 1) / 2
        blurred = gaussian_blur(p_abn, self.config.blur_kernel, self.config.blur_sigma)
        anomaly_map = blurred.mean(dim=1)
        if self.config.score_mode == "research":
            text_score = cos[:, 1]
        else:  # the paper's softmax over the two (row-normalized) cosines
            rows = F.normalize(text, dim=-1)
            logits = self.config.logit_scale * torch.einsum("be,bke->bk", img, rows)
            text_score = torch.softmax(logits, dim=-1)[:, 1]
        image_score = (text_score + anomaly_map.flatten(1).max(dim=1).values) / 2
        return FiLoOutput(tap_probs, anomaly_map, image_score, text_score)

    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        positions: list[str | None] | None = None,
    ) -> FiLoOutput:
        """Inference helper: eval mode, no autograd, inputs moved to the model's device/dtype."""
        self.eval()
        p = next(self.parameters())
        return self(images.to(device=p.device, dtype=p.dtype), class_names, positions)

    def load_clip_weights(self, path: str | Path) -> None:
        """Load OpenAI/open_clip CLIP weights (position grid resized to the configured input)."""
        load_clip_weights(self.clip_model, path)


def build_filo(
    config: FiLoConfig | None = None,
    *,
    prompts: PromptTable | None = None,
    clip_weights: str | Path | None = None,
    device: str | torch.device | None = None,
) -> FiLo:
    """Construct a FiLo model, optionally load CLIP weights, move to the configured device/dtype."""
    config = config or FiLoConfig()
    model = FiLo(config, prompts)
    if clip_weights is not None:
        model.load_clip_weights(clip_weights)
    target = resolve_device(device if device is not None else config.device)
    return model.to(device=target, dtype=_DTYPES[config.dtype])
