"""GroundingDINO detector (transformers backend) for FiLo's box step.

Public API::

    from filo.detector import load_detector, Detector, Detection, DetectionParams
    det = load_detector("ckpt/grounding_train_on_mvtec.pth", device="cpu", bert_dir=None)
    dets = det.detect_tensors(pixel_values, orig_sizes, captions, match_words)  # one per image
    # FiLo's whole box step (caption, detect, map boxes, position): filo.pipeline.box_step

Checkpoints in the ORIGINAL GroundingDINO layout are converted on load; ``python -m
filo.detector convert IN OUT`` writes the converted file once (canonical transformers-5.x names,
renamed on load for the installed transformers, so converted files work on every version).

transformers versions verified (tests/test_detector_*.py and test_fusion.py pass; the converted
tiny model reproduces the original groundingdino-py fixture to < 5e-6 in logits and < 1e-6 in
boxes; tokenizer from a local vocab.txt with ``local_files_only``): 4.40.2, 4.57.6, 5.24.0.
GroundingDINO first shipped in transformers 4.40.0 (4.39.3 has no ``grounding_dino``), so
``transformers>=4.40,<6`` is the supported range. 4.x and 5.x differ only in the Swin backbone
module names (see ``filo.detector.convert.V4_RENAMES``).
"""

from __future__ import annotations

from filo.detector.caption import build_caption
from filo.detector.config import DetectorArch
from filo.detector.inference import Detection, DetectionParams, Detector, load_detector

__all__ = ["Detection", "DetectionParams", "Detector", "DetectorArch", "build_caption",
           "load_detector"]
