"""The test run: predictions for every test image (cached, resumable), then the tables.

Order of work:
1. list the test split (dataset order), open the prediction cache for these settings;
2. predict the images that have no cache entry yet, in batches (detector boxes first when a
   grounding checkpoint is given, then the FiLo maps, then the box fusion), writing each entry
   atomically as soon as it is made;
3. read the cache class by class and compute the metrics; write the table, ``results.json``,
   ``results.csv``, the log, and optionally per-image maps and ``scores.csv``.

``--from_cache`` skips step 2 (no model is loaded) and fails if an entry is missing.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from filo.data.dataset import EvalDataset, collate
from filo.data.layouts import load_split
from filo.data.records import Sample
from filo.errors import FiloError
from filo.evaluation.cache import Prediction, PredictionCache, file_fingerprint
from filo.evaluation.report import ClassResult, class_metrics, render_table, write_results
from filo.fileio import atomic_save_npy, atomic_write_text

logger = logging.getLogger(__name__)

# Bumped when the default computation behind unchanged settings changes (2: a research-layout
# checkpoint runs CLIP with exact GELU), so older cache entries are not reused.
RULES_VERSION = 2


@dataclass
class EvalSettings:
    """Every setting of a test run (the CLI flags)."""

    dataset: str = "mvtec"
    data_path: Path | None = None
    ckpt_path: Path | None = None
    grounded_checkpoint: Path | None = None
    box_threshold: float = 0.25
    text_threshold: float = 0.25
    area_threshold: float = 0.7
    outside_box_factor: float = 0.7
    image_size: int = 518
    device: str | None = None
    batch_size: int = 8
    num_workers: int = 2
    classes: list[str] | None = None
    prompts: Path | None = None
    no_grounding: bool = False
    position: str | None = None
    save_path: Path = Path("outputs/results/test")
    save_maps: Path | None = None
    save_boxes: Path | None = None
    viz_dir: Path | None = None
    viz_limit: int | None = None
    viz_only_errors: bool = False
    viz_lift_boxes: bool = False
    from_cache: bool = False
    score_mode: str = "research"
    autocast: str = "none"  # 'bf16' / 'fp16': faster, not bit-exact (see README, Performance)
    kernels: str = "fast"  # 'reference': plain PyTorch CPU ops (same maps to ~1e-6, slower)
    legacy_macaroni: bool = False
    legacy_phrase_case: bool = False
    legacy_text_threshold: bool = False
    legacy_grid: bool = False
    legacy_box_slices: bool = False
    clip_act: str | None = None  # None: what the checkpoint records / the research rule
    bert_dir: Path | None = None

    @property
    def grounding(self) -> bool:
        return not self.no_grounding and self.grounded_checkpoint is not None

    def prediction_settings(self) -> dict[str, Any]:
        """What changes the per-image predictions (the cache key)."""
        out: dict[str, Any] = {
            "filo_ckpt": file_fingerprint(self.ckpt_path),
            "image_size": self.image_size,
            "prompts": _file_digest(self.prompts),
            "score_mode": self.score_mode,
            "autocast": self.autocast,
            "legacy_macaroni": self.legacy_macaroni,
            "clip_act": self.clip_act or "auto",
            "rules": RULES_VERSION,
            "grounding": self.grounding,
            "position": None if self.grounding else self.position,
        }
        if self.grounding:
            out.update(
                grounded_checkpoint=file_fingerprint(self.grounded_checkpoint),
                box_threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                area_threshold=self.area_threshold,
                outside_box_factor=self.outside_box_factor,
                legacy_phrase_case=self.legacy_phrase_case,
                legacy_text_threshold=self.legacy_text_threshold,
                legacy_grid=self.legacy_grid,
                legacy_box_slices=self.legacy_box_slices,
            )
        return out

    def as_log_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return str(path)


@dataclass
class BatchPredictions:
    """Model output for one batch, on the CPU."""

    anomaly_maps: np.ndarray  # [B, S, S] float32, after the box fusion
    image_scores: np.ndarray  # [B]
    extras: list[dict[str, Any]] = field(default_factory=list)


Predictor = Callable[[dict[str, Any]], BatchPredictions]


def run_test(settings: EvalSettings, *, predictor_factory: Callable[[EvalSettings], Predictor] | None = None,
             log: Callable[[str], None] = print) -> list[ClassResult]:
    """Run a whole test: predict what is not cached, then compute and write the tables."""
    if settings.data_path is None:
        raise FiloError("--data_path is required (the dataset root)")
    split = load_split(settings.data_path, settings.dataset, "test", settings.classes,
                       source="--data_path")
    samples = [s for group in split.values() for s in group]
    out_dir = Path(settings.save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = PredictionCache(out_dir / "cache", settings.prediction_settings())
    todo = [s for s in samples if not cache.has(s.img_path)]
    log(f"[filo] {len(samples)} test images in {len(split)} classes; "
        f"{len(samples) - len(todo)} cached in {cache.dir}")

    if todo:
        if settings.from_cache:
            raise FiloError(f"--from_cache: {len(todo)} of {len(samples)} images have no cached "
                            f"prediction in {cache.dir} (first: {todo[0].img_path}); run without "
                            f"--from_cache to compute them")
        if predictor_factory is None:
            from filo.evaluation.predictor import build_predictor as predictor_factory
            from filo.evaluation.predictor import check_classes, load_prompts_for

            check_classes(load_prompts_for(settings), list(split), str(settings.data_path))
        predictor = predictor_factory(settings)
        _predict_missing(settings, todo, cache, predictor)

    results = _evaluate_classes(split, cache, settings)
    _write_outputs(settings, split, cache, results, out_dir, log)
    return results


def _predict_missing(settings: EvalSettings, todo: Sequence[Sample], cache: PredictionCache,
                     predictor: Predictor) -> None:
    dataset = EvalDataset(todo, settings.data_path, settings.image_size,
                          with_detector_input=settings.grounding)
    loader = DataLoader(dataset, batch_size=max(1, settings.batch_size), shuffle=False,
                        num_workers=max(0, settings.num_workers), collate_fn=collate,
                        persistent_workers=False)
    bar = tqdm(total=len(todo), unit="img", desc="predict", dynamic_ncols=True)
    try:
        for batch in loader:
            out = predictor(batch)
            for i, img_path in enumerate(batch["img_path"]):
                cache.put(Prediction(
                    img_path=img_path, cls_name=batch["cls_name"][i],
                    label=int(batch["label"][i]), image_score=float(out.image_scores[i]),
                    anomaly_map=out.anomaly_maps[i], mask=batch["mask"][i].numpy(),
                    extras=out.extras[i] if out.extras else {},
                ))
            bar.update(len(batch["img_path"]))
    finally:
        bar.close()


def _evaluate_classes(split: dict[str, list[Sample]], cache: PredictionCache,
                      settings: EvalSettings) -> list[ClassResult]:
    results = []
    for cls_name, group in tqdm(split.items(), desc="metrics", unit="class", dynamic_ncols=True):
        preds = [_must_get(cache, s) for s in group]
        maps = np.stack([p.anomaly_map for p in preds])
        masks = np.stack([p.mask for p in preds])
        labels = np.array([p.label for p in preds])
        scores = np.array([p.image_score for p in preds])
        results.append(class_metrics(cls_name, masks, maps, labels, scores))
    return results


def _must_get(cache: PredictionCache, s: Sample) -> Prediction:
    pred = cache.get(s.img_path)
    if pred is None:  # removed or corrupted since it was listed
        raise FiloError(f"cache entry for {s.img_path} in {cache.dir} is unreadable; run the "
                        f"same command again to recompute it")
    return pred


def _write_outputs(settings: EvalSettings, split: dict[str, list[Sample]], cache: PredictionCache,
                   results: list[ClassResult], out_dir: Path, log: Callable[[str], None]) -> None:
    table = render_table(results)
    paths = write_results(out_dir, results, settings.as_log_dict())
    lines = [f"filo test run {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    lines += [f"{k}: {v}" for k, v in settings.as_log_dict().items()]
    lines += [f"cache: {cache.dir}", "", table, ""]
    atomic_write_text(out_dir / "test_log.txt", "\n".join(lines))
    if settings.save_maps is not None:
        _save_maps(settings.save_maps, split, cache)
    if settings.save_boxes is not None and settings.grounding:
        _save_boxes(settings.save_boxes, split, cache)
    if settings.viz_dir is not None:
        index = write_visualisations(settings, split, cache, table)
        log(f"[filo] visualisations: {index}")
    log("")
    log(table)
    log("")
    log(f"[filo] aupro = legacy 200-threshold definition (as published); aupro_exact = MVTec AD "
        f"definition. Results: {paths['md']}, {paths['json']}, {paths['csv']}; log: "
        f"{out_dir / 'test_log.txt'}")


def write_visualisations(settings: EvalSettings, split: dict[str, list[Sample]],
                         cache: PredictionCache, table: str | None) -> Path:
    """One panel per image (input, map overlay on a fixed 0..1 scale, GT outline, boxes) and
    ``index.html``; visual options never touch the cached numbers."""
    from filo.data.transforms import load_rgb
    from filo.viz import VizWriter

    root = Path(settings.data_path) if settings.data_path is not None else None

    def load_image(img_path: str) -> np.ndarray:
        return np.asarray(load_rgb(root / img_path if root is not None else img_path))

    writer = VizWriter(settings.viz_dir, 0.0, 1.0, settings.viz_limit, settings.viz_only_errors,
                       None, settings.viz_lift_boxes, load_image=load_image, root=root)
    total = sum(len(g) for g in split.values())
    with tqdm(total=total, desc="visualise", unit="img", dynamic_ncols=True) as bar:
        for group in split.values():
            for s in group:
                bar.update(1)
                pred = _must_get(cache, s)
                if not writer.wants(s.cls_name, pred.label, pred.image_score):
                    continue
                det = pred.extras.get("detections") or {}
                writer.add(s.img_path, s.cls_name, pred.label, pred.image_score, None,
                           pred.anomaly_map, gt_mask=pred.mask if pred.label else None,
                           boxes=det.get("boxes"), labels=det.get("phrases"),
                           scores=det.get("scores"), matched=det.get("matched"))
    return writer.finish(table, title=f"filo test: {settings.dataset} {settings.data_path}")


def map_file_name(img_path: str, suffix: str) -> Path:
    """Output name for an image: its path relative to the dataset root plus ``suffix``."""
    rel = Path(img_path)
    if rel.is_absolute():
        rel = Path(*rel.parts[1:])
    return rel.parent / (rel.stem + suffix)


def _save_maps(directory: Path, split: dict[str, list[Sample]], cache: PredictionCache) -> None:
    directory = Path(directory)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_path", "class", "label", "image_score"])
    for group in split.values():
        for s in group:
            pred = _must_get(cache, s)
            atomic_save_npy(directory / map_file_name(s.img_path, ".npy"),
                            pred.anomaly_map.astype(np.float32))
            writer.writerow([s.img_path, s.cls_name, pred.label, repr(float(pred.image_score))])
    atomic_write_text(directory / "scores.csv", buf.getvalue())


def _save_boxes(directory: Path, split: dict[str, list[Sample]], cache: PredictionCache) -> None:
    import json

    for group in split.values():
        for s in group:
            pred = _must_get(cache, s)
            det = pred.extras.get("detections")
            if det is None:
                continue
            atomic_write_text(Path(directory) / map_file_name(s.img_path, ".json"),
                              json.dumps(det, indent=1) + "\n")
