"""Building PatchCore memory banks from normal images, and scoring images against them.

Per class (docs/design.md section 13):

1. the normal train images (``--shots K``: K of them, chosen with the seed);
2. calibration images (docs/design.md section 13.2): by default every train image is in the bank
   (the paper's run) and each is scored leave-one-out, against the bank without the rows of its
   own patches; ``--calib_dir``: other normal images scored against the whole bank;
   ``--calib_fraction F``: a seeded fraction held out of the bank, when that is at least 3
   images (else leave-one-out);
3. patch features of the bank images (backbone -> 3x3 neighbourhoods -> pooled, fused), the
   approximate greedy coreset, saved with its settings (``bank.npy`` + ``meta.json``);
4. calibration: image and pixel scores of the calibration images give the thresholds
   (quantiles) and the normal statistics that fusion normalises with.

Classes already built with the same settings are skipped, so an interrupted build resumes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from filo.data.records import Sample
from filo.errors import FiloError
from filo.heap import batch_work
from filo.memory.config import MemoryConfig

logger = logging.getLogger(__name__)

# meta fields that must agree between a bank and the run that uses it
USAGE_FIELDS = ("backbone", "layers", "patchsize", "pretrain_dim", "target_dim", "resize",
                "imagesize", "crop", "tile", "tile_overlap")


def class_rng(seed: int, cls_name: str) -> np.random.Generator:
    """A generator per (seed, class): adding classes never changes another class's draws."""
    return np.random.default_rng([seed, zlib.crc32(cls_name.encode())])


def choose_images(samples: Sequence[Sample], cfg: MemoryConfig, cls_name: str
                  ) -> tuple[list[Sample], list[Sample] | None]:
    """(bank images, calibration images or None for leave-one-out) of one class.

    k-shot: K seeded images, leave-one-out. Full-shot: every normal train image in the bank and
    leave-one-out, or with ``--calib_fraction F`` a seeded ``round(F * N)`` of them held out --
    unless that is fewer than :data:`~filo.calibration.MIN_CALIBRATION_IMAGES`, which would
    calibrate on one or two images: then leave-one-out over all of them (logged).
    ``--calib_dir`` images are added by :func:`calibration_images`.
    """
    from filo.calibration import MIN_CALIBRATION_IMAGES

    normal = [s for s in samples if not s.anomaly]
    if not normal:
        raise FiloError(f"class {cls_name} has no normal train images (expected "
                        f"{cls_name}/train/good/*); a memory bank needs some")
    rng = class_rng(cfg.seed, cls_name)
    if cfg.shots is not None:
        if cfg.shots > len(normal):
            raise FiloError(f"--shots {cfg.shots}: class {cls_name} has only {len(normal)} "
                            f"normal train image(s); use --shots {len(normal)} or fewer")
        pick = sorted(rng.choice(len(normal), size=cfg.shots, replace=False).tolist())
        return [normal[i] for i in pick], None
    if cfg.calib_dir is not None or cfg.calib_fraction <= 0:
        return list(normal), None
    n_cal = int(round(len(normal) * cfg.calib_fraction))
    if n_cal < MIN_CALIBRATION_IMAGES or n_cal > len(normal) - 1:
        logger.info("class %s: --calib_fraction %g of %d images holds out %d; calibrating "
                    "leave-one-out over all of them instead", cls_name, cfg.calib_fraction,
                    len(normal), n_cal)
        return list(normal), None
    held = set(rng.choice(len(normal), size=n_cal, replace=False).tolist())
    return ([s for i, s in enumerate(normal) if i not in held],
            [s for i, s in enumerate(normal) if i in held])


def calibration_images(calib_dir: Path, cls_name: str, n_classes: int = 1) -> list[Sample]:
    """The normal images of ``--calib_dir`` for ``cls_name``
    (:func:`filo.calibration.calibration_files`) as samples with absolute paths."""
    from filo.calibration import calibration_files

    return [Sample(str(p), "", cls_name, "good", 0)
            for p in calibration_files(calib_dir, cls_name, n_classes)]


def weights_checksum(path: Path | None) -> str | None:
    """sha256 of a backbone weights file (cached by path, size and mtime: instant the second
    time)."""
    if path is None or not Path(path).is_file():
        return None
    from filo.assets import ChecksumCache

    return ChecksumCache().sha256(Path(path))


class PatchEmbedder:
    """Backbone + PatchCore aggregation: images -> patch features [B * P, D] on a grid."""

    def __init__(self, cfg: MemoryConfig, *, ckpt_path: Path | None = None,
                 device: torch.device | str = "cpu", filo_model=None,
                 quirk_size: int | None = None, channels_last: bool | None = None) -> None:
        """``quirk_size``: input size of the BatchNorm probe (default ``cfg.imagesize``, as the
        original; banks that recorded no probe size were probed at 224). ``channels_last``
        (default ``cfg.channels_last``): the WideResNet's layout (docs/design.md §13.4)."""
        from filo.memory.features import (
            WIDE_RESNET_LAYERS,
            ClipTowerFeatures,
            WideResNetFeatures,
            build_wide_resnet,
        )

        self.cfg = cfg
        self.device = torch.device(device)
        if cfg.backbone == "clip":
            if ckpt_path is None:
                raise FiloError("--backbone clip needs --ckpt_path: the FiLo checkpoint whose "
                                "CLIP tower provides the features")
            if filo_model is None:  # (a run that already loaded the checkpoint passes it)
                from filo.checkpoint import build_filo_from_checkpoint

                filo_model = build_filo_from_checkpoint(ckpt_path, device="cpu")
            visual = filo_model.clip_model.visual
            n_blocks = len(visual.transformer.resblocks)
            self.layers = cfg.layer_list(n_blocks)
            try:
                blocks = tuple(int(b) for b in self.layers)
            except ValueError:
                raise FiloError(f"--layers {cfg.layers}: CLIP layers are block numbers "
                                f"1..{n_blocks}") from None
            self.net = ClipTowerFeatures(visual, blocks)
            side = self.net.image_size
            if cfg.imagesize != side:  # the tower's position embedding fixes its input size
                raise FiloError(
                    f"--backbone clip: the CLIP tower of {ckpt_path} takes {side} px inputs but "
                    f"this build crops to --imagesize {cfg.imagesize}; pass --resize {side} "
                    f"--imagesize {side} --no_crop (the whole image at {side} px), or "
                    f"--resize R --imagesize {side} with R > {side} for a centre crop")
            self.mean, self.std = self.net.mean, self.net.std
            self.weights_id = str(Path(ckpt_path).resolve())
            self.weights_sha256 = weights_checksum(Path(ckpt_path))  # path and content
            self.quirk_size = None
        else:
            self.layers = cfg.layer_list()
            weights = cfg.weights_path()
            self.quirk_size = int(quirk_size or cfg.imagesize)
            deepest = max(self.layers, key=lambda n: WIDE_RESNET_LAYERS.index(n)
                          if n in WIDE_RESNET_LAYERS else -1)
            model = build_wide_resnet(cfg.backbone, weights, bn_quirk=not cfg.no_bn_quirk,
                                      quirk_size=self.quirk_size, quirk_last_layer=deepest)
            self.net = WideResNetFeatures(model, self.layers)
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            self.weights_id = str(weights) if weights is not None else None
            self.weights_sha256 = weights_checksum(weights)
        # channels-last convolutions: 12-20 % faster on the CPU (oneDNN), the same arithmetic
        # in another order (features move by ~1.4e-6 of their maximum)
        if channels_last is None:
            channels_last = cfg.channels_last
        self.memory_format = (torch.channels_last if channels_last and cfg.backbone != "clip"
                              else torch.contiguous_format)
        self.net = self.net.to(self.device, memory_format=self.memory_format).eval()

    @classmethod
    def from_network(cls, cfg: MemoryConfig, net: torch.nn.Module, *,
                     device: torch.device | str = "cpu", channels_last: bool | None = None
                     ) -> PatchEmbedder:
        """An embedder around an already built WideResNet feature network (seeded random
        weights in benchmarks and tests), laid out as :meth:`__init__` lays it out."""
        emb = cls.__new__(cls)
        emb.cfg, emb.device = cfg, torch.device(device)
        emb.layers = cfg.layer_list()
        emb.mean, emb.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        emb.weights_id = emb.weights_sha256 = None
        emb.quirk_size = None
        last = cfg.channels_last if channels_last is None else channels_last
        emb.memory_format = torch.channels_last if last else torch.contiguous_format
        emb.net = net.to(emb.device, memory_format=emb.memory_format).eval()
        return emb

    def preprocess(self, img) -> torch.Tensor:
        """The network input of one image: ``[3, imagesize, imagesize]``, or with ``--tile``
        the whole image at its native resolution ``[3, H, W]`` (cut into tiles later)."""
        if self.cfg.tile:
            from filo.memory.tiles import tile_tensor

            return tile_tensor(img, self.mean, self.std)
        from filo.memory.transforms import patchcore_tensor

        return patchcore_tensor(img, self.cfg.resize, self.cfg.imagesize, crop=self.cfg.crop,
                                mean=self.mean, std=self.std)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features ``[B * P, D]`` (float32 on the CPU, or written into ``out``)."""
        from filo.memory.patchcore import aggregate

        images = images.to(self.device).contiguous(memory_format=self.memory_format)
        feats = self.net(images)
        if out is not None and out.device != self.device:
            rows, grid = aggregate(list(feats), self.cfg.patchsize, self.cfg.pretrain_dim,
                                   self.cfg.target_dim)
            out.copy_(rows)
            return out, tuple(grid)
        rows, grid = aggregate(list(feats), self.cfg.patchsize, self.cfg.pretrain_dim,
                               self.cfg.target_dim, out=out)
        return (rows if out is not None else rows.float().cpu()), tuple(grid)


class EmbedderCache:
    """One backbone per (backbone, layers, weights, BatchNorm quirk and its probe size, layout),
    shared by every class whose settings differ only in preprocessing or pooling (per-class
    presets). ``channels_last``: the layout of every network (default: each config's
    ``--channels_last``); scoring passes True (no coreset depends on the last bits there)."""

    def __init__(self, *, ckpt_path: Path | None, device, filo=None,
                 channels_last: bool | None = None) -> None:
        self.ckpt_path, self.device, self.filo = ckpt_path, device, filo
        self.channels_last = channels_last
        self._cache: dict[tuple, PatchEmbedder] = {}

    def get(self, cfg: MemoryConfig, quirk_size: int | None = None) -> PatchEmbedder:
        import copy

        probe = None if cfg.no_bn_quirk or cfg.backbone == "clip" else int(
            quirk_size or cfg.imagesize)
        layout = cfg.channels_last if self.channels_last is None else self.channels_last
        key = (cfg.backbone, cfg.layers, str(cfg.weights_path()), cfg.no_bn_quirk, probe, layout)
        if key not in self._cache:
            self._cache[key] = PatchEmbedder(cfg, ckpt_path=self.ckpt_path, device=self.device,
                                             filo_model=self.filo, quirk_size=probe,
                                             channels_last=layout)
        view = copy.copy(self._cache[key])  # same network, this class's settings
        view.cfg = cfg
        return view


# working memory of one image in the WideResNet forward up to layer3, per input pixel (bytes,
# a bound on the activations alive at once: docs/design.md §13.4), which sizes the batches
ACTIVATION_BYTES_PER_PIXEL = 600
# on a CPU, batches beyond this many MB of activations leave the caches: at 512 px a batch of 8
# took 1.12x the time per image of one image (freed pages kept), at 224 px 0.85x
CPU_BATCH_MEMORY_MB = 256


def feature_dtype(cfg: MemoryConfig) -> torch.dtype:
    return torch.float16 if cfg.feature_dtype == "float16" else torch.float32


def images_per_batch(cfg: MemoryConfig, batch_size: int,
                     device: torch.device | str | None = None) -> int:
    """``batch_size``, lowered so that one batch's activations stay within
    ``--batch_memory_mb`` (at least 1), and on a CPU device within
    :data:`CPU_BATCH_MEMORY_MB`: there 224 px images run 8 at a time and 512 px or larger ones
    one by one, the faster choice at both sizes (docs/design.md §13.4)."""
    side = cfg.tile or cfg.imagesize
    per_image = side * side * ACTIVATION_BYTES_PER_PIXEL
    budget = cfg.batch_memory_mb
    if device is not None and torch.device(device).type == "cpu":
        budget = min(budget, CPU_BATCH_MEMORY_MB)
    return max(1, min(int(batch_size), (budget << 20) // per_image))


def _load_images(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder) -> torch.Tensor:
    from filo.data.dataset import check_image_shape
    from filo.data.transforms import decode_image

    def load(path: Path) -> torch.Tensor:
        img = decode_image(path)
        check_image_shape(img.size, str(path), memory=True)  # one line for a 6000x2 image
        return embedder.preprocess(img)

    return torch.stack([load(root / s.img_path) for s in samples])


@dataclass
class TileLayout:
    """Where one image's tiles lie: units ``first .. first + len(boxes)`` of the features."""

    first: int
    boxes: list[tuple[int, int]]
    size: tuple[int, int]  # (H, W) of the image


def _units(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder):
    """Network inputs one by one: images, or with ``--tile`` every image's tiles (with each
    image's layout)."""
    from filo.data.transforms import decode_image

    cfg = embedder.cfg
    for s in samples:
        x = embedder.preprocess(decode_image(root / s.img_path))
        if not cfg.tile:
            yield x, None
            continue
        from filo.memory.tiles import split_tiles

        tiles, boxes = split_tiles(x, cfg.tile, cfg.tile_overlap)
        for j, t in enumerate(tiles):
            yield t, ((boxes, tuple(x.shape[-2:])) if j == 0 else None)


class FeatureBuffer:
    """Patch features stored as they arrive: ``[units, P, D]`` preallocated for ``capacity``
    units in ``dtype`` (grown only if images hold more tiles than the first one)."""

    def __init__(self, capacity: int, dtype: torch.dtype) -> None:
        self.capacity, self.dtype = max(1, capacity), dtype
        self.data: torch.Tensor | None = None
        self.n = 0

    def slot(self, count: int, p: int, d: int) -> torch.Tensor:
        if self.data is None:
            self.data = torch.empty(self.capacity, p, d, dtype=self.dtype)
        if self.n + count > self.data.shape[0]:
            grown = torch.empty(max(self.n + count, 2 * self.data.shape[0]), p, d,
                                dtype=self.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        view = self.data[self.n:self.n + count].view(count * p, d)
        self.n += count
        return view

    def result(self) -> torch.Tensor:
        return self.data[: self.n] if self.data is not None else torch.zeros(0, 0, 0)

    def embed(self, embedder: PatchEmbedder, x: torch.Tensor) -> tuple[int, int]:
        """Patch features of the batch ``x`` written straight into the buffer (the first image
        alone the first time: it gives the patch count and dimension); returns the grid."""
        if self.data is None:
            rows, grid = embedder.embed(x[:1])
            self.slot(1, rows.shape[0], rows.shape[1]).copy_(rows)
            x = x[1:]
            if not len(x):
                return grid
        p, d = self.data.shape[1:]
        return embedder.embed(x, out=self.slot(len(x), p, d))[1]


def embed_units(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder,
                batch_size: int = 8, desc: str | None = None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, tuple[int, int], list[TileLayout] | None]:
    """Patch features of every image (or tile), ``[units, P, D]``, the grid, and with ``--tile``
    each image's :class:`TileLayout`.

    Features go straight into one preallocated array (``dtype``, default ``--feature_dtype``);
    batches hold at most :func:`images_per_batch` units.
    """
    cfg = embedder.cfg
    dtype = dtype or feature_dtype(cfg)
    per_batch = images_per_batch(cfg, batch_size, embedder.device)
    layouts: list[TileLayout] | None = [] if cfg.tile else None
    buf: FeatureBuffer | None = None
    grid = (0, 0)
    bar = tqdm(total=len(samples), desc=desc, unit="img", leave=False, disable=desc is None)
    pending: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal buf, grid
        if not pending:
            return
        x = torch.stack(pending)
        pending.clear()
        if buf is None:
            units_per_image = len(layouts[0].boxes) if layouts else 1
            buf = FeatureBuffer(len(samples) * units_per_image, dtype)
        grid = buf.embed(embedder, x)

    for x, layout in _units(root, samples, embedder):
        if layout is not None:
            done = (buf.n if buf is not None else 0) + len(pending)
            layouts.append(TileLayout(done, layout[0], layout[1]))
            if len(layouts) > 1:
                bar.update(1)
        elif layouts is None:
            bar.update(1)
        pending.append(x)
        if len(pending) == per_batch:
            flush()
    flush()
    if layouts:
        bar.update(1)
    bar.close()
    return (buf.result() if buf is not None else torch.zeros(0, 0, cfg.target_dim)), grid, layouts


def embed_images(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder,
                 batch_size: int = 8, desc: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch features of every image, [len(samples), P, D], and the patch grid (not tiled)."""
    feats, grid, _ = embed_units(root, samples, embedder, batch_size, desc)
    return feats, grid


@dataclass
class ScoredImages:
    maps: np.ndarray  # [B, imagesize, imagesize] float32
    scores: np.ndarray  # [B]


def score_features(patches: torch.Tensor, scorer, grid: tuple[int, int], cfg: MemoryConfig
                   ) -> ScoredImages:
    """Patch features [B, P, D] -> smoothed maps at the input size and image scores."""
    from filo.memory.patchcore import image_scores, score_map

    b, p, d = patches.shape
    patch_scores = np.asarray(scorer.scores(patches.reshape(b * p, d))).reshape(b, p)
    maps, grid_scores = score_map(patch_scores, grid, cfg.imagesize)
    return ScoredImages(np.asarray(maps, dtype=np.float32),
                        np.asarray(image_scores(grid_scores, cfg.score_rule, cfg.topk)))


def score_tiles(patches: torch.Tensor, layouts: Sequence[TileLayout], scorer,
                grid: tuple[int, int], cfg: MemoryConfig) -> list[ScoredImages]:
    """Tiled features [units, P, D] -> per image a stitched map at its native size [1, H, W]
    (tile maps upsampled, overlaps averaged, then the Gaussian over the whole image) and its
    image score over all its tiles' patches (docs/design.md §13.5)."""
    from scipy import ndimage

    from filo.memory.patchcore import image_scores, score_map
    from filo.memory.tiles import stitch

    out = []
    for lay in layouts:
        units = patches[lay.first:lay.first + len(lay.boxes)]
        t, p, d = units.shape
        patch_scores = np.asarray(scorer.scores(units.reshape(t * p, d))).reshape(t, p)
        tile_maps, grid_scores = score_map(patch_scores, grid, cfg.tile, sigma=0)
        full = ndimage.gaussian_filter(stitch(tile_maps, lay.boxes, lay.size), sigma=4.0)
        out.append(ScoredImages(full[None].astype(np.float32),
                                image_scores(grid_scores.reshape(1, -1), cfg.score_rule,
                                             cfg.topk)))
    return out


def score_units(patches: torch.Tensor, layouts, scorer, grid, cfg: MemoryConfig
                ) -> ScoredImages:
    """:func:`score_features` or, tiled, :func:`score_tiles` with the maps' pixels flattened
    per image (images may differ in size)."""
    if layouts is None:
        return score_features(patches, scorer, grid, cfg)
    res = score_tiles(patches, layouts, scorer, grid, cfg)
    if not res:
        return ScoredImages(np.zeros((0,), np.float32), np.zeros((0,), np.float32))
    maps = [r.maps for r in res]
    same = all(m.shape == maps[0].shape for m in maps)
    return ScoredImages(np.concatenate(maps) if same else
                        np.concatenate([m.reshape(-1) for m in maps]),
                        np.concatenate([r.scores for r in res]))


def _coreset(rows: torch.Tensor, cfg: MemoryConfig, device) -> torch.Tensor:
    """Indices of the bank rows among ``rows`` (pick order)."""
    from filo.memory.patchcore import approximate_greedy_coreset

    idx = approximate_greedy_coreset(rows, cfg.coreset_fraction(), seed=cfg.seed, device=device,
                                     rng=cfg.coreset_rng_name(), arch=cfg.backbone)
    return idx


def _streamed_bank(root: Path, imgs: Sequence[Sample], embedder: PatchEmbedder,
                   cfg: MemoryConfig, batch_size: int, desc: str | None
                   ) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The bank chosen in stages when the images' patch features would exceed
    ``--feature_memory_mb`` (docs/design.md §13.5), else None (one coreset of all features).

    Blocks of images whose features fit half the budget are embedded one after another; each
    keeps its own coreset (fraction ``sqrt(p)``, lowered so that what all blocks keep fits the
    other half, never below ``p``) and is freed; the union's coreset then has the size of a
    one-stage coreset, ``int(N * p)`` rows.
    """
    from filo.memory.patchcore import approximate_greedy_coreset

    frac = cfg.coreset_fraction()
    if frac >= 1 or len(imgs) < 2:
        return None
    probe, _, _ = embed_units(root, imgs[:1], embedder, batch_size)
    per_image = probe.numel() * probe.element_size()
    budget = cfg.feature_memory_mb << 20
    total = per_image * len(imgs)
    if total <= budget:
        return None
    block = max(1, (budget // 2) // per_image)
    first = max(frac, min(frac ** 0.5, (budget / 2) / total))
    kept, n_rows, grid = [], 0, (0, 0)
    for i in range(0, len(imgs), block):
        feats, grid, _ = embed_units(root, imgs[i:i + block], embedder, batch_size, desc)
        rows = feats.reshape(-1, feats.shape[-1])
        n_rows += rows.shape[0]
        kept.append(rows[approximate_greedy_coreset(rows, first, seed=cfg.seed + i,
                                                    device=embedder.device)].clone())
        del feats, rows
    union = torch.cat(kept)
    del kept
    want = int(n_rows * frac)
    idx = approximate_greedy_coreset(union, min(1.0, want / max(1, len(union))), seed=cfg.seed,
                                     device=embedder.device)
    logger.info("staged coreset: %d rows from %d in %d blocks", len(idx), n_rows,
                -(-len(imgs) // block))
    return union[idx], grid


def _scorer(bank: torch.Tensor | np.ndarray, cfg: MemoryConfig):
    from filo.memory.patchcore import NearestNeighbourScorer

    return NearestNeighbourScorer(bank, k=cfg.num_nn, backend=cfg.nn_backend, index=cfg.index)


def calibration(maps: np.ndarray, scores: np.ndarray, cfg: MemoryConfig,
                cls_name: str | None = None) -> dict[str, Any]:
    """Thresholds and normal statistics from calibration images' maps and image scores
    (:mod:`filo.calibration`: quantile thresholds, mean, std floored with a warning)."""
    from filo.calibration import image_statistics, pixel_statistics

    out = image_statistics(scores, cfg.calib_quantile, cls_name)
    if out["n_images"]:
        out.update(pixel_statistics(maps, cfg.pixel_quantile, cls_name, out["n_images"]))
    return out


def leave_one_out(feats: torch.Tensor, bank_idx: torch.Tensor, grid: tuple[int, int],
                  cfg: MemoryConfig, layouts: Sequence[TileLayout] | None = None
                  ) -> ScoredImages:
    """Each image of ``feats`` [units, P, D] (one unit per image, or its tiles when
    ``layouts`` is given) scored against the bank rows (``bank_idx`` into the flattened
    features) that did not come from its own patches. Maps are flattened per image when the
    images are tiled (they may differ in size)."""
    units, p, d = feats.shape
    flat = feats.reshape(-1, d)
    spans = ([(lay.first, lay.first + len(lay.boxes)) for lay in layouts]
             if layouts is not None else [(i, i + 1) for i in range(units)])
    owner = torch.empty(units, dtype=torch.long)
    for i, (lo, hi) in enumerate(spans):
        owner[lo:hi] = i
    source = owner[bank_idx // p]  # the image each bank row came from
    maps: list[np.ndarray] = []
    full: np.ndarray | None = None  # untiled: every map written into one array as it comes
    scores = []
    for i, (lo, hi) in enumerate(spans):
        keep = bank_idx[source != i]
        lay = None if layouts is None else [TileLayout(0, layouts[i].boxes, layouts[i].size)]
        res = score_units(feats[lo:hi], lay, _scorer(flat[keep], cfg), grid, cfg)
        if layouts is None:
            if full is None:
                full = np.empty((units, *res.maps.shape[1:]), dtype=res.maps.dtype)
            full[i] = res.maps[0]
        else:
            maps.append(res.maps.reshape(-1))
        scores.append(res.scores)
    return ScoredImages(full if layouts is None else np.concatenate(maps),
                        np.concatenate(scores))


def build_class_bank(root: Path, cls_name: str, samples: Sequence[Sample], cfg: MemoryConfig,
                     embedder: PatchEmbedder, batch_size: int = 8, n_classes: int = 1):
    """(bank rows [M, D] float32, meta fields) of one class."""
    bank_imgs, calib_imgs = choose_images(samples, cfg, cls_name)
    if cfg.calib_dir is not None and cfg.shots is None:
        calib_imgs = calibration_images(cfg.calib_dir, cls_name, n_classes)
    cfg.check_tiles()
    desc = f"{cls_name} features"
    # staged coreset (features beyond --feature_memory_mb) only with separate calibration
    # images: leave-one-out needs every image's features
    streamed = (_streamed_bank(root, bank_imgs, embedder, cfg, batch_size, desc)
                if calib_imgs is not None else None)
    feats, layouts = None, None
    if streamed is not None:
        bank, grid = streamed
    else:
        feats, grid, layouts = embed_units(root, bank_imgs, embedder, batch_size, desc=desc)
        d = feats.shape[-1]
        bank_idx = _coreset(feats.reshape(-1, d), cfg, embedder.device)
        bank = feats.reshape(-1, d)[bank_idx]
    if calib_imgs is None:  # leave one out: each image against the others' bank rows
        if len(bank_imgs) >= 2:
            res = leave_one_out(feats, bank_idx, grid, cfg, layouts)
            feats = None  # the statistics need only the maps (the peak is the features)
            cal = calibration(res.maps, res.scores, cfg, cls_name)
            used_for_calibration: list[str] = [s.img_path for s in bank_imgs]
        else:
            logger.warning("class %s: one normal train image, no leave-one-out calibration "
                           "(give --calib_dir)", cls_name)
            cal, used_for_calibration = calibration(np.zeros((0,)), np.zeros((0,)), cfg), []
        cal["method"] = ("leave-one-out over the shots" if cfg.shots is not None else
                         "leave-one-out over the train images")
    else:
        feats = None  # (freed before the calibration images are embedded)
        if calib_imgs:
            cfeats, _, clayouts = embed_units(root, calib_imgs, embedder, batch_size)
            res = score_units(cfeats, clayouts, _scorer(bank, cfg), grid, cfg)
            cal = calibration(res.maps, res.scores, cfg, cls_name)
        else:
            cal = calibration(np.zeros((0,)), np.zeros((0,)), cfg)
        cal["method"] = (f"--calib_dir {cfg.calib_dir}" if cfg.calib_dir is not None else
                         f"held-out {cfg.calib_fraction:g} of the normal train images")
        used_for_calibration = [s.img_path for s in calib_imgs]
    meta = {"n_images": len(bank_imgs), "image_paths": [s.img_path for s in bank_imgs],
            "grid": list(grid), "calibration": {**cal, "images": used_for_calibration}}
    return bank.float().numpy(), meta


def bank_meta(cfg: MemoryConfig, embedder: PatchEmbedder, bank: np.ndarray, fields: dict):
    from filo import __version__
    from filo.memory.bank import BankMeta

    return BankMeta(
        backbone=cfg.backbone, weights=embedder.weights_id,
        weights_sha256=embedder.weights_sha256,
        layers=list(embedder.layers), patchsize=cfg.patchsize, pretrain_dim=cfg.pretrain_dim,
        target_dim=cfg.target_dim, resize=cfg.resize, imagesize=cfg.imagesize, crop=cfg.crop,
        coreset_percentage=cfg.coreset_fraction(), coreset_seed=cfg.seed, num_nn=cfg.num_nn,
        n_images=fields["n_images"], n_patches=int(bank.shape[0]), grid=fields["grid"],
        tile=cfg.tile, tile_overlap=cfg.tile_overlap if cfg.tile else 0,
        shots=cfg.shots, image_paths=fields["image_paths"], filo_version=__version__,
        calibration=fields["calibration"],
        extra={"score_rule": cfg.score_rule, "topk": cfg.topk, "settings": cfg.to_dict(),
               "bn_quirk_size": getattr(embedder, "quirk_size", None)})


def build_settings(cfg: MemoryConfig, embedder: PatchEmbedder) -> dict[str, Any]:
    """The meta fields a finished bank must match to be reused (resume)."""
    return {"backbone": cfg.backbone, "layers": list(embedder.layers),
            "patchsize": cfg.patchsize, "pretrain_dim": cfg.pretrain_dim,
            "target_dim": cfg.target_dim, "resize": cfg.resize, "imagesize": cfg.imagesize,
            "crop": cfg.crop, "coreset_percentage": cfg.coreset_fraction(),
            "coreset_seed": cfg.seed, "num_nn": cfg.num_nn, "shots": cfg.shots,
            "tile": cfg.tile, "tile_overlap": cfg.tile_overlap if cfg.tile else 0}


# settings recorded in meta.json's extra.settings that change the rows or the calibration
RECIPE_FIELDS = ("calib_fraction", "calib_dir", "calib_quantile", "pixel_quantile",
                 "coreset_rng", "no_bn_quirk")


def _check_recipe(meta, cfg: MemoryConfig, embedder: PatchEmbedder) -> None:
    """FiloError naming the first calibration / coreset setting that differs from the bank's."""
    have = dict(meta.extra.get("settings") or {})
    want = cfg.to_dict()
    for key in RECIPE_FIELDS:
        if have.get(key, "(unrecorded)") != want[key]:
            raise FiloError(f"built with {key}={have.get(key, '(unrecorded)')!r}, this run "
                            f"uses {want[key]!r}")
    if meta.extra.get("bn_quirk_size") != getattr(embedder, "quirk_size", None):
        raise FiloError(f"BatchNorm probe at {meta.extra.get('bn_quirk_size', 224)}, this run "
                        f"probes at {getattr(embedder, 'quirk_size', None)}")


@torch.no_grad()
def filo_statistics(root: Path, samples: Sequence[Sample], filo, cls_name: str,
                    batch_size: int = 8, quantile: float = 0.99) -> dict[str, Any]:
    """Normal-image statistics of FiLo's maps and image scores (no box step, all positions) for
    ``--fusion mean|max``: the same images as the memory calibration."""
    from filo.data.transforms import clip_tensor, decode_image

    maps, scores = [], []
    size = filo.config.image_size
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        x = torch.stack([clip_tensor(decode_image(root / s.img_path), size) for s in chunk])
        out = filo.predict(x, [cls_name] * len(chunk), [None] * len(chunk))
        maps.append(out.anomaly_map.float().cpu().numpy())
        scores.append(out.image_score.float().cpu().numpy())
    if not maps:
        return {}
    from filo.calibration import image_statistics, pixel_statistics

    img = np.concatenate(scores).astype(np.float64)
    out = image_statistics(img, quantile, f"{cls_name} (FiLo)")
    out.update(pixel_statistics(np.concatenate(maps), None, f"{cls_name} (FiLo)", len(img)))
    return out


@batch_work
def build_banks(root: Path, split: dict[str, list[Sample]], cfg: MemoryConfig, out: Path, *,
                ckpt_path: Path | None = None, device: str | None = None, batch_size: int = 8,
                filo=None, log: Callable[[str], None] = print, dist=None) -> list[str]:
    """Build (or reuse) one bank per class under ``out``; returns the classes built now.

    ``filo`` (a FiLo model): also record FiLo's normal-image statistics on the calibration
    images, which ``--fusion mean|max`` needs.
    """
    from filo.device import resolve_device
    from filo.memory.bank import load_bank, save_bank

    preset = None
    if cfg.preset is not None:
        from filo.memory.presets import load_preset

        preset = load_preset(cfg.preset)
    configs = {c: preset.config_for(cfg, c) if preset is not None else cfg for c in split}
    for cls_name, samples in split.items():  # every class's image choice, before any work
        choose_images(samples, configs[cls_name], cls_name)
        if configs[cls_name].calib_dir is not None and configs[cls_name].shots is None:
            calibration_images(configs[cls_name].calib_dir, cls_name, len(split))
    embedders = EmbedderCache(ckpt_path=ckpt_path, device=resolve_device(device), filo=filo)
    built = []
    # under torchrun each process builds whole classes (features, coreset, calibration): every
    # world_size-th class from its rank; the bank of a class never mixes processes
    mine = dist.shard(list(split)) if dist is not None else list(split)
    for cls_name in tqdm(mine, desc="memory banks", unit="class"):
        cfg_c = configs[cls_name]
        embedder = embedders.get(cfg_c)
        want = build_settings(cfg_c, embedder)
        if (Path(out) / cls_name / "meta.json").is_file():
            try:
                _, old_meta = load_bank(out, cls_name, expect=want)
                _check_recipe(old_meta, cfg_c, embedder)
                log(f"[filo] {cls_name}: bank exists with these settings; kept")
                continue
            except FiloError as err:
                log(f"[filo] {cls_name}: rebuilding ({err})")
        bank, fields = build_class_bank(root, cls_name, split[cls_name], cfg_c, embedder,
                                        batch_size, n_classes=len(split))
        if filo is not None and filo.prompts.has_class(cls_name):
            cal_paths = set(fields["calibration"].get("images", []))
            cal_samples = [s for s in split[cls_name] if s.img_path in cal_paths]
            if cfg_c.calib_dir is not None and cfg_c.shots is None:
                cal_samples = calibration_images(cfg_c.calib_dir, cls_name, len(split))
            stats = filo_statistics(root, cal_samples, filo, cls_name, batch_size,
                                    cfg_c.calib_quantile)
            if stats:
                fields["calibration"]["filo"] = stats
        save_bank(out, cls_name, bank, bank_meta(cfg_c, embedder, bank, fields))
        cal = fields["calibration"]
        thr = (f"image threshold {cal['image_threshold']:.4g}" if "image_threshold" in cal
               else "no calibration images")
        log(f"[filo] {cls_name}: {bank.shape[0]} patches from {fields['n_images']} image(s); "
            f"{thr}")
        built.append(cls_name)
    return built
