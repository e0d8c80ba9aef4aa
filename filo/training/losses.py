"""Training losses of FiLo (docs/design.md section 7).

- :func:`focal_loss`: focal loss with gamma 2 on already-softmaxed 2-channel maps, with the
  label smoothing of the research code (one-hot clamped to ``[s, 1 - s]``, ``s`` added to
  ``p_t`` before the log), averaged over every pixel of the batch.
- :func:`dice_loss`: ``1 - mean_b dice_b`` with ``dice_b = (2 sum(p t) + 1) / (sum p + sum t + 1)``
  computed over the whole image ``b``. (The research code squeezed a batch of one to
  ``[H, W]`` and so computed the Dice coefficient per image *row*; we compute it per image.)
- :func:`segmentation_loss`: stage 1, summed over the per-tap maps:
  ``focal(p, gt) + dice(p_abn, gt) + dice(p_norm, 1 - gt)``.
- :func:`adapter_loss`: stage 2, cross-entropy of the two cosines / temperature (0.07).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
ADAPTER_TEMPERATURE = 0.07


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA,
               smooth: float = FOCAL_SMOOTH) -> torch.Tensor:
    """Focal loss of class probabilities ``probs`` [B, C, H, W] against labels ``target`` [B, H, W].

    ``target`` holds class indices (0 normal, 1 abnormal; bool or float 0/1 accepted). Per pixel:
    ``q = clamp(one_hot(target), s / (C - 1), 1 - s)``, ``p_t = sum_c q_c p_c + s``,
    ``loss = -(1 - p_t)^gamma log p_t``; the result is the mean over all B*H*W pixels.
    """
    if probs.dim() != target.dim() + 1 or probs.shape[0] != target.shape[0] \
            or probs.shape[2:] != target.shape[1:]:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} do not match")
    n_class = probs.shape[1]
    idx = (target > 0.5).long() if target.dtype.is_floating_point else target.long()
    one_hot = F.one_hot(idx, n_class).movedim(-1, 1).to(probs.dtype)
    if smooth:
        one_hot = one_hot.clamp(smooth / (n_class - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(dim=1) + smooth
    return (-torch.pow(1.0 - pt, gamma) * torch.log(pt)).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss per image: ``pred``, ``target`` [B, ...]; ``1 - mean over images of dice``."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = pred.reshape(pred.shape[0], -1)
    t = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(tap_probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss. ``tap_probs`` [B, K, 2, H, W] (softmax normal/abnormal per map), ``gt`` [B, H, W]
    (bool or 0/1). Sum over the K maps of ``focal + dice(p_abn, gt) + dice(p_norm, 1 - gt)``."""
    if tap_probs.dim() != 5 or tap_probs.shape[2] != 2:
        raise ValueError(f"tap_probs must be [B, K, 2, H, W], got {tuple(tap_probs.shape)}")
    g = (gt > 0.5).to(tap_probs.dtype) if gt.dtype.is_floating_point else gt.to(tap_probs.dtype)
    total = tap_probs.new_zeros(())
    for k in range(tap_probs.shape[1]):
        p = tap_probs[:, k]
        total = total + focal_loss(p, g)
        total = total + dice_loss(p[:, 1], g)
        total = total + dice_loss(p[:, 0], 1.0 - g)
    return total


def adapter_loss(cosines: torch.Tensor, labels: torch.Tensor,
                 temperature: float = ADAPTER_TEMPERATURE) -> torch.Tensor:
    """Stage-2 loss: cross-entropy of ``cosines / temperature`` [B, 2] (normal, abnormal) vs labels [B]."""
    return F.cross_entropy(cosines / temperature, labels.long())
