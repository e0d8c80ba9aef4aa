"""The MuSc scorers the pipeline plugs in (docs/design.md section 16).

:class:`MuscScorer` turns CLIP inputs into LNAMD-ready layer-normalised taps
(:meth:`MuscScorer.extract`), scores a whole set of images of one class against each other
(:meth:`MuscScorer.score_set`: MSM for every degree and layer, mean over layers then degrees in
float64, bilinear ``align_corners=True`` upsampling, image score = the map's maximum, RsCIN), or
scores new images against a stored reference pool (:meth:`MuscScorer.score_pool`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from filo.errors import FiloError
from filo.musc.config import MuscSettings
from filo.musc.lnamd import aggregate, layer_normed
from filo.musc.msm import BLOCK_ROWS, mutual_scores, scores_against
from filo.musc.rscin import rscin


@dataclass
class SetScores:
    """MuSc's output for a set of images (dataset order)."""

    grid: np.ndarray  # float64 [N, L] patch scores
    maps: np.ndarray  # float32 [N, S, S] upsampled maps (raw distances, no normalisation)
    raw: np.ndarray  # float64 [N] max of each upsampled map
    scores: np.ndarray  # [N] after RsCIN (float32), = raw without it


def input_digest(image: torch.Tensor) -> str:
    """Identity of one preprocessed CLIP input (the pool leaves a query's own copy out)."""
    return hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes()
                          ).hexdigest()[:20]


def subsets(paths: Sequence[str], divide: int, seed: int = 42) -> list[list[int]]:
    """The original's ``divide_num`` split: indices grouped by their parent folder (first-seen
    order), each group shuffled with ``random.seed(seed)`` and cut into chunks of ``divide``;
    subset t takes element t of every chunk. ``divide <= 1``: one set, dataset order."""
    if divide <= 1:
        return [list(range(len(paths)))]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(str(p).replace("\\", "/").split("/")[-2] if "/" in str(p) else "",
                          []).append(i)
    out = []
    for t in range(divide):
        random.seed(seed)
        sub = []
        for ids in groups.values():
            ids = list(ids)
            random.shuffle(ids)
            chunks = [ids[i:i + divide] for i in range(0, len(ids), divide)]
            sub.extend(c[t] for c in chunks if len(c) > t)
        out.append(sub)
    return out


def upsample(grid: np.ndarray, size: int, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[N, L]`` -> (float32 maps ``[N, size, size]``, float64 per-map maxima);
    bilinear, ``align_corners=True``, in float64, a few maps at a time."""
    n, length = grid.shape
    g = int(round(length ** 0.5))
    maps = np.empty((n, size, size), dtype=np.float32)
    top = np.empty(n, dtype=np.float64)
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float64)).view(n, 1, g, g)
    for a in range(0, n, chunk):
        up = F.interpolate(t[a:a + chunk], size=size, mode="bilinear", align_corners=True)[:, 0]
        top[a:a + chunk] = up.reshape(up.shape[0], -1).amax(-1).numpy()
        maps[a:a + chunk] = up.float().numpy()
    return maps, top


class MuscScorer:
    """A MuSc tower plus its settings; optional reference pools (per class) for single images."""

    def __init__(self, tower, settings: MuscSettings, *, pools=None,
                 device: torch.device | str = "cpu", exact: bool = False) -> None:
        self.tower = tower.to(device).eval()
        self.settings = settings
        self.device = torch.device(device)
        self.pools = pools  # filo.musc.pool.PoolSet or None
        self.exact = exact
        settings.validate(tower.depth)

    def settings_key(self) -> dict:
        """What a pool must share with this scorer (the tower's resolved layers included)."""
        return {**self.settings.key(), "layers": list(self.tower.layers)}

    def source_key(self) -> dict:
        """The tower's weights: path, kind and sha256 (cached by the checksum cache)."""
        if getattr(self, "_source", None) is None:
            from filo.memory.build import weights_checksum

            src = self.tower.source
            path = getattr(src, "path", None)
            self._source = {"path": path, "kind": getattr(src, "kind", None),
                            "act": getattr(src, "act", None),
                            "sha256": weights_checksum(path) if path else None}
        return self._source

    @property
    def block_rows(self) -> int:
        return self.settings.block or BLOCK_ROWS

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """CLIP inputs ``[B, 3, S, S]`` -> (per tapped layer ``[B, C, g, g]`` layer-normalised
        float32 on the CPU, image features ``[B, E]`` float32 on the CPU)."""
        if images.shape[-1] != self.settings.image_size:
            raise ValueError(f"MuSc expects {self.settings.image_size} px inputs, got "
                             f"{images.shape[-1]}")
        taps, feats = self.tower(images.to(self.device))
        return [layer_normed(t).cpu() for t in taps], feats.float().cpu()

    def _aggregate(self, x: torch.Tensor, r: int, chunk: int = 16) -> torch.Tensor:
        """LNAMD of ``[N, C, g, g]`` in chunks of images (the temporaries stay small)."""
        return torch.cat([aggregate(x[a:a + chunk].to(self.device), r, exact=self.exact)
                          for a in range(0, x.shape[0], chunk)])

    def check_set(self, n: int, what: str) -> None:
        need = self.settings.min_set()
        if n < need:
            why = (f"RsCIN's largest k is {max(self.settings.k_list)}" if need > 5 else
                   "with fewer the interval average covers no image")
            raise FiloError(f"MuSc needs at least {need} images per set, {what} has {n} "
                            f"({why}); add images, give --musc_pool, or lower --musc_divide")

    def _grid(self, normed: Sequence[torch.Tensor], members: list[int] | None = None
              ) -> np.ndarray:
        """float64 ``[N, L]``: MSM per (degree, layer), mean over layers then over degrees."""
        s = self.settings
        per_r = []
        for r in s.r_list:
            per_layer = []
            for x in normed:
                x = x if members is None else x[members]
                z = self._aggregate(x, r)
                per_layer.append(mutual_scores(z, s.ratio, block_rows=self.block_rows)
                                 .double().cpu())
                del z
            per_r.append(torch.stack(per_layer).mean(0))
        return torch.stack(per_r).mean(0).numpy()

    @torch.no_grad()
    def score_set(self, normed: Sequence[torch.Tensor], feats: torch.Tensor,
                  paths: Sequence[str] | None = None, what: str = "the set") -> SetScores:
        """Every image of one class's set scored against the others (``paths`` only matter for
        ``divide > 1``)."""
        n = normed[0].shape[0]
        s = self.settings
        parts = subsets(paths or [str(i) for i in range(n)], s.divide, s.seed)
        for part in parts:
            self.check_set(len(part), what if s.divide <= 1 else f"a subset of {what}")
        grid = np.empty((n, normed[0].shape[-1] ** 2), dtype=np.float64)
        for part in parts:
            grid[part] = self._grid(normed, part if s.divide > 1 else None)
        maps, raw = upsample(grid, s.image_size)
        scores = rscin(raw, feats.numpy(), s.k_list)
        return SetScores(grid, maps, raw, np.asarray(scores))

    @torch.no_grad()
    def score_pool(self, pool, normed: Sequence[torch.Tensor], feats: torch.Tensor,
                   digests: Sequence[str]) -> SetScores:
        """Query images against ``pool`` (:class:`filo.musc.pool.Pool`): each query's map is its
        MSM map against the pool's images (its own copy left out); RsCIN runs over the pool's
        stored scores with the query in its copy's place (or added)."""
        s = self.settings
        pool.check_settings(self.settings_key(), self.source_key())
        m = normed[0].shape[0]
        exclude = [pool.indices_of(d) for d in digests]
        refs = [pool.n - len(e) for e in exclude]
        if min(refs) + 1 < s.min_set():
            self.check_set(min(refs) + 1, f"pool {pool.path} plus the image")
        per_r = []
        for r in s.r_list:
            per_layer = []
            for li, x in enumerate(normed):
                zq = self._aggregate(x, r)
                zr = self._aggregate(pool.normed(li), r)
                per_layer.append(scores_against(zq, zr, s.ratio, exclude=exclude,
                                                block_rows=self.block_rows).double().cpu())
                del zq, zr
            per_r.append(torch.stack(per_layer).mean(0))
        grid = torch.stack(per_r).mean(0).numpy()
        maps, raw = upsample(grid, s.image_size)
        scores = np.empty(m, dtype=np.float64)
        for i in range(m):
            a, f = pool.raw.astype(np.float64), pool.feats
            if exclude[i]:
                j = exclude[i][0]
                a = a.copy()
                a[j] = raw[i]
                f = f.copy()
                f[j] = feats[i].numpy()
            else:
                j = len(a)
                a = np.append(a, raw[i])
                f = np.concatenate([f, feats[i:i + 1].numpy()])
            scores[i] = float(rscin(a, f, s.k_list)[j])
        return SetScores(grid, maps, raw, scores)
