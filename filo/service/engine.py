"""What the service does with one request: settings, decoding, inference, output files.

:class:`Engine` wraps a loaded :class:`~filo.pipeline.Pipeline`. A request is

1. checked and decoded in the request's thread (:meth:`Engine.prepare`): its
   :class:`RequestSettings`, the image bytes (format, pixel count) and the model inputs;
2. predicted in a batch on the batcher's worker thread (:meth:`Engine.run_batch`): requests with
   the same settings share one forward pass; a request's own defect phrases or thresholds are
   applied to the pipeline for its group and put back afterwards (the worker is the only thread
   that touches the models);
3. rendered in the request's thread again (:meth:`Engine.finish`): overlay and mask PNGs and the
   result JSON under ``out_dir/<request id>/``, and the response.

Verdicts: a class whose memory bank is calibrated gets ``normal`` / ``anomalous`` from its image
threshold. When a request changes a setting that moves the score the threshold was calibrated
for (phrases or box thresholds while FiLo counts), the verdict is withheld and said why.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from filo.data.dataset import collate, image_inputs
from filo.data.transforms import decode_image_bytes
from filo.errors import FiloError
from filo.fileio import atomic_write_bytes, atomic_write_text, ensure_inside
from filo.pipeline import ImagePrediction, Pipeline
from filo.service.config import IMAGE_FORMATS, ServiceConfig
from filo.settings import in_range

RESULT_FILES = ("overlay.png", "mask.png", "result.json")
MAX_PHRASES = 64
MAX_PHRASE_CHARS = 80


class RequestError(FiloError):
    """A problem with what the client sent (answered 4xx; ``status`` says which)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestSettings:
    """What one request may change; ``None`` keeps the service's setting."""

    class_name: str
    phrases: tuple[str, ...] | None = None  # the class's defect phrases, replaced
    box_threshold: float | None = None
    text_threshold: float | None = None
    area_threshold: float | None = None
    outside_box_factor: float | None = None
    mask_threshold: float | None = None

    def group_key(self) -> tuple:
        """Requests with equal keys share a forward pass (the mask threshold is applied later)."""
        return (self.class_name if self.phrases is not None else None, self.phrases,
                self.box_threshold, self.text_threshold, self.area_threshold,
                self.outside_box_factor)

    @property
    def changes_model(self) -> bool:
        return any(v is not None for v in self.group_key()[1:])


_RANGES = {"box_threshold": in_range(0.0, 1.0), "text_threshold": in_range(0.0, 1.0),
           "area_threshold": in_range(0.0, 1.0, lo_open=True),
           "outside_box_factor": in_range(0.0, 1.0), "mask_threshold": in_range(0.0, 1.0)}


def parse_phrases(text: str | None) -> tuple[str, ...] | None:
    """Defect phrases from a form field: one per line (blank lines ignored); None when absent."""
    if text is None or not text.strip():
        return None
    phrases = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(phrases) > MAX_PHRASES:
        raise RequestError(f"phrases: at most {MAX_PHRASES} lines, got {len(phrases)}")
    long = [p for p in phrases if len(p) > MAX_PHRASE_CHARS]
    if long:
        raise RequestError(f"phrases: {long[0][:20]!r}... is longer than {MAX_PHRASE_CHARS} "
                           "characters")
    if any(ch in p for p in phrases for ch in ".;"):
        raise RequestError("phrases: a phrase may not contain '.' or ';' (they separate the "
                           "detector's caption)")
    return phrases


@dataclass
class PreparedRequest:
    """A checked, decoded request waiting for the model."""

    request_id: str
    settings: RequestSettings
    filename: str
    rgb: np.ndarray  # the original image, RGB uint8 (for the overlay)
    item: dict[str, Any]  # model inputs (filo.data.dataset.image_inputs)
    received: float


class Engine:
    """The loaded pipeline and everything a request needs around it."""

    def __init__(self, pipeline: Pipeline, config: ServiceConfig, out_dir: Path) -> None:
        self.pipeline = pipeline
        self.config = config
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._base_prompts = pipeline.prompts
        self._base_config = pipeline.config
        self._base_params = pipeline.detector.params if pipeline.detector is not None else None
        self._results: deque[str] = deque(self._existing_results())
        self._results_lock = threading.Lock()

    # ---- classes -------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        """Classes a request may name (dataset spelling: ``metal_nut``)."""
        p = self.pipeline
        pools = p.musc.pools if getattr(p, "musc", None) is not None else None
        if p.model is None and p.detector is None:
            return list(pools.classes) if pools is not None else list(p.memory.classes)
        names = [k.replace(" ", "_") for k in self._base_prompts.class_names]
        if p.memory is not None:
            names = [n for n in names if n in p.memory.classes]
        if pools is not None:  # MuSc scores single images against the classes' pools
            names = [n for n in names if n in pools.classes]
        return names

    def resolve_class(self, name: str) -> str:
        name = (name or "").strip()
        known = self.class_names()
        for candidate in (name, name.replace(" ", "_")):
            if candidate in known:
                return candidate
        raise RequestError(f"class_name {name!r} is unknown; GET /v1/classes lists the "
                           f"{len(known)} classes of this service", status=422)

    def classes_info(self) -> dict[str, Any]:
        p = self.pipeline
        cfg = self._base_config
        out = []
        for name in self.class_names():
            cal = p.calibration(name)
            entry: dict[str, Any] = {"name": name, "calibrated": cal is not None,
                                     "map_range": list(p.map_range(name))}
            if p.model is not None or p.detector is not None:
                prompts = self._base_prompts
                entry.update(phrases=prompts.detail_phrases(name),
                             table_key=prompts.table_key(name),
                             object_word=prompts.prompt_name(name))
            if cal is not None:
                entry["image_threshold"] = cal["image_threshold"]
                entry["pixel_threshold"] = cal["pixel_threshold"]
            out.append(entry)
        return {
            "classes": out,
            "models": {"filo": p.model is not None, "grounding": p.detector is not None,
                       "memory_bank": p.memory is not None,
                       "fusion": cfg.fusion_mode if p.memory is not None else None},
            "defaults": {"box_threshold": cfg.box_threshold,
                         "text_threshold": cfg.text_threshold,
                         "area_threshold": cfg.area_threshold,
                         "outside_box_factor": cfg.outside_box_factor,
                         "mask_threshold": self.config.mask_threshold},
            "prompt_file": {"source": self._base_prompts.source,
                            "grounding_words": self._base_prompts.grounding_words},
            "image_size": p.image_size,
            "input_sizes": self.input_sizes(),
            "limits": {"max_upload_mb": self.config.max_upload_mb,
                       "max_image_pixels": self.config.max_image_pixels,
                       "formats": list(IMAGE_FORMATS)},
        }

    # ---- 1. request thread: check and decode ---------------------------------------------------
    def settings(self, class_name: str, phrases: str | None = None, **values: float | None
                 ) -> RequestSettings:
        ranges = dict(_RANGES)
        if self.pipeline.raw_memory_maps:  # raw PatchCore distances: any value >= 0
            ranges["mask_threshold"] = in_range(0.0, float("inf"))
        for name, value in values.items():
            if value is not None and (problem := ranges[name](value)):
                raise RequestError(f"{name} {value}: {problem}", status=422)
        parsed = parse_phrases(phrases)
        if parsed is not None and self.pipeline.model is None and self.pipeline.detector is None:
            raise RequestError("phrases: this service scores with a memory bank alone; it has "
                               "no prompts to edit", status=422)
        return RequestSettings(class_name=self.resolve_class(class_name), phrases=parsed,
                               **values)

    def prepare(self, data: bytes, filename: str, settings: RequestSettings) -> PreparedRequest:
        name = Path(filename or "upload").name[:100] or "upload"
        try:
            img = decode_image_bytes(data, name, allowed_formats=frozenset(IMAGE_FORMATS),
                                     max_pixels=self.config.max_image_pixels)
        except RequestError:
            raise
        except FiloError as err:
            raise RequestError(str(err), status=415 if "format" in str(err) else 400) from None
        p = self.pipeline
        try:
            item = image_inputs(img, settings.class_name, p.image_size,
                                with_detector_input=p.needs_detector_input,
                                memory_transform=p.memory_transform, name=name)
        except FiloError as err:  # a degenerate shape (6000x2 with the box step, ...)
            raise RequestError(str(err), status=422) from None
        rgb = np.asarray(img.convert("RGB"))
        return PreparedRequest(uuid.uuid4().hex, settings, name, rgb, item, time.perf_counter())

    def warmup(self, max_classes: int = 64, size: tuple[int, int] = (128, 96)) -> int:
        """Run every model once per class (up to ``max_classes``) on a plain grey image, and
        draw one panel, so that the first real request costs what later ones do (lazy weights,
        prompt encodings, kernels, image code paths); nothing is written. Returns the number of
        classes warmed. The CLI calls it before the port opens (design.md section 15.1)."""
        from filo.viz import render_panel

        grey = Image.new("RGB", size, (128, 128, 128))
        buf = io.BytesIO()
        grey.save(buf, format="PNG")
        names = self.class_names()[:max_classes]
        for name in names:
            req = self.prepare(buf.getvalue(), "warmup.png", self.settings(name))
            outcome = self.run_batch([req])[0]
            if isinstance(outcome, Exception):
                raise outcome
            pred = outcome[0]
            vmin, vmax = self.view_scale(name, pred, req.rgb.shape[:2])[:2]
            det = pred.detection or {}
            render_panel(req.rgb, pred.anomaly_map.astype(np.float32), vmin=vmin, vmax=vmax,
                         boxes=det.get("boxes"), box_labels=det.get("phrases"),
                         box_scores=det.get("scores"), box_matched=det.get("matched"),
                         title="warmup")
        return len(names)

    def input_sizes(self) -> dict[str, Any]:
        """Each model's own input size in pixels: FiLo's square side, the detector's short /
        long side limits, each memory bank's crop side (``{class: side}``)."""
        from filo.data.transforms import DETECTOR_MAX_SIZE, DETECTOR_SHORT_SIDE

        p = self.pipeline
        out: dict[str, Any] = {}
        if p.model is not None:
            out["filo"] = int(p.image_size)
        if p.detector is not None:
            out["grounding"] = {"short_side": DETECTOR_SHORT_SIDE, "max_side": DETECTOR_MAX_SIZE}
        if p.memory is not None:
            out["memory_bank"] = {c: int(p.memory.meta(c).imagesize)
                                  for c in self.class_names()}
        return out

    def view_scale(self, cls_name: str, pred, hw: tuple[int, int], full: np.ndarray | None = None,
                   ) -> tuple[float, float, float | None]:
        """(vmin, vmax, threshold on the map) of one result, from ONE calibrated threshold: the
        class's image threshold (the verdict's) expressed on this image's map, ``t x map max /
        image score`` (the image score is the map's peak before its last smoothing), so the
        verdict is anomalous exactly when some pixel reaches it; the colour scale is 0 .. 2t
        (the threshold mid-bar). Without a calibrated threshold: the pipeline's map range and
        no threshold."""
        vmin, vmax = self.pipeline.map_range(cls_name)
        cal = self.pipeline.calibration(cls_name) if self.pipeline.memory is not None else None
        score = float(pred.image_score)
        if cal is None or not np.isfinite(score) or score <= 0:
            return vmin, vmax, None
        peak = float(np.max(full)) if full is not None else float(np.max(pred.anomaly_map))
        if not np.isfinite(peak) or peak <= 0:
            return vmin, vmax, None
        t = float(cal["image_threshold"]) * peak / score
        return 0.0, 2.0 * t, t

    # ---- 2. worker thread: batches -------------------------------------------------------------
    def run_batch(self, requests: list[PreparedRequest]) -> list[Any]:
        """Predictions in request order; requests with other settings run as their own group."""
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.settings.group_key(), []).append(i)
        for indices in groups.values():
            started = time.perf_counter()
            try:
                with self._applied(requests[indices[0]].settings):
                    preds = self.pipeline.predict(collate([requests[i].item for i in indices]))
            except Exception as err:  # noqa: BLE001 - one group's failure is its requests' error
                for i in indices:
                    out[i] = err
                continue
            took = time.perf_counter() - started
            for i, pred in zip(indices, preds, strict=True):
                out[i] = (pred, started, took, len(indices))
        return out

    @contextmanager
    def _applied(self, s: RequestSettings):
        """The pipeline with ``s``'s phrases and thresholds inside the block, put back after."""
        if not s.changes_model:
            yield
            return
        p = self.pipeline
        prompts = self._base_prompts
        if s.phrases is not None:
            key = prompts.table_key(s.class_name)
            prompts = replace(prompts, classes={**prompts.classes, key: list(s.phrases)})
        try:
            p.prompts = prompts
            if p.model is not None and s.phrases is not None:
                p.model.set_prompt_table(prompts)
            if s.outside_box_factor is not None:
                p.config = replace(self._base_config, outside_box_factor=s.outside_box_factor)
            if p.detector is not None:
                changes = {k: getattr(s, k) for k in ("box_threshold", "text_threshold",
                                                      "area_threshold")
                           if getattr(s, k) is not None}
                p.detector.params = replace(self._base_params, **changes)
            yield
        finally:
            p.prompts = self._base_prompts
            if p.model is not None and s.phrases is not None:
                p.model.set_prompt_table(self._base_prompts)
            p.config = self._base_config
            if p.detector is not None:
                p.detector.params = self._base_params

    # ---- 3. request thread: outputs ------------------------------------------------------------
    def finish(self, req: PreparedRequest, outcome: tuple[ImagePrediction, float, float, int]
               ) -> dict[str, Any]:
        from PIL import Image

        from filo.viz import render_panel, write_panel

        pred, started, took, batch = outcome
        s = req.settings
        h, w = req.rgb.shape[:2]
        folder = ensure_inside(self.out_dir, self.out_dir / req.request_id)
        folder.mkdir()
        det = pred.detection or {}
        amap = pred.anomaly_map.astype(np.float32)
        full = np.asarray(Image.fromarray(amap, mode="F").resize((w, h), Image.BILINEAR))
        calibrated_view = not (s.changes_model and self.pipeline.config.fusion_mode != "memory")
        vmin, vmax, map_threshold = (self.view_scale(s.class_name, pred, (h, w), full)
                                     if calibrated_view else
                                     (*self.pipeline.map_range(s.class_name), None))
        panel = render_panel(req.rgb, amap, vmin=vmin, vmax=vmax, boxes=det.get("boxes"),
                             box_labels=det.get("phrases"), box_scores=det.get("scores"),
                             box_matched=det.get("matched"),
                             title=f"{req.filename}  score {pred.image_score:.3f}")
        write_panel(folder / "overlay.png", panel)

        cal = self.pipeline.calibration(s.class_name)
        verdict = note = None
        threshold = None
        if cal is not None:
            if s.changes_model and self.pipeline.config.fusion_mode != "memory":
                note = ("no verdict: this request's phrases or thresholds differ from those the "
                        "memory bank's threshold was calibrated with")
            else:
                threshold = cal["image_threshold"]
                verdict = "anomalous" if pred.image_score >= threshold else "normal"
        else:
            note = ("no verdict: the class has no calibrated memory bank and the service has no "
                    "--calib_dir")
        mask_threshold, mask_source = s.mask_threshold, "request"
        if mask_threshold is None and map_threshold is not None:
            mask_threshold, mask_source = map_threshold, "calibrated image threshold"
        if mask_threshold is None:
            mask_threshold, mask_source = self.config.mask_threshold, "service default"
        binary = full >= mask_threshold
        atomic_write_bytes(folder / "mask.png", _png_bytes((binary * 255).astype(np.uint8)))

        base = f"/v1/results/{req.request_id}"
        boxes = [{"box": [round(float(v), 2) for v in b], "score": round(float(sc), 5),
                  "phrase": ph, "counted": bool(m)}
                 for b, sc, ph, m in zip(det.get("boxes", []), det.get("scores", []),
                                         det.get("phrases", []), det.get("matched", []),
                                         strict=True)]
        result = {
            "id": req.request_id,
            "class_name": s.class_name,
            "filename": req.filename,
            "image_size": [w, h],
            "image_score": float(pred.image_score),
            "verdict": verdict,
            "image_threshold": threshold,
            "verdict_note": note,
            "position": pred.position,
            "boxes": boxes,
            "mask_threshold": float(mask_threshold),
            "mask_threshold_source": mask_source,
            "anomalous_fraction": float(binary.mean()),
            "map_max": float(amap.max()),
            "color_scale": [float(vmin), float(vmax)],
            "overlay_url": f"{base}/overlay.png",
            "mask_url": f"{base}/mask.png",
            "result_url": f"{base}/result.json",
            "settings": self.effective_settings(s),
            "timing_ms": {"queue": round((started - req.received) * 1e3, 2),
                          "inference": round(took * 1e3, 2), "batch_size": batch,
                          "total": round((time.perf_counter() - req.received) * 1e3, 2)},
        }
        atomic_write_text(folder / "result.json", json.dumps(result, indent=1) + "\n")
        self._remember(req.request_id)
        return result

    def effective_settings(self, s: RequestSettings) -> dict[str, Any]:
        cfg = self._base_config
        out: dict[str, Any] = {
            k: getattr(s, k) if getattr(s, k) is not None else getattr(cfg, k)
            for k in ("box_threshold", "text_threshold", "area_threshold", "outside_box_factor")}
        if self.pipeline.model is not None or self.pipeline.detector is not None:
            out["phrases"] = (list(s.phrases) if s.phrases is not None
                              else self._base_prompts.detail_phrases(s.class_name))
        return out

    # ---- result files --------------------------------------------------------------------------
    def result_file(self, request_id: str, name: str) -> Path:
        """The path of one output file; only ids this service made and the known names."""
        if name not in RESULT_FILES or len(request_id) != 32 or not all(
                c in "0123456789abcdef" for c in request_id):
            raise RequestError("no such result", status=404)
        path = self.out_dir / request_id / name
        if not path.is_file():
            raise RequestError("no such result (results are kept for the latest "
                               f"{self.config.keep_results} requests)", status=404)
        return path

    def _existing_results(self) -> list[str]:
        found = [d for d in self.out_dir.iterdir()
                 if d.is_dir() and len(d.name) == 32 and (d / "result.json").is_file()]
        return [d.name for d in sorted(found, key=lambda d: d.stat().st_mtime)]

    def _remember(self, request_id: str) -> None:
        with self._results_lock:
            self._results.append(request_id)
            old = []
            while len(self._results) > self.config.keep_results:
                old.append(self._results.popleft())
        for rid in old:
            shutil.rmtree(self.out_dir / rid, ignore_errors=True)


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
