"""The original PatchCore run's random numbers for the coreset (docs/design.md section 13.1).

The original draws its coreset projection and start points from the global generators, after
everything its run drew before: per class it seeds Python, numpy and torch with ``--seed``,
builds the torchvision backbone (whose random initialisation draws from torch's generator before
the ImageNet weights replace it), iterates the train data loader once (one int64 draw, its base
seed), then creates a bias-free ``nn.Linear(D, 128)`` (default init) as the projection and picks
the start points with ``np.random.choice(N, 10, replace=False)``.

:func:`original_draws` replays exactly that inside :func:`torch.random.fork_rng` with a private
``numpy.random.RandomState``, so nothing global changes. Building the backbone costs about a
second per call; the result is cached per (seed, arch, D, N).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision

from filo.errors import FiloError

# filo backbone name -> torchvision constructor the original builds
ORIGINAL_ARCHS = {"wrn50": "wide_resnet50_2", "wrn101": "wide_resnet101_2"}


@functools.lru_cache(maxsize=8)
def _projection_state(seed: int, arch: str) -> torch.Tensor:
    """torch's CPU generator state when the original creates its projection layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        getattr(torchvision.models, ORIGINAL_ARCHS[arch])(weights=None)  # the backbone's init
        torch.empty((), dtype=torch.int64).random_()  # the train data loader's base seed
        return torch.get_rng_state()


def original_draws(seed: int, n: int, d: int, proj_dim: int = 128, n_starts: int = 10,
                   arch: str = "wrn50") -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(projection weight [proj_dim, d] or None when d == proj_dim, start rows)`` as the
    original run with ``--seed seed`` draws them for a class with ``n`` patch features."""
    if arch not in ORIGINAL_ARCHS:
        raise FiloError(f"--coreset_rng original replays the original's {', '.join(ORIGINAL_ARCHS)}"
                        f" runs; with --backbone {arch} use --coreset_rng filo")
    weight = None
    if d != proj_dim:
        gen = torch.Generator()
        gen.set_state(_projection_state(seed, arch))
        weight = torch.empty(proj_dim, d)  # nn.Linear(d, proj_dim)'s default weight init
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    # np.random.choice(n, k, replace=False) of a freshly seeded legacy generator
    starts = np.random.RandomState(int(seed)).permutation(n)[: min(n_starts, n)]
    return weight, torch.from_numpy(starts.astype(np.int64))
