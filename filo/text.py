"""Text side of FiLo: conditional prompt learners, prompt tokens and the CLIP text encoder.

Prompt text is ``X X ... X <sentence>.`` (``n_ctx`` placeholders). The placeholders' token
embeddings are replaced by ``ctx + meta_net(image_feature)``; the class/state words keep their
frozen CLIP embeddings. The text transformer runs with its causal mask, so every token only sees
the tokens before it: the sequence can be cut right after the last end-of-text token of the batch
without changing any result (fewer tokens to run).

What is cached and what cannot be: the tokenization of every class's prompts is done once per
:class:`PromptTokens` (per model) and reused. Text *features* cannot be cached per (class,
position): the prompt learner adds ``meta_net(image_feature)`` to the context of every prompt,
so the text transformer runs for every image. :func:`class_text_features` therefore encodes,
for all images of a batch in ONE text-transformer call, only the prompts each image needs (its
class's normal prompts and the abnormal prompts of its position), with the sequence cut after
the longest end-of-text token. ``all_positions=True`` / ``truncate=False`` switch both savings
off (same result, used to time research-code-like inference).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from filo.backbone import LinearFn, block_mlp, block_out_proj, block_qkv
from filo.errors import FiloError
from filo.prompts import PromptTable


class PromptLearner(nn.Module):
    """Learned context ``ctx`` [n_ctx, ctx_dim] shifted per image by ``meta_net(image_feature)``."""

    def __init__(self, n_ctx: int, ctx_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, ctx_dim))
        nn.init.normal_(self.ctx, std=0.02)
        hidden = max(feature_dim // 16, 1)
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(feature_dim, hidden)),
                    ("relu", nn.ReLU()),
                    ("linear2", nn.Linear(hidden, ctx_dim)),
                ]
            )
        )

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, feature_dim] -> per-image context [B, n_ctx, ctx_dim]."""
        return self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)


class TextEncoder(nn.Module):
    """CLIP's text transformer over given token embeddings (shares the CLIP modules).

    Attribute names follow the research layout (``text_encoder.transformer.*``,
    ``text_encoder.positional_embedding``, ``text_encoder.ln_final.*``,
    ``text_encoder.text_projection``).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection

    def forward(
        self, embeddings: torch.Tensor, token_ids: torch.Tensor, linear: LinearFn = F.linear
    ) -> torch.Tensor:
        """embeddings [P, L, D] (L <= context length), token_ids [P, L] -> features [P, E].

        The blocks are written out (causal attention, ``linear`` for every linear layer, see
        :func:`filo.backbone.encode_image_two_stream`); same result as open_clip's forward with
        its causal mask.
        """
        n = embeddings.shape[1]
        x = embeddings + self.positional_embedding[:n].to(embeddings.dtype)
        for block in self.transformer.resblocks:
            q, k, v = block_qkv(block, block.ln_1(x), linear)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.ls_1(block_out_proj(block, attn, linear))
            x = x + block.ls_2(block_mlp(block, block.ln_2(x), linear))
        x = self.ln_final(x)
        eot = token_ids.argmax(dim=-1)
        # gather, not x[arange(P), eot]: the same rows, and a graph OpenVINO reshapes
        pooled = x.gather(1, eot.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection


@dataclass(frozen=True)
class ClassTokens:
    """Token ids of one class: normal [N_norm, L]; abnormal [N_states * N_pos, L] (state-major)."""

    normal: torch.Tensor
    abnormal: torch.Tensor
    n_positions: int

    def abnormal_rows(self, position_index: int | None) -> torch.Tensor:
        if position_index is None:
            return self.abnormal
        return self.abnormal[position_index :: self.n_positions]


class PromptTokens:
    """Tokenizes a class's prompts once and caches them (per instance, keyed by class name)."""

    def __init__(self, table: PromptTable, n_ctx: int, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer  # bundled BPE vocabulary, no download

        self.table = table
        self.n_ctx = n_ctx
        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.placeholder_id = self.tokenizer.encoder["x</w>"]
        self.prefix = " ".join(["X"] * n_ctx)
        self._cache: dict[str, ClassTokens] = {}

    def sentence(self, state: str) -> str:
        return f"{self.prefix} {state}."

    def _tokenize(self, cls_name: str, states: list[str]) -> torch.Tensor:
        for state in states:
            if len(self.tokenizer.encode(self.sentence(state))) + 2 > self.context_length:
                raise FiloError(
                    f"prompt file {self.table.source}: class {cls_name!r}: prompt {state!r} is too "
                    f"long for CLIP's {self.context_length}-token context; shorten the phrase"
                )
        ids = self.tokenizer([self.sentence(s) for s in states])
        if not torch.all(ids[:, 1 : 1 + self.n_ctx] == self.placeholder_id):
            raise FiloError(f"class {cls_name!r}: placeholder tokens were not tokenized as expected")
        return ids

    def get(self, cls_name: str) -> ClassTokens:
        if cls_name not in self._cache:
            normal = self._tokenize(cls_name, self.table.normal_prompts(cls_name))
            abnormal = self._tokenize(cls_name, self.table.abnormal_prompts(cls_name))
            self._cache[cls_name] = ClassTokens(normal, abnormal, len(self.table.positions))
        return self._cache[cls_name]

    def position_index(self, position: str | None) -> int | None:
        if position is None:
            return None
        return self.table.positions.index(self.table.check_position(position))


def encode_prompts(
    text_encoder: TextEncoder,
    token_embedding: nn.Embedding,
    token_ids: torch.Tensor,
    ctx: torch.Tensor,
    *,
    truncate: bool = True,
    linear: LinearFn = F.linear,
) -> torch.Tensor:
    """Encode prompts whose placeholder embeddings (positions 1..n_ctx) are replaced by ``ctx``.

    token_ids [P, L], ctx [P, n_ctx, D] -> features [P, E] (not normalized). With ``truncate``
    the sequence is cut after the longest end-of-text token (exact under the causal mask).
    """
    n_ctx = ctx.shape[1]
    if truncate:
        length = int(token_ids.argmax(dim=-1).max()) + 1
        token_ids = token_ids[:, :length]
    frozen = token_embedding(token_ids).to(ctx.dtype)
    embeddings = torch.cat([frozen[:, :1], ctx, frozen[:, 1 + n_ctx :]], dim=1)
    return text_encoder(embeddings, token_ids, linear)


def class_text_features(
    *,
    text_encoder: TextEncoder,
    token_embedding: nn.Embedding,
    tokens: PromptTokens,
    normal_learner: PromptLearner,
    abnormal_learner: PromptLearner,
    image_features: torch.Tensor,
    class_names: list[str],
    positions: list[str | None],
    truncate: bool = True,
    all_positions: bool = False,
    linear: LinearFn = F.linear,
) -> torch.Tensor:
    """Per-image text matrix ``T`` [B, 2, E] (rows: normal, abnormal; Frobenius-normalized).

    Only the prompts each image needs are encoded (all images in one text-transformer pass):
    its class's normal prompts and the abnormal prompts of its position (all positions, averaged,
    when the position is None). ``all_positions=True`` encodes the abnormal prompts of all
    positions and selects afterwards (the research code's amount of work, same result).
    """
    device = image_features.device
    ctx_normal = normal_learner(image_features)
    ctx_abnormal = abnormal_learner(image_features)
    ids, ctxs, counts, picks = [], [], [], []
    for i, (cls_name, position) in enumerate(zip(class_names, positions, strict=True)):
        ct = tokens.get(cls_name)
        pos_index = tokens.position_index(position)
        if all_positions:
            rows_a = ct.abnormal
            picks.append(None if pos_index is None else slice(pos_index, None, ct.n_positions))
        else:
            rows_a = ct.abnormal_rows(pos_index)
            picks.append(None)
        for rows, ctx in ((ct.normal, ctx_normal[i]), (rows_a, ctx_abnormal[i])):
            ids.append(rows)
            ctxs.append(ctx.unsqueeze(0).expand(rows.shape[0], -1, -1))
            counts.append(rows.shape[0])
    all_ids = torch.cat(ids).to(device)
    feats = encode_prompts(text_encoder, token_embedding, all_ids, torch.cat(ctxs), truncate=truncate,
                           linear=linear)
    feats = F.normalize(feats, dim=-1)
    groups = torch.split(feats, counts)
    out = []
    for i in range(len(class_names)):
        rows_a = groups[2 * i + 1] if picks[i] is None else groups[2 * i + 1][picks[i]]
        normal = F.normalize(groups[2 * i].mean(dim=0), dim=-1)
        abnormal = F.normalize(rows_a.mean(dim=0), dim=-1)
        pair = torch.stack([normal, abnormal])
        out.append(pair / pair.norm())  # Frobenius norm over both rows
    return torch.stack(out)
