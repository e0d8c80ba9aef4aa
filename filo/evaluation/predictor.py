"""One batch in, anomaly maps and image scores out: FiLo maps, with the GroundingDINO box step.

With a grounding checkpoint (docs/design.md section 6): the detector runs first on the detector
input of each image; its highest-scoring counted box picks the position word of the abnormal
prompts, FiLo computes the map and the image score (before fusion, as in the research code),
then the map is multiplied by the outside-box factor everywhere outside the counted boxes.
Without one: FiLo alone, abnormal prompts of all nine positions averaged (or ``--position``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from filo.device import resolve_device
from filo.errors import FiloError
from filo.evaluation.runner import BatchPredictions, EvalSettings, Predictor
from filo.fusion import fuse_with_boxes, position_from_boxes
from filo.prompts import PromptTable, load_prompt_table

logger = logging.getLogger(__name__)


def load_prompts_for(settings: EvalSettings) -> PromptTable:
    return load_prompt_table(settings.prompts, legacy_macaroni=settings.legacy_macaroni)


def build_filo_model(settings: EvalSettings, prompts: PromptTable, device: torch.device):
    from filo.checkpoint import build_filo_from_checkpoint

    if settings.ckpt_path is None:
        raise FiloError("--ckpt_path is required: a FiLo checkpoint such as ckpt/filo_train_on_visa.pth")
    model = build_filo_from_checkpoint(settings.ckpt_path, prompts=prompts, device=device,
                                       legacy_macaroni=settings.legacy_macaroni,
                                       score_mode=settings.score_mode,
                                       autocast=settings.autocast,
                                       onednn_linear=settings.kernels == "fast",
                                       clip_act=settings.clip_act)
    if model.config.image_size != settings.image_size:
        raise FiloError(f"{settings.ckpt_path} is built for {model.config.image_size}x"
                        f"{model.config.image_size} inputs; pass --image_size "
                        f"{model.config.image_size}")
    return model.eval()


def build_detector(settings: EvalSettings, device: torch.device):
    from filo.detector.inference import DetectionParams, load_detector

    params = DetectionParams(
        box_threshold=settings.box_threshold, text_threshold=settings.text_threshold,
        area_threshold=settings.area_threshold,
        legacy_text_threshold=settings.legacy_text_threshold,
        case_sensitive=settings.legacy_phrase_case, batch_size=max(1, settings.batch_size),
        fast_kernels=settings.kernels == "fast")
    return load_detector(settings.grounded_checkpoint, device=device, bert_dir=settings.bert_dir,
                         params=params)


def check_classes(prompts: PromptTable, class_names: list[str], where: str) -> None:
    unknown = [c for c in class_names if not prompts.has_class(c)]
    if unknown:
        raise FiloError(f"class {unknown[0]!r} of {where} has no prompts in "
                        f"{prompts.source}; add it to a prompt file and pass --prompts "
                        f"(see prompts/README.md)")


class FiLoPredictor:
    """FiLo maps for a batch, with the optional GroundingDINO step."""

    def __init__(self, settings: EvalSettings, model, prompts: PromptTable, detector=None):
        self.settings = settings
        self.model = model
        self.prompts = prompts
        self.detector = detector
        if settings.position is not None and detector is None:
            prompts.check_position(settings.position)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> BatchPredictions:
        classes = list(batch["cls_name"])
        size = self.settings.image_size
        extras: list[dict[str, Any]] = [{} for _ in classes]
        boxes_map: list[np.ndarray] | None = None
        if self.detector is not None:
            positions, boxes_map = self._detect(batch, classes, extras, size)
        else:
            positions = [self.settings.position] * len(classes)
        out = self.model.predict(batch["image"], classes, positions)
        maps = out.anomaly_map.float().cpu()
        if boxes_map is not None:
            maps = fuse_with_boxes(maps, boxes_map, self.settings.outside_box_factor,
                                   legacy_slices=self.settings.legacy_box_slices)
        return BatchPredictions(maps.numpy().astype(np.float32),
                                out.image_score.float().cpu().numpy(), extras)

    def _detect(self, batch, classes, extras, size):
        words = self.prompts.grounding_words
        from filo.detector.caption import build_caption

        captions = [build_caption(words, self.prompts.detail_phrases(c)) for c in classes]
        match = [[*self.prompts.detail_phrases(c), *words] for c in classes]
        dets = self.detector.detect_tensors(batch["det_image"], batch["orig_size"], captions, match)
        positions, boxes_map = [], []
        for i, det in enumerate(dets):
            in_map = det.boxes_in_map(size, research=self.settings.legacy_box_slices).numpy()
            counted = np.asarray(det.matched, dtype=bool)
            det.position = position_from_boxes(in_map, det.scores.numpy(), counted,
                                               self.prompts.positions, size=size,
                                               legacy_grid=self.settings.legacy_grid)
            positions.append(det.position)
            boxes_map.append(in_map[counted])
            extras[i]["detections"] = det.to_json()
        return positions, boxes_map


def build_predictor(settings: EvalSettings) -> Predictor:
    device = resolve_device(settings.device)
    prompts = load_prompts_for(settings)
    detector = build_detector(settings, device) if settings.grounding else None
    model = build_filo_model(settings, prompts, device)
    return FiLoPredictor(settings, model, prompts, detector)
