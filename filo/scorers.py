"""The scorers a pipeline can add to FiLo and the box step: a plain registry, name -> builder.

Per-image scorers (``score(images, classes, orig_sizes, size)``: memory banks, trained anomalib
models) and set scorers (MuSc: a whole class scored at once, or one image against a stored pool)
are built the same way: ``SCORERS[name](config, device=..., filo_model=..., image_size=...)``.
Builders import their package lazily, so listing the registry loads nothing optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def build_memory(config, *, device, filo_model=None, image_size: int | None = None):
    """PatchCore memory banks of ``--memory_bank`` (per image)."""
    from filo.memory.scorer import MemoryScorer

    return MemoryScorer(config.memory_bank, ckpt_path=config.ckpt_path, device=device,
                        filo_model=filo_model)


def build_musc(config, *, device, filo_model=None, image_size: int | None = None):
    """MuSc (per set; per image with ``--musc_pool``), on the CLIP of ``--musc_clip`` or
    ``--ckpt_path``."""
    from filo.musc.pool import PoolSet
    from filo.musc.scorer import MuscScorer
    from filo.musc.settings import musc_weights, settings_from
    from filo.musc.tower import load_tower

    settings = settings_from(config, image_size or config.image_size or 518)
    tower = load_tower(musc_weights(config), settings.image_size, act=config.clip_act,
                       layers=settings.layers, device=device)
    pools = PoolSet(config.musc_pool) if config.musc_pool is not None else None
    return MuscScorer(tower, settings, pools=pools, device=device, exact=config.exact)


def build_baseline(config, *, device, filo_model=None, image_size: int | None = None):
    """Trained anomalib models of ``--baseline`` (per image; docs/design.md §17)."""
    from filo.baselines.scorer import build_baseline_scorer

    return build_baseline_scorer(config, device)


SCORERS: dict[str, Callable[..., Any]] = {"memory": build_memory, "musc": build_musc,
                                          "baseline": build_baseline}
