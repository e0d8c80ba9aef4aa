"""Convert GroundingDINO checkpoints from the ORIGINAL (IDEA-Research) layout to transformers.

Every original key is handled by exactly one rule of :data:`KEY_RULES` (renamed, or split into
query/key/value), or is a known leftover listed in :data:`IGNORED_KEYS` with the reason. Anything
else is reported as unknown. Conversion is pure (state dict in, state dict + report out);
:func:`read_checkpoint` reads a file and tells the layouts apart by their keys.

Names: :data:`KEY_RULES` produce CANONICAL names, the module names of transformers 5.x; converted
files store those, so a file converted under one transformers version loads under any other.
Installed transformers versions name the Swin backbone inside GroundingDINO differently (4.40 to
4.57 use the old BERT-style Swin names, see :data:`V4_RENAMES`); :func:`installed_naming` reads
the naming off the instantiated model's state dict and :func:`to_naming` renames the canonical
state dict for it, again with every key handled by exactly one explicit rule.

Layouts:
- original: ``groundingdino_swint_ogc.pth`` (``{"model": sd}``, keys maybe prefixed ``module.``)
  and FiLo's ``grounding_train_on_{mvtec,visa}.pth`` (a flat state dict);
- transformers: the output of ``python -m filo.detector convert IN OUT`` (``{"format":
  "filo-gdino-hf", "arch": {...}, "state_dict": {...}}``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from filo.detector.config import DetectorArch, arch_from_state_dict
from filo.errors import FiloError
from filo.weights import clean_state_dict, read_weights, unwrap

log = logging.getLogger(__name__)

HF_FORMAT = "filo-gdino-hf"
GROUNDING_CHECKPOINT_HINT = (
    "use grounding_train_on_{mvtec,visa}.pth (FiLo release) or groundingdino_swint_ogc.pth "
    "(IDEA-Research), completely downloaded"
)

SWIN = "model.backbone.conv_encoder.model.swin"
SWIN_NORMS = "model.backbone.conv_encoder.model.hidden_states_norms"
ENC = "model.encoder.layers"
DEC = "model.decoder.layers"

# (original-key regex, transformers template, kind). "copy" renames; "qkv" splits a stacked
# [q; k; v] matrix (rows) or bias into three tensors named with {part} = the three names.
# Templates use \1, \2 ... for the regex groups.
KEY_RULES: list[tuple[str, str, str]] = [
    # ---- Swin vision backbone
    (r"backbone\.0\.patch_embed\.proj\.(weight|bias)",
     SWIN + r".embeddings.patch_embeddings.projection.\1", "copy"),
    (r"backbone\.0\.patch_embed\.norm\.(weight|bias)", SWIN + r".embeddings.norm.\1", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)",
     SWIN + r".encoder.layers.\1.blocks.\2.layernorm_before.\3", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)",
     SWIN + r".encoder.layers.\1.blocks.\2.layernorm_after.\3", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
     SWIN + r".encoder.layers.\1.blocks.\2.attention.{part}.\3", "qkv_swin"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     SWIN + r".encoder.layers.\1.blocks.\2.attention.o_proj.\3", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
     SWIN + r".encoder.layers.\1.blocks.\2.attention.relative_position_bias"
            r".relative_position_bias_table", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     SWIN + r".encoder.layers.\1.blocks.\2.mlp.\3.\4", "copy"),
    (r"backbone\.0\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
     SWIN + r".encoder.layers.\1.downsample.\2.\3", "copy"),
    # original norm{i} (i = 1..3 for out indices 1,2,3) -> transformers stage{i+1}
    (r"backbone\.0\.norm(\d)\.(weight|bias)", SWIN_NORMS + r".stage{norm_stage}.\2", "copy"),
    # ---- input projections, text projection, BERT
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"model.input_proj_vision.\1.\2.\3", "copy"),
    (r"feat_map\.(weight|bias)", r"model.text_projection.\1", "copy"),
    (r"bert\.(embeddings\.(?:word|position|token_type)_embeddings\.weight)",
     r"model.text_backbone.\1", "copy"),
    (r"bert\.embeddings\.LayerNorm\.(weight|bias)",
     r"model.text_backbone.embeddings.LayerNorm.\1", "copy"),
    (r"bert\.encoder\.layer\.(\d+)\.((?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
     r"|attention\.output\.LayerNorm|intermediate\.dense|output\.dense|output\.LayerNorm)"
     r"\.(?:weight|bias))",
     r"model.text_backbone.encoder.layer.\1.\2", "copy"),
    # ---- encoder: deformable image layers
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     ENC + r".\1.deformable_layer.self_attn.\2.\3", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     ENC + r".\1.deformable_layer.self_attn_layer_norm.\2", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.linear1\.(weight|bias)",
     ENC + r".\1.deformable_layer.fc1.\2", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.linear2\.(weight|bias)",
     ENC + r".\1.deformable_layer.fc2.\2", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     ENC + r".\1.deformable_layer.final_layer_norm.\2", "copy"),
    # ---- encoder: text enhancer layers
    (r"transformer\.encoder\.text_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     ENC + r".\1.text_enhancer_layer.self_attn.{part}.\2", "qkv_mha"),
    (r"transformer\.encoder\.text_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     ENC + r".\1.text_enhancer_layer.self_attn.out_proj.\2", "copy"),
    (r"transformer\.encoder\.text_layers\.(\d+)\.linear1\.(weight|bias)",
     ENC + r".\1.text_enhancer_layer.fc1.\2", "copy"),
    (r"transformer\.encoder\.text_layers\.(\d+)\.linear2\.(weight|bias)",
     ENC + r".\1.text_enhancer_layer.fc2.\2", "copy"),
    (r"transformer\.encoder\.text_layers\.(\d+)\.norm1\.(weight|bias)",
     ENC + r".\1.text_enhancer_layer.layer_norm_before.\2", "copy"),
    (r"transformer\.encoder\.text_layers\.(\d+)\.norm2\.(weight|bias)",
     ENC + r".\1.text_enhancer_layer.layer_norm_after.\2", "copy"),
    # ---- encoder: bi-directional image/text fusion layers
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.gamma_v", ENC + r".\1.fusion_layer.vision_param",
     "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.gamma_l", ENC + r".\1.fusion_layer.text_param",
     "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_v\.(weight|bias)",
     ENC + r".\1.fusion_layer.layer_norm_vision.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_l\.(weight|bias)",
     ENC + r".\1.fusion_layer.layer_norm_text.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.v_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.vision_proj.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.l_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.text_proj.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_v_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.values_vision_proj.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_l_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.values_text_proj.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.out_v_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.out_vision_proj.\2", "copy"),
    (r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.out_l_proj\.(weight|bias)",
     ENC + r".\1.fusion_layer.attn.out_text_proj.\2", "copy"),
    # ---- two-stage proposal head and query embeddings
    (r"transformer\.level_embed", r"model.level_embed", "copy"),
    (r"transformer\.tgt_embed\.weight", r"model.query_position_embeddings.weight", "copy"),
    (r"transformer\.enc_output\.(weight|bias)", r"model.enc_output.\1", "copy"),
    (r"transformer\.enc_output_norm\.(weight|bias)", r"model.enc_output_norm.\1", "copy"),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)",
     r"model.encoder_output_bbox_embed.layers.\1.\2", "copy"),
    # ---- decoder layers
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     DEC + r".\1.encoder_attn.\2.\3", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     DEC + r".\1.encoder_attn_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_text\.in_proj_(weight|bias)",
     DEC + r".\1.encoder_attn_text.{part}.\2", "qkv_mha"),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_text\.out_proj\.(weight|bias)",
     DEC + r".\1.encoder_attn_text.out_proj.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.(weight|bias)",
     DEC + r".\1.encoder_attn_text_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     DEC + r".\1.self_attn.{part}.\2", "qkv_mha"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     DEC + r".\1.self_attn.out_proj.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     DEC + r".\1.self_attn_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.linear1\.(weight|bias)", DEC + r".\1.fc1.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.linear2\.(weight|bias)", DEC + r".\1.fc2.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)",
     DEC + r".\1.final_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"model.decoder.layer_norm.\1", "copy"),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)",
     r"model.decoder.reference_points_head.layers.\1.\2", "copy"),
    # ---- box heads: the original stores the shared decoder box MLP twice (bbox_embed.{l} and
    # transformer.decoder.bbox_embed.{l}); transformers ties bbox_embed.{l} and
    # model.decoder.bbox_embed.{l}. Both copies are mapped; convert() checks they agree.
    (r"bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)", r"bbox_embed.\1.layers.\2.\3", "copy"),
    (r"transformer\.decoder\.bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     r"model.decoder.bbox_embed.\1.layers.\2.\3", "copy"),
]

# Original keys with no transformers counterpart, and why dropping them is harmless.
IGNORED_KEYS: list[tuple[str, str]] = [
    (r"backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index",
     "constant index buffer, recomputed by transformers"),
    (r"bert\.embeddings\.position_ids", "constant buffer of old transformers versions"),
    (r"bert\.pooler\.dense\.(weight|bias)", "BERT pooler, unused by GroundingDINO"),
    (r"label_enc\.weight", "denoising label embedding, training only"),
]

# ---- installed transformers namings
# "v5": transformers 5.x (the canonical names above). "v4": transformers 4.40 .. 4.57 (verified
# on 4.40.2 and 4.57.6; GroundingDINO first shipped in 4.40.0). The two differ ONLY in the Swin
# backbone: 4.x has no ``.swin`` level under ``conv_encoder.model`` and names the block
# attention/MLP the BERT way. BERT, the encoder/decoder, heads and hidden_states_norms agree.
NAMING_V5 = "v5"
NAMING_V4 = "v4"
_SWIN_V4 = "model.backbone.conv_encoder.model"

# The 4.x Swin renames as pairs of key patterns, (canonical, transformers 4.x), from which both
# directions are generated (V4_RENAMES and its inverse): literal dots, and placeholders
# ``{name}`` that stand for the same part of the key on both sides (see _SLOTS).
_V4_PAIRS: list[tuple[str, str]] = [
    (SWIN + ".embeddings.{emb}.{wb}", _SWIN_V4 + ".embeddings.{emb}.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.attention.q_proj.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.attention.self.query.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.attention.k_proj.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.attention.self.key.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.attention.v_proj.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.attention.self.value.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.attention.o_proj.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.attention.output.dense.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.attention.relative_position_bias"
            ".relative_position_bias_table",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.{ln}.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.{ln}.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.mlp.fc1.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.intermediate.dense.{wb}"),
    (SWIN + ".encoder.layers.{i}.blocks.{j}.mlp.fc2.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.blocks.{j}.output.dense.{wb}"),
    (SWIN + ".encoder.layers.{i}.downsample.{ds}.{wb}",
     _SWIN_V4 + ".encoder.layers.{i}.downsample.{ds}.{wb}"),
]
_SLOTS = {"i": r"\d+", "j": r"\d+", "wb": "weight|bias", "ln": "layernorm_before|layernorm_after",
          "emb": r"patch_embeddings\.projection|norm", "ds": "reduction|norm"}
# Where the renamed Swin keys live under each naming; every key outside keeps its name (BERT,
# encoder/decoder, heads and 4.x's hidden_states_norms, which sits next to the 4.x Swin).
_SWIN_SCOPE = {NAMING_V5: re.escape(SWIN + "."),
               NAMING_V4: re.escape(_SWIN_V4 + ".") + "(?:embeddings|encoder)\\."}


def _rename_rules(pairs: list[tuple[str, str]], scope: str) -> list[tuple[str, str]]:
    """(regex, template) rules renaming each pair's left pattern to its right one, plus the
    identity for every key outside ``scope`` (keys inside it that no pair knows match nothing)."""
    rules = []
    for src, dst in pairs:
        regex = re.sub(r"\\{(\w+)\\}", lambda m: f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})",
                       re.escape(src))
        rules.append((regex, re.sub(r"\{(\w+)\}", r"\\g<\1>", dst)))
    return [*rules, (f"((?!{scope}).*)", r"\1")]


# (canonical-key regex, transformers-4.x template). Every canonical key matches exactly one rule.
V4_RENAMES = _rename_rules(_V4_PAIRS, _SWIN_SCOPE[NAMING_V5])
# The inverse (transformers-4.x key -> canonical), for writing a 4.x model's own state dict in
# the canonical layout (see canonical_state_dict); 4.x-only buffers (HF_ONLY_KEYS) are dropped.
_V4_TO_CANONICAL = _rename_rules([(v4, v5) for v5, v4 in _V4_PAIRS], _SWIN_SCOPE[NAMING_V4])

# Model keys (per naming) that no original key fills, why that is harmless, and what to do:
# "identity" fills weight 1 / bias 0, "keep" leaves the value transformers computed at init.
HF_ONLY_KEYS: dict[str, list[tuple[str, str, str]]] = {
    NAMING_V5: [
        (r"model\.backbone\.conv_encoder\.model\.swin\.layernorm\.(weight|bias)",
         "final Swin norm, not used by the feature maps GroundingDINO takes", "identity"),
    ],
    NAMING_V4: [
        (r"model\.backbone\.conv_encoder\.model\.encoder\.layers\.\d+\.blocks\.\d+\."
         r"attention\.self\.relative_position_index",
         "constant index buffer, computed by transformers at init", "keep"),
    ],
}

# A key only the given naming has, to tell the installed naming from the model's state dict.
NAMING_PROBES: dict[str, str] = {
    NAMING_V5: "model.backbone.conv_encoder.model.swin.embeddings.patch_embeddings.projection.weight",
    NAMING_V4: "model.backbone.conv_encoder.model.embeddings.patch_embeddings.projection.weight",
}

_COMPILED = [(re.compile(rx + r"\Z"), tpl, kind) for rx, tpl, kind in KEY_RULES]
_IGNORED = [(re.compile(rx + r"\Z"), why) for rx, why in IGNORED_KEYS]
_V4 = [(re.compile(rx + r"\Z"), tpl) for rx, tpl in V4_RENAMES]
_V4_INV = [(re.compile(rx + r"\Z"), tpl) for rx, tpl in _V4_TO_CANONICAL]
_HF_ONLY = {naming: [(re.compile(rx + r"\Z"), why, action) for rx, why, action in rules]
            for naming, rules in HF_ONLY_KEYS.items()}

QKV_PARTS = {"qkv_swin": ("q_proj", "k_proj", "v_proj"), "qkv_mha": ("query", "key", "value")}


@dataclass
class ConversionReport:
    """What happened to every original key."""

    converted: dict[str, list[str]] = field(default_factory=dict)  # original -> transformers keys
    ignored: dict[str, str] = field(default_factory=dict)  # original key -> reason
    unknown: list[str] = field(default_factory=list)  # original keys no rule knows

    def summary(self) -> str:
        return (f"{len(self.converted)} keys converted, {len(self.ignored)} known leftovers "
                f"ignored, {len(self.unknown)} unknown")


def _split_qkv(tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % 3:
        raise FiloError(f"checkpoint key {key}: first dimension {tensor.shape[0]} is not 3*d")
    return tuple(t.clone() for t in tensor.chunk(3, dim=0))


def convert_key(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """transformers (key, tensor) pairs for one original key; ``None`` if no rule applies."""
    for rx, template, kind in _COMPILED:
        match = rx.match(key)
        if not match:
            continue
        if "{norm_stage}" in template:
            template = template.replace("{norm_stage}", str(int(match.group(1)) + 1))
        if kind == "copy":
            return [(match.expand(template), value)]
        parts = _split_qkv(value, key)
        return [(match.expand(template.replace("{part}", name)), part)
                for name, part in zip(QKV_PARTS[kind], parts, strict=True)]
    return None


def convert_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                   ConversionReport]:
    """Original-layout state dict -> transformers ``GroundingDinoForObjectDetection`` state dict."""
    original = clean_state_dict(original)
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        pairs = convert_key(key, value)
        if pairs is not None:
            report.converted[key] = [k for k, _ in pairs]
            out.update(pairs)
            continue
        reason = next((why for rx, why in _IGNORED if rx.match(key)), None)
        if reason is not None:
            report.ignored[key] = reason
        else:
            report.unknown.append(key)
    _check_shared_box_heads(out)
    return out, report


def _check_shared_box_heads(hf: dict[str, torch.Tensor]) -> None:
    """The decoder box MLP is shared across layers and with the top-level copy: verify it."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, value in hf.items():
        match = re.fullmatch(r"(?:model\.decoder\.)?bbox_embed\.\d+\.(layers\.\d+\.(?:weight|bias))",
                             key)
        if match:
            groups.setdefault(match.group(1), []).append((key, value))
    for items in groups.values():
        ref_key, ref = items[0]
        for key, value in items[1:]:
            if value.shape != ref.shape or not torch.equal(value, ref):
                raise FiloError(
                    f"checkpoint: box heads {ref_key} and {key} differ; only GroundingDINO "
                    "checkpoints with a shared decoder box head (dec_pred_bbox_embed_share) "
                    "are supported"
                )


def hf_only_rule(key: str, naming: str = NAMING_V5) -> tuple[str, str] | None:
    """(reason, action) if a model key may stay unfilled by a converted checkpoint, else None."""
    return next(((why, action) for rx, why, action in _HF_ONLY[naming] if rx.match(key)), None)


def installed_naming(model_keys) -> str:
    """The naming (``"v5"`` or ``"v4"``) of an instantiated model, from its state-dict keys."""
    keys = set(model_keys)
    found = [naming for naming, probe in NAMING_PROBES.items() if probe in keys]
    if len(found) != 1:
        import transformers

        raise FiloError(
            f"transformers {transformers.__version__}: its GroundingDINO module names are not "
            "known to filo.detector.convert; install a verified version "
            "(pip install 'transformers>=4.40,<6')"
        )
    return found[0]


def rename_key(key: str, naming: str) -> str | None:
    """The name of canonical ``key`` under ``naming`` (None: no rule knows the key)."""
    if naming == NAMING_V5:
        return key
    if naming != NAMING_V4:
        raise ValueError(f"unknown naming {naming!r}")
    return _apply_renames(_V4, key)


def _apply_renames(rules: list[tuple[re.Pattern, str]], key: str) -> str | None:
    """``key`` renamed by the first rule whose regex matches it (None: no rule matches)."""
    for rx, template in rules:
        match = rx.match(key)
        if match:
            return match.expand(template)
    return None


def to_naming(state_dict: dict[str, torch.Tensor], naming: str) -> dict[str, torch.Tensor]:
    """Rename a canonical (transformers 5.x) state dict for the installed naming."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = rename_key(key, naming)
        if new is None:
            raise FiloError(f"converted checkpoint key {key}: no {naming} rename rule; "
                            "is it a Swin-T GroundingDINO converted by filo?")
        if new in out:
            raise FiloError(f"converted checkpoint keys collide on {new} under naming {naming}")
        out[new] = value
    return out


def canonical_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers GroundingDINO's own state dict (any supported version) in canonical names,
    e.g. to save a ``filo-gdino-hf`` file that loads under every transformers version."""
    naming = installed_naming(model_state)
    if naming == NAMING_V5:
        return dict(model_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if hf_only_rule(key, naming) is not None:
            continue  # a 4.x-only buffer the canonical layout does not store
        new = _apply_renames(_V4_INV, key)
        if new is None:
            raise FiloError(f"model key {key}: no canonical name")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# Files


@dataclass
class LoadedCheckpoint:
    """A checkpoint in transformers layout plus what its conversion did."""

    state_dict: dict[str, torch.Tensor]
    arch: DetectorArch
    layout: str  # "original" or "transformers"
    report: ConversionReport | None = None


def detect_layout(obj: object, path: str | Path = "checkpoint") -> tuple[str, dict]:
    """Tell apart the layouts by their keys; return (layout, payload): the whole dict for the
    transformers layout, the state dict (``module.`` prefixes stripped) for the original one."""
    if isinstance(obj, dict) and obj.get("format") == HF_FORMAT:
        return "transformers", obj
    if isinstance(obj, dict) and "filo" in obj:
        raise FiloError(f"{path}: this is a FiLo checkpoint ('filo' key), not a GroundingDINO "
                        "one; pass it as the FiLo checkpoint and give --grounded_checkpoint "
                        "grounding_train_on_{mvtec,visa}.pth or groundingdino_swint_ogc.pth")
    obj, _ = unwrap(obj, ("model",))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = clean_state_dict(obj)
        if "backbone.0.patch_embed.proj.weight" in state and any(k.startswith("bert.")
                                                                 for k in state):
            return "original", state
        if any(k.startswith("model.text_backbone.") for k in state):
            raise FiloError(f"{path}: a bare transformers state dict without architecture; "
                            "convert the original checkpoint with `python -m filo.detector "
                            "convert IN OUT`")
    raise FiloError(f"{path}: not a GroundingDINO checkpoint (expected the original layout, "
                    "e.g. groundingdino_swint_ogc.pth or grounding_train_on_{mvtec,visa}.pth, "
                    "or a file written by `python -m filo.detector convert`)")


def read_checkpoint(path: str | Path, bert_config: dict | None = None) -> LoadedCheckpoint:
    """Read a GroundingDINO checkpoint of either layout (once), converting the original one."""
    obj = read_weights(path, what="GroundingDINO checkpoint", hint=GROUNDING_CHECKPOINT_HINT)
    layout, payload = detect_layout(obj, path)
    if layout == "transformers":
        return LoadedCheckpoint(state_dict=payload["state_dict"],
                                arch=DetectorArch.from_dict(payload["arch"]), layout=layout)
    arch = arch_from_state_dict(payload, source=str(path), bert_config=bert_config)
    state_dict, report = convert_state_dict(payload)
    log.info("%s: original GroundingDINO layout, %s", path, report.summary())
    if report.unknown:
        raise FiloError(f"{path}: {len(report.unknown)} keys no conversion rule knows "
                        f"(first: {report.unknown[0]}); is this a GroundingDINO Swin-T checkpoint?")
    return LoadedCheckpoint(state_dict=state_dict, arch=arch, layout=layout, report=report)


def convert_file(src: str | Path, dst: str | Path,
                 bert_config: dict | None = None) -> ConversionReport:
    """Convert an original-layout checkpoint file to the transformers layout file ``dst``."""
    loaded = read_checkpoint(src, bert_config=bert_config)
    if loaded.layout != "original" or loaded.report is None:
        raise FiloError(f"{src}: already in the transformers layout; nothing to convert")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": HF_FORMAT, "arch": loaded.arch.to_dict(),
                "state_dict": loaded.state_dict}, dst)
    return loaded.report
