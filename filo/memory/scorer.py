"""Scoring images against saved memory banks, in the evaluation's map geometry.

:class:`MemoryScorer` loads a bank folder (one bank per class, built by ``python -m filo.memory
build``), rebuilds the feature extractor the banks were built with, and turns a batch of
memory-bank inputs into maps at the run's ``S x S`` full-image geometry (the FiLo map's) and
image scores (docs/design.md section 13). A bank built with the centre crop covers only the crop:
its map is placed where the crop lies in the image, and the rest of the image gets the bank's
normal pixel level (the calibration mean) -- PatchCore never sees those pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from filo.errors import FiloError
from filo.memory.build import USAGE_FIELDS, PatchEmbedder, score_features
from filo.memory.config import MemoryConfig


def bank_folder_key(directory: str | Path) -> str:
    """A short hash of a bank folder's content identity (every meta.json, each bank's size and
    modification time): part of the prediction cache key."""
    d = Path(directory)
    h = hashlib.sha256()
    for meta in sorted(d.glob("*/meta.json")):
        h.update(meta.parent.name.encode())
        h.update(meta.read_bytes())
        bank = meta.parent / "bank.npy"
        if bank.is_file():
            st = bank.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def crop_box(orig_size: tuple[int, int], resize: int, imagesize: int
             ) -> tuple[float, float, float, float]:
    """Where ``Resize(resize)`` + ``CenterCrop(imagesize)`` looks, as fractions (x0, y0, x1, y1)
    of the original image."""
    w, h = orig_size
    short, long_ = (w, h) if w <= h else (h, w)
    new_long = int(resize * long_ / short)
    rw, rh = (resize, new_long) if w <= h else (new_long, resize)
    left = int(round((rw - imagesize) / 2.0))
    top = int(round((rh - imagesize) / 2.0))
    return left / rw, top / rh, (left + imagesize) / rw, (top + imagesize) / rh


def to_full_geometry(amap: np.ndarray, size: int, crop: tuple[float, float, float, float] | None,
                     fill: float) -> np.ndarray:
    """A memory map at the bank's input size -> ``size x size`` over the whole image."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    if crop is None:
        return F.interpolate(t, size=(size, size), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    x0, y0, x1, y1 = (int(round(v * size)) for v in crop)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    out = np.full((size, size), fill, dtype=np.float32)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    return out


class MemoryScorer:
    """The banks of one folder, their shared feature extractor and per-class NN scorers."""

    def __init__(self, directory: str | Path, *, ckpt_path: Path | None = None,
                 device: torch.device | str = "cpu", expect: dict[str, Any] | None = None,
                 filo_model=None) -> None:
        from filo.memory.bank import list_bank_classes, load_bank

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FiloError(f"--memory_bank {self.dir} is not a folder; build one with "
                            f"`python -m filo.memory build ... --out {self.dir}`")
        self.classes = list_bank_classes(self.dir)
        if not self.classes:
            raise FiloError(f"--memory_bank {self.dir} holds no banks (no <class>/meta.json); "
                            f"build them with `python -m filo.memory build`")
        _, first = load_bank(self.dir, self.classes[0], expect=expect)
        self.meta0 = first
        settings = dict(first.extra.get("settings") or {})
        known = set(MemoryConfig.__dataclass_fields__)
        self.cfg = MemoryConfig(**{k: v for k, v in settings.items() if k in known})
        if self.cfg.weights is not None:
            self.cfg.weights = Path(self.cfg.weights)
        self.usage = {f: getattr(first, f) for f in USAGE_FIELDS}
        if self.cfg.backbone == "clip":
            if ckpt_path is None:
                raise FiloError(f"the banks in {self.dir} use the CLIP tower of {first.weights}: "
                                f"pass that FiLo checkpoint with --ckpt_path")
            if Path(first.weights or "").resolve() != Path(ckpt_path).resolve():
                raise FiloError(f"the banks in {self.dir} were built with the CLIP tower of "
                                f"{first.weights}, not of --ckpt_path {ckpt_path}; rebuild them "
                                f"with this checkpoint or pass that one")
        self.embedder = PatchEmbedder(self.cfg, ckpt_path=ckpt_path, device=device,
                                      filo_model=filo_model)
        self._banks: dict[str, tuple[Any, Any]] = {}

    def check_classes(self, class_names) -> None:
        missing = [c for c in class_names if c not in self.classes]
        if missing:
            raise FiloError(f"--memory_bank {self.dir} has no bank for class {missing[0]!r} "
                            f"(has {', '.join(self.classes)}); build it with `python -m "
                            f"filo.memory build --classes {missing[0]} --out {self.dir}`")

    def meta(self, cls_name: str):
        return self._bank(cls_name)[1]

    def _bank(self, cls_name: str):
        if cls_name not in self._banks:
            from filo.memory.bank import load_bank
            from filo.memory.patchcore import NearestNeighbourScorer

            bank, meta = load_bank(self.dir, cls_name, expect=self.usage)
            scorer = NearestNeighbourScorer(bank, k=meta.num_nn, backend=self.cfg.nn_backend,
                                            index=self.cfg.index)
            self._banks[cls_name] = (scorer, meta)
        return self._banks[cls_name]

    def transform(self):
        """PIL image -> memory-bank input; a picklable function for data-loader workers."""
        import functools

        from filo.memory.transforms import patchcore_tensor

        return functools.partial(patchcore_tensor, resize=self.cfg.resize,
                                 imagesize=self.cfg.imagesize, crop=self.cfg.crop,
                                 mean=self.embedder.mean, std=self.embedder.std)

    def score(self, images: torch.Tensor, classes: list[str], orig_sizes, size: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(maps [B, size, size] over the whole image, image scores [B]) against each image's
        class bank."""
        rows, grid = self.embedder.embed(images)
        patches = rows.reshape(len(classes), -1, rows.shape[-1])
        maps = np.zeros((len(classes), size, size), dtype=np.float32)
        scores = np.zeros(len(classes), dtype=np.float64)
        for cls_name in dict.fromkeys(classes):
            idx = [i for i, c in enumerate(classes) if c == cls_name]
            scorer, meta = self._bank(cls_name)
            res = score_features(patches[idx], scorer, grid, self.cfg)
            fill = float(meta.calibration.get("pixel_mean", float(res.maps.min())))
            for j, i in enumerate(idx):
                crop = (crop_box(orig_sizes[i], self.cfg.resize, self.cfg.imagesize)
                        if self.cfg.crop else None)
                maps[i] = to_full_geometry(res.maps[j], size, crop, fill)
                scores[i] = res.scores[j]
        return maps, scores

    def describe(self) -> str:
        return json.dumps({"banks": self.classes, **self.usage}, default=str)
