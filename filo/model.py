"""FiLo: CLIP with the two-stream backbone, linear + MMCI heads, adapter and learned prompts.

``FiLo(config, prompts, options)(images, class_names, positions)`` returns, per image, the 7
per-tap 2-channel probability maps, the final anomaly map and the image score (docs/design.md
section 5). Each image has its own class and position; ``None`` averages the abnormal prompts
over all positions. :class:`FiLoConfig` is the architecture (saved in checkpoints),
:class:`InferenceOptions` how the model runs (never saved), the device an argument of
:func:`build_filo`.

Inference speed (all exact to float rounding, switchable in :class:`InferenceOptions` so the
benchmark can time a research-code-like configuration of this same code):

* text: only the prompts an image needs are encoded (``encode_all_positions=False``), all images
  of a batch in one text-transformer pass, cut after the longest end-of-text token
  (``truncate_context=True``); tokenization is cached per class (:class:`filo.text.PromptTokens`).
  The text transformer itself must run per image: the prompt learner adds
  ``meta_net(image_feature)`` to the context of every prompt.
* MMCI heads: the six convolutions of a tap (1x1, 3x3, 5x5, 7x7, 1x5, 5x1, "same" padding) are
  one 7x7 convolution with the zero-padded kernels summed (49 instead of 94 kernel taps), and
  taps fed by the same tensor (reference taps: ``[V, V, V]``) run as one convolution
  (``fuse_mmci=True``; used whenever autograd is off, fused weights cached until a weight changes).
* maps: the 7 taps' logits are upsampled in one call; the final map blurs the tap mean once
  (the blur is linear, so this equals the mean of the 7 blurred maps).
* towers: on the CPU in float32 without autograd, the linear layers of the vision and text
  towers run through oneDNN instead of the BLAS (:mod:`filo.kernels`; ``onednn_linear=True``),
  about 2x faster on CPUs where the BLAS is slow; on CUDA nothing changes.
* :meth:`FiLo.predict` runs under ``torch.inference_mode``; ``autocast`` ('bf16' / 'fp16') runs
  the towers and heads in reduced precision (NOT exact; the maps, softmax and blur stay float32).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from filo import kernels
from filo.backbone import (
    ClipConfig,
    TapConfig,
    build_clip,
    encode_image_two_stream,
    load_clip_weights,
)
from filo.device import resolve_device
from filo.errors import FiloError
from filo.heads import MMCI_KERNELS, Adapter, LinearHeads, MMCIHeads
from filo.prompts import PromptTable, load_prompt_table
from filo.text import PromptLearner, PromptTokens, TextEncoder, class_text_features

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# InferenceOptions switches that turn every inference optimization off: the "research-code-like"
# configuration the benchmark compares against (run it at batch 1 under torch.no_grad).
RESEARCH_LIKE_SWITCHES: dict[str, bool] = {
    "encode_all_positions": True,
    "truncate_context": False,
    "fuse_mmci": False,
    "onednn_linear": False,
}


@dataclass
class FiLoConfig:
    """The architecture of a FiLo model: what a checkpoint's weights fit (saved with them).

    How the model runs (score, precision, speed switches) is :class:`InferenceOptions`; the
    device is an argument of :func:`build_filo`.
    """

    clip: ClipConfig = field(default_factory=ClipConfig)
    taps: TapConfig = field(default_factory=TapConfig)
    n_ctx: int = 12
    use_adapter: bool = True  # the released checkpoints are evaluated with the adapter
    logit_scale: float = 100.0
    blur_kernel: int = 3
    blur_sigma: float = 4.0

    @classmethod
    def vit_l_14_336(cls, image_size: int = 518, clip_act: str | None = None,
                     **overrides) -> FiLoConfig:
        """ViT-L-14-336 FiLo; ``clip_act`` None: the research rule (GELU unless 336 px)."""
        return cls(clip=ClipConfig.vit_l_14_336(image_size, clip_act), taps=TapConfig(),
                   **overrides)

    @classmethod
    def tiny(cls, **overrides) -> FiLoConfig:
        clip = ClipConfig.tiny()
        return cls(clip=clip, taps=TapConfig.for_depth(clip.vision_layers), **overrides)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    def validate(self) -> None:
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise FiloError(f"blur_kernel must be a positive odd number, got {self.blur_kernel}")
        self.clip.validate()
        self.taps.validate(self.clip.vision_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taps"]["mid_tap_blocks"] = list(self.taps.mid_tap_blocks)
        d["taps"]["true_layers"] = list(self.taps.true_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FiLoConfig:
        """Inverse of :meth:`to_dict`. Configs saved before the split also hold runtime fields
        (``device``, ``score_mode``, ...): those are dropped."""
        d = {k: v for k, v in d.items() if k not in _SAVED_RUNTIME_FIELDS}
        clip = ClipConfig.from_dict(d.pop("clip"))
        taps = dict(d.pop("taps"))
        taps["mid_tap_blocks"] = tuple(taps["mid_tap_blocks"])
        taps["true_layers"] = tuple(taps["true_layers"])
        unknown = sorted(set(d) - _field_names(cls))
        if unknown:
            raise FiloError(f"filo config: unknown field(s) {', '.join(unknown)}")
        return cls(clip=clip, taps=TapConfig(**taps), **d)


@dataclass(frozen=True)
class InferenceOptions:
    """How a FiLo model runs, kept out of :class:`FiLoConfig` and out of checkpoints.

    The speed switches change the work done, not the result (equal to float rounding; see the
    module docstring); ``autocast`` and ``dtype`` trade exactness for speed. Frozen: change a
    live model's options with :meth:`FiLo.set_options` and :func:`dataclasses.replace`.
    """

    score_mode: str = "research"  # 'research': (t + max map) / 2; 'softmax': softmax text prob
    legacy_macaroni: bool = False  # True: macaroni1 uses macaroni2's phrases (research code)
    encode_all_positions: bool = False  # True: encode all 9 positions' prompts, then select
    truncate_context: bool = True  # False: run the full 77-token context
    fuse_mmci: bool = True  # one 7x7 conv per MMCI tap group when autograd is off
    onednn_linear: bool = True  # CPU float32 without autograd: tower linears via oneDNN
    autocast: str = "none"  # 'bf16' / 'fp16': reduced-precision towers in predict (not exact)
    dtype: str = "float32"  # parameter dtype build_filo casts the model to

    def validate(self) -> None:
        if self.score_mode not in ("research", "softmax"):
            raise FiloError(f"score_mode must be 'research' or 'softmax', got {self.score_mode!r}")
        if self.dtype not in _DTYPES:
            raise FiloError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.autocast not in _AUTOCAST:
            raise FiloError(f"autocast must be one of {', '.join(_AUTOCAST)}, got {self.autocast!r}")


def _field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


# runtime fields that configs saved before the FiLoConfig / InferenceOptions split carry
_SAVED_RUNTIME_FIELDS = _field_names(InferenceOptions) | {"device"}


def split_overrides(overrides: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """Keyword overrides split into (FiLoConfig fields, InferenceOptions fields).

    Any other name is a ``TypeError`` naming it (a misspelt switch is not silently ignored).
    """
    arch, run = _field_names(FiLoConfig), _field_names(InferenceOptions)
    unknown = sorted(set(overrides) - arch - run)
    if unknown:
        raise TypeError(f"unknown FiLoConfig / InferenceOptions field(s): {', '.join(unknown)}")
    return ({k: v for k, v in overrides.items() if k in arch},
            {k: v for k, v in overrides.items() if k in run})


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


def fused_mmci_weights(heads: MMCIHeads, taps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One 7x7 convolution equal to the sum of the six MMCI convolutions of each tap in ``taps``.

    Every kernel is odd-sized with "same" padding, so centring it in a 7x7 zero kernel (padding
    3) gives the same output; the per-tap kernels and biases are summed, and several taps are
    stacked along the output channels -> weight [len(taps) * E, W, 7, 7], bias [len(taps) * E].
    """
    size = max(max(k) for _, k in MMCI_KERNELS)
    weights, biases = [], []
    for i in taps:
        first = getattr(heads, MMCI_KERNELS[0][0])[i]
        w = first.weight.new_zeros(first.out_channels, first.in_channels, size, size)
        b = first.weight.new_zeros(first.out_channels)
        for name, (kh, kw) in MMCI_KERNELS:
            conv = getattr(heads, name)[i]
            top, left = (size - kh) // 2, (size - kw) // 2
            w[:, :, top:top + kh, left:left + kw] += conv.weight
            if conv.bias is not None:
                b += conv.bias
        weights.append(w)
        biases.append(b)
    return torch.cat(weights), torch.cat(biases)


class FiLo(nn.Module):
    """FiLo model; submodule names match the research checkpoints (``{"filo": state_dict}``)."""

    def __init__(self, config: FiLoConfig | None = None, prompts: PromptTable | None = None,
                 options: InferenceOptions | None = None) -> None:
        super().__init__()
        self.config = config = config or FiLoConfig()
        config.validate()
        self.options = options = options or InferenceOptions()
        options.validate()
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

    # ---- options and prompts -------------------------------------------------------------------
    def set_options(self, options: InferenceOptions) -> None:
        """Run with other :class:`InferenceOptions` (validated; the prompt table follows
        ``legacy_macaroni``). ``dtype`` is applied by :func:`build_filo`, not here."""
        options.validate()
        self.options = options
        self.set_prompt_table(self.prompts)

    def set_prompt_table(self, table: PromptTable) -> None:
        """Use another prompt table (e.g. a user's ``--prompts`` file); clears the token cache."""
        self.prompts = table.with_legacy_macaroni(self.options.legacy_macaroni)
        self.prompt_tokens = PromptTokens(
            self.prompts, self.config.n_ctx, self.config.clip.text_context_length
        )

    # ---- pieces --------------------------------------------------------------------------------
    @property
    def _linear(self):
        """The linear-layer function of the towers (see ``InferenceOptions.onednn_linear``)."""
        return kernels.linear if self.options.onednn_linear else F.linear

    def image_features(self, images: torch.Tensor):
        """(VisionFeatures, normalized global image feature [B, E] after the optional adapter)."""
        feats = encode_image_two_stream(
            self.clip_model.visual, images, self.config.taps, linear=self._linear
        )
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
        truncate: bool | None = None,
        all_positions: bool | None = None,
    ) -> torch.Tensor:
        """Per-image ``T`` [B, 2, E] (normal, abnormal), Frobenius-normalized.

        ``truncate`` / ``all_positions`` default to the options' ``truncate_context`` /
        ``encode_all_positions`` (they change the work done, not the result).
        """
        if truncate is None:
            truncate = self.options.truncate_context
        if all_positions is None:
            all_positions = self.options.encode_all_positions
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
            all_positions=all_positions,
            linear=self._linear,
        )

    def patch_features(self, feats) -> list[torch.Tensor]:
        """Per tap ``[B, N, E]`` head outputs: the linear taps, then the MMCI taps (7 in all)."""
        linear = self.decoder_linear(feats.linear_taps)
        if self.options.fuse_mmci and not torch.is_grad_enabled():
            return linear + self._fused_mmci(feats.mmci_taps)
        return linear + self.decoder_cov(feats.mmci_taps)

    def _fused_mmci(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """MMCI heads as one 7x7 conv per group of taps that share their input tensor."""
        heads = self.decoder_cov
        if len(taps) != heads.n_taps:
            raise ValueError(f"expected {heads.n_taps} taps, got {len(taps)}")
        groups: list[list[int]] = []
        for i, tap in enumerate(taps):
            for g in groups:
                if taps[g[0]] is tap:
                    g.append(i)
                    break
            else:
                groups.append([i])
        params = list(heads.parameters())
        key = (tuple(map(tuple, groups)),
               tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        cache = getattr(self, "_mmci_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                fused = [fused_mmci_weights(heads, g) for g in groups]
            cache = (key, fused)
            self._mmci_cache = cache  # plain attribute: not in state_dict, rebuilt on change
        out: list[torch.Tensor | None] = [None] * len(taps)
        for g, (w, b) in zip(groups, cache[1], strict=True):
            patches = taps[g[0]][:, 1:, :]
            bsz, n, c = patches.shape
            side = math.isqrt(n)
            # contiguous NCHW: a permuted (channels-last) input makes the convolution convert the
            # large fused weight to channels-last on every call
            grid = patches.reshape(bsz, side, side, c).permute(0, 3, 1, 2).contiguous()
            y = F.conv2d(grid, w.to(grid.dtype), b.to(grid.dtype), padding=w.shape[-1] // 2)
            y = y.permute(0, 2, 3, 1).reshape(bsz, n, len(g), -1)
            for j, i in enumerate(g):
                out[i] = y[:, :, j]
        return out  # type: ignore[return-value]

    def tap_probabilities(
        self, feats, text: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """[B, n_taps, 2, H, W]: per tap logits 100 f.T, bilinear upsample, then softmax."""
        return self.maps_from_patches(self.patch_features(feats), text, size)

    def maps_from_patches(
        self, patch: list[torch.Tensor], text: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """All taps at once (float32): normalize, 100 f.T, one bilinear upsample, softmax."""
        f = F.normalize(torch.stack(patch, dim=1).float(), dim=-1)  # [B, T, N, E]
        logits = self.config.logit_scale * torch.einsum("btne,bke->btkn", f, text.float())
        b, t, _, n = logits.shape
        side = math.isqrt(n)
        grid = logits.reshape(b, t * 2, side, side)
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
        return torch.softmax(grid.reshape(b, t, 2, *size), dim=2)

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
        patch = self.patch_features(feats)
        with _no_autocast(images.device.type):
            img, text = img.float(), text.float()
            cos = torch.einsum("be,bke->bk", img, text)  # [B, 2]
            tap_probs = self.maps_from_patches(patch, text, tuple(images.shape[-2:]))
            p_abn = (tap_probs[:, :, 1] - tap_probs[:, :, 0] + 1) / 2
            # blur is linear: blur(mean of taps) == mean of blurred taps, one blur instead of 7
            anomaly_map = gaussian_blur(
                p_abn.mean(dim=1), self.config.blur_kernel, self.config.blur_sigma
            )
            if self.options.score_mode == "research":
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
        *,
        autocast: str | None = None,
    ) -> FiLoOutput:
        """Inference helper: eval mode, no autograd, inputs moved to the model's device/dtype.

        ``autocast`` ('none', 'bf16', 'fp16'; default: ``options.autocast``) runs the vision and
        text towers and the heads under ``torch.autocast`` (meant for CUDA; bf16 also works on
        CPUs with bf16 units). Not exact: maps typically move by ~1e-3..1e-2.
        """
        self.eval()
        p = next(self.parameters())
        mode = self.options.autocast if autocast is None else autocast
        if mode not in _AUTOCAST:
            raise FiloError(f"autocast must be one of {', '.join(_AUTOCAST)}, got {mode!r}")
        ctx = (torch.autocast(p.device.type, dtype=_AUTOCAST[mode]) if _AUTOCAST[mode] is not None
               else nullcontext())
        with ctx:
            return self(images.to(device=p.device, dtype=p.dtype), class_names, positions)

    def load_clip_weights(self, path: str | Path) -> None:
        """Load OpenAI/open_clip CLIP weights (position grid resized to the configured input)."""
        load_clip_weights(self.clip_model, path)


def _no_autocast(device_type: str):
    """Maps, softmax and blur always run in float32, also inside an autocast region."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def build_filo(
    config: FiLoConfig | None = None,
    *,
    prompts: PromptTable | None = None,
    clip_weights: str | Path | None = None,
    device: str | torch.device | None = None,
    options: InferenceOptions | None = None,
) -> FiLo:
    """Construct a FiLo model, optionally load CLIP weights, cast it to ``options.dtype`` and
    move it to ``device`` (None / 'auto': CUDA if available, else CPU; :mod:`filo.device`)."""
    model = FiLo(config or FiLoConfig(), prompts, options)
    if clip_weights is not None:
        model.load_clip_weights(clip_weights)
    return model.to(device=resolve_device(device), dtype=_DTYPES[model.options.dtype])
