"""PatchCore memory-bank mode: patch features of normal images, coreset, nearest-neighbour maps.

Public API::

    from filo.memory import (aggregate, approximate_greedy_coreset, NearestNeighbourScorer,
                             score_map, image_scores, build_wide_resnet, WideResNetFeatures,
                             ClipTowerFeatures, patchcore_tensor, patchcore_mask,
                             BankMeta, save_bank, load_bank, list_bank_classes)

    model = build_wide_resnet("wrn50", "ckpt/wide_resnet50_2-95faca4d.pth")
    extract = WideResNetFeatures(model, ("layer2", "layer3"))
    x = torch.stack([patchcore_tensor(img) for img in images])          # [B, 3, 224, 224]
    feats, grid = aggregate(extract(x))                                 # [B*28*28, 1024]
    bank = feats[approximate_greedy_coreset(feats, 0.1)]
    scorer = NearestNeighbourScorer(bank, k=1)
    patch = scorer.scores(aggregate(extract(test_x))[0]).reshape(len(test_x), -1)
    maps, grid_scores = score_map(patch, grid, 224)
    scores = image_scores(grid_scores, "max")

Semantics of each step: :mod:`filo.memory.patchcore` (module docstring).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; imported on first use so that light entry points (``filo.memory.config``,
# ``--help``) do not pay for torchvision, scipy and faiss
_EXPORTS = {
    "BankMeta": "bank", "list_bank_classes": "bank", "load_bank": "bank", "save_bank": "bank",
    "ClipTowerFeatures": "features", "FeatureSpec": "features",
    "WideResNetFeatures": "features", "apply_bn_quirk": "features",
    "build_wide_resnet": "features", "load_wide_resnet_weights": "features",
    "IMAGE_SCORE_RULES": "patchcore", "NearestNeighbourScorer": "patchcore",
    "aggregate": "patchcore", "approximate_greedy_coreset": "patchcore",
    "faiss_available": "patchcore", "image_scores": "patchcore", "patch_grid": "patchcore",
    "patchify": "patchcore", "projection_matrix": "patchcore", "score_map": "patchcore",
    "patchcore_mask": "transforms", "patchcore_tensor": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"filo.memory.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'filo.memory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
