"""RsCIN: re-scoring with the image-feature neighbourhood (docs/design.md section 16.4).

The image scores are min-max scaled over the set; the cosine matrix of the image features keeps
each row's k largest entries (the image itself included), rows are normalised to sum 1 and the
scaled scores are smoothed over that graph; the result is the mean over the k list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from filo.errors import FiloError


def rscin(scores: np.ndarray, feats: np.ndarray | torch.Tensor | None,
          k_list: Sequence[int]) -> np.ndarray:
    """Re-scored image scores (float32), or ``scores`` unchanged for a 0 in ``k_list`` or no
    features."""
    scores = np.asarray(scores)
    if feats is None or 0 in k_list or not len(k_list):
        return scores
    n = scores.shape[0]
    if n < max(k_list):
        raise FiloError(f"MuSc RsCIN: a set of {n} images is smaller than its largest k "
                        f"{max(k_list)}; use a larger set or --musc_k 0")
    x = np.asarray(feats.cpu().numpy() if isinstance(feats, torch.Tensor) else feats)
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = torch.tensor(x @ x.T).float()
    s_t = torch.tensor(s).float().unsqueeze(-1)
    out = []
    for k in k_list:
        drop = torch.topk(w, n - k, dim=-1, largest=False, sorted=True).indices
        wk = w.clone().scatter_(1, drop, 0.0)
        p = wk * (1.0 / wk.sum(dim=1, keepdim=True))
        out.append(p @ s_t)
    return torch.cat(out, -1).mean(-1).numpy()
