"""Scoring images with trained anomalib models, in the evaluation's map geometry.

:class:`BaselineScorer` reads ``--baseline`` (a folder from ``python -m filo.baselines fit``,
one class folder, or one checkpoint), rebuilds each class's model from its JSON record and
loads only the checkpoint's state dict. An image goes in as anomalib's reader and datamodule
make it (RGB in [0, 1], resized to the model's input size); the model's forward (pre-processor,
network, post-processor) gives the map and score anomalib's predict writes; the map is resized
bilinearly to the run's ``S x S`` (docs/design.md §17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from filo.baselines.record import find_records, folder_key
from filo.errors import FiloError


class BaselineInputs:
    """(PIL image, class) -> the model's input tensor (picklable: numbers only)."""

    def __init__(self, sizes: dict[str, int | None]) -> None:
        self.sizes = sizes

    def __call__(self, img, cls_name: str) -> torch.Tensor:
        from filo.baselines import backend

        x = backend.read_image_tensor(img)
        size = self.sizes.get(cls_name, next(iter(self.sizes.values())))
        return backend.resize_transform(size)(x) if size else x


class BaselineScorer:
    """The trained models of one ``--baseline`` (loaded on first use, per class)."""

    def __init__(self, target: str | Path, *, device: torch.device | str = "cpu") -> None:
        from filo.baselines import backend

        backend.require()
        self.target = Path(target)
        self.records = find_records(self.target)
        self.device = device
        self._models: dict[str, Any] = {}
        self.single = self.target.is_file()  # one checkpoint scores every class

    def _key(self, cls_name: str) -> str:
        return next(iter(self.records)) if self.single else cls_name

    @property
    def map_size(self) -> int:
        """The models' input size (the natural map size of a run without --image_size)."""
        sizes = [r.input_size for r, _ in self.records.values() if r.input_size]
        return int(max(sizes)) if sizes else 256

    def describe(self) -> str:
        models = sorted({r.model for r, _ in self.records.values()})
        return f"anomalib {'/'.join(models)} ({self.target})"

    def check_classes(self, class_names) -> None:
        if self.single:
            return
        missing = [c for c in class_names if c not in self.records]
        if missing:
            raise FiloError(f"--baseline {self.target} has no trained model for class "
                            f"{missing[0]!r} (has {', '.join(self.records)}); train it with "
                            f"`python -m filo.baselines fit --classes {missing[0]} --out "
                            f"{self.target}`")

    def model(self, cls_name: str):
        key = self._key(cls_name)
        if key not in self._models:
            from filo.baselines import backend

            rec, ckpt = self.records[key]
            self._models[key] = backend.load_trained(rec.model, rec.init_args, rec.input_size,
                                                     ckpt, device=self.device)
        return self._models[key]

    def transform(self) -> BaselineInputs:
        return BaselineInputs({c: r.input_size for c, (r, _) in self.records.items()})

    @torch.inference_mode()
    def score(self, images, classes: list[str], orig_sizes, size: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(maps [B, size, size], image scores [B]) by each image's class model."""
        from filo.baselines import backend

        del orig_sizes  # the model sees the whole image, resized
        maps = np.zeros((len(classes), size, size), dtype=np.float32)
        scores = np.zeros(len(classes), dtype=np.float64)
        for cls_name in dict.fromkeys(classes):
            idx = [i for i, c in enumerate(classes) if c == cls_name]
            batch = torch.stack([images[i] for i in idx]).to(self.device)
            amap, score = backend.infer(self.model(cls_name), batch)
            if amap.shape[-2:] != (size, size):
                amap = F.interpolate(amap[:, None], size=(size, size), mode="bilinear",
                                     align_corners=False)[:, 0]
            for j, i in enumerate(idx):
                maps[i] = amap[j].cpu().numpy()
                scores[i] = float(score[j])
        return maps, scores


def baseline_key(target: str | Path) -> str:
    return folder_key(Path(target))


def build_baseline_scorer(config, device) -> BaselineScorer:
    """Registry builder (:data:`filo.scorers.SCORERS`): ``--baseline`` of a PipelineConfig."""
    return BaselineScorer(config.baseline, device=device)
