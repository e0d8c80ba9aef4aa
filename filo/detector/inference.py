"""GroundingDINO detection for FiLo (docs/design.md section 6), batched over images.

``Detector.detect`` takes PIL images (or prepared tensors), one caption per image and the words
that make a box count, and returns one :class:`Detection` per image with boxes in ORIGINAL image
pixels. Images of the same detector size and caption token count run as one batch (exactly the
single-image result); ``DetectionParams.pad_to_batch`` pads differently sized images (and captions) into one batch with
a pixel mask instead (faster, but padding changes the Swin windows, so results differ slightly).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from filo.detector.caption import phrase_from_token_probs, phrase_matches
from filo.detector.deform_attn import use_gather_deformable_attention
from filo.device import resolve_device
from filo.kernels import use_onednn_linears

log = logging.getLogger(__name__)


@dataclass
class DetectionParams:
    """Thresholds and switches of the box step (defaults: the research code's command line)."""

    box_threshold: float = 0.25
    text_threshold: float = 0.25
    area_threshold: float = 0.7  # fraction of the image; boxes with w*h >= this are dropped
    legacy_text_threshold: bool = False  # research code decoded phrases with box_threshold
    case_sensitive: bool = False  # research code: case-sensitive substring matching
    pad_to_batch: bool = False  # pad different sizes into one batch (pixel_mask)
    batch_size: int = 8
    # CPU float32 kernels, applied when the Detector is created: linear layers via oneDNN
    # (filo.kernels) and deformable attention as one gather (filo.detector.deform_attn); same
    # results to float rounding. False: transformers' own ops (the research-code-like setting)
    fast_kernels: bool = True

    @property
    def phrase_threshold(self) -> float:
        return self.box_threshold if self.legacy_text_threshold else self.text_threshold


@dataclass
class Detection:
    """Kept boxes of one image. ``boxes`` are x1, y1, x2, y2 in original-image pixels."""

    boxes: torch.Tensor  # [N, 4] float
    scores: torch.Tensor  # [N] max token probability
    phrases: list[str]
    matched: list[bool]  # box counts (a detail phrase / general word is in its phrase)
    image_size: tuple[int, int]  # original (w, h)
    position: str | None = None  # filled by the caller from filo.fusion.position_from_boxes
    boxes_norm: torch.Tensor | None = None  # [N, 4] the detector's normalized cx, cy, w, h

    @property
    def best_score(self) -> float:
        """Image-level detector score: the best kept box's score (0 when there is none)."""
        return float(self.scores.max()) if len(self.scores) else 0.0

    def counted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes and scores of the counted (matched) boxes."""
        mask = torch.tensor(self.matched, dtype=torch.bool)
        return self.boxes[mask], self.scores[mask]

    def boxes_in_map(self, size: int = 518, research: bool = False) -> torch.Tensor:
        """Boxes mapped to the size x size CLIP map (a non-aspect-preserving resize).

        ``research``: the research code's geometry instead, normalized boxes times ``size``
        without clamping to the image (:func:`filo.fusion.research_box_corners`).
        """
        if research:
            from filo.fusion import research_box_corners

            if self.boxes_norm is None:
                raise ValueError("this Detection carries no normalized boxes (boxes_norm)")
            return research_box_corners(self.boxes_norm, size)
        w, h = self.image_size
        scale = torch.tensor([size / w, size / h, size / w, size / h], dtype=self.boxes.dtype)
        return self.boxes * scale

    def to_json(self) -> dict:
        return {
            "boxes": [[round(float(v), 2) for v in box] for box in self.boxes],
            "scores": [round(float(s), 5) for s in self.scores],
            "phrases": list(self.phrases),
            "matched": [bool(m) for m in self.matched],
            "position": self.position,
            # the detector's own normalized boxes, exact (float32 values), for the research geometry
            **({"boxes_cxcywh": [[float(v) for v in box] for box in self.boxes_norm]}
               if self.boxes_norm is not None else {}),
        }


def select_queries(probs: torch.Tensor, boxes: torch.Tensor, box_threshold: float,
                   area_threshold: float) -> torch.Tensor:
    """Indices of kept queries: max prob > box_threshold and w*h < area_threshold.

    ``probs`` [Q, T] token probabilities, ``boxes`` [Q, 4] normalized cx, cy, w, h. If no query
    survives, the single best query (highest max prob) is kept regardless of both rules.
    """
    best = probs.max(dim=1).values
    area = boxes[:, 2] * boxes[:, 3]
    keep = torch.nonzero((best > box_threshold) & (area < area_threshold)).flatten()
    if keep.numel() == 0:
        keep = best.argmax().reshape(1)
    return keep


def cxcywh_to_xyxy_pixels(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalized cx, cy, w, h -> x1, y1, x2, y2 pixels, clamped to the image."""
    cx, cy, w, h = boxes.unbind(-1)
    out = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                       (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
    out[..., 0::2] = out[..., 0::2].clamp(0, width)
    out[..., 1::2] = out[..., 1::2].clamp(0, height)
    return out


def postprocess(probs: torch.Tensor, boxes: torch.Tensor, input_ids: Sequence[int], tokenizer,
                image_size: tuple[int, int], match_words: Sequence[str],
                params: DetectionParams) -> Detection:
    """One image's sigmoid token probabilities [Q, T] and boxes [Q, 4] -> :class:`Detection`."""
    n_tokens = len(input_ids)
    probs = probs[:, :n_tokens].float().cpu()
    boxes = boxes.float().cpu()
    keep = select_queries(probs, boxes, params.box_threshold, params.area_threshold)
    phrases = [phrase_from_token_probs(probs[q], input_ids, tokenizer, params.phrase_threshold)
               for q in keep.tolist()]
    matched = [phrase_matches(p, match_words, params.case_sensitive) for p in phrases]
    w, h = image_size
    return Detection(boxes=cxcywh_to_xyxy_pixels(boxes[keep], w, h),
                     scores=probs[keep].max(dim=1).values, phrases=phrases, matched=matched,
                     image_size=(int(w), int(h)), boxes_norm=boxes[keep].clone())


class Detector:
    """A loaded GroundingDINO (transformers) with its tokenizer and parameters."""

    def __init__(self, model, tokenizer, params: DetectionParams | None = None,
                 device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.params = params or DetectionParams()
        if self.params.fast_kernels:  # same parameters; only the CPU float32 kernels change
            use_onednn_linears(self.model)
            use_gather_deformable_attention(self.model)

    # -- core -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixel_values: Sequence[torch.Tensor], captions: Sequence[str]
                ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Run one batch: sigmoid token probs [B, Q, T], boxes [B, Q, 4], token ids per image.

        Images of different sizes are padded bottom/right with a pixel mask.
        """
        heights = [int(t.shape[-2]) for t in pixel_values]
        widths = [int(t.shape[-1]) for t in pixel_values]
        batch = torch.zeros(len(pixel_values), 3, max(heights), max(widths))
        mask = torch.zeros(len(pixel_values), max(heights), max(widths), dtype=torch.long)
        for i, t in enumerate(pixel_values):
            batch[i, :, : heights[i], : widths[i]] = t
            mask[i, : heights[i], : widths[i]] = 1
        text = self.tokenizer(list(captions), padding="longest", return_tensors="pt")
        ids = [self.tokenizer(c)["input_ids"] for c in captions]
        out = self.model(pixel_values=batch.to(self.device), pixel_mask=mask.to(self.device),
                         input_ids=text["input_ids"].to(self.device),
                         attention_mask=text["attention_mask"].to(self.device),
                         token_type_ids=text["token_type_ids"].to(self.device))
        return out.logits.sigmoid().cpu(), out.pred_boxes.cpu(), ids

    def detect_tensors(self, pixel_values: Sequence[torch.Tensor],
                       image_sizes: Sequence[tuple[int, int]], captions: Sequence[str],
                       match_words: Sequence[Sequence[str]]) -> list[Detection]:
        """Detections for prepared detector inputs ([3, h', w'] each) and original (w, h) sizes."""
        n = len(pixel_values)
        if not (len(image_sizes) == len(captions) == len(match_words) == n):
            raise ValueError("pixel_values, image_sizes, captions and match_words differ in length")
        order = list(range(n))
        # exact mode: groups of the same image size AND the same caption token count, so neither
        # images nor texts get padded (transformers 4.40 lets padded text tokens change the
        # result; 5.x does not, but unpadded batches are exact on every version)
        group = [(tuple(pixel_values[i].shape[-2:]), len(self.tokenizer(captions[i])["input_ids"]))
                 for i in range(n)]
        if not self.params.pad_to_batch:
            order.sort(key=lambda i: group[i])
        results: list[Detection | None] = [None] * n
        step = max(1, self.params.batch_size)
        chunks: list[list[int]] = []
        for i in order:
            same = (chunks and len(chunks[-1]) < step and (
                self.params.pad_to_batch or group[chunks[-1][0]] == group[i]))
            if same:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        for chunk in chunks:
            probs, boxes, ids = self.forward([pixel_values[i] for i in chunk],
                                             [captions[i] for i in chunk])
            for j, i in enumerate(chunk):
                results[i] = postprocess(probs[j], boxes[j], ids[j], self.tokenizer,
                                         image_sizes[i], match_words[i], self.params)
        return results  # type: ignore[return-value]


def load_detector(checkpoint: str | Path, device: str | torch.device | None = "cpu",
                  bert_dir: str | Path | None = None,
                  params: DetectionParams | None = None) -> Detector:
    """Load a GroundingDINO checkpoint (original layout converted on the fly) as a Detector.

    The tokenizer comes from ``bert_dir`` / ``$FILO_BERT_LOCAL`` / third_party/bert-base-uncased
    (vocab.txt), never from the network; the BERT weights come from the checkpoint.
    """
    from filo.detector.model import load_detector_model, load_tokenizer

    tokenizer = load_tokenizer(bert_dir)  # fail fast on a missing vocab before the big load
    dev = resolve_device(device)
    model, report = load_detector_model(checkpoint, device=dev, bert_dir=bert_dir)
    if report.conversion is not None:
        log.info("%s: %s", checkpoint, report.conversion.summary())
    return Detector(model, tokenizer, params, dev)
