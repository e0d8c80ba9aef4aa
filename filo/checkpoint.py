"""FiLo checkpoints in the research layout: ``{"filo": state_dict}``.

The state dict holds ``clip_model.*`` (the whole CLIP), a duplicate of the text tower under
``text_encoder.*``, ``decoder_linear.*``, ``decoder_cov.*``, ``adapter.*`` and the two prompt
learners. Files we write are interchangeable with the released ones; we add a
``"filo_config"`` entry (plain dict) that the research code ignores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from filo.backbone import (
    CLIP_ACTS,
    ClipConfig,
    TapConfig,
    normalize_clip_state_dict,
    research_clip_act,
)
from filo.device import resolve_device
from filo.errors import FiloError
from filo.fileio import atomic_torch_save
from filo.weights import clean_state_dict, fit_pos_embed, read_weights, unwrap

if TYPE_CHECKING:  # filo.model is imported where used: reading a checkpoint needs no model
    from filo.model import FiLo, InferenceOptions

logger = logging.getLogger(__name__)

FILO_CHECKPOINT_HINT = (
    "download filo_train_on_mvtec.pth / filo_train_on_visa.pth from the FiLo release into ckpt/"
)
_GROUPS = (
    "clip_model.visual",
    "clip_model",
    "text_encoder",
    "decoder_linear",
    "decoder_cov",
    "adapter",
    "normal_prompt_learner",
    "abnormal_prompt_learner",
)
_GROUNDING_PREFIXES = ("backbone.0.", "transformer.", "bert.", "feat_map.", "input_proj.", "bbox_embed.")


@dataclass
class LoadReport:
    """Missing / unexpected keys grouped by module (``clip_model.visual``, ``decoder_cov``, ...)."""

    path: str
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        parts = []
        for label, groups in (("missing", self.missing), ("unexpected", self.unexpected)):
            for group, keys in groups.items():
                parts.append(f"{label} {group}: {len(keys)} key(s) (e.g. {keys[0]})")
        return "; ".join(parts) if parts else "all keys matched"


def key_group(key: str) -> str:
    for g in _GROUPS:
        if key == g or key.startswith(g + "."):
            return g
    return key.split(".", 1)[0]


def _grouped(keys) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in sorted(keys):
        out.setdefault(key_group(k), []).append(k)
    return out


def read_filo_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read and sanity-check a FiLo checkpoint; returns (state_dict, saved config or None).

    The state dict is as stored, ``module.`` prefixes stripped (:mod:`filo.weights`).
    """
    obj = read_weights(path, what="FiLo checkpoint", hint=FILO_CHECKPOINT_HINT)
    if not isinstance(obj, dict):
        raise FiloError(f"{path} is not a FiLo checkpoint (expected a dict with a 'filo' entry)")
    state, container = unwrap(obj, ("filo", "model"))
    if container == "model":
        raise FiloError(
            f"{path} looks like a GroundingDINO checkpoint (weights under 'model'), not a FiLo "
            "one; pass it as the grounding checkpoint and give the FiLo file (filo_train_on_*.pth) "
            "here"
        )
    config = obj.get("filo_config") if container == "filo" else None
    state = clean_state_dict(state)
    _check_filo_keys(state, path)
    return state, config


def _check_filo_keys(state: dict, path: str | Path) -> None:
    """FiloError unless ``state`` holds FiLo tensors (names the file it looks like instead)."""
    keys = [k for k in state if isinstance(k, str)]
    if not any(key_group(k) in _GROUPS for k in keys):
        if any(k.startswith(_GROUNDING_PREFIXES) for k in keys):
            raise FiloError(
                f"{path} looks like a GroundingDINO checkpoint (keys such as "
                f"{next(k for k in keys if k.startswith(_GROUNDING_PREFIXES))}), not a FiLo one; "
                "pass it as the grounding checkpoint and give filo_train_on_*.pth here"
            )
        if any(k.startswith("visual.") for k in keys):
            raise FiloError(f"{path} is a plain CLIP weight file, not a FiLo checkpoint; pass it "
                            "as the CLIP weights and give filo_train_on_*.pth here")
        raise FiloError(f"{path} holds no FiLo weights (no decoder_linear/clip_model/... keys); "
                        f"{FILO_CHECKPOINT_HINT}")
    bad = [k for k in keys if not isinstance(state[k], torch.Tensor)]
    if bad:
        raise FiloError(f"{path}: entry {bad[0]} is not a tensor; the file is not a FiLo "
                        "checkpoint")


def normalize_filo_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module.`` prefixes off, surgery attention names -> open_clip names, duplicates filled.

    Idempotent; the text-tower twins end up as the same tensors, so a second pass is cheap.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in clean_state_dict(state).items():
        if key.startswith(("clip_model.", "text_encoder.")):
            head, rest = key.split(".", 1)
            rest = next(iter(normalize_clip_state_dict({rest: value})), rest)
            key = f"{head}.{rest}"
        out[key] = value
    # the text tower is stored twice; keep both copies consistent (clip_model wins)
    for key in list(out):
        if key.startswith("text_encoder."):
            twin = "clip_model." + key[len("text_encoder."):]
            if twin not in out:
                out[twin] = out[key]
                continue
            if out[twin] is not out[key] and not torch.equal(out[twin], out[key]):
                logger.warning("%s differs from %s; using the clip_model copy", key, twin)
            out[key] = out[twin]
    return out


_TEXT_ENCODER_NAMES = ("positional_embedding", "text_projection")


def _is_text_encoder_key(rest: str) -> bool:
    return rest.startswith(("transformer.", "ln_final.")) or rest in _TEXT_ENCODER_NAMES


def load_filo_checkpoint(checkpoint: str | Path | Mapping[str, torch.Tensor], model, *,
                         strict: bool = False, source: str | None = None) -> LoadReport:
    """Load a FiLo checkpoint into ``model``; return (and log) the missing/unexpected keys by group.

    ``checkpoint`` is a file path, or a state dict already read from one with
    :func:`read_filo_state_dict` (so that the file is read once; ``source`` names it in
    messages). CLIP weights come from the checkpoint when it holds ``clip_model.*``; a
    heads-only file leaves the model's CLIP as it is (load OpenAI weights first). Shape
    mismatches are errors, except the vision position embedding, which is resized to the
    model's input size.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        state, _ = read_filo_state_dict(checkpoint)
        source = source or str(checkpoint)
    else:
        state, source = dict(checkpoint), source or "<state dict>"
    state = normalize_filo_state_dict(state)
    # fill text_encoder.* from clip_model.* for files that only store one copy
    for key in list(state):
        if key.startswith("clip_model."):
            rest = key[len("clip_model."):]
            if _is_text_encoder_key(rest):
                state.setdefault("text_encoder." + rest, state[key])
    report = LoadReport(path=source)
    own = model.state_dict()
    pos_key = "clip_model.visual.positional_embedding"
    if pos_key in own and fit_pos_embed(state, pos_key, own[pos_key],
                                        tuple(model.clip_model.visual.grid_size)):
        report.resized.append(pos_key)
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise FiloError(
            f"{source}: checkpoint does not fit this model ({'; '.join(mismatched[:2])}); it was "
            "trained for another model size; build the model with "
            "filo.checkpoint.build_filo_from_checkpoint"
        )
    result = model.load_state_dict(state, strict=False)
    report.missing = _grouped(result.missing_keys)
    report.unexpected = _grouped(result.unexpected_keys)
    if strict and not report.clean:
        raise FiloError(f"{source}: checkpoint keys do not match the model: {report.summary()}")
    if report.clean:
        logger.info("loaded %s: all keys matched", source)
    else:
        logger.warning("loaded %s: %s", source, report.summary())
    return report


def save_filo_checkpoint(path: str | Path, model, *, include_config: bool = True) -> Path:
    """Write ``{"filo": state_dict}`` (research layout, incl. clip_model.* and text_encoder.*).

    The write is atomic: a temporary file in the same folder, then ``os.replace``.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    payload: dict = {"filo": state}
    if include_config and hasattr(model, "config"):
        payload["filo_config"] = model.config.to_dict()
    return atomic_torch_save(payload, p)


def infer_config_from_state_dict(state: dict[str, torch.Tensor], *, clip_act: str | None = None,
                                 **overrides):
    """FiLoConfig from tensor shapes (ViT-L-14-336 or any open_clip-style ViT); ``overrides``
    are FiLoConfig fields.

    Attention heads are not visible in shapes: OpenAI's 64-wide heads are assumed. Nor is the
    MLP activation: ``clip_act`` None applies the research rule for the stored image size
    (:func:`filo.backbone.research_clip_act`: GELU unless 336 px).
    """
    from filo.model import FiLoConfig

    state = normalize_filo_state_dict(state)
    try:
        conv = state["clip_model.visual.conv1.weight"]
        pos = state["clip_model.visual.positional_embedding"]
        tok = state["clip_model.token_embedding.weight"]
        ctx = state["normal_prompt_learner.ctx"]
        proj = state["clip_model.visual.proj"]
    except KeyError as err:
        raise FiloError(f"cannot infer the model size: checkpoint lacks {err.args[0]}; build "
                        "FiLoConfig yourself and use load_filo_checkpoint") from err

    def depth(prefix: str) -> int:
        idx = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
        return max(idx) + 1

    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    text_width = tok.shape[1]
    layers = depth("clip_model.visual.transformer.resblocks.")
    clip = ClipConfig(
        embed_dim=proj.shape[1],
        image_size=grid * patch,
        patch_size=patch,
        vision_width=width,
        vision_layers=layers,
        vision_heads=max(width // 64, 1),
        text_context_length=state["clip_model.positional_embedding"].shape[0],
        text_vocab_size=tok.shape[0],
        text_width=text_width,
        text_heads=max(text_width // 64, 1),
        text_layers=depth("clip_model.transformer.resblocks."),
        act=clip_act or research_clip_act(grid * patch),
    )
    return FiLoConfig(clip=clip, taps=TapConfig.for_depth(layers), n_ctx=ctx.shape[0], **overrides)


def build_filo_from_checkpoint(
    path: str | Path,
    *,
    prompts=None,
    device: str | torch.device | None = None,
    clip_weights: str | Path | None = None,
    strict: bool = False,
    clip_act: str | None = None,
    options: InferenceOptions | None = None,
    image_size: int | None = None,
    **overrides,
) -> FiLo:
    """Build a FiLo model whose config comes from the checkpoint (saved config, else shapes).

    The file is read once. ``options`` (:class:`filo.model.InferenceOptions`) says how the model
    runs; ``overrides`` are keyword overrides by field name, of :class:`filo.model.FiLoConfig`
    (applied to the checkpoint's config) or of ``InferenceOptions`` (applied on top of
    ``options``, e.g. ``score_mode="softmax"``); any other name is a ``TypeError``.
    ``clip_act`` ('gelu' / 'quick_gelu') overrides the CLIP MLP activation; None keeps the one
    the checkpoint records, or, for a research-layout file (no saved config), applies the
    research rule: GELU unless the stored image size is 336 (docs/design.md section 1.1).
    ``device`` None: CUDA if available, else CPU. ``image_size``: the input size the caller
    expects; a checkpoint for another size is an error before any model is built.
    """
    from filo.model import InferenceOptions, build_filo, split_overrides

    config_overrides, option_overrides = split_overrides(overrides)
    options = replace(options or InferenceOptions(), **option_overrides)
    if clip_act is not None and clip_act not in CLIP_ACTS:
        raise FiloError(f"clip activation must be one of {', '.join(CLIP_ACTS)}, got {clip_act!r}")
    raw, saved = read_filo_state_dict(path)
    state = normalize_filo_state_dict(raw)
    config = _checkpoint_config(path, state, saved, clip_act=clip_act,
                                has_clip_weights=clip_weights is not None, **config_overrides)
    if image_size is not None and config.image_size != image_size:
        raise FiloError(f"{path} is built for {config.image_size}x{config.image_size} inputs; "
                        f"pass --image_size {config.image_size} (or leave it out)")
    model = build_filo(config, prompts=prompts, clip_weights=clip_weights, device="cpu",
                       options=options)
    load_filo_checkpoint(state, model, strict=strict, source=str(path))
    return model.to(resolve_device(device))


def _checkpoint_config(path: str | Path, state: dict[str, torch.Tensor], saved: dict | None, *,
                       clip_act: str | None, has_clip_weights: bool, **overrides):
    """FiLoConfig of a checkpoint: its saved config, else inferred from the (normalized) state's
    shapes, else (heads-only file) ViT-L-14-336, which needs separate CLIP weights."""
    from filo.model import FiLoConfig

    if saved is not None:
        config = FiLoConfig.from_dict(saved)
        for k, v in overrides.items():
            setattr(config, k, v)
        if clip_act is not None:
            config.clip.act = clip_act
        return config
    if "clip_model.visual.conv1.weight" in state:
        return infer_config_from_state_dict(state, clip_act=clip_act, **overrides)
    if not has_clip_weights:
        raise FiloError(f"{path} holds no CLIP weights (no clip_model.*); pass the OpenAI "
                        "CLIP weights (ckpt/ViT-L-14-336px.pt) as well")
    return FiLoConfig.vit_l_14_336(clip_act=clip_act, **overrides)
