"""Building PatchCore memory banks from normal images, and scoring images against them.

Per class (docs/design.md section 13):

1. the normal train images (``--shots K``: K of them, chosen with the seed);
2. calibration images: full-shot, a seeded ``--calib_fraction`` held out of the bank; k-shot,
   leave-one-out (each shot scored against a bank of the other shots);
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
from filo.memory.config import MemoryConfig

logger = logging.getLogger(__name__)

# meta fields that must agree between a bank and the run that uses it
USAGE_FIELDS = ("backbone", "layers", "patchsize", "pretrain_dim", "target_dim", "resize",
                "imagesize", "crop")


def class_rng(seed: int, cls_name: str) -> np.random.Generator:
    """A generator per (seed, class): adding classes never changes another class's draws."""
    return np.random.default_rng([seed, zlib.crc32(cls_name.encode())])


def choose_images(samples: Sequence[Sample], cfg: MemoryConfig, cls_name: str
                  ) -> tuple[list[Sample], list[Sample] | None]:
    """(bank images, calibration images or None for leave-one-out) of one class."""
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
    n_cal = int(round(len(normal) * cfg.calib_fraction)) if len(normal) >= 2 else 0
    n_cal = min(max(n_cal, 1 if cfg.calib_fraction > 0 and len(normal) >= 2 else 0),
                len(normal) - 1)
    held = set(rng.choice(len(normal), size=n_cal, replace=False).tolist()) if n_cal else set()
    return ([s for i, s in enumerate(normal) if i not in held],
            [s for i, s in enumerate(normal) if i in held])


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
                 device: torch.device | str = "cpu", filo_model=None) -> None:
        from filo.memory.features import ClipTowerFeatures, WideResNetFeatures, build_wide_resnet

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
            self.mean, self.std = self.net.mean, self.net.std
            self.weights_id = str(Path(ckpt_path).resolve())
            self.weights_sha256 = weights_checksum(Path(ckpt_path))  # path and content
        else:
            self.layers = cfg.layer_list()
            weights = cfg.weights_path()
            model = build_wide_resnet(cfg.backbone, weights, bn_quirk=not cfg.no_bn_quirk)
            self.net = WideResNetFeatures(model, self.layers)
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            self.weights_id = str(weights) if weights is not None else None
            self.weights_sha256 = weights_checksum(weights)
        self.net = self.net.to(self.device).eval()

    def preprocess(self, img) -> torch.Tensor:
        from filo.memory.transforms import patchcore_tensor

        return patchcore_tensor(img, self.cfg.resize, self.cfg.imagesize, crop=self.cfg.crop,
                                mean=self.mean, std=self.std)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        from filo.memory.patchcore import aggregate

        feats = self.net(images.to(self.device))
        rows, grid = aggregate(list(feats), self.cfg.patchsize, self.cfg.pretrain_dim,
                               self.cfg.target_dim)
        return rows.float().cpu(), tuple(grid)


class EmbedderCache:
    """One backbone per (backbone, layers, weights, BatchNorm quirk), shared by every class whose
    settings differ only in preprocessing or pooling (per-class presets)."""

    def __init__(self, *, ckpt_path: Path | None, device, filo=None) -> None:
        self.ckpt_path, self.device, self.filo = ckpt_path, device, filo
        self._cache: dict[tuple, PatchEmbedder] = {}

    def get(self, cfg: MemoryConfig) -> PatchEmbedder:
        import copy

        key = (cfg.backbone, cfg.layers, str(cfg.weights_path()), cfg.no_bn_quirk)
        if key not in self._cache:
            self._cache[key] = PatchEmbedder(cfg, ckpt_path=self.ckpt_path, device=self.device,
                                             filo_model=self.filo)
        view = copy.copy(self._cache[key])  # same network, this class's settings
        view.cfg = cfg
        return view


def _load_images(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder) -> torch.Tensor:
    from filo.data.dataset import check_image_shape
    from filo.data.transforms import decode_image

    def load(path: Path) -> torch.Tensor:
        img = decode_image(path)
        check_image_shape(img.size, str(path), memory=True)  # one line for a 6000x2 image
        return embedder.preprocess(img)

    return torch.stack([load(root / s.img_path) for s in samples])


def embed_images(root: Path, samples: Sequence[Sample], embedder: PatchEmbedder,
                 batch_size: int = 8, desc: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch features of every image, [len(samples), P, D], and the patch grid."""
    out, grid = [], (0, 0)
    bar = tqdm(total=len(samples), desc=desc, unit="img", leave=False, disable=desc is None)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows, grid = embedder.embed(_load_images(root, chunk, embedder))
        out.append(rows.reshape(len(chunk), -1, rows.shape[-1]))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out), grid


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


def _coreset(rows: torch.Tensor, cfg: MemoryConfig, device) -> torch.Tensor:
    from filo.memory.patchcore import approximate_greedy_coreset

    idx = approximate_greedy_coreset(rows, cfg.coreset_fraction(), seed=cfg.seed, device=device)
    return rows[idx]


def _scorer(bank: torch.Tensor | np.ndarray, cfg: MemoryConfig):
    from filo.memory.patchcore import NearestNeighbourScorer

    return NearestNeighbourScorer(bank, k=cfg.num_nn, backend=cfg.nn_backend, index=cfg.index)


def calibration(maps: np.ndarray, scores: np.ndarray, cfg: MemoryConfig) -> dict[str, Any]:
    """Thresholds and normal statistics from calibration images' maps and image scores."""
    if len(scores) == 0:
        return {"n_images": 0}
    pixels = maps.reshape(-1).astype(np.float64)
    return {
        "n_images": int(len(scores)),
        "image_threshold": float(np.quantile(scores, cfg.calib_quantile)),
        "pixel_threshold": float(np.quantile(pixels, cfg.pixel_quantile)),
        "image_quantile": cfg.calib_quantile, "pixel_quantile": cfg.pixel_quantile,
        "image_mean": float(np.mean(scores)), "image_std": float(np.std(scores)),
        "image_scores": [float(v) for v in scores],  # for fused thresholds at use time
        "pixel_mean": float(pixels.mean()), "pixel_std": float(pixels.std()),
    }


def build_class_bank(root: Path, cls_name: str, samples: Sequence[Sample], cfg: MemoryConfig,
                     embedder: PatchEmbedder, batch_size: int = 8):
    """(bank rows [M, D] float32, meta fields) of one class."""
    bank_imgs, calib_imgs = choose_images(samples, cfg, cls_name)
    feats, grid = embed_images(root, bank_imgs, embedder, batch_size, desc=f"{cls_name} features")
    d = feats.shape[-1]
    bank = _coreset(feats.reshape(-1, d), cfg, embedder.device)
    if calib_imgs is None:  # k-shot: leave one shot out
        maps, scores = [], []
        if len(bank_imgs) >= 2:
            for i in range(len(bank_imgs)):
                others = torch.cat([feats[j] for j in range(len(bank_imgs)) if j != i])
                res = score_features(feats[i:i + 1], _scorer(_coreset(others, cfg,
                                                                       embedder.device), cfg),
                                     grid, cfg)
                maps.append(res.maps)
                scores.append(res.scores)
        else:
            logger.warning("class %s: one shot, no leave-one-out calibration", cls_name)
        cal = calibration(np.concatenate(maps) if maps else np.zeros((0,)),
                          np.concatenate(scores) if scores else np.zeros((0,)), cfg)
        cal["method"] = "leave-one-out over the shots"
        used_for_calibration: list[str] = [s.img_path for s in bank_imgs] if maps else []
    else:
        if calib_imgs:
            cfeats, _ = embed_images(root, calib_imgs, embedder, batch_size)
            res = score_features(cfeats, _scorer(bank, cfg), grid, cfg)
            cal = calibration(res.maps, res.scores, cfg)
        else:
            cal = calibration(np.zeros((0,)), np.zeros((0,)), cfg)
        cal["method"] = f"held-out {cfg.calib_fraction:g} of the normal train images"
        used_for_calibration = [s.img_path for s in calib_imgs]
    meta = {"n_images": len(bank_imgs), "image_paths": [s.img_path for s in bank_imgs],
            "grid": list(grid), "calibration": {**cal, "images": used_for_calibration}}
    return bank.numpy().astype(np.float32), meta


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
        shots=cfg.shots, image_paths=fields["image_paths"], filo_version=__version__,
        calibration=fields["calibration"],
        extra={"score_rule": cfg.score_rule, "topk": cfg.topk, "settings": cfg.to_dict()})


def build_settings(cfg: MemoryConfig, embedder: PatchEmbedder) -> dict[str, Any]:
    """The meta fields a finished bank must match to be reused (resume)."""
    return {"backbone": cfg.backbone, "layers": list(embedder.layers),
            "patchsize": cfg.patchsize, "pretrain_dim": cfg.pretrain_dim,
            "target_dim": cfg.target_dim, "resize": cfg.resize, "imagesize": cfg.imagesize,
            "crop": cfg.crop, "coreset_percentage": cfg.coreset_fraction(),
            "coreset_seed": cfg.seed, "num_nn": cfg.num_nn, "shots": cfg.shots}


@torch.no_grad()
def filo_statistics(root: Path, samples: Sequence[Sample], filo, cls_name: str,
                    batch_size: int = 8) -> dict[str, Any]:
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
    pixels = np.concatenate(maps).reshape(-1).astype(np.float64)
    img = np.concatenate(scores).astype(np.float64)
    return {"n_images": int(len(img)), "image_scores": [float(v) for v in img],
            "pixel_mean": float(pixels.mean()),
            "pixel_std": float(pixels.std()), "image_mean": float(img.mean()),
            "image_std": float(img.std())}


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
                load_bank(out, cls_name, expect=want)
                log(f"[filo] {cls_name}: bank exists with these settings; kept")
                continue
            except FiloError as err:
                log(f"[filo] {cls_name}: rebuilding ({err})")
        bank, fields = build_class_bank(root, cls_name, split[cls_name], cfg_c, embedder,
                                        batch_size)
        if filo is not None and filo.prompts.has_class(cls_name):
            cal_paths = set(fields["calibration"].get("images", []))
            cal_samples = [s for s in split[cls_name] if s.img_path in cal_paths]
            stats = filo_statistics(root, cal_samples, filo, cls_name, batch_size)
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
