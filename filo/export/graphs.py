"""The torch modules a bundle's graphs are traced from (docs/design.md §18).

The export boundary of FiLo is the point after which everything is cheap and fixed-shape
arithmetic (done in numpy by :mod:`filo.deploy.numerics`):

* :class:`FiLoImageGraph`: image ``[B, 3, S, S]`` -> ``image_feature`` ``[B, E]`` (adapter,
  normalized) and ``patch`` ``[B, 7, N, E]`` (the 7 head outputs, normalized);
* :class:`FiLoTextGraph`: one image's ``image_feature`` ``[1, E]`` and a class's frozen prompt
  token embeddings (``normal_embeddings`` ``[Pn, L, D]``, ``abnormal_embeddings``
  ``[Pa, L, D]``) with their token ids (for the end-of-text position) -> the text matrix
  ``text`` ``[2, E]``. The prompt learners add ``meta_net(image_feature)`` to the context, so
  the text side runs per image (docs/design.md section 3); which abnormal rows (one position or
  all nine) is the caller's choice of rows.
* :class:`FeatureGraph`: a memory bank's backbone (WideResNet stages or CLIP ori-stream taps)
  -> its feature maps ``feature_0 .. feature_{n-1}``; PatchCore's aggregation and the kNN
  run in numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from filo.text import encode_prompts


class FiLoImageGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, image_feature = self.model.image_features(image)
        patch = self.model.patch_features(feats)
        return image_feature.float(), F.normalize(torch.stack(patch, dim=1).float(), dim=-1)


class FiLoTextGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_feature, normal_embeddings, normal_ids, abnormal_embeddings,
                abnormal_ids) -> torch.Tensor:
        m = self.model
        n_normal = normal_embeddings.shape[0]
        ctx_n = m.normal_prompt_learner(image_feature)  # [1, n_ctx, D]
        ctx_a = m.abnormal_prompt_learner(image_feature)
        ctx = torch.cat([ctx_n.expand(n_normal, -1, -1),
                         ctx_a.expand(abnormal_embeddings.shape[0], -1, -1)])
        frozen = torch.cat([normal_embeddings, abnormal_embeddings])
        ids = torch.cat([normal_ids, abnormal_ids])
        feats = encode_prompts(m.text_encoder, _Frozen(frozen), ids, ctx, truncate=False,
                               linear=m._linear)
        feats = F.normalize(feats, dim=-1)
        normal = F.normalize(feats[:n_normal].mean(dim=0), dim=-1)
        abnormal = F.normalize(feats[n_normal:].mean(dim=0), dim=-1)
        pair = torch.stack([normal, abnormal])
        return pair / pair.norm()


class _Frozen:
    """Stands in for the token embedding: the embeddings are already looked up."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    def __call__(self, _ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings


class FeatureGraph(nn.Module):
    """``PatchEmbedder.net`` (WideResNetFeatures / ClipTowerFeatures) as a graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(image))
