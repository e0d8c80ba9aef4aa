"""Visualisations for a whole run: which images get a panel, where files go, the index page.

Folder written by :class:`VizWriter` (one subfolder per class)::

    viz_dir/
      index.html                                  results table + per-class thumbnail grids
      <class>/<path under the class>.png          full panels (see filo.viz.render)
      thumbs/<class>/<path under the class>.jpg   small copies linked from index.html
      .pending/                                   temporary (only-errors without a threshold)

Which images are written:
* ``limit_per_class``: at most N panels per class, the first N (in the order of ``add``) that
  pass the error filter.
* ``only_errors``: only misclassified images: normal with ``score >= threshold`` or anomalous
  with ``score < threshold``. With ``threshold=None`` the per-class F1-optimal image threshold
  (predict anomalous when ``score >= t``) is used, known only at :meth:`VizWriter.finish`; until
  then each candidate's map (and mask, and the image unless ``load_image`` is given) is spilled to
  ``.pending/`` so memory stays bounded, and the panels are rendered in ``finish``.
When a threshold is known (given, or computed at ``finish``) errors are also marked on the index
page.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from tqdm import tqdm

from filo.fileio import ensure_inside
from filo.viz.export import atomic_write_bytes, viz_file_name, write_panel, write_thumbnail
from filo.viz.html import IndexEntry, IndexSection, index_html
from filo.viz.render import _to_numpy, render_panel

logger = logging.getLogger(__name__)

THUMBS_DIR = "thumbs"
PENDING_DIR = ".pending"


def f1_optimal_threshold(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """The image-score threshold ``t`` maximising F1 of ``score >= t -> anomalous``.

    Candidates are the distinct scores; among equal F1 the highest ``t`` wins. ``None`` when
    there is no anomalous image (F1 is undefined) or no finite score.
    """
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    positives = int(y.sum())
    if positives == 0 or s.size == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # end of each group of equal scores
    f1 = 2 * tp[last] / (tp[last] + fp[last] + positives)
    return float(s[last][int(np.argmax(f1))])


def _box_rows(record: _Record) -> list[tuple[str, float | None, bool]]:
    """(phrase, score, counted) of each box of a record, for the index page."""
    if not record.boxes:
        return []
    n = len(record.boxes)
    phrases = record.box_labels or [""] * n
    scores = record.box_scores or [None] * n
    matched = record.box_matched or [True] * n
    return [(str(phrases[i]), None if scores[i] is None else float(scores[i]), bool(matched[i]))
            for i in range(n)]


def is_error(label: int, score: float, threshold: float | None) -> bool | None:
    """Misclassified at ``threshold`` (``None`` when there is no threshold or no finite score)."""
    if threshold is None or not np.isfinite(score):
        return None
    return bool(score >= threshold) if not label else bool(score < threshold)


@dataclass
class _Record:
    img_path: str
    cls_name: str
    label: int
    score: float
    rel: PurePosixPath
    boxes: list | None = None
    box_labels: list | None = None
    box_scores: list | None = None
    box_matched: list | None = None
    spill: Path | None = None
    written: bool = False


@dataclass
class _ClassState:
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    written: int = 0
    records: list[_Record] = field(default_factory=list)


class VizWriter:
    """Decides which images get a panel, writes panels + thumbnails, then ``index.html``.

    ``threshold`` is one image-score threshold for every class, a ``{class: threshold}`` mapping,
    or ``None`` (per-class F1-optimal, computed in :meth:`finish`). ``load_image(img_path)`` returns
    the RGB uint8 image; with it, ``add`` may be called with ``image=None`` and deferred panels do
    not spill images. ``max_image_side`` downsizes large images (and their boxes) before rendering
    (``None`` keeps the original size). ``root`` is the dataset root for absolute image paths.
    """

    def __init__(
        self,
        viz_dir: str | Path,
        vmin: float = 0.0,
        vmax: float = 1.0,
        limit_per_class: int | None = None,
        only_errors: bool = False,
        threshold: float | Mapping[str, float] | None = None,
        lift_boxes: bool = False,
        *,
        load_image: Callable[[str], np.ndarray] | None = None,
        max_image_side: int | None = 1024,
        thumb_width: int = 1280,
        root: str | Path | None = None,
        scales: Mapping[str, tuple[float, float]] | None = None,
        scale_note: str | None = None,
        map_name: str = "anomaly map",
        map_label: str | None = None,
    ) -> None:
        if not np.isfinite(vmin) or not np.isfinite(vmax) or vmax <= vmin:
            raise ValueError(f"need finite vmin < vmax, got vmin={vmin}, vmax={vmax}")
        if limit_per_class is not None and limit_per_class < 0:
            raise ValueError("limit_per_class must be >= 0 or None")
        self.viz_dir = Path(viz_dir)
        self.vmin, self.vmax = float(vmin), float(vmax)
        self.limit_per_class = limit_per_class
        self.only_errors = bool(only_errors)
        self.threshold = threshold
        self.lift_boxes = bool(lift_boxes)
        self.load_image = load_image
        self.max_image_side = max_image_side
        self.thumb_width = int(thumb_width)
        self.root = root
        self.scales = dict(scales or {})
        for cls_name, (lo, hi) in self.scales.items():
            if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
                raise ValueError(f"class {cls_name}: need finite vmin < vmax, got {lo}, {hi}")
        self.scale_note = scale_note
        self.map_name = map_name
        self.map_label = map_label or map_name
        self._classes: dict[str, _ClassState] = {}
        self._n_spilled = 0

    def scale(self, cls_name: str) -> tuple[float, float]:
        """The colour scale of a class: its entry of ``scales``, else (vmin, vmax)."""
        return self.scales.get(cls_name, (self.vmin, self.vmax))

    # -- decisions ---------------------------------------------------------------------------
    def given_threshold(self, cls_name: str) -> float | None:
        if self.threshold is None:
            return None
        if isinstance(self.threshold, Mapping):
            value = self.threshold.get(cls_name)
            return None if value is None else float(value)
        return float(self.threshold)

    def _deferred(self, cls_name: str) -> bool:
        return self.only_errors and self.given_threshold(cls_name) is None

    def _limit_reached(self, state: _ClassState) -> bool:
        return self.limit_per_class is not None and state.written >= self.limit_per_class

    def wants(self, cls_name: str, label: int, image_score: float) -> bool:
        """False when :meth:`add` would certainly skip this image (callers may skip loading it)."""
        state = self._classes.get(cls_name, _ClassState())
        if self._deferred(cls_name):
            return True
        if self._limit_reached(state):
            return False
        if self.only_errors:
            return bool(is_error(label, image_score, self.given_threshold(cls_name)))
        return True

    def _rel(self, img_path: str, cls_name: str) -> PurePosixPath:
        rel = PurePosixPath(viz_file_name(img_path, self.root).as_posix())
        if rel.parts[0] != cls_name:
            rel = PurePosixPath(cls_name) / rel
        return rel

    # -- adding ------------------------------------------------------------------------------
    def add(
        self,
        img_path: str,
        cls_name: str,
        label: int,
        image_score: float,
        image: np.ndarray | None,
        anomaly_map,
        gt_mask=None,
        boxes: Sequence[Sequence[float]] | None = None,
        labels: Sequence[str] | None = None,
        scores: Sequence[float] | None = None,
        matched: Sequence[bool] | None = None,
    ) -> bool:
        """Offer one image; returns True when it was written now or kept for ``finish``."""
        state = self._classes.setdefault(cls_name, _ClassState())
        label = int(bool(label))
        score = float(image_score)
        state.labels.append(label)
        state.scores.append(score)
        if not self.wants(cls_name, label, score):
            return False
        record = _Record(
            img_path=str(img_path), cls_name=cls_name, label=label, score=score,
            rel=self._rel(str(img_path), cls_name),
            boxes=None if boxes is None else [tuple(float(v) for v in b) for b in boxes],
            box_labels=None if labels is None else [str(x) for x in labels],
            box_scores=None if scores is None else [float(x) for x in scores],
            box_matched=None if matched is None else [bool(x) for x in matched],
        )
        if self._deferred(cls_name):
            record.spill = self._spill(image, anomaly_map, gt_mask)
            state.records.append(record)
            return True
        self._render(record, image, anomaly_map, gt_mask)
        state.records.append(record)
        state.written += 1
        return True

    def _spill(self, image, anomaly_map, gt_mask) -> Path:
        pending = ensure_inside(self.viz_dir, self.viz_dir / PENDING_DIR)
        pending.mkdir(parents=True, exist_ok=True)
        path = pending / f"{self._n_spilled:07d}.npz"
        self._n_spilled += 1
        arrays = {"map": np.asarray(_to_numpy(anomaly_map), dtype=np.float32)}
        if gt_mask is not None:
            arrays["mask"] = np.asarray(_to_numpy(gt_mask)) > 0
        if self.load_image is None:
            if image is None:
                raise ValueError("add() needs the image when the writer has no load_image")
            arrays["image"] = np.asarray(image, dtype=np.uint8)
        np.savez(path, **arrays)
        return path

    def _image_for(self, record: _Record, image) -> np.ndarray:
        if image is None:
            if self.load_image is None:
                raise ValueError("add() needs the image when the writer has no load_image")
            image = self.load_image(record.img_path)
        return np.asarray(image)

    def _render(self, record: _Record, image, anomaly_map, gt_mask) -> None:
        image = self._image_for(record, image)
        boxes = record.boxes
        h, w = image.shape[:2]
        if self.max_image_side and max(h, w) > self.max_image_side:
            factor = self.max_image_side / max(h, w)
            size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            if boxes:
                boxes = [tuple(v * factor for v in b) for b in boxes]
        kind = "anomalous" if record.label else "normal"
        title = (f"{record.cls_name} | {kind} | score {record.score:.3f} | {record.rel.name} | "
                 f"{self.map_label}")
        vmin, vmax = self.scale(record.cls_name)
        panel = render_panel(
            image, anomaly_map, vmin=vmin, vmax=vmax, gt_mask=gt_mask, boxes=boxes,
            box_labels=record.box_labels, box_scores=record.box_scores,
            box_matched=record.box_matched, title=title, lift_boxes=self.lift_boxes)
        write_panel(ensure_inside(self.viz_dir, self.viz_dir / record.rel), panel)
        write_thumbnail(ensure_inside(self.viz_dir, self._thumb_path(record)), panel,
                        self.thumb_width)
        record.written = True

    def _thumb_path(self, record: _Record) -> Path:
        return self.viz_dir / THUMBS_DIR / record.rel.with_suffix(".jpg")

    # -- finishing ---------------------------------------------------------------------------
    def class_threshold(self, cls_name: str) -> tuple[float | None, str]:
        """The error threshold of a class and where it comes from ("given" / "F1-optimal")."""
        given = self.given_threshold(cls_name)
        if given is not None:
            return given, "given"
        state = self._classes.get(cls_name)
        if state is None:
            return None, "none"
        return f1_optimal_threshold(state.labels, state.scores), "F1-optimal"

    def finish(self, results_table_markdown: str | None = None,
               title: str = "FiLo visualisations") -> Path:
        """Render deferred panels, write ``index.html`` and return its path."""
        self.viz_dir.mkdir(parents=True, exist_ok=True)
        pending = [(c, r) for c, st in self._classes.items() for r in st.records if r.spill]
        for cls_name, record in tqdm(pending, desc="visualisations", disable=not pending):
            state = self._classes[cls_name]
            thr, _ = self.class_threshold(cls_name)
            if is_error(record.label, record.score, thr) and not self._limit_reached(state):
                with np.load(record.spill) as data:
                    image = data["image"] if "image" in data.files else None
                    mask = data["mask"] if "mask" in data.files else None
                    self._render(record, image, data["map"], mask)
                state.written += 1
            os.unlink(record.spill)
            record.spill = None
        shutil.rmtree(self.viz_dir / PENDING_DIR, ignore_errors=True)

        sections = []
        for cls_name, state in self._classes.items():
            thr, kind = self.class_threshold(cls_name)
            written = [r for r in state.records if r.written]
            written.sort(key=lambda r: (-r.score if np.isfinite(r.score) else np.inf, r.img_path))
            entries = [IndexEntry(panel=r.rel.as_posix(),
                                  thumb=(PurePosixPath(THUMBS_DIR) / r.rel.with_suffix(".jpg")).as_posix(),
                                  name=r.img_path, label=r.label, score=r.score,
                                  error=is_error(r.label, r.score, thr),
                                  boxes=_box_rows(r)) for r in written]
            state.records = written
            lo, hi = self.scale(cls_name)
            sections.append(IndexSection(cls_name, entries, thr, kind, total=len(state.scores),
                                         scale=f"{lo:.4g} (no colour) to {hi:.4g} (red)"))
        notes = [
            f"Map shown: {self.map_name}.",
            f"Colour scale: {self.scale_note}." if self.scale_note else
            f"Colour scale fixed for the run: {self.vmin:g} (no colour) to {self.vmax:g} (red).",
            f"Panels: input | {self.map_name} overlay with ground-truth outline (white) and "
            "detector boxes (solid magenta: counted, dashed grey: not counted) | colour bar. "
            "Click a panel to open it at full size; box phrases in full under each panel.",
            f"Selection: {'only misclassified images' if self.only_errors else 'all images'}, "
            f"limit per class: {self.limit_per_class if self.limit_per_class is not None else 'none'}"
            f"{', boxes lifted (display only)' if self.lift_boxes else ''}.",
        ]
        page = index_html(title, results_table_markdown, sections, notes)
        path = ensure_inside(self.viz_dir, self.viz_dir / "index.html")
        atomic_write_bytes(path, page.encode("utf-8"))
        logger.info("wrote %s (%d panels)", path, sum(len(s.entries) for s in sections))
        return path
