"""GroundingDINO detector (transformers backend) for FiLo's box step.

Public API::

    from filo.detector import load_detector, Detector, Detection, DetectionParams
    det = load_detector("ckpt/grounding_train_on_mvtec.pth", device="cpu", bert_dir=None)
    results = det.detect(images, class_names, prompts)   # list[Detection], one per image

Checkpoints in the ORIGINAL GroundingDINO layout are converted on load; ``python -m
filo.detector convert IN OUT`` writes the converted file once.
"""

from __future__ import annotations

from filo.detector.caption import build_caption
from filo.detector.config import DetectorArch
from filo.detector.inference import Detection, DetectionParams, Detector, load_detector

__all__ = ["Detection", "DetectionParams", "Detector", "DetectorArch", "build_caption",
           "load_detector"]
