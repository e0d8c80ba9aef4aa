"""Torch-free inference of a bundle: the pipeline's maps, scores and verdicts from numpy and a
runtime (docs/design.md §18).

:class:`BundleInferencer` mirrors :class:`filo.pipeline.Pipeline` without the box step:

* FiLo: PIL bicubic resize to the bundle's size (:func:`filo.imagefile.clip_resize`), ToTensor,
  CLIP mean/std; the image graph; the text graph on the class's normal rows and the abnormal
  rows of the bundle's position (all nine, averaged, without one); :func:`~filo.deploy.numerics.filo_maps`.
* memory bank: PatchCore's resize (+ centre crop), ImageNet or CLIP mean/std; the feature graph;
  numpy aggregation, kNN against the bank, smoothing, image score; the map in the full-image
  geometry (crop placed, the rest at the calibration's pixel mean).
* fusion ``mean`` / ``max``: both maps and scores as z-scores of their normal-image statistics,
  combined, squashed by 1/2 + z / (2 (1 + |z|)); calibrated thresholds give the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from filo.calibration import squash, zscore
from filo.deploy import numerics
from filo.deploy.bundle import Bundle
from filo.deploy.runtimes import open_graph
from filo.errors import FiloError
from filo.imagefile import clip_resize, to_rgb


@dataclass
class Prediction:
    anomaly_map: np.ndarray  # float32 [S, S]
    image_score: float
    position: str | None
    verdict: str | None = None
    image_threshold: float | None = None


def _to_input(img: Image.Image, mean, std) -> np.ndarray:
    """ToTensor + Normalize: [1, 3, H, W] float32."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((arr - m) / s).transpose(2, 0, 1)[None])


def patchcore_geometry(img: Image.Image, resize: int, imagesize: int, crop: bool) -> Image.Image:
    """torchvision Resize (shorter side, PIL bilinear) + CenterCrop, or a square resize."""
    if not crop:
        return img.resize((imagesize, imagesize), Image.Resampling.BILINEAR)
    w, h = img.size
    short, long_ = (w, h) if w <= h else (h, w)
    if short != resize:
        new_long = int(resize * long_ / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = int(round((w - imagesize) / 2.0)), int(round((h - imagesize) / 2.0))
    return img.crop((left, top, left + imagesize, top + imagesize))


class BundleInferencer:
    """A bundle's graphs, opened once; :meth:`predict` runs one decoded image."""

    def __init__(self, bundle: Bundle | str | Path, *, threads: int = 0) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        m = self.bundle.manifest
        self.fusion = m["fusion"]
        self.fusion_weight = float(m["fusion_weight"])
        self.position = m.get("position")
        self.size = int(m["map_size"])
        self.filo = m.get("filo")
        self._graphs: dict[str, object] = {}
        self._threads = threads
        self._text: dict[str, dict[str, np.ndarray]] = {}
        self._banks: dict[str, np.ndarray] = {}
        if self.filo:
            self._graph(self.filo["image_graph"])
            self._graph(self.filo["text_graph"])

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def raw_memory_maps(self) -> bool:
        return self.fusion == "memory" and self.filo is None

    def check_class(self, cls_name: str) -> None:
        if cls_name not in self.bundle.manifest["classes"]:
            raise FiloError(f"--class {cls_name!r}: the bundle {self.bundle.root} serves "
                            f"{', '.join(self.classes)}; export it with --classes {cls_name}")

    def _graph(self, rel: str):
        if rel not in self._graphs:
            self._graphs[rel] = open_graph(self.bundle.path(rel), self._threads)
        return self._graphs[rel]

    # ---- FiLo ------------------------------------------------------------------------------------
    def _class_text(self, cls_name: str) -> dict[str, np.ndarray]:
        if cls_name not in self._text:
            files = self.bundle.manifest["classes"][cls_name]["text"]
            arrays = {k: self.bundle.array(v) for k, v in files.items()}
            if self.position is not None:
                i = self.filo["positions"].index(self.position)
                n = int(self.filo["n_positions"])
                for k in ("abnormal_ids", "abnormal_embeddings"):
                    arrays[k] = np.ascontiguousarray(arrays[k][i::n])
            self._text[cls_name] = arrays
        return self._text[cls_name]

    def filo_input(self, img: Image.Image) -> np.ndarray:
        f = self.filo
        return _to_input(clip_resize(img, int(f["image_size"])), f["mean"], f["std"])

    def run_filo(self, img: Image.Image, cls_name: str) -> tuple[np.ndarray, float]:
        f = self.filo
        out = self._graph(f["image_graph"])({"image": self.filo_input(img)})
        feat = out["image_feature"]
        text = self._graph(f["text_graph"])({"image_feature": feat, **self._class_text(cls_name)})
        return numerics.filo_maps(out["patch"][0], text["text"], feat[0], int(f["image_size"]),
                                  logit_scale=f["logit_scale"], blur_kernel=f["blur_kernel"],
                                  blur_sigma=f["blur_sigma"], score_mode=f["score_mode"])

    # ---- memory bank -------------------------------------------------------------------------
    def _bank(self, cls_name: str) -> np.ndarray:
        if cls_name not in self._banks:
            rel = self.bundle.manifest["classes"][cls_name]["memory"]["bank"]
            self._banks[cls_name] = np.ascontiguousarray(self.bundle.array(rel),
                                                         dtype=np.float32)
        return self._banks[cls_name]

    def run_memory(self, img: Image.Image, cls_name: str) -> tuple[np.ndarray, float]:
        mc = self.bundle.manifest["classes"][cls_name]["memory"]
        rgb = to_rgb(img)
        x = _to_input(patchcore_geometry(rgb, mc["resize"], mc["imagesize"], mc["crop"]),
                      mc["mean"], mc["std"])
        out = self._graph(mc["graph"])({"image": x})
        feats = [out[f"feature_{j}"][0] for j in range(len(out))]
        rows, grid = numerics.aggregate(feats, mc["patchsize"], mc["pretrain_dim"],
                                        mc["target_dim"])
        scores = numerics.knn_scores(rows, self._bank(cls_name), mc["num_nn"])
        amap = numerics.memory_map(scores, grid, mc["imagesize"])
        score = numerics.image_scores(scores.reshape(grid), mc["score_rule"], mc["topk"])
        cal = mc["calibration"]
        crop = numerics.crop_box(rgb.size, mc["resize"], mc["imagesize"]) if mc["crop"] else None
        fill = float(cal.get("pixel_mean", float(amap.min())))
        return numerics.to_full_geometry(amap, self.size, crop, fill), score

    # ---- the pipeline ------------------------------------------------------------------------
    def predict(self, img: Image.Image, cls_name: str) -> Prediction:
        self.check_class(cls_name)
        if self.filo is not None:
            amap, score = self.run_filo(img, cls_name)
            if self.fusion in ("mean", "max"):
                amap, score = self._fuse(img, cls_name, amap, score)
        else:
            amap, score = self.run_memory(img, cls_name)
        pred = Prediction(amap.astype(np.float32), float(score), self.position)
        cal = self.calibration(cls_name)
        if cal is not None:
            pred.image_threshold = cal["image_threshold"]
            pred.verdict = "anomalous" if pred.image_score >= cal["image_threshold"] else "normal"
        return pred

    def _fuse(self, img, cls_name: str, filo_map, filo_score) -> tuple[np.ndarray, float]:
        mem_map, mem_score = self.run_memory(img, cls_name)
        cal = self.bundle.manifest["classes"][cls_name]["memory"]["calibration"]
        f_cal = cal["filo"]
        # the pipeline's normalisation (docs/design.md §13.2): z-scores with floored standard
        # deviations, combined, then the non-saturating squash
        zf = (zscore(filo_map, f_cal, "pixel"), zscore(filo_score, f_cal, "image"))
        zm = (zscore(mem_map, cal, "pixel"), zscore(mem_score, cal, "image"))
        w = self.fusion_weight
        if self.fusion == "mean":
            z_map, z_score = (1 - w) * zf[0] + w * zm[0], (1 - w) * zf[1] + w * zm[1]
        else:
            z_map, z_score = np.maximum(zf[0], zm[0]), np.maximum(zf[1], zm[1])
        return squash(z_map).astype(np.float32), float(squash(z_score))

    def calibration(self, cls_name: str) -> dict | None:
        """Calibrated thresholds, as :meth:`filo.pipeline.Pipeline.calibration`."""
        mem = self.bundle.manifest["classes"][cls_name].get("memory")
        if mem is None or self.fusion == "filo":
            return None
        cal = mem["calibration"]
        if "image_threshold" not in cal:
            return None
        if self.fusion == "memory":
            return {"image_threshold": float(cal["image_threshold"]),
                    "pixel_threshold": cal.get("pixel_threshold")}
        f_cal = cal.get("filo") or {}
        f_scores, m_scores = f_cal.get("image_scores") or [], cal.get("image_scores") or []
        if not f_scores or len(f_scores) != len(m_scores):
            return None
        zf, zm = zscore(f_scores, f_cal, "image"), zscore(m_scores, cal, "image")
        w = self.fusion_weight
        z = (1 - w) * zf + w * zm if self.fusion == "mean" else np.maximum(zf, zm)
        fused = squash(z)
        return {"image_threshold": float(np.quantile(fused, cal["image_quantile"])),
                "pixel_threshold": None}

    def map_range(self, cls_name: str) -> tuple[float, float]:
        if not self.raw_memory_maps:
            return 0.0, 1.0
        cal = self.bundle.manifest["classes"][cls_name]["memory"]["calibration"]
        thr = cal.get("pixel_threshold")
        hi = 2.0 * float(thr) if thr else float(cal.get("pixel_mean", 0.0)) + 6.0 * float(
            cal.get("pixel_std", 1.0))
        return 0.0, hi if hi > 0 else 1.0
