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

from filo.deploy.numerics import crop_box  # torch-free; the deployed inferencer shares it
from filo.errors import FiloError
from filo.memory.build import USAGE_FIELDS, score_features
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


def _config_from_meta(meta) -> MemoryConfig:
    settings = dict(meta.extra.get("settings") or {})
    known = set(MemoryConfig.__dataclass_fields__)
    cfg = MemoryConfig(**{k: v for k, v in settings.items() if k in known})
    if cfg.weights is not None:
        cfg.weights = Path(cfg.weights)
    return cfg


class MemoryInputs:
    """PIL image, class name -> that class's memory-bank input (picklable for data-loader
    workers: it holds only numbers)."""

    def __init__(self, params: dict[str, dict[str, Any]]) -> None:
        self.params = params

    def __call__(self, img, cls_name: str) -> torch.Tensor:
        from filo.memory.transforms import patchcore_tensor

        p = self.params.get(cls_name) or next(iter(self.params.values()))
        if p.get("tile"):
            from filo.memory.tiles import tile_tensor

            return tile_tensor(img, tuple(p["mean"]), tuple(p["std"]))
        return patchcore_tensor(img, p["resize"], p["imagesize"], crop=p["crop"],
                                mean=tuple(p["mean"]), std=tuple(p["std"]))


class MemoryMasks:
    """(bool mask [H, W] or None, class name) -> that class's ground truth on the bank's input
    geometry (:func:`~filo.memory.transforms.patchcore_mask`: the original's truncation), for
    ``--protocol crop`` (picklable: it holds only numbers)."""

    def __init__(self, params: dict[str, dict[str, Any]]) -> None:
        self.params = params

    def __call__(self, mask, cls_name: str) -> torch.Tensor:
        from PIL import Image

        from filo.memory.transforms import patchcore_mask

        p = self.params.get(cls_name) or next(iter(self.params.values()))
        if mask is None:
            return torch.zeros((p["imagesize"], p["imagesize"]), dtype=torch.bool)
        img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        return patchcore_mask(img, p["resize"], p["imagesize"], crop=p["crop"])


class MemoryScorer:
    """The banks of one folder, their feature extractors and per-class NN scorers."""

    def __init__(self, directory: str | Path, *, ckpt_path: Path | None = None,
                 device: torch.device | str = "cpu", filo_model=None) -> None:
        from filo.memory.bank import list_bank_classes, load_bank
        from filo.memory.build import EmbedderCache

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FiloError(f"--memory_bank {self.dir} is not a folder; build one with "
                            f"`python -m filo.memory build ... --out {self.dir}`")
        self.classes = list_bank_classes(self.dir)
        if not self.classes:
            raise FiloError(f"--memory_bank {self.dir} holds no banks (no <class>/meta.json); "
                            f"build them with `python -m filo.memory build`")
        self._metas = {}
        for cls_name in self.classes:  # meta.json only (small); the banks load when used
            meta = _read_meta(self.dir, cls_name)
            if meta.backbone == "clip":
                if ckpt_path is None:
                    raise FiloError(f"the bank of {cls_name} in {self.dir} uses the CLIP tower "
                                    f"of {meta.weights}: pass that FiLo checkpoint with "
                                    f"--ckpt_path")
                if Path(meta.weights or "").resolve() != Path(ckpt_path).resolve():
                    raise FiloError(f"the banks in {self.dir} were built with the CLIP tower of "
                                    f"{meta.weights}, not of --ckpt_path {ckpt_path}; rebuild "
                                    f"them with this checkpoint or pass that one")
            if meta.weights_sha256 is not None:
                from filo.memory.build import weights_checksum

                now = weights_checksum(Path(meta.weights)) if meta.weights else None
                if now != meta.weights_sha256:
                    raise FiloError(
                        f"the bank of {cls_name} in {self.dir} was built with backbone weights "
                        f"{meta.weights} of sha256 {meta.weights_sha256[:12]}..., but that file "
                        + ("is missing" if now is None else f"now has sha256 {now[:12]}...")
                        + "; put the original weights back or rebuild the banks")
            # rows and meta as built (checksum), before any model work; memory-mapped
            load_bank(self.dir, cls_name, mmap_mode="r")
            self._metas[cls_name] = meta
        self._cfgs = {c: _config_from_meta(m) for c, m in self._metas.items()}
        self._embedders = EmbedderCache(ckpt_path=ckpt_path, device=device, filo=filo_model,
                                        channels_last=True)
        self._banks: dict[str, Any] = {}
        self._load_bank = load_bank

    def check_classes(self, class_names) -> None:
        missing = [c for c in class_names if c not in self.classes]
        if missing:
            raise FiloError(f"--memory_bank {self.dir} has no bank for class {missing[0]!r} "
                            f"(has {', '.join(self.classes)}); build it with `python -m "
                            f"filo.memory build --classes {missing[0]} --out {self.dir}`")

    def meta(self, cls_name: str):
        return self._metas[cls_name]

    def config(self, cls_name: str) -> MemoryConfig:
        return self._cfgs[cls_name]

    def _embedder(self, cls_name: str):
        """The class's feature extractor, with the BatchNorm probe size its bank was built with
        (224 for banks that recorded none)."""
        probe = self._metas[cls_name].extra.get("bn_quirk_size", 224)
        return self._embedders.get(self._cfgs[cls_name], quirk_size=probe)

    def _scorer(self, cls_name: str):
        if cls_name not in self._banks:
            from filo.memory.patchcore import NearestNeighbourScorer

            meta = self._metas[cls_name]
            bank, _ = self._load_bank(self.dir, cls_name,
                                      expect={f: getattr(meta, f) for f in USAGE_FIELDS})
            cfg = self._cfgs[cls_name]
            self._banks[cls_name] = NearestNeighbourScorer(bank, k=meta.num_nn,
                                                           backend=cfg.nn_backend,
                                                           index=cfg.index)
        return self._banks[cls_name]

    def transform(self) -> MemoryInputs:
        """(PIL image, class name) -> memory-bank input, per class's settings."""
        params = {}
        for c, cfg in self._cfgs.items():
            emb = self._embedder(c)
            params[c] = {"resize": cfg.resize, "imagesize": cfg.imagesize, "crop": cfg.crop,
                         "tile": cfg.tile, "mean": list(emb.mean), "std": list(emb.std)}
        return MemoryInputs(params)

    def mask_transform(self) -> MemoryMasks:
        """(mask, class name) -> ground truth on each class's bank input (``--protocol crop``)."""
        return MemoryMasks({c: {"resize": cfg.resize, "imagesize": cfg.imagesize,
                                "crop": cfg.crop} for c, cfg in self._cfgs.items()})

    def score_on_input(self, images, classes: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """(maps at each bank's input geometry -- the centre crop at its imagesize, as the
        original evaluates --, image scores [B])."""
        maps: list[np.ndarray] = [np.zeros((0, 0), dtype=np.float32)] * len(classes)
        scores = np.zeros(len(classes), dtype=np.float64)
        for cls_name in dict.fromkeys(classes):
            idx = [i for i, c in enumerate(classes) if c == cls_name]
            res = self._score_class(images, idx, cls_name)
            for j, i in enumerate(idx):
                maps[i] = res.maps[j]
                scores[i] = res.scores[j]
        return maps, scores

    def _score_class(self, images, idx: list[int], cls_name: str):
        embedder = self._embedder(cls_name)
        rows, grid = embedder.embed(torch.stack([images[i] for i in idx]))
        patches = rows.reshape(len(idx), -1, rows.shape[-1])
        return score_features(patches, self._scorer(cls_name), grid, self._cfgs[cls_name])

    def score(self, images, classes: list[str], orig_sizes, size: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(maps [B, size, size] over the whole image, image scores [B]) against each image's
        class bank. ``images``: a [B, 3, s, s] tensor or a list of per-image tensors."""
        maps = np.zeros((len(classes), size, size), dtype=np.float32)
        scores = np.zeros(len(classes), dtype=np.float64)
        for cls_name in dict.fromkeys(classes):
            idx = [i for i, c in enumerate(classes) if c == cls_name]
            cfg = self._cfgs[cls_name]
            if cfg.tile:
                self._score_tiled(images, idx, cls_name, size, maps, scores)
                continue
            res = self._score_class(images, idx, cls_name)
            fill = float(self._metas[cls_name].calibration.get("pixel_mean",
                                                               float(res.maps.min())))
            for j, i in enumerate(idx):
                crop = crop_box(orig_sizes[i], cfg.resize, cfg.imagesize) if cfg.crop else None
                maps[i] = to_full_geometry(res.maps[j], size, crop, fill)
                scores[i] = res.scores[j]
        return maps, scores

    def _score_tiled(self, images, idx: list[int], cls_name: str, size: int,
                     maps: np.ndarray, scores: np.ndarray) -> None:
        """Tiled bank: each image's native-resolution tiles, maps stitched at the image's size,
        then resized to the run's ``size x size`` (docs/design.md §13.5)."""
        from filo.memory.build import TileLayout, images_per_batch, score_tiles
        from filo.memory.tiles import split_tiles

        cfg = self._cfgs[cls_name]
        embedder = self._embedder(cls_name)
        per_batch = images_per_batch(cfg, 8, embedder.device)
        for i in idx:
            x = images[i]
            tiles, boxes = split_tiles(x, cfg.tile, cfg.tile_overlap)
            parts, grid = [], (0, 0)
            for start in range(0, len(tiles), per_batch):
                rows, grid = embedder.embed(tiles[start:start + per_batch])
                parts.append(rows.reshape(-1, grid[0] * grid[1], rows.shape[-1]))
            res = score_tiles(torch.cat(parts), [TileLayout(0, boxes, tuple(x.shape[-2:]))],
                              self._scorer(cls_name), grid, cfg)[0]
            maps[i] = to_full_geometry(res.maps[0], size, None, 0.0)
            scores[i] = res.scores[0]


def _read_meta(directory: Path, cls_name: str):
    """A bank's meta.json alone (one-line errors as load_bank's)."""
    from filo.memory.bank import BankMeta

    path = Path(directory) / cls_name / "meta.json"
    try:
        return BankMeta.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise FiloError(f"memory bank metadata {path} cannot be read ({type(err).__name__}); "
                        f"rebuild the bank with `python -m filo.memory build`") from None
