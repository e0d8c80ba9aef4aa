"""Registry of the pipeline's image scorers besides FiLo and the detector: name -> builder
``(PipelineConfig, device) -> scorer``.

A scorer has ``transform()`` (PIL image, class -> its input, carried in the batch's
``mem_images``), ``check_classes(names)``, ``map_size`` and ``score(inputs, classes,
orig_sizes, size) -> (maps [B, S, S], scores [B])``. Builders import their heavy dependencies
when called, so listing the registry imports nothing optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _baseline(config, device) -> Any:
    from filo.baselines.scorer import build_baseline_scorer

    return build_baseline_scorer(config, device)


SCORERS: dict[str, Callable[[Any, Any], Any]] = {
    "baseline": _baseline,  # --baseline: trained anomalib models (docs/design.md §16)
}
