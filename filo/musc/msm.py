"""MSM: mutual scoring of a set of images (docs/design.md section 16.3).

For unit patch vectors ``Z`` of N images (``[N, L, C]``), patch p of image i gets, for every
other image j, the Euclidean distance to its nearest patch in j; its score is the mean of the
``k = int(ratio (N - 1))`` smallest of those N - 1 distances (the best-matching 30 % of the
others). The original computes one ``cdist`` of image i against all others at a time; here the
squared distances come from blocks of one matrix product each (``[-2a, |a|^2, 1] . [b, 1,
|b|^2]``, the form ``cdist`` itself uses), each block serving both directions (i -> j and
j -> i), the minimum is taken before the square root, and
memory is bounded by the block (about ``block_rows^2`` floats) plus the ``N x L x N`` table of
nearest distances.
"""

from __future__ import annotations

import torch

from filo.errors import FiloError

BLOCK_ROWS = 2048  # patch rows per side of one product block: 2048^2 float32 = 16 MiB (cache-sized)


def images_per_block(patches: int, block_rows: int = BLOCK_ROWS) -> int:
    return max(1, block_rows // max(patches, 1))


def interval_k(n_refs: int, ratio: float) -> int:
    """How many of the ``n_refs`` reference images the interval average uses."""
    return int(n_refs * ratio)


def _left(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[-2 x, |x|^2, 1]`` (the left factor of the squared-distance product)."""
    return torch.cat([x * -2.0, x.pow(2).sum(-1, keepdim=True), torch.ones_like(x[:, :1])], 1)


def _right(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[x, 1, |x|^2]`` (the right factor)."""
    return torch.cat([x, torch.ones_like(x[:, :1]), x.pow(2).sum(-1, keepdim=True)], 1)


def nearest_table(za: torch.Tensor, zb: torch.Tensor | None = None, *,
                  block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """``d[i, p, j]`` = distance of patch p of image i of ``za`` to its nearest patch of image
    j of ``zb`` (``zb`` None: ``za`` against itself, each product block used both ways; the
    diagonal ``j == i`` is +inf). ``[Na, L, Nb]`` float32."""
    same = zb is None
    zb = za if same else zb
    na, la, c = za.shape
    nb, lb, _ = zb.shape
    d = torch.empty(na, la, nb, dtype=torch.float32, device=za.device)
    step_a = images_per_block(la, block_rows)
    step_b = images_per_block(lb, block_rows)
    for a0 in range(0, na, step_a):
        a1 = min(a0 + step_a, na)
        rows = _left(za[a0:a1].reshape(-1, c))
        for b0 in range(a0 if same else 0, nb, step_b):
            b1 = min(b0 + step_b, nb)
            # squared distances in one product: [-2a, |a|^2, 1] . [b, 1, |b|^2]
            g = rows @ _right(zb[b0:b1].reshape(-1, c)).T  # [(a1-a0) La, (b1-b0) Lb]
            g = g.view(a1 - a0, la, b1 - b0, lb)
            d[a0:a1, :, b0:b1] = g.amin(dim=3).clamp_min_(0).sqrt_()
            if same and b0 != a0:  # the transposed direction from the same product
                d[b0:b1, :, a0:a1] = g.amin(dim=1).clamp_min_(0).sqrt_().permute(1, 2, 0)
            del g
    if same:
        idx = torch.arange(na, device=za.device)
        d[idx, :, idx] = float("inf")
    return d


def interval_mean(d: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` smallest entries of the last axis (``[M, L, R]`` -> ``[M, L]``)."""
    if k < 1:
        raise FiloError(f"MuSc: the interval average needs at least one reference image "
                        f"(k = {k}); use a larger set")
    vals = torch.topk(d, k, dim=-1, largest=False, sorted=True).values
    return vals.flip(-1).mean(dim=-1)


def mutual_scores(z: torch.Tensor, ratio: float = 0.3, *, block_rows: int = BLOCK_ROWS
                  ) -> torch.Tensor:
    """``[N, L]`` float32 MSM scores of every image of the set ``z`` against the others."""
    d = nearest_table(z, block_rows=block_rows)
    return interval_mean(d, interval_k(z.shape[0] - 1, ratio))


def scores_against(zq: torch.Tensor, zref: torch.Tensor, ratio: float = 0.3, *,
                   exclude: list[list[int]] | None = None, block_rows: int = BLOCK_ROWS
                   ) -> torch.Tensor:
    """``[M, L]`` scores of query images against reference images; ``exclude[m]``: reference
    indices that are query m itself (left out, as the original leaves out the image)."""
    d = nearest_table(zq, zref, block_rows=block_rows)
    n_refs = zref.shape[0]
    out = []
    for m in range(zq.shape[0]):
        ex = list(exclude[m]) if exclude else []
        row = d[m]
        if ex:
            row = row.clone()
            row[:, ex] = float("inf")
        out.append(interval_mean(row[None], interval_k(n_refs - len(ex), ratio))[0])
    return torch.stack(out)
