"""The evaluation run: predictions for every test image (cached, resumable), then the tables.

Used by test.py (FiLo, with or without the box step) and by detector-only runs
(``python -m filo.detect``): both are a :class:`~filo.pipeline.PipelineConfig` plus a
:class:`RunConfig` (which data, which outputs). Order of work:

1. list the test split (dataset order), open the prediction cache for these settings;
2. build the pipeline and predict the images that have no cache entry yet, in batches, writing
   each entry atomically as soon as it is made;
3. read the cache class by class and compute the metrics; write the table, ``results.json``,
   ``results.csv``, the log, and optionally per-image maps, box JSON files, COCO detections,
   the COCO box evaluation against the masks (``--coco_eval``) and visualisations.

``--from_cache`` skips step 2 (no model is loaded) and fails if an entry is missing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from filo.data.dataset import EvalDataset, collate
from filo.data.layouts import load_split
from filo.data.records import Sample
from filo.distributed import DistContext
from filo.errors import FiloError
from filo.evaluation.cache import Prediction, PredictionCache, input_identity
from filo.evaluation.report import (
    COLUMNS,
    EXTRA_COLUMNS,
    IMAGE_COLUMNS,
    MAD_COLUMNS,
    SAMPLE_COLUMNS,
    ClassResult,
    class_metrics,
    coco_payload,
    render_coco_table,
    render_table,
    sample_metrics,
    write_results,
)
from filo.fileio import atomic_save_npy, atomic_write_text, check_writable_dir, output_file
from filo.heap import batch_work
from filo.pipeline import Pipeline, PipelineConfig, build_pipeline
from filo.settings import as_dict, at_least, setting

logger = logging.getLogger(__name__)
PIXEL_COLUMNS = ("auroc_px", "f1_px", "ap_px", "aupro", "aupro_exact")

DATASETS = ("mvtec", "visa", "folder", "meta", "mpdd", "btad", "mvtec_ad2", "realiad", "auto")
DATA_ENV = {"mvtec": "MVTEC_ROOT", "visa": "VISA_ROOT", "mpdd": "MPDD_ROOT",
            "btad": "BTAD_ROOT", "mvtec_ad2": "MVTEC_AD2_ROOT", "realiad": "REALIAD_ROOT"}


PROTOCOLS = ("image", "crop")


@dataclass
class RunConfig:
    """Which images a run evaluates and what it writes (the pipeline settings are apart)."""

    dataset: str = setting("mvtec", "dataset layout of --data_path", choices=DATASETS)
    data_path: Path | None = setting(None, "dataset root",
                                     default_help="$MVTEC_ROOT or $VISA_ROOT by --dataset")
    classes: str | None = setting(None, "comma-separated class names to evaluate",
                                  default_help="all, in dataset order")
    batch_size: int = setting(8, "images per forward pass", check=at_least(1))
    num_workers: int = setting(2, "data-loading worker processes", check=at_least(0))
    save_path: Path | None = setting(
        None, "results folder: table, results.json/.csv, log, prediction cache",
        default_help="$RESULTS_DIR/test_<dataset> (detector-only: detect_<dataset>)")
    save_maps: Path | None = setting(None, "write one float32 .npy map per image and scores.csv "
                                     "here")
    save_boxes: Path | None = setting(None, "write the detector's boxes as one JSON per image here")
    save_coco: Path | None = setting(
        None, "write all kept boxes as COCO detections to this file (bbox x,y,w,h in original "
        "pixels, score, category = the matched prompt word or 'anomaly')", metavar="FILE")
    coco_eval: bool = setting(
        False, "score the kept boxes with COCO box AP (pycocotools; AP, AP50, AP75, AR@100 per "
        "class and overall) against ground-truth boxes built from the masks, one per connected "
        "defect region; needs masks and the box step; writes coco_gt.json, "
        "coco_detections.json and coco_eval.csv to --save_path")
    pixel_metrics: bool = setting(
        False, "detector-only runs: also score the box maps against the masks (FiLo runs always "
        "do)")
    viz_dir: Path | None = setting(None, "write visualisations (panels and index.html) here")
    viz_limit: int | None = setting(None, "at most N visualisations per class", check=at_least(0),
                                    default_help="all", metavar="N")
    viz_only_errors: bool = setting(False, "visualise only misclassified images (per-class "
                                    "F1-optimal threshold)")
    viz_lift_boxes: bool = setting(False, "visual only: raise the shown heat inside detector "
                                   "boxes", aliases=("--lift_boxes",))
    from_cache: bool = setting(False, "recompute the tables from cached predictions without "
                               "running any model")
    allow_outside_root: bool = setting(
        False, "accept images listed outside the dataset root (absolute paths or '..' in "
        "meta.json / split_csv); their outputs go to _outside/ in the output folders")
    realiad_split: Path | None = setting(
        None, "--dataset realiad: the split variant to read, a folder of <class>.json files "
        "(realiad_jsons_sv, realiad_jsons_fuiad_0.2, ...) or one multi-class JSON file; "
        "relative to --data_path or its realiad_jsons/, or absolute",
        default_help="the multi-view realiad_jsons")
    protocol: str = setting(
        "image", "map geometry of the metrics: image (maps and masks over the whole image) or "
        "crop (the PatchCore paper's protocol, memory bank alone: maps and masks on the bank's "
        "centre crop at its --imagesize, masks defective only where they stay 255 after "
        "resizing)", choices=PROTOCOLS)

    normal_dir: str | None = setting(
        None, "--dataset folder, a tree in no layout (anomalib's Folder names): folder of normal "
        "training images, relative to --data_path (its last fifth is tested unless "
        "--normal_test_dir is given)", metavar="DIR")
    abnormal_dir: str | None = setting(
        None, "--dataset folder: a folder of anomalous test images, one defect type (repeat the "
        "flag for several)", metavar="DIR", repeatable=True)
    mask_dir: str | None = setting(
        None, "--dataset folder: masks of the --abnormal_dir images ({name}_mask.png or "
        "{name}.png, in DIR/<defect>/ or DIR/)", metavar="DIR", default_help="no masks")
    normal_test_dir: str | None = setting(
        None, "--dataset folder: folder of normal test images", metavar="DIR",
        default_help="the last fifth of --normal_dir")

    def folder_spec(self):
        """The named folders of ``--normal_dir`` ... (:class:`~filo.data.layouts.FolderSpec`)."""
        from filo.data.layouts import FolderSpec

        dirs = tuple(d.strip() for d in (self.abnormal_dir or "").split(",") if d.strip())
        return FolderSpec(normal_dir=self.normal_dir, abnormal_dirs=dirs, mask_dir=self.mask_dir,
                          normal_test_dir=self.normal_test_dir)
    mask_rule: str = setting(
        "filo", "ground-truth binarisation after the resize to the map size: filo's (> 0.5) or "
        "the MuSc code's ('musc': == 255 for every layout but visa, > 0 for visa), to compare "
        "with its published numbers", choices=("filo", "musc"))

    def class_list(self) -> list[str] | None:
        if not self.classes:
            return None
        return [c.strip() for c in self.classes.split(",") if c.strip()] or None

    def resolved(self, prefix: str = "test") -> RunConfig:
        """Defaults from the environment filled in: data path and results folder."""
        from dataclasses import replace

        out = replace(self)
        if out.data_path is None:
            env = DATA_ENV.get(out.dataset)
            if env and os.environ.get(env):
                out.data_path = Path(os.environ[env])
            else:
                raise FiloError("--data_path is required (or set MVTEC_ROOT / VISA_ROOT via "
                                "env.sh)")
        if out.save_path is None:
            out.save_path = Path(os.environ.get("RESULTS_DIR", "outputs/results")) / \
                f"{prefix}_{out.dataset}"
        return out


PipelineFactory = Callable[[PipelineConfig], Pipeline]


def _quiet(*_args) -> None:
    """Log function of the processes other than rank 0 (which alone reports)."""


def check_outputs_writable(run: RunConfig) -> None:
    """Every output folder of the run can be written (checked before anything is loaded), and
    no visualisation flag is given without ``--viz_dir`` (it would have no effect)."""
    if run.viz_dir is None:
        idle = [flag for flag, given in (("--viz_limit", run.viz_limit is not None),
                                         ("--viz_only_errors", run.viz_only_errors),
                                         ("--viz_lift_boxes", run.viz_lift_boxes)) if given]
        if idle:
            raise FiloError(f"{idle[0]} shapes the visualisations, which are written only with "
                            f"--viz_dir: it has no effect without it; add --viz_dir DIR or "
                            f"drop it")
    check_writable_dir(run.save_path or "outputs/results/test", "--save_path")
    for flag in ("save_maps", "save_boxes", "viz_dir"):
        if getattr(run, flag) is not None:
            check_writable_dir(getattr(run, flag), f"--{flag}")
    if run.save_coco is not None:
        check_writable_dir(Path(run.save_coco).parent, "--save_coco (its folder)")


class _Unreadable(FiloError):
    """A cache entry listed as present could not be read back (torn or removed meanwhile)."""

    def __init__(self, sample: Sample) -> None:
        super().__init__(f"the cache entry of {sample.img_path} could not be read; run the same "
                         f"command again to recompute it")
        self.sample = sample


@batch_work
def run_evaluation(run: RunConfig, pipeline: PipelineConfig, *,
                   pipeline_factory: PipelineFactory | None = None,
                   log: Callable[[str], None] = print,
                   dist: DistContext | None = None) -> list[ClassResult]:
    """Run a whole evaluation: predict what is not cached, then compute and write the tables.

    Cheap checks come first (output folders writable, dataset listing, prompt file and classes),
    so a bad input is one error line before any model is loaded or any cache folder is made.
    Under torchrun (``dist``), each process predicts its shard of the missing images and rank 0
    alone computes and writes the results (the other processes return an empty list).
    """
    dist = dist or DistContext()
    if not dist.is_main:
        log = _quiet
    if run.data_path is None:
        raise FiloError("--data_path is required (the dataset root)")
    if not run.from_cache:
        pipeline.check_usable()
    check_outputs_writable(run)
    split = load_split(run.data_path, run.dataset, "test", run.class_list(),
                       source="--data_path", allow_outside_root=run.allow_outside_root,
                       realiad_split=run.realiad_split, folders=run.folder_spec())
    coco_classes = coco_eval_classes(run, pipeline, split, log) if run.coco_eval else []
    empty = [c for c, group in split.items() if not group]
    for cls_name in empty:
        logger.warning("class %s has no test images; it is left out of the table and the means",
                       cls_name)
        log(f"[filo] warning: class {cls_name} has no test images under {run.data_path}; "
            f"left out of the table and the means")
    split = {c: group for c, group in split.items() if group}
    if not split:
        raise FiloError(f"no test images under {run.data_path} ({run.dataset} layout)")
    samples = [s for group in split.values() for s in group]
    if run.protocol == "crop" and pipeline.fusion_mode != "memory":
        raise FiloError("--protocol crop evaluates a memory bank alone on its centre crop: give "
                        "--memory_bank with --fusion memory (no FiLo or fused maps)")
    if pipeline.uses_musc and pipeline.musc_k is None:  # the original's k list of the dataset
        from dataclasses import replace

        from filo.musc.config import k_list_for

        pipeline = replace(pipeline, musc_k=",".join(map(str, k_list_for(run.dataset))))
    prompts = None
    if not run.from_cache and pipeline_factory is None:
        from filo.pipeline import generic_prompts_note, load_pipeline_prompts

        prompts = load_pipeline_prompts(pipeline)
        if pipeline.uses_filo or pipeline.grounding:
            covered, added = prompts.covering(list(split))
            if added:
                log(f"[filo] warning: {generic_prompts_note(added, prompts.source, str(run.data_path))}")
                prompts = covered
    out_dir = Path(run.save_path or "outputs/results/test")
    cache = PredictionCache(out_dir / "cache", cache_key(run, pipeline))
    sources = {s.img_path: input_identity(run.data_path, s.img_path, s.mask_path)
               for s in samples}
    by_set = pipeline.uses_musc and pipeline.musc_pool is None  # a class is one set
    if by_set:  # every prediction depends on the whole class: its members are in the identity
        from filo.evaluation.cache import settings_key

        for group in split.values():
            ident = settings_key({"members": [[s.img_path, sources[s.img_path]] for s in group]})
            for s in group:
                sources[s.img_path] = {**sources[s.img_path], "set": ident}
    model: Pipeline | None = None

    def predict(todo: list[Sample]) -> None:
        nonlocal model
        if run.from_cache:
            raise FiloError(f"--from_cache: {len(todo)} of {len(samples)} images have no cached "
                            f"prediction in {cache.dir} (first: {todo[0].img_path}); run without "
                            f"--from_cache to compute them")
        if model is None:
            if pipeline_factory is None:
                model = build_pipeline(pipeline, prompts=prompts)
            else:
                model = pipeline_factory(pipeline)
            model.check_classes(list(split), str(run.data_path))
        if by_set:
            _predict_sets(run, todo, cache, model, sources)
        else:
            _predict_missing(run, todo, cache, model, sources)

    todo = [s for s in samples if not cache.has(s.img_path, sources[s.img_path])]
    if by_set:  # a class with any missing entry is recomputed whole, one class per process
        stale = {s.cls_name for s in todo}
        todo = [s for s in samples if s.cls_name in stale]
    log(f"[filo] {len(samples)} test images in {len(split)} classes; "
        f"{len(samples) - len(todo)} cached in {cache.dir}"
        + (f"; {dist.world_size} processes share the rest" if dist.active else ""))
    dist.barrier()  # every process has listed the cache before anyone writes to it
    if todo and run.from_cache:
        predict(todo)  # (the --from_cache error)
    if by_set:
        mine_classes = set(dist.shard(list(dict.fromkeys(s.cls_name for s in todo))))
        mine = [s for s in todo if s.cls_name in mine_classes]
    else:
        mine = dist.shard(todo)
    if mine:
        predict(mine)
    dist.barrier()  # every shard is in the cache
    if not dist.is_main:
        return []
    pixel = pipeline.uses_filo or pipeline.uses_memory or pipeline.uses_musc or run.pixel_metrics \
        or pipeline.baseline is not None
    for _attempt in range(3):
        try:
            results = _evaluate_classes(split, cache, pixel,
                                        per_sample=run.dataset == "realiad")
            break
        except _Unreadable as err:  # get() removed the torn entry: recompute it now
            broken = [s for s in samples if not cache.has(s.img_path)]
            logger.warning("unreadable cache entries (first %s): recomputing", err.sample.img_path)
            log(f"[filo] warning: {len(broken)} cache entr{'y' if len(broken) == 1 else 'ies'} "
                f"in {cache.dir} could not be read (first: {err.sample.img_path}); recomputing")
            predict(broken)
    else:
        raise FiloError(f"cache entries in {cache.dir} keep coming back unreadable; check the "
                        f"disk, or delete the folder and run again")
    columns = (*COLUMNS, *EXTRA_COLUMNS) if pixel else IMAGE_COLUMNS
    if run.dataset == "realiad":
        columns = (*columns, *SAMPLE_COLUMNS)
    _write_outputs(run, pipeline, split, cache, results, out_dir, columns, log,
                   coco_classes=coco_classes)
    return results


def coco_eval_classes(run: RunConfig, pipeline: PipelineConfig,
                      split: dict[str, list[Sample]], log: Callable[[str], None]) -> list[str]:
    """The classes ``--coco_eval`` scores: those whose every anomalous image has a mask (a class
    of normal images only counts too: no boxes is its exact ground truth). Classes with
    anomalous images without masks are left out with a warning; a run without the box step,
    without pycocotools or without any mask is one :class:`FiloError` line (before any model
    loads)."""
    import importlib.util

    if not pipeline.grounding:
        raise FiloError("--coco_eval scores the detector's boxes: it needs --grounded_checkpoint "
                        "(and no --no_grounding)")
    if importlib.util.find_spec("pycocotools") is None:
        raise FiloError("--coco_eval needs pycocotools: pip install pycocotools")
    groups = {c: g for c, g in split.items() if g}
    usable = [c for c, g in groups.items() if all(s.mask_path for s in g if s.anomaly)]
    if not any(s.mask_path for c in usable for s in groups[c]):
        raise FiloError(f"--coco_eval needs masks: no anomalous test image under "
                        f"{run.data_path} has a ground-truth mask ({run.dataset} layout); drop "
                        f"--coco_eval or add the masks")
    for cls_name in groups:
        if cls_name not in usable:
            logger.warning("class %s has anomalous images without masks: left out of "
                           "--coco_eval", cls_name)
            log(f"[filo] warning: class {cls_name} has anomalous images without masks; it is "
                f"left out of the --coco_eval table")
    return usable


def cache_key(run: RunConfig, pipeline: PipelineConfig) -> dict[str, Any]:
    """The prediction cache's settings key: the pipeline's plus the dataset root."""
    key = {**pipeline.cache_key(), "data_root": str(Path(run.data_path).resolve())}
    if run.protocol != "image":  # other maps and masks
        key["protocol"] = run.protocol
    if run.realiad_split is not None:  # a variant may label an image differently
        key["realiad_split"] = str(run.realiad_split)
    if run.folder_spec().given():  # named folders decide the labels
        key["folders"] = [run.normal_dir, run.abnormal_dir, run.mask_dir, run.normal_test_dir]
    if run.mask_rule != "filo":  # the cached masks differ
        key["mask_rule"] = run.mask_rule
    return key


def _put(run: RunConfig, cache: PredictionCache, batch, i: int, pred,
         sources: dict[str, dict[str, Any]], mask_paths: dict[str, str]) -> None:
    extras = {"detections": pred.detection} if pred.detection is not None else {}
    mask = np.asarray(batch.masks[i])
    if run.mask_rule == "musc" and mask_paths.get(batch.img_paths[i]):
        from filo.musc.masks import original_mask

        mask = original_mask(Path(run.data_path) / mask_paths[batch.img_paths[i]],
                             mask.shape[-1], run.dataset)
    cache.put(Prediction(
        img_path=batch.img_paths[i], cls_name=batch.cls_names[i],
        label=int(batch.labels[i]), image_score=pred.image_score,
        anomaly_map=pred.anomaly_map, mask=mask, extras=extras,
        source=sources.get(batch.img_paths[i])))


def _predict_sets(run: RunConfig, todo: Sequence[Sample], cache: PredictionCache,
                  model: Pipeline, sources: dict[str, dict[str, Any]]) -> None:
    """Set scorers (MuSc): each class of ``todo`` (whole classes) predicted at once."""
    mask_paths = {s.img_path: s.mask_path for s in todo}
    groups: dict[str, list[Sample]] = {}
    for s in todo:
        groups.setdefault(s.cls_name, []).append(s)

    def feed(loader, kept: list):
        for batch in loader:
            kept.append(batch)
            yield batch

    for group in tqdm(groups.values(), desc="predict sets", unit="class", dynamic_ncols=True,
                      disable=None):
        dataset = EvalDataset(group, run.data_path, model.image_size,
                              with_detector_input=model.needs_detector_input,
                              allow_missing_masks=True)
        loader = DataLoader(dataset, batch_size=run.batch_size, shuffle=False,
                            num_workers=run.num_workers, collate_fn=collate,
                            persistent_workers=False)
        batches: list = []
        preds = model.predict_set(feed(loader, batches))
        i = 0
        for batch in batches:
            for j in range(len(batch)):
                _put(run, cache, batch, j, preds[i], sources, mask_paths)
                i += 1


def _predict_missing(run: RunConfig, todo: Sequence[Sample], cache: PredictionCache,
                     model: Pipeline, sources: dict[str, dict[str, Any]]) -> None:
    crop = run.protocol == "crop"
    dataset = EvalDataset(todo, run.data_path, model.image_size,
                          with_detector_input=model.needs_detector_input,
                          memory_transform=getattr(model, "memory_transform", None),
                          allow_missing_masks=True,
                          mask_transform=model.memory.mask_transform() if crop else None)
    loader = DataLoader(dataset, batch_size=run.batch_size, shuffle=False,
                        num_workers=run.num_workers, collate_fn=collate, persistent_workers=False)
    bar = tqdm(total=len(todo), unit="img", desc="predict", dynamic_ncols=True,
               disable=None)
    mask_paths = {s.img_path: s.mask_path for s in todo}
    batches = iter(loader)
    try:
        for batch in batches:
            preds = model.predict(batch, memory_geometry="crop") if crop else model.predict(
                batch)
            for i, pred in enumerate(preds):
                _put(run, cache, batch, i, pred, sources, mask_paths)
            bar.update(len(batch))
    finally:
        bar.close()
        # join the loader's worker processes now (also after an error), not at interpreter exit
        shutdown_workers = getattr(batches, "_shutdown_workers", None)
        if shutdown_workers is not None:
            shutdown_workers()
        del batches


def has_masks(group: Sequence[Sample]) -> bool:
    """Pixel metrics need a mask for every anomalous image of the class (and some anomaly)."""
    anomalous = [s for s in group if s.anomaly]
    return bool(anomalous) and all(s.mask_path for s in anomalous)


def _evaluate_classes(split: dict[str, list[Sample]], cache: PredictionCache,
                      pixel: bool, per_sample: bool = False) -> list[ClassResult]:
    results = []
    for cls_name, group in tqdm(split.items(), desc="metrics", unit="class", dynamic_ncols=True):
        labels_set = {s.anomaly for s in group}
        if labels_set == {0}:
            logger.warning("class %s has no anomalous test images: scores only, its metrics "
                           "are not available", cls_name)
        preds = [_must_get(cache, s) for s in group]
        maps = np.stack([p.anomaly_map for p in preds])
        masks = np.stack([p.mask for p in preds])
        labels = np.array([p.label for p in preds])
        scores = np.array([p.image_score for p in preds])
        partial = pixel and not has_masks(group) and any(s.mask_path for s in group if s.anomaly)
        if labels_set != {0} and pixel and not has_masks(group):
            logger.warning("class %s has anomalous images without masks: %s", cls_name,
                           "pixel metrics over the images with ground truth (normal images and "
                           "masked anomalies)" if partial else "image-level metrics only")
        result = class_metrics(cls_name, masks, maps, labels, scores,
                               pixel=pixel and has_masks(group))
        if partial:  # pixel columns from the images with ground truth (design.md 9.1)
            keep = [i for i, s in enumerate(group) if not s.anomaly or s.mask_path]
            px = class_metrics(cls_name, masks[keep], maps[keep], labels[keep], scores[keep])
            result.values.update({c: px.values[c] for c in PIXEL_COLUMNS})
            mad = [result.values[c] for c in MAD_COLUMNS]
            result.values["mAD"] = (float(np.mean(mad)) if not any(np.isnan(mad))
                                    else float("nan"))
        if per_sample:  # Real-IAD: also per physical sample (max over its views)
            from filo.data.layouts import realiad_sample_key

            result.values.update(sample_metrics([realiad_sample_key(s) for s in group],
                                                labels, scores))
        results.append(result)
    return results


def _must_get(cache: PredictionCache, s: Sample) -> Prediction:
    pred = cache.get(s.img_path)
    if pred is None:  # removed or torn since it was listed (get() deleted a torn file)
        raise _Unreadable(s)
    return pred


def run_log_settings(run: RunConfig, pipeline: PipelineConfig) -> dict[str, Any]:
    """Every setting of the run, flat (the log and ``results.json``'s ``settings``)."""
    return {**as_dict(run), "classes": run.class_list(), **as_dict(pipeline)}


def _write_outputs(run: RunConfig, pipeline: PipelineConfig, split: dict[str, list[Sample]],
                   cache: PredictionCache, results: list[ClassResult], out_dir: Path,
                   columns: Sequence[str], log: Callable[[str], None], *,
                   coco_classes: Sequence[str] = ()) -> None:
    table = render_table(results, columns)
    settings = run_log_settings(run, pipeline)
    coco = coco_table = None
    if run.coco_eval:
        coco = coco_evaluation(run, split, cache, out_dir, coco_classes)
        coco_table = render_coco_table(coco)
    paths = write_results(out_dir, results, settings, columns, coco=coco)
    lines = [f"filo test run {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    lines += [f"{k}: {v}" for k, v in settings.items()]
    lines += [f"cache: {cache.dir}", "", table, ""]
    if coco_table is not None:
        lines += ["COCO box evaluation (--coco_eval, x100):", "", coco_table, ""]
    atomic_write_text(out_dir / "test_log.txt", "\n".join(lines))
    if run.save_maps is not None:
        save_maps(run.save_maps, split, cache)
    if run.save_boxes is not None and pipeline.grounding:
        save_boxes(run.save_boxes, split, cache)
    if run.save_coco is not None and pipeline.grounding:
        from filo.evaluation.coco import coco_from_cache
        from filo.pipeline import load_pipeline_prompts

        coco = coco_from_cache(split, cache, load_pipeline_prompts(pipeline),
                               case_sensitive=pipeline.legacy_phrase_case)
        atomic_write_text(run.save_coco, json.dumps(coco) + "\n")
    if run.viz_dir is not None:
        index = write_visualisations(run, split, cache, table,
                                     title=f"filo test: {run.dataset} {run.data_path} "
                                     f"({pipeline.map_name})", pipeline=pipeline)
        log(f"[filo] visualisations: {index}")
    log("")
    log(table)
    log("")
    if coco_table is not None:
        log("[filo] COCO box evaluation (--coco_eval; AP = IoU 0.5:0.95, x100; nan = no "
            "ground-truth box):")
        log("")
        log(coco_table)
        log("")
        log(f"[filo] COCO: {paths['coco_csv']}, ground truth {out_dir / COCO_GT_FILE}, "
            f"detections {out_dir / COCO_DT_FILE}")
    note = ("[filo] aupro = legacy 200-threshold definition (as published); aupro_exact = MVTec "
            "AD definition. " if "aupro" in columns else "[filo] ")
    log(f"{note}Results: {paths['md']}, {paths['json']}, {paths['csv']}; log: "
        f"{out_dir / 'test_log.txt'}")


COCO_GT_FILE = "coco_gt.json"
COCO_DT_FILE = "coco_detections.json"


def coco_evaluation(run: RunConfig, split: dict[str, list[Sample]], cache: PredictionCache,
                    out_dir: Path, classes: Sequence[str]) -> dict[str, Any]:
    """``--coco_eval``: the ground truth of ``classes`` from the masks, every cached kept box of
    their images as a COCO result, both written to ``out_dir`` (``coco_gt.json``,
    ``coco_detections.json``: ``COCOeval(COCO(gt), COCO(gt).loadRes(dt), "bbox")`` gives the
    same numbers), and the metrics per class and overall (the ``coco`` key of
    ``results.json``)."""
    from filo.evaluation import coco_eval

    gt = coco_eval.build_ground_truth(split, run.data_path, classes)
    ids = coco_eval.image_ids(split)
    detections = []
    for cls_name in classes:
        for s in split[cls_name]:
            det = _must_get(cache, s).extras.get("detections")
            detections += coco_eval.detections_of(ids[s.img_path], det)
    atomic_write_text(out_dir / COCO_GT_FILE, json.dumps(gt) + "\n")
    atomic_write_text(out_dir / COCO_DT_FILE, json.dumps(detections) + "\n")
    metrics = coco_eval.evaluate_by_class(gt, detections)
    skipped = [c for c in split if c not in set(classes)]
    return coco_payload(metrics, skipped=skipped,
                        files={"ground_truth": COCO_GT_FILE, "detections": COCO_DT_FILE})


VIZ_QUANTILES = (1.0, 99.5)  # per-run colour scale: these percentiles of a class's maps
VIZ_SAMPLE = 4_000_000  # at most about this many map values per class enter the percentiles


def visual_scales(pipeline: PipelineConfig | None, split: dict[str, list[Sample]],
                  cache: PredictionCache) -> tuple[dict[str, tuple[float, float]], str]:
    """The gallery's colour scale of every class, and how it was chosen (design.md section 8.2):

    * raw memory-bank distances: the bank's calibrated range (0 .. 2 x pixel threshold);
    * fused maps (a logistic of z-scores against the normal calibration images): 0.5 (the
      normal images' mean) .. logistic(6) (6 standard deviations above it);
    * a FiLo map with a bank that holds FiLo's normal-image statistics: their mean .. mean +
      6 std;
    * otherwise the 1st .. 99.5th percentile of all maps of the class in this run."""
    import json as _json

    from filo.memory.bank import bank_dir
    from filo.pipeline import memory_map_range

    def calibration(cls_name: str) -> dict:
        if pipeline is None or pipeline.memory_bank is None:
            return {}
        path = bank_dir(pipeline.memory_bank, cls_name) / "meta.json"
        try:
            return dict(_json.loads(path.read_text()).get("calibration") or {})
        except (OSError, ValueError):
            return {}

    scales, how = {}, set()
    for cls_name, group in split.items():
        cal = calibration(cls_name)
        filo_cal = cal.get("filo") or {}
        if pipeline is not None and pipeline.uses_memory and not pipeline.uses_filo and cal:
            scales[cls_name] = memory_map_range(cal)
            how.add("the memory bank's calibrated range (0 to twice its pixel threshold)")
            continue
        if pipeline is not None and pipeline.uses_memory and pipeline.uses_filo and cal:
            scales[cls_name] = (0.5, float(1.0 / (1.0 + np.exp(-6.0))))
            how.add("fused z-scores against the normal calibration images: 0.5 = their mean, "
                    "top = 6 standard deviations above")
            continue
        if filo_cal.get("pixel_std") and pipeline is not None and pipeline.uses_filo:
            mean, std = float(filo_cal["pixel_mean"]), float(filo_cal["pixel_std"])
            scales[cls_name] = (mean, mean + 6.0 * std)
            how.add("FiLo's normal-image statistics from the memory bank (mean to mean + 6 std)")
            continue
        maps = [np.asarray(_must_get(cache, s).anomaly_map, dtype=np.float32).ravel()
                for s in group]
        stride = max(1, sum(m.size for m in maps) // VIZ_SAMPLE)  # bounded memory and time
        values = np.concatenate([m[::stride] for m in maps])
        values = values[np.isfinite(values)]
        lo, hi = ((float(v) for v in np.percentile(values, VIZ_QUANTILES)) if values.size
                  else (0.0, 1.0))
        if not hi > lo:
            hi = lo + (abs(lo) * 1e-3 or 1e-6)
        scales[cls_name] = (lo, hi)
        how.add(f"per class, percentiles {VIZ_QUANTILES[0]:g} to {VIZ_QUANTILES[1]:g} of "
                f"all its maps in this run")
    return scales, "; ".join(sorted(how)) or "0 to 1"


def write_visualisations(run: RunConfig, split: dict[str, list[Sample]], cache: PredictionCache,
                         table: str | None, title: str,
                         pipeline: PipelineConfig | None = None) -> Path:
    """One panel per image (input, map overlay on the run's colour scale, GT outline, boxes)
    and ``index.html``; visual options never touch the cached numbers."""
    from filo.data.transforms import load_rgb
    from filo.detector.caption import clean_phrase
    from filo.viz import VizWriter

    root = Path(run.data_path) if run.data_path is not None else None

    def load_image(img_path: str) -> np.ndarray:
        return np.asarray(load_rgb(root / img_path if root is not None else img_path))

    scales, how = visual_scales(pipeline, split, cache)
    writer = VizWriter(run.viz_dir, 0.0, 1.0, run.viz_limit, run.viz_only_errors, None,
                       run.viz_lift_boxes, load_image=load_image, root=root, scales=scales,
                       scale_note=how,
                       map_name=pipeline.map_name if pipeline is not None else "anomaly map",
                       map_label=pipeline.map_label if pipeline is not None else None)
    total = sum(len(g) for g in split.values())
    with tqdm(total=total, desc="visualise", unit="img", dynamic_ncols=True) as bar:
        for group in split.values():
            for s in group:
                bar.update(1)
                pred = _must_get(cache, s)
                if not writer.wants(s.cls_name, pred.label, pred.image_score):
                    continue
                det = pred.extras.get("detections") or {}
                phrases = det.get("phrases")
                if phrases is not None:  # a cache of an older filo may hold [SEP] and the like
                    phrases = [clean_phrase(str(p)) for p in phrases]
                writer.add(s.img_path, s.cls_name, pred.label, pred.image_score, None,
                           pred.anomaly_map, gt_mask=pred.mask if pred.label else None,
                           boxes=det.get("boxes"), labels=phrases,
                           scores=det.get("scores"), matched=det.get("matched"))
    return writer.finish(table, title=title)


def save_maps(directory: Path, split: dict[str, list[Sample]], cache: PredictionCache) -> None:
    """One float32 ``.npy`` per image (dataset-relative names) and ``scores.csv``."""
    directory = Path(directory)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_path", "class", "label", "image_score"])
    for group in split.values():
        for s in group:
            pred = _must_get(cache, s)
            atomic_save_npy(output_file(directory, s.img_path, ".npy"),
                            pred.anomaly_map.astype(np.float32))
            writer.writerow([s.img_path, s.cls_name, pred.label, repr(float(pred.image_score))])
    atomic_write_text(directory / "scores.csv", buf.getvalue())


def box_record(img_path: str, detection: dict[str, Any]) -> dict[str, Any]:
    """The one box JSON format (test.py, detector-only runs and predict)."""
    return {"img_path": img_path, **detection}


def save_boxes(directory: Path, split: dict[str, list[Sample]], cache: PredictionCache) -> None:
    """One JSON per image (:func:`box_record`), dataset-relative names."""
    for group in split.values():
        for s in group:
            det = _must_get(cache, s).extras.get("detections")
            if det is None:
                continue
            atomic_write_text(output_file(directory, s.img_path, ".json"),
                              json.dumps(box_record(s.img_path, det), indent=1) + "\n")
