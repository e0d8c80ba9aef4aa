"""Architecture of the GroundingDINO detector and its transformers ``GroundingDinoConfig``.

:class:`DetectorArch` holds the few numbers that differ between GroundingDINO variants. The
released checkpoints use :meth:`DetectorArch.swin_t_ogc`; the tests use :meth:`DetectorArch.tiny`.
:func:`arch_from_state_dict` reads the numbers from an original-layout state dict, so loading a
checkpoint never depends on guessing the variant.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from filo.errors import FiloError

# The original GroundingDINO always uses 4 feature levels and 4 sampling points per level;
# the encoder's sampling_offsets rows are heads * levels * points * 2.
NUM_FEATURE_LEVELS = 4
NUM_POINTS = 4


@dataclass
class DetectorArch:
    """Shape of a GroundingDINO model (original-layout names in comments)."""

    swin_embed_dim: int = 96
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    swin_num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    swin_window_size: int = 7
    swin_image_size: int = 224
    bert_hidden_size: int = 768
    bert_layers: int = 12
    bert_heads: int = 12
    bert_intermediate_size: int = 3072
    bert_vocab_size: int = 30522
    bert_max_positions: int = 512
    d_model: int = 256  # hidden_dim
    num_heads: int = 8  # nheads
    ffn_dim: int = 2048  # dim_feedforward
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 900
    max_text_len: int = 256

    @classmethod
    def swin_t_ogc(cls) -> DetectorArch:
        """``GroundingDINO_SwinT_OGC.py`` (groundingdino_swint_ogc.pth, FiLo grounding_train_on_*)."""
        return cls()

    @classmethod
    def tiny(cls) -> DetectorArch:
        """A few-layer model for tests (d_model stays 256: the original hard-codes it for text)."""
        return cls(swin_embed_dim=32, swin_depths=[1, 1, 2, 1], swin_num_heads=[1, 2, 4, 8],
                   bert_hidden_size=32, bert_layers=2, bert_heads=2, bert_intermediate_size=64,
                   d_model=256, num_heads=8, ffn_dim=64, encoder_layers=2, decoder_layers=2,
                   num_queries=20)

    @classmethod
    def from_dict(cls, values: dict) -> DetectorArch:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf_config(self):
        """The equivalent ``transformers.GroundingDinoConfig`` (eval-time dropouts off)."""
        from transformers import BertConfig, GroundingDinoConfig, SwinConfig

        backbone = SwinConfig(embed_dim=self.swin_embed_dim, depths=list(self.swin_depths),
                              num_heads=list(self.swin_num_heads),
                              window_size=self.swin_window_size, image_size=self.swin_image_size,
                              out_indices=[2, 3, 4])
        text = BertConfig(hidden_size=self.bert_hidden_size,
                          num_hidden_layers=self.bert_layers,
                          num_attention_heads=self.bert_heads,
                          intermediate_size=self.bert_intermediate_size,
                          vocab_size=self.bert_vocab_size,
                          max_position_embeddings=self.bert_max_positions)
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, d_model=self.d_model,
            encoder_attention_heads=self.num_heads, decoder_attention_heads=self.num_heads,
            encoder_ffn_dim=self.ffn_dim, decoder_ffn_dim=self.ffn_dim,
            encoder_layers=self.encoder_layers, decoder_layers=self.decoder_layers,
            num_queries=self.num_queries, max_text_len=self.max_text_len,
            num_feature_levels=NUM_FEATURE_LEVELS, encoder_n_points=NUM_POINTS,
            decoder_n_points=NUM_POINTS, two_stage=True, decoder_bbox_embed_share=True,
            two_stage_bbox_embed_share=False, embedding_init_target=True, query_dim=4,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            fusion_dropout=0.0, fusion_droppath=0.0, text_enhancer_dropout=0.0,
            positional_embedding_temperature=20, activation_function="relu",
        )


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    return len(found)


def arch_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                         bert_config: dict | None = None) -> DetectorArch:
    """Read the architecture from an original-layout GroundingDINO state dict (prefix-free).

    Everything but the BERT head count is in the tensor shapes; the head count comes from the
    BERT directory's config.json (``bert_config``) when its hidden size matches, else it is
    ``hidden / 64`` (12 for bert-base-uncased).
    """
    try:
        keys = list(sd)
        embed = sd["backbone.0.patch_embed.proj.weight"].shape[0]
        n_stages = _count(keys, r"backbone\.0\.layers\.(\d+)\.")
        depths = [_count(keys, rf"backbone\.0\.layers\.{i}\.blocks\.(\d+)\.")
                  for i in range(n_stages)]
        heads, window = [], 7
        for i in range(n_stages):
            table = sd[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"]
            heads.append(int(table.shape[1]))
            window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
        d_model = int(sd["transformer.level_embed"].shape[1])
        offsets = sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"]
        num_heads = int(offsets.shape[0]) // (NUM_FEATURE_LEVELS * NUM_POINTS * 2)
        word = sd["bert.embeddings.word_embeddings.weight"]
        bert_hidden = int(word.shape[1])
        bert_heads = max(1, bert_hidden // 64)
        if bert_config and bert_config.get("hidden_size") == bert_hidden:
            bert_heads = int(bert_config.get("num_attention_heads", bert_heads))
        return DetectorArch(
            swin_embed_dim=int(embed), swin_depths=depths, swin_num_heads=heads,
            swin_window_size=window,
            bert_hidden_size=bert_hidden,
            bert_layers=_count(keys, r"bert\.encoder\.layer\.(\d+)\."),
            bert_heads=bert_heads,
            bert_intermediate_size=int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            bert_vocab_size=int(word.shape[0]),
            bert_max_positions=int(sd["bert.embeddings.position_embeddings.weight"].shape[0]),
            d_model=d_model, num_heads=num_heads,
            ffn_dim=int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0]),
            encoder_layers=_count(keys, r"transformer\.encoder\.layers\.(\d+)\."),
            decoder_layers=_count(keys, r"transformer\.decoder\.layers\.(\d+)\."),
            num_queries=int(sd["transformer.tgt_embed.weight"].shape[0]),
        )
    except KeyError as err:
        raise FiloError(
            f"{source}: not an original-layout GroundingDINO state dict (no {err.args[0]!r}); "
            "use groundingdino_swint_ogc.pth or grounding_train_on_{mvtec,visa}.pth"
        ) from None
