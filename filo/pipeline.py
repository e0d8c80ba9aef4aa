"""The inference pipeline: a batch of images in, per image a map, a score, boxes and a position.

One home for the step every entry point runs (test.py, detector-only runs, ``filo.predict``,
the demo, the benchmark):

1. **box step** (:func:`box_step`, docs/design.md section 6), when a grounding checkpoint is
   given: caption of the class -> GroundingDINO -> kept boxes -> boxes in map pixels -> position
   word of the best counted box -> the counted boxes;
2. **FiLo** (docs/design.md sections 2-5), when a FiLo checkpoint is given: the anomaly map and
   the image score with the abnormal prompts of that position (all nine averaged without the
   box step, or ``--position``);
3. **fusion**: the map is multiplied by the outside-box factor outside the counted boxes.

Without a FiLo checkpoint the pipeline is the detector alone: the map is the box map (each pixel
the best score of the counted boxes covering it) and the image score the best kept box's score.

:class:`PipelineConfig` holds exactly the settings that change a prediction; its fields are
also the command-line flags of every CLI (:mod:`filo.settings`). :func:`build_pipeline` loads
each file once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filo.backbone import CLIP_ACTS
from filo.data.dataset import ImageBatch
from filo.data.transforms import DEFAULT_IMAGE_SIZE
from filo.device import resolve_device
from filo.errors import FiloError
from filo.fusion import box_score_map, fuse_with_boxes, position_from_boxes
from filo.prompts import GENERIC_DEFECT_PHRASES, PromptTable, load_prompt_table
from filo.settings import at_least, in_range, setting

logger = logging.getLogger(__name__)

KERNELS = ("fast", "reference")
AUTOCAST = ("none", "bf16", "fp16")
SCORE_MODES = ("research", "softmax")
FUSIONS = ("filo", "memory", "mean", "max")
METHODS = ("filo", "musc")
MUSC_FUSIONS = ("musc", "mean", "max")
# every research-code switch of the prediction (what RULES=research / the scripts turn on)
RESEARCH_RULES = ("legacy_macaroni", "legacy_phrase_case", "legacy_text_threshold", "legacy_grid",
                  "legacy_box_slices")
# Bumped when the computation behind unchanged settings changes, so older cache entries are not
# reused (2: a research-layout checkpoint runs CLIP with exact GELU).
RULES_VERSION = 2


@dataclass
class PipelineConfig:
    """Every setting that changes a prediction (and the flags that set them)."""

    ckpt_path: Path | None = setting(
        None, "FiLo checkpoint ({'filo': ...}, e.g. ckpt/filo_train_on_visa.pth); without it "
        "the pipeline is GroundingDINO alone")
    grounded_checkpoint: Path | None = setting(
        None, "GroundingDINO checkpoint (original or converted layout); enables the box step")
    no_grounding: bool = setting(False, "FiLo maps alone, no box step")
    prompts: Path | None = setting(None, "prompt YAML file",
                                   default_help="the released-checkpoint prompts")
    image_size: int | None = setting(
        None, "CLIP input and map size", check=at_least(8),
        default_help="the FiLo checkpoint's (518 for the released ones); 518 without one")
    position: str | None = setting(
        None, "without the box step: fix the position word", default_help="average all nine")
    score_mode: str = setting("research", "image score: research-code formula or the paper's "
                              "softmax", choices=SCORE_MODES)
    clip_act: str | None = setting(
        None, "CLIP MLP activation", choices=CLIP_ACTS,
        default_help="the checkpoint's recorded one; for a research-layout checkpoint exact GELU "
        "unless it is for 336 px, as the research code runs it")
    box_threshold: float = setting(0.25, "keep boxes whose best token probability exceeds this",
                                   check=in_range(0.0, 1.0))
    text_threshold: float = setting(0.25, "phrase tokens above this probability",
                                    check=in_range(0.0, 1.0))
    area_threshold: float = setting(0.7, "drop boxes covering this fraction of the image or more",
                                    check=in_range(0.0, 1.0, lo_open=True))
    outside_box_factor: float = setting(0.7, "map values outside every counted box are "
                                        "multiplied by this (1 disables)",
                                        check=in_range(0.0, 1.0))
    legacy_macaroni: bool = setting(False, "research-code bug: macaroni1 uses macaroni2's prompts")
    legacy_phrase_case: bool = setting(False, "research code: case-sensitive phrase matching")
    legacy_text_threshold: bool = setting(False, "research code: phrases use --box_threshold")
    legacy_grid: bool = setting(
        False, "research-code position rule: closed cells [0,172],[173,344],[345,517], best box "
        "by its printed 2-decimal score, last of ties")
    legacy_box_slices: bool = setting(
        False, "research-code box rule: boxes not clamped to the image, corners truncated with "
        "int() and used as Python slices (a corner <= -1 empties the box), for the position "
        "word and the outside-box factor")
    kernels: str = setting(
        "fast", "CPU float32 kernels: 'fast' (linear layers via oneDNN, deformable attention as "
        "one gather) or 'reference' (plain PyTorch ops); same maps to ~1e-6, no effect on CUDA",
        choices=KERNELS)
    autocast: str = setting("none", "reduced-precision towers (CUDA; bf16 also on recent CPUs): "
                            "faster, maps differ by up to ~1e-2 from float32", choices=AUTOCAST)
    exact: bool = setting(
        False, "reproduction mode: the detector and FiLo see one image at a time and every "
        "kernel is the reference one, so results do not depend on --batch_size (batching and "
        "the fast kernels move scores slightly, see README)")
    memory_bank: Path | None = setting(
        None, "folder of PatchCore memory banks (python -m filo.memory build): scores images "
        "against normal images of their class")
    fusion: str | None = setting(
        None, "with --memory_bank: which maps and scores count: filo, memory, or both "
        "normalised by their normal-image statistics and combined by mean or max",
        choices=FUSIONS, default_help="memory without --ckpt_path, else mean")
    fusion_weight: float = setting(0.5, "--fusion mean: weight of the memory bank (FiLo gets "
                                   "1 - weight)", check=in_range(0.0, 1.0))
    calib_dir: Path | None = setting(
        None, "folder of normal images (one sub-folder per class, or the images of the one "
        "class predicted) that calibrates runs without a memory bank: FiLo alone or the "
        "detector alone get an image threshold (0.99 quantile of their scores), a pixel "
        "threshold (0.999 quantile) and a map range (docs/design.md section 13.2)",
        default_help="leave-one-out")
    method: str = setting(
        "filo", "scorer: 'filo' (the FiLo checkpoint, memory bank and/or detector as given) or "
        "'musc' (training-free mutual scoring of each class's test images, docs/design.md "
        "section 16; fused with the boxes of --grounded_checkpoint)", choices=METHODS)
    musc_clip: Path | None = setting(
        None, "--method musc: CLIP weights (OpenAI ViT-*.pt, an open_clip state dict or a FiLo "
        "checkpoint)", default_help="the CLIP of --ckpt_path")
    musc_layers: str | None = setting(
        None, "--method musc: tapped blocks, 0-based, comma-separated",
        default_help="5,11,17,23 for 24 blocks, 2,5,8,11 for 12")
    musc_r: str = setting("1,3,5", "--method musc: LNAMD aggregation degrees (odd)")
    musc_k: str | None = setting(None, "--method musc: RsCIN k list (0 disables RsCIN)",
                                 default_help="1,8,9 for --dataset visa, else 1,2,3")
    musc_divide: int = setting(1, "--method musc: mutual-scoring subsets per class",
                               check=at_least(1))
    musc_block: int | None = setting(
        None, "--method musc: patch rows per side of one distance block (bounds memory; "
        "results move by ~1e-7 at most)", check=at_least(1), default_help="2048")
    musc_pool: Path | None = setting(
        None, "--method musc: folder of reference pools (python -m filo.musc pool): each image "
        "is scored against its class's pool instead of its test split")
    musc_fusion: str = setting(
        "musc", "--method musc: 'musc' alone, or with --ckpt_path FiLo's and MuSc's maps and "
        "scores, each z-scored by the set's (or pool's) statistics, combined by 'mean' "
        "(--fusion_weight = MuSc's weight) or 'max'", choices=MUSC_FUSIONS)
    baseline: Path | None = setting(
        None, "trained anomalib model(s) to score with instead of FiLo: a folder from `python "
        "-m filo.baselines fit` (one model per class) or one of its checkpoints")
    device: str | None = setting(None, "cpu, cuda or cuda:N", default_help="cuda if available")
    bert_dir: Path | None = setting(None, "local bert-base-uncased tokenizer directory",
                                    default_help="$FILO_BERT_LOCAL or third_party/")

    @property
    def grounding(self) -> bool:
        return not self.no_grounding and self.grounded_checkpoint is not None

    @property
    def uses_musc(self) -> bool:
        return self.method == "musc"

    @property
    def uses_memory(self) -> bool:
        return self.memory_bank is not None and self.fusion_mode != "filo"

    @property
    def uses_filo(self) -> bool:
        if self.uses_musc:  # --ckpt_path may only lend MuSc its CLIP
            return self.ckpt_path is not None and self.musc_fusion != "musc"
        return self.ckpt_path is not None and self.fusion_mode != "memory"

    @property
    def map_name(self) -> str:
        """What the maps of this pipeline are, in words (titles, log lines, the gallery)."""
        boxes = " with GroundingDINO boxes" if self.grounding else ""
        if self.baseline is not None:
            return f"trained-model map (anomalib){boxes}"
        if self.uses_musc:
            return (f"fused map (MuSc{boxes} + FiLo, {self.musc_fusion})" if self.uses_filo
                    else f"MuSc map{boxes}")
        if self.uses_filo and self.uses_memory:
            return f"fused map (FiLo{boxes} + memory bank, {self.fusion_mode})"
        if self.uses_memory:
            return "memory-bank map (PatchCore distances)"
        if self.uses_filo:
            return f"FiLo map{boxes}"
        return "GroundingDINO box map"

    @property
    def map_label(self) -> str:
        """:attr:`map_name` in a few words (panel titles)."""
        boxes = " + boxes" if self.grounding else ""
        if self.baseline is not None:
            return f"trained-model map{boxes}"
        if self.uses_musc:
            return f"MuSc + FiLo map{boxes}" if self.uses_filo else f"MuSc map{boxes}"
        if self.uses_filo and self.uses_memory:
            return f"fused map ({self.fusion_mode})"
        if self.uses_memory:
            return "memory-bank map"
        return f"FiLo map{boxes}" if self.uses_filo else "box map"

    @property
    def fusion_mode(self) -> str:
        """The effective --fusion (its default depends on what is given)."""
        if self.memory_bank is None:
            return "filo"
        if self.fusion is not None:
            return self.fusion
        return "memory" if self.ckpt_path is None else "mean"

    @property
    def fast_kernels(self) -> bool:
        return self.kernels == "fast" and not self.exact

    def check_usable(self) -> None:
        """A pipeline needs FiLo, the detector, or both."""
        if self.uses_musc:
            from filo.musc.settings import check_musc_config

            check_musc_config(self)
            return
        if self.baseline is not None:
            if self.ckpt_path is not None or self.memory_bank is not None:
                raise FiloError("--baseline scores with a trained anomalib model alone: drop "
                                "--ckpt_path and --memory_bank (run them as their own rows)")
            return
        if self.fusion_mode in ("mean", "max") and self.ckpt_path is None:
            raise FiloError(f"--fusion {self.fusion_mode} combines FiLo and the memory bank: "
                            f"give --ckpt_path too, or use --fusion memory")
        if self.fusion_mode == "filo" and self.fusion == "filo" and self.ckpt_path is None:
            raise FiloError("--fusion filo needs --ckpt_path")
        if not self.uses_filo and not self.grounding and not self.uses_memory:
            raise FiloError("nothing to run: give --ckpt_path (a FiLo checkpoint such as "
                            "ckpt/filo_train_on_visa.pth), --grounded_checkpoint and/or "
                            "--memory_bank")
        self.check_no_idle_flags()

    def check_no_idle_flags(self) -> None:
        """A flag that would have no effect in this combination is refused in one line (it
        would otherwise be silently ignored and the user believe it applied)."""
        if self.fusion is not None and self.memory_bank is None:
            raise FiloError(f"--fusion {self.fusion} combines FiLo with a memory bank: it has no "
                            f"effect without --memory_bank; add --memory_bank DIR or drop it")
        if self.position is not None and self.grounding:
            raise FiloError(f"--position {self.position} has no effect with the box step (the "
                            f"boxes choose the position word); drop it or add --no_grounding")
        if self.position is not None and not self.uses_filo:
            raise FiloError(f"--position {self.position} selects FiLo's prompts: it has no "
                            f"effect without FiLo (--ckpt_path); drop it")

    def cache_key(self) -> dict[str, Any]:
        """What changes the per-image predictions (not device, batch size or workers)."""
        from filo.evaluation.cache import file_digest, file_fingerprint

        out: dict[str, Any] = {
            "filo_ckpt": file_fingerprint(self.ckpt_path),
            "image_size": self.image_size,
            "prompts": file_digest(self.prompts),
            "score_mode": self.score_mode,
            "autocast": self.autocast,
            "legacy_macaroni": self.legacy_macaroni,
            "clip_act": self.clip_act or "auto",
            "rules": RULES_VERSION,
            "kernels": "fast" if self.fast_kernels else "reference",
            "grounding": self.grounding,
            "position": None if self.grounding else self.position,
        }
        if self.uses_musc:
            from filo.musc.settings import musc_cache_key

            out.update(musc_cache_key(self))
        if self.baseline is not None:
            from filo.baselines.scorer import baseline_key

            out["baseline"] = baseline_key(self.baseline)
        if self.memory_bank is not None:
            from filo.memory.scorer import bank_folder_key

            out.update(memory_bank=bank_folder_key(self.memory_bank), fusion=self.fusion_mode,
                       fusion_weight=self.fusion_weight if self.fusion_mode == "mean" else None)
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
            if self.exact:
                out["exact"] = True
        return out


@dataclass
class ImagePrediction:
    """What the pipeline says about one image."""

    anomaly_map: np.ndarray  # float32 [S, S], after the box fusion
    image_score: float
    position: str | None  # position word used for the abnormal prompts (None: all nine)
    detection: dict[str, Any] | None = None  # boxes (original pixels), scores, phrases, ...


@dataclass
class BoxStepResult:
    """The box step's output for one image."""

    detection: Any  # filo.detector.inference.Detection (position filled in)
    counted_in_map: np.ndarray  # [N, 4] counted boxes in map pixels (the fusion's geometry)
    counted_scores: np.ndarray  # [N]


def box_step(detector, prompts: PromptTable, det_images, orig_sizes, classes: list[str],
             size: int, *, legacy_grid: bool = False,
             legacy_box_slices: bool = False) -> list[BoxStepResult]:
    """Caption -> detect -> boxes in ``size`` x ``size`` map pixels -> position -> counted boxes
    (docs/design.md section 6; ``legacy_box_slices`` uses the research box geometry, 6.1)."""
    from filo.detector.caption import build_caption

    words = prompts.grounding_words
    captions = [build_caption(words, prompts.detail_phrases(c)) for c in classes]
    match = [[*prompts.detail_phrases(c), *words] for c in classes]
    dets = detector.detect_tensors(det_images, orig_sizes, captions, match)
    out = []
    for det in dets:
        in_map = det.boxes_in_map(size, research=legacy_box_slices).numpy()
        counted = np.asarray(det.matched, dtype=bool).reshape(-1)
        scores = det.scores.numpy()
        det.position = position_from_boxes(in_map, scores, counted, prompts.positions, size=size,
                                           legacy_grid=legacy_grid)
        out.append(BoxStepResult(det, in_map[counted], scores[counted]))
    return out


class Pipeline:
    """Loaded models and prompts; :meth:`predict` runs one :class:`ImageBatch`."""

    def __init__(self, config: PipelineConfig, prompts: PromptTable, model=None, detector=None,
                 image_size: int | None = None, memory=None, musc=None,
                 scorer=None) -> None:
        self.config = config
        self.prompts = prompts
        self.model = model
        self.detector = detector
        self.memory = memory  # filo.memory.scorer.MemoryScorer
        self._zero_shot: dict[str, dict] = {}  # class -> --calib_dir record
        self.musc = musc  # filo.musc.scorer.MuscScorer
        self.scorer = scorer  # a filo.scorers.SCORERS scorer (--baseline)
        if model is not None:
            self.image_size = int(model.config.image_size)
        else:
            self.image_size = int(image_size or config.image_size or (
                scorer.map_size if scorer is not None else DEFAULT_IMAGE_SIZE))
        if model is None and detector is None and memory is None and musc is None \
                and scorer is None:
            raise FiloError("a pipeline needs a FiLo model, a detector, a memory bank, MuSc or "
                            "a trained baseline")
        if config.position is not None and detector is None:
            prompts.check_position(config.position)

    @property
    def needs_detector_input(self) -> bool:
        return self.detector is not None

    @property
    def scores_sets(self) -> bool:
        """Predictions depend on the whole class (MuSc without a pool): use
        :meth:`predict_set`."""
        return self.musc is not None and self.musc.pools is None

    @property
    def memory_transform(self):
        """PIL image -> memory-bank (or --baseline) input (None without either)."""
        if self.scorer is not None:
            return self.scorer.transform()
        return self.memory.transform() if self.memory is not None else None

    def check_classes(self, class_names, where: str) -> None:
        """Every class has prompts (before any image is predicted): a class the prompt table has
        no entry for gets the generic defect phrases (:meth:`PromptTable.covering`), with one
        warning line naming the class and how to give it its own phrases."""
        if self.model is not None or self.detector is not None:
            table, added = self.prompts.covering(class_names)
            if added:
                logger.warning(generic_prompts_note(added, self.prompts.source, where))
                self.prompts = table
                if self.model is not None and hasattr(self.model, "set_prompt_table"):
                    self.model.set_prompt_table(table)
        if self.musc is not None and self.musc.pools is not None:
            self.musc.pools.check_classes(class_names)
        if self.scorer is not None:
            self.scorer.check_classes(class_names)
        if self.memory is not None:
            self.memory.check_classes(class_names)
            if self.config.fusion_mode in ("mean", "max"):
                for c in class_names:
                    if "filo" not in self.memory.meta(c).calibration:
                        raise FiloError(
                            f"--fusion {self.config.fusion_mode}: the bank of class {c!r} in "
                            f"{self.config.memory_bank} has no FiLo normal-image statistics; "
                            f"rebuild it with `python -m filo.memory build ... --ckpt_path "
                            f"{self.config.ckpt_path}` or use --fusion memory")

    def fused_scores(self, cls_name: str, filo_scores, memory_scores) -> np.ndarray:
        """Image scores of the fused modes from FiLo's and the memory bank's raw scores (the
        same formula as :meth:`_fuse_memory`; used for calibrated fused thresholds)."""
        from filo.calibration import squash, zscore

        cal = self.memory.meta(cls_name).calibration
        zf = zscore(filo_scores, cal["filo"], "image")
        zm = zscore(memory_scores, cal, "image")
        w = self.config.fusion_weight
        z = (1 - w) * zf + w * zm if self.config.fusion_mode == "mean" else np.maximum(zf, zm)
        return squash(z)

    def calibration(self, cls_name: str) -> dict | None:
        """Calibrated thresholds of ``cls_name`` from its memory bank: ``image_threshold`` and
        ``pixel_threshold`` (None for the fused modes: no pixel threshold is calibrated).

        With ``--fusion memory`` the bank's own; with ``mean`` / ``max`` the image threshold is
        the same quantile of the calibration images' fused scores. Without a bank (or with
        ``--fusion filo``): the :meth:`zero_shot_calibration` of ``--calib_dir``; None without
        one, or without calibration images."""
        if self.memory is None or self.config.fusion_mode == "filo":
            rec = self.zero_shot_calibration(cls_name)
            if rec is None:
                return None
            return {"image_threshold": float(rec["image_threshold"]),
                    "pixel_threshold": rec.get("pixel_threshold")}
        cal = self.memory.meta(cls_name).calibration
        if "image_threshold" not in cal:
            return None
        if self.config.fusion_mode == "memory":
            return {"image_threshold": float(cal["image_threshold"]),
                    "pixel_threshold": cal.get("pixel_threshold")}
        f_cal = cal.get("filo") or {}
        f_scores, m_scores = f_cal.get("image_scores") or [], cal.get("image_scores") or []
        if not f_scores or len(f_scores) != len(m_scores):  # e.g. a bank of an older filo
            return None
        fused = self.fused_scores(cls_name, f_cal["image_scores"], cal["image_scores"])
        return {"image_threshold": float(np.quantile(fused, cal["image_quantile"])),
                "pixel_threshold": None}

    def zero_shot_calibration(self, cls_name: str) -> dict | None:
        """The calibration record of ``cls_name`` from the normal images of ``--calib_dir``,
        scored by this pipeline (FiLo and/or the detector, no memory bank): quantile thresholds
        and normal statistics (:mod:`filo.calibration`), computed once and cached by the
        settings and the images (None without ``--calib_dir``)."""
        if self.config.calib_dir is None:
            return None
        if cls_name in self._zero_shot:
            return self._zero_shot[cls_name]
        from filo.calibration import (
            IMAGE_QUANTILE,
            PIXEL_QUANTILE,
            calibration_files,
            image_statistics,
            pixel_statistics,
            read_record,
            record_key,
            write_record,
        )
        from filo.data.dataset import collate, image_inputs
        from filo.data.transforms import decode_image

        files = calibration_files(self.config.calib_dir, cls_name)
        key = record_key({**self.config.cache_key(), "class": cls_name,
                          "quantiles": [IMAGE_QUANTILE, PIXEL_QUANTILE]}, files)
        rec = read_record(key)
        if rec is None:
            maps, scores = [], []
            for start in range(0, len(files), 8):
                items = [image_inputs(decode_image(f), cls_name, self.image_size,
                                      with_detector_input=self.needs_detector_input)
                         for f in files[start:start + 8]]
                for pred in self.predict(collate(items)):
                    maps.append(pred.anomaly_map)
                    scores.append(pred.image_score)
            rec = image_statistics(scores, IMAGE_QUANTILE, cls_name)
            rec.update(pixel_statistics(np.stack(maps), PIXEL_QUANTILE, cls_name, len(scores)))
            rec.update(method=f"--calib_dir {self.config.calib_dir}",
                       images=[str(f) for f in files])
            write_record(key, rec)
        self._zero_shot[cls_name] = rec
        return rec

    @property
    def raw_memory_maps(self) -> bool:
        """Maps are PatchCore's raw distances (a memory bank alone), not values in [0, 1]."""
        return self.memory is not None and self.model is None

    def map_range(self, cls_name: str) -> tuple[float, float]:
        """The colour scale of ``cls_name``'s maps: (0, 1) for FiLo, fused and box maps (they
        are in [0, 1]); for raw memory-bank distances, and for FiLo / box maps calibrated with
        ``--calib_dir``, (0, 2 x the calibrated pixel threshold), so the threshold sits in the
        middle of the bar (mean + 6 std without a threshold)."""
        if not self.raw_memory_maps:
            rec = None if self.memory is not None else self.zero_shot_calibration(cls_name)
            thr = rec.get("pixel_threshold") if rec else None
            return (0.0, 2.0 * float(thr)) if thr and thr > 0 else (0.0, 1.0)
        return memory_map_range(self.memory.meta(cls_name).calibration)

    def _fuse_memory(self, batch: ImageBatch, classes: list[str], filo_maps: np.ndarray,
                     filo_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FiLo and memory maps / scores, each normalised by its normal-image statistics (the
        bank's calibration, standard deviations floored), combined by mean or max, then squashed
        to (0, 1) by :func:`filo.calibration.squash` (monotonic and never saturating: rankings
        and metrics are those of the combined z-scores; docs/design.md section 13.2)."""
        mem_maps, mem_scores = self.memory.score(batch.mem_images, classes, batch.orig_sizes,
                                                 self.image_size)
        from filo.calibration import squash, zscore

        w = self.config.fusion_weight
        maps = np.empty_like(filo_maps)
        scores = np.empty(len(classes), dtype=np.float64)
        for i, c in enumerate(classes):
            cal = self.memory.meta(c).calibration
            f_cal = cal["filo"]
            zf_map, zm_map = zscore(filo_maps[i], f_cal, "pixel"), zscore(mem_maps[i], cal, "pixel")
            zf, zm = zscore(filo_scores[i], f_cal, "image"), zscore(mem_scores[i], cal, "image")
            if self.config.fusion_mode == "mean":
                z_map, z = (1 - w) * zf_map + w * zm_map, (1 - w) * zf + w * zm
            else:
                z_map, z = np.maximum(zf_map, zm_map), np.maximum(zf, zm)
            maps[i] = squash(z_map)
            scores[i] = float(squash(z))
        return maps.astype(np.float32), scores

    def _filo(self, images: torch.Tensor, classes: list[str], positions: list[str | None]):
        """FiLo on the batch; with ``exact`` one image at a time (batched matrix products round
        differently, ~1e-7), so results do not depend on the batch size."""
        if not self.config.exact or len(classes) == 1:
            return self.model.predict(images, classes, positions)
        outs = [self.model.predict(images[i:i + 1], classes[i:i + 1], positions[i:i + 1])
                for i in range(len(classes))]
        return _concat_outputs(outs)

    def _boxes(self, batch: ImageBatch) -> tuple[list[BoxStepResult] | None, list]:
        """The box step of a batch (None without a detector) and the position words."""
        classes = list(batch.cls_names)
        if self.detector is None:
            return None, [self.config.position] * len(classes)
        if batch.det_images is None:
            raise ValueError("the batch has no detector input (EvalDataset "
                             "with_detector_input=True)")
        boxes = box_step(self.detector, self.prompts, batch.det_images, batch.orig_sizes,
                         classes, self.image_size, legacy_grid=self.config.legacy_grid,
                         legacy_box_slices=self.config.legacy_box_slices)
        return boxes, [b.detection.position for b in boxes]

    def _musc_finish(self, classes: list[str], maps: np.ndarray, scores: np.ndarray,
                     boxes, filo: tuple[np.ndarray, np.ndarray] | None,
                     stats: dict[str, dict]) -> tuple[np.ndarray, np.ndarray]:
        """MuSc maps / scores -> fused with FiLo (z-scores by ``stats[class]``) -> the
        outside-box factor (docs/design.md section 16.5)."""
        if filo is not None:
            from filo.musc.fusion import zscore_fuse

            maps, scores = maps.copy(), np.asarray(scores, dtype=np.float64).copy()
            for c in dict.fromkeys(classes):
                idx = [i for i, k in enumerate(classes) if k == c]
                maps[idx], scores[idx] = zscore_fuse(
                    maps[idx], scores[idx], filo[0][idx], filo[1][idx], stats[c]["musc"],
                    stats[c]["filo"], self.config.musc_fusion, self.config.fusion_weight)
        if boxes is not None:
            maps = fuse_with_boxes(torch.from_numpy(np.ascontiguousarray(maps)),
                                   [b.counted_in_map for b in boxes],
                                   self.config.outside_box_factor,
                                   legacy_slices=self.config.legacy_box_slices).numpy()
        return maps.astype(np.float32), np.asarray(scores, dtype=np.float64)

    def _musc_pool(self, batch: ImageBatch, boxes, positions) -> tuple[np.ndarray, np.ndarray]:
        """Each image against its class's reference pool (``--musc_pool``)."""
        from filo.musc.scorer import input_digest

        classes = list(batch.cls_names)
        normed, feats = self.musc.extract(batch.images)
        digests = [input_digest(im) for im in batch.images]
        maps = np.empty((len(classes), self.image_size, self.image_size), dtype=np.float32)
        scores = np.empty(len(classes), dtype=np.float64)
        stats = {}
        for c in dict.fromkeys(classes):
            idx = [i for i, k in enumerate(classes) if k == c]
            pool = self.musc.pools.get(c)
            res = self.musc.score_pool(pool, [x[idx] for x in normed], feats[idx],
                                       [digests[i] for i in idx])
            maps[idx], scores[idx] = res.maps, res.scores
            stats[c] = {"musc": pool.stats.get("musc"), "filo": pool.stats.get("filo")}
            if self.model is not None and not stats[c]["filo"]:
                raise FiloError(f"--musc_fusion {self.config.musc_fusion}: pool {pool.path} has "
                                f"no FiLo statistics; rebuild it with `python -m filo.musc pool "
                                f"... --ckpt_path {self.config.ckpt_path}`")
        filo = None
        if self.model is not None:
            out = self._filo(batch.images, classes, positions)
            filo = (out.anomaly_map.float().cpu().numpy(), out.image_score.float().cpu().numpy())
        return self._musc_finish(classes, maps, scores, boxes, filo, stats)

    @torch.inference_mode()
    def predict_set(self, batches) -> list[ImagePrediction]:
        """MuSc over one class's whole set (an iterable of :class:`ImageBatch`, dataset order),
        fused with FiLo and the boxes as configured (docs/design.md section 16.5)."""
        from filo.musc.pool import map_stats

        normed, feats, boxes, positions, classes, paths = [], [], [], [], [], []
        fmaps, fscores = [], []
        for batch in batches:
            b, pos = self._boxes(batch)
            n, f = self.musc.extract(batch.images)
            normed.append(n)
            feats.append(f)
            boxes += b if b is not None else [None] * len(batch)
            positions += pos
            classes += list(batch.cls_names)
            paths += list(batch.img_paths)
            if self.model is not None:
                out = self._filo(batch.images, list(batch.cls_names), pos)
                fmaps.append(out.anomaly_map.float().cpu().numpy())
                fscores.append(out.image_score.float().cpu().numpy())
        if len(set(classes)) > 1:
            raise ValueError("predict_set takes the images of one class")
        layers = [torch.cat([n[i] for n in normed]) for i in range(len(normed[0]))]
        res = self.musc.score_set(layers, torch.cat(feats), paths, what=f"class {classes[0]!r}")
        filo = (np.concatenate(fmaps), np.concatenate(fscores)) if fmaps else None
        stats = {classes[0]: {"musc": map_stats(res.maps, res.scores),
                              "filo": map_stats(*filo) if filo is not None else None}}
        maps, scores = self._musc_finish(classes, res.maps, res.scores,
                                         boxes if self.detector is not None else None, filo,
                                         stats)
        return [ImagePrediction(maps[i], float(scores[i]), positions[i],
                                detection_record(boxes[i].detection)
                                if boxes[i] is not None else None)
                for i in range(len(classes))]

    @torch.inference_mode()
    def predict(self, batch: ImageBatch, memory_geometry: str = "image"
                ) -> list[ImagePrediction]:
        """Predictions of a batch. ``memory_geometry="crop"`` (a memory bank alone, test.py
        ``--protocol crop``): the raw maps on each bank's input (its centre crop at its
        imagesize) instead of the ``S x S`` whole-image map."""
        classes = list(batch.cls_names)
        if memory_geometry == "crop":
            if self.memory is None or self.model is not None or self.detector is not None:
                raise FiloError("maps on the centre crop need a memory bank alone (--fusion "
                                "memory, no box step)")
            maps_crop, scores_crop = self.memory.score_on_input(batch.mem_images, classes)
            return [ImagePrediction(maps_crop[i], float(scores_crop[i]), None)
                    for i in range(len(classes))]
        size = self.image_size
        boxes, positions = self._boxes(batch)

        if self.musc is not None:
            if self.musc.pools is None:
                raise FiloError("MuSc scores a whole class at once: use predict_set, or give "
                                "--musc_pool to score single images against a reference pool")
            maps_np, scores = self._musc_pool(batch, boxes, positions)
        elif self.model is not None:
            out = self._filo(batch.images, classes, positions)
            maps = out.anomaly_map.float().cpu()
            if boxes is not None:
                maps = fuse_with_boxes(maps, [b.counted_in_map for b in boxes],
                                       self.config.outside_box_factor,
                                       legacy_slices=self.config.legacy_box_slices)
            maps_np = maps.numpy().astype(np.float32)
            scores = out.image_score.float().cpu().numpy()
            if self.memory is not None:
                maps_np, scores = self._fuse_memory(batch, classes, maps_np, scores)
        elif self.scorer is not None:  # --baseline: the trained model's maps and scores
            maps_np, scores = self.scorer.score(batch.mem_images, classes, batch.orig_sizes,
                                                size)
            if boxes is not None:
                maps_np = fuse_with_boxes(torch.from_numpy(maps_np),
                                          [b.counted_in_map for b in boxes],
                                          self.config.outside_box_factor,
                                          legacy_slices=self.config.legacy_box_slices
                                          ).numpy().astype(np.float32)
        elif self.memory is not None:  # memory bank alone: raw PatchCore maps and scores
            if batch.mem_images is None:
                raise ValueError("the batch has no memory-bank input (EvalDataset "
                                 "memory_transform)")
            maps_np, scores = self.memory.score(batch.mem_images, classes, batch.orig_sizes,
                                                size)
        else:  # detector alone: box map and best box score
            assert boxes is not None
            maps_np = np.stack([box_score_map(b.counted_in_map, b.counted_scores, size, size)
                                for b in boxes])
            scores = np.array([b.detection.best_score for b in boxes], dtype=np.float64)
        return [ImagePrediction(maps_np[i], float(scores[i]), positions[i],
                                detection_record(boxes[i].detection) if boxes is not None
                                else None)
                for i in range(len(classes))]



def _concat_outputs(outs):
    from filo.model import FiLoOutput

    return FiLoOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in
                        ("tap_probs", "anomaly_map", "image_score", "text_score")))


def detection_record(det) -> dict[str, Any]:
    """A detection as JSON data: boxes in original pixels, scores, phrases, matched, position,
    the detector's normalized boxes and the original image size (w, h)."""
    return {**det.to_json(), "image_size": [int(v) for v in det.image_size]}


def memory_map_range(calibration: dict) -> tuple[float, float]:
    """The colour scale of raw memory-bank distances from a bank's calibration: (0, 2 x the
    pixel threshold), so the threshold sits in the middle of the bar (mean + 6 std without
    one)."""
    thr = calibration.get("pixel_threshold")
    hi = 2.0 * float(thr) if thr else float(calibration.get("pixel_mean", 0.0)) + 6.0 * float(
        calibration.get("pixel_std", 1.0))
    return 0.0, hi if hi > 0 else 1.0


def generic_prompts_note(added, source: str, where: str) -> str:
    """The warning line for classes that run on the generic defect phrases."""
    names = ", ".join(repr(c) for c in added)
    first = added[0].replace("_", " ")
    return (f"class {names} of {where} has no entry in prompt file {source}: using the generic "
            f"defect phrases ({', '.join(GENERIC_DEFECT_PHRASES)}); for the part's own phrases "
            f"write a YAML file with `classes: {{{first}: [defect phrase, ...]}}` and pass "
            f"--prompts FILE (prompts/README.md)")


def load_pipeline_prompts(config: PipelineConfig) -> PromptTable:
    """The prompt table of ``--prompts`` (default: the bundled MVTec + VisA tables)."""
    return load_prompt_table(config.prompts, legacy_macaroni=config.legacy_macaroni)


def build_pipeline(config: PipelineConfig, *, prompts: PromptTable | None = None) -> Pipeline:
    """Load the prompts, the detector and the FiLo model that ``config`` names (each file once)."""
    config.check_usable()
    device = resolve_device(config.device)
    prompts = prompts if prompts is not None else load_pipeline_prompts(config)
    # FiLo first: a checkpoint for another --image_size is refused before anything is built
    model = None
    if config.uses_filo:  # (not with --fusion memory)
        from filo.checkpoint import build_filo_from_checkpoint

        model = build_filo_from_checkpoint(
            config.ckpt_path, prompts=prompts, device=device,
            legacy_macaroni=config.legacy_macaroni, score_mode=config.score_mode,
            autocast=config.autocast, onednn_linear=config.fast_kernels,
            clip_act=config.clip_act, image_size=config.image_size)
        model.eval()
    detector = None
    if config.grounding:
        from filo.detector.inference import DetectionParams, load_detector

        params = DetectionParams(
            box_threshold=config.box_threshold, text_threshold=config.text_threshold,
            area_threshold=config.area_threshold,
            legacy_text_threshold=config.legacy_text_threshold,
            case_sensitive=config.legacy_phrase_case,
            batch_size=1 if config.exact else 1 << 16,  # else: the whole incoming batch
            fast_kernels=config.fast_kernels)
        detector = load_detector(config.grounded_checkpoint, device=device,
                                 bert_dir=config.bert_dir, params=params)
    from filo.scorers import SCORERS

    size = model.config.image_size if model is not None else config.image_size
    memory = SCORERS["memory"](config, device=device, filo_model=model) \
        if config.uses_memory else None
    musc = SCORERS["musc"](config, device=device, filo_model=model,
                           image_size=size or DEFAULT_IMAGE_SIZE) if config.uses_musc else None
    scorer = SCORERS["baseline"](config, device=device) if config.baseline is not None else None
    return Pipeline(config, prompts, model, detector, memory=memory, musc=musc, scorer=scorer,
                    image_size=size)


__all__ = ["BoxStepResult", "ImagePrediction", "METHODS", "Pipeline", "PipelineConfig",
           "RESEARCH_RULES", "box_step", "build_pipeline", "generic_prompts_note",
           "load_pipeline_prompts", "memory_map_range"]
