"""Per-class metrics and the result table (docs/design.md section 8).

The table keeps the research code's columns and order, x100 with one decimal, classes in
dataset order and a ``mean`` row. Its ``aupro`` column is the legacy 200-threshold definition the
published numbers use; ``aupro_exact`` beside it is the exact MVTec AD definition.

``--coco_eval`` adds a second table (COCO box AP per class and over all images,
:mod:`filo.evaluation.coco_eval`): the ``coco`` key of ``results.json``, ``coco_eval.csv`` and a
second table in ``results.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from filo import metrics
from filo.evaluation.coco_eval import METRICS as COCO_METRICS
from filo.fileio import atomic_write_text

COLUMNS = ("auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp")
EXTRA_COLUMNS = ("aupro_exact", "mAD")
# mAD (Real-IAD's summary): the mean of these seven columns; null when any is not available
MAD_COLUMNS = ("auroc_sp", "ap_sp", "f1_sp", "auroc_px", "ap_px", "f1_px", "aupro")
IMAGE_COLUMNS = ("auroc_sp", "f1_sp", "ap_sp")  # detector-only runs without pixel metrics
# Real-IAD: image metrics per physical sample (max over its views; anomalous if any view is)
SAMPLE_COLUMNS = ("auroc_sp_sample", "f1_sp_sample", "ap_sp_sample")
HEADERS = ("objects", *COLUMNS, *EXTRA_COLUMNS)
COLUMN_NOTES = {
    "aupro": "legacy AUPRO: 200 thresholds, FPR < 0.3 rescaled to [0, 1] (the papers' definition)",
    "aupro_exact": "exact AUPRO: every threshold, integrated to FPR 0.3, divided by 0.3 (MVTec AD)",
    "mAD": "mean of image AUROC, AP, F1-max, pixel AUROC, AP, F1-max and aupro (Real-IAD)",
    "auroc_sp_sample": "sample-level image metrics (Real-IAD): a sample's score is the max over "
                       "its views, it is anomalous if any view is",
}


# --coco_eval: the COCO bbox metrics and the counts beside them
COCO_COUNTS = ("n_images", "n_gt", "n_detections")
COCO_NOTE = ("COCO bbox evaluation (pycocotools): every kept box as category 'defect' against "
             "one ground-truth box per 8-connected mask region; AP = IoU 0.5:0.95, AR100 = "
             "recall with at most 100 boxes per image; x100; null = no ground-truth box to score "
             "against; 'overall' pools all evaluated images")


@dataclass
class ClassResult:
    name: str
    n_images: int
    values: dict[str, float]  # column -> value in [0, 1] (NaN when undefined)


def class_metrics(name: str, masks: np.ndarray, maps: np.ndarray, labels: np.ndarray,
                  scores: np.ndarray, *, pixel: bool = True) -> ClassResult:
    """All table columns for one class. ``pixel=False`` leaves the pixel columns NaN (not
    available: no masks, or a detector-only run); a class with only normal (or only anomalous)
    images has no image metrics either (NaN, ``null`` in results.json)."""
    values = {c: math.nan for c in (*COLUMNS, *EXTRA_COLUMNS)}
    if pixel and np.asarray(masks).any():
        px = metrics.pixel_metrics(masks, maps, fpr_limit=0.3, legacy=True)
        values.update(auroc_px=px["auroc_px"], f1_px=px["f1_px"], ap_px=px["ap_px"],
                      aupro=px["aupro_legacy"], aupro_exact=px["aupro"])
    if len(set(np.asarray(labels).tolist())) == 2:
        values.update(
            auroc_sp=metrics.image_auroc(labels, scores),
            f1_sp=metrics.image_f1_max(labels, scores),
            ap_sp=metrics.image_ap(labels, scores),
        )
    mad = [values[c] for c in MAD_COLUMNS]
    values["mAD"] = float(np.mean(mad)) if not any(math.isnan(v) for v in mad) else math.nan
    return ClassResult(name, int(len(labels)), values)


def sample_metrics(keys: Sequence[str], labels: np.ndarray, scores: np.ndarray
                   ) -> dict[str, float]:
    """Image metrics per sample: images grouped by ``keys``; a sample's score is the max of its
    images', its label the max of theirs (anomalous if any view is)."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    lab = np.array([max(int(labels[i]) for i in g) for g in groups.values()])
    sco = np.array([max(float(scores[i]) for i in g) for g in groups.values()])
    if len(set(lab.tolist())) < 2:
        return dict.fromkeys(SAMPLE_COLUMNS, math.nan)
    return {"auroc_sp_sample": metrics.image_auroc(lab, sco),
            "f1_sp_sample": metrics.image_f1_max(lab, sco),
            "ap_sp_sample": metrics.image_ap(lab, sco)}


def mean_row(results: Sequence[ClassResult]) -> dict[str, float]:
    out = {}
    for col in dict.fromkeys(c for r in results for c in r.values):
        vals = [r.values.get(col, math.nan) for r in results]
        vals = [v for v in vals if not math.isnan(v)]
        out[col] = float(np.mean(vals)) if vals else math.nan
    return out


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v * 100:.1f}"


def display_name(cls_name: str) -> str:
    """Table name of a class, as the research code prints it (underscores become spaces)."""
    return cls_name.replace("_", " ")


def render_table(results: Sequence[ClassResult], columns: Sequence[str] = (*COLUMNS, *EXTRA_COLUMNS)) -> str:
    rows = [[display_name(r.name), *(_fmt(r.values[c]) for c in columns)] for r in results]
    mean = mean_row(results)
    rows.append(["mean", *(_fmt(mean[c]) for c in columns)])
    return tabulate(rows, headers=["objects", *columns], tablefmt="pipe", disable_numparse=True)


def _coco_fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.1f}"


def _coco_rows(coco: dict[str, Any]) -> list[list[str]]:
    """Rows of the COCO table / CSV: the classes, then ``overall``; metrics already x100."""
    named = [*((display_name(n), m) for n, m in coco["classes"].items()),
             ("overall", coco["overall"])]
    return [[name, *(str(m[c]) for c in COCO_COUNTS), *(_coco_fmt(m[c]) for c in COCO_METRICS)]
            for name, m in named]


def render_coco_table(coco: dict[str, Any]) -> str:
    """The ``--coco_eval`` table of a :func:`coco_payload`: one row per class and ``overall``
    (all images pooled), counts then AP, AP50, AP75, AR100 x100 with one decimal (``nan``: no
    ground-truth box to score against)."""
    return tabulate(_coco_rows(coco), headers=["objects", "images", "gt_boxes", "detections",
                                               *COCO_METRICS],
                    tablefmt="pipe", disable_numparse=True)


def coco_payload(coco: dict[str, Any], *, skipped: Sequence[str] = (),
                 files: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``coco`` key of ``results.json``: metrics x100 (4 decimals, ``null`` where not
    available), counts, the classes left out (no masks) and the written files."""

    def entry(m: dict[str, Any]) -> dict[str, Any]:
        return {**{c: int(m[c]) for c in COCO_COUNTS},
                **{c: None if m[c] is None else round(m[c] * 100, 4) for c in COCO_METRICS}}

    return {"note": COCO_NOTE, "metrics": list(COCO_METRICS),
            "classes": {n: entry(m) for n, m in coco["classes"].items()},
            "overall": entry(coco["overall"]), "skipped_classes": list(skipped),
            "files": dict(files or {})}


def write_results(out_dir: str | Path, results: Sequence[ClassResult], settings: dict[str, Any],
                  columns: Sequence[str] = (*COLUMNS, *EXTRA_COLUMNS),
                  coco: dict[str, Any] | None = None) -> dict[str, Path]:
    """``results.json``, ``results.csv`` and ``results.md`` (the table) in ``out_dir``; with
    ``coco`` (a :func:`coco_payload`), its ``coco`` key in ``results.json``, ``coco_eval.csv``
    and the COCO table in ``results.md`` too."""
    out = Path(out_dir)
    mean = mean_row(results)

    def num(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 100, 4)

    payload = {
        "columns": list(columns),
        "column_notes": {k: v for k, v in COLUMN_NOTES.items() if k in columns},
        "classes": {r.name: {"n_images": r.n_images, **{c: num(r.values[c]) for c in columns}}
                    for r in results},
        "mean": {c: num(mean[c]) for c in columns},
        "settings": settings,
    }
    if coco is not None:
        payload["coco"] = coco
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["objects", "n_images", *columns])
    for r in results:
        writer.writerow([display_name(r.name), r.n_images, *(_fmt(r.values[c]) for c in columns)])
    writer.writerow(["mean", sum(r.n_images for r in results), *(_fmt(mean[c]) for c in columns)])
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(payload, indent=1, default=str) + "\n")
    atomic_write_text(paths["csv"], buf.getvalue())
    notes = "\n".join(f"- `{k}`: {v}" for k, v in COLUMN_NOTES.items() if k in columns)
    md = render_table(results, columns) + "\n\n" + notes + "\n"
    if coco is not None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["objects", *COCO_COUNTS, *COCO_METRICS])
        writer.writerows(_coco_rows(coco))
        paths["coco_csv"] = out / "coco_eval.csv"
        atomic_write_text(paths["coco_csv"], buf.getvalue())
        md += "\n" + render_coco_table(coco) + "\n\n- " + COCO_NOTE + "\n"
    atomic_write_text(paths["md"], md)
    return paths

