"""One visualisation panel per image, drawn with OpenCV only (no matplotlib).

Panel layout (all sizes in pixels, ``H x W`` is the ORIGINAL image size)::

    +--------------------------------------------------------------+
    | title strip (height ``title_h``; 0 when ``title`` is None)   |
    +----------------------+----------------------+----------------+
    | input image          | anomaly-map overlay  | colour bar     |
    | (unchanged copy)     | + GT outline (white, | vmax at top,   |
    | x in [0, W)          |   black edge)        | middle, vmin   |
    |                      | + detector boxes and | at the bottom  |
    |                      |   "phrase score"     |                |
    |                      | x in [W, 2W)         | x in [2W, 2W+C)|
    +----------------------+----------------------+----------------+

* width = ``2 * W + C`` with ``C = colorbar_width(...)``; height = ``title_h + H`` (both are given
  by :func:`panel_layout`, which the renderer itself uses).
* The heat colours use a FIXED scale ``[vmin, vmax]`` for a whole run (FiLo maps are
  probabilities: pass ``vmin=0, vmax=1``, the defaults). A value ``v`` is normalised to
  ``n = clip((v - vmin) / (vmax - vmin), 0, 1)``, coloured with the turbo colormap and blended
  with the image with opacity ``ALPHA_MAX * sqrt((n - HEAT_FLOOR) / (1 - HEAT_FLOOR))``; below
  ``HEAT_FLOOR`` (2 % of the scale) the opacity is exactly 0, so the overlay there equals the
  input pixel for pixel.
* Boxes counted by the fusion (``box_matched`` True) are solid magenta; the others are dashed
  light grey. Each label ("phrase 0.87") sits on a filled background next to its box, outside
  it, where it covers no other label and no box when there is such a place
  (:func:`label_rect`), and is shortened with "..." to at most ``LABEL_MAX_FRACTION`` of the
  image width (the full phrase is in the gallery's box list); everything of the overlay is drawn on its own ``H x W`` canvas, so nothing spills into
  the input or the colour bar.
* Font scale, text thickness and line width follow the image size (:func:`text_style`), so text
  is legible from 64 px to 2000+ px images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
ELLIPSIS = "..."
ALPHA_MAX = 0.6
HEAT_FLOOR = 0.02
LIFT_PERCENTILE = 95.0

BOX_MATCHED_RGB = (255, 0, 255)
BOX_OTHER_RGB = (190, 190, 190)
GT_RGB = (255, 255, 255)
GT_EDGE_RGB = (0, 0, 0)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)


def _colormap_lut() -> np.ndarray:
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO)[:, 0, :]
    return np.ascontiguousarray(bgr[:, ::-1])  # RGB, shape (256, 3)


HEAT_LUT = _colormap_lut()


@dataclass(frozen=True)
class TextStyle:
    """Font scale, text thickness, line width and padding for one image size."""

    scale: float
    thickness: int
    line: int
    pad: int


def text_style(height: int, width: int) -> TextStyle:
    """Sizes that keep text readable: ~8 px tall glyphs at 64 px, ~65 px at 2000 px."""
    side = max(1, min(int(height), int(width)))
    scale = float(np.clip(side / 640.0, 0.35, 3.0))
    thickness = max(1, int(round(scale * 1.5)))
    line = max(1, int(round(side / 250.0)))
    pad = max(1, int(round(3 * scale)))
    return TextStyle(scale=scale, thickness=thickness, line=line, pad=pad)


def text_width(text: str, style: TextStyle) -> int:
    """Width of ``text`` in pixels as measured by ``cv2.getTextSize``."""
    if not text:
        return 0
    return int(cv2.getTextSize(text, FONT, style.scale, style.thickness)[0][0])


def _text_height(style: TextStyle) -> tuple[int, int]:
    (_, h), baseline = cv2.getTextSize("Ag0.", FONT, style.scale, style.thickness)
    return int(h), int(baseline)


def fit_text(text: str, max_width: int, style: TextStyle) -> str:
    """``text`` itself if it fits in ``max_width`` px, else the longest prefix + "..." that fits.

    Returns "" when not even the ellipsis fits.
    """
    if text_width(text, style) <= max_width:
        return text
    lo, hi = 0, len(text)  # invariant: prefix of length lo fits (with the ellipsis) or lo == 0
    if text_width(ELLIPSIS, style) > max_width:
        return ""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + ELLIPSIS, style) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ELLIPSIS


def box_label(phrase: str, score: float | None, max_width: int, style: TextStyle) -> str:
    """``"phrase 0.87"`` no wider than ``max_width`` px; the phrase is shortened first (caption
    separators "." at its ends dropped)."""
    phrase = " ".join(str(phrase).split()).strip(" .")
    if score is None or not np.isfinite(score):
        return fit_text(phrase, max_width, style)
    suffix = f" {float(score):.2f}"
    full = phrase + suffix
    if text_width(full, style) <= max_width:
        return full
    room = max_width - text_width(suffix, style)
    short = fit_text(phrase, room, style) if room > 0 else ""
    if short:
        return short + suffix
    return fit_text(full, max_width, style)


def _tick_values(vmin: float, vmax: float) -> list[float]:
    return [vmax, (vmin + vmax) / 2.0, vmin]


def _tick_text(value: float) -> str:
    return f"{value:.3g}"


def _bar_width(height: int, width: int) -> int:
    return max(6, int(round(min(height, width) / 20)))


def colorbar_width(height: int, width: int, vmin: float = 0.0, vmax: float = 1.0) -> int:
    """Width of the colour-bar column: pad, bar stripe, pad, widest tick label, pad."""
    style = text_style(height, width)
    bar = _bar_width(height, width)
    labels = max(text_width(_tick_text(v), style) for v in _tick_values(vmin, vmax))
    return 3 * style.pad + bar + labels + style.pad


@dataclass(frozen=True)
class PanelLayout:
    """Where each part of the panel is; see the module docstring."""

    image_h: int
    image_w: int
    title_h: int
    colorbar_w: int

    @property
    def height(self) -> int:
        return self.title_h + self.image_h

    @property
    def width(self) -> int:
        return 2 * self.image_w + self.colorbar_w

    @property
    def input_x(self) -> int:
        return 0

    @property
    def overlay_x(self) -> int:
        return self.image_w

    @property
    def colorbar_x(self) -> int:
        return 2 * self.image_w

    @property
    def image_y(self) -> int:
        return self.title_h


def panel_layout(height: int, width: int, *, vmin: float = 0.0, vmax: float = 1.0,
                 title: str | None = None) -> PanelLayout:
    """The layout :func:`render_panel` uses for an ``height x width`` image."""
    style = text_style(height, width)
    title_h = 0
    if title:
        th, base = _text_height(style)
        title_h = th + base + 2 * style.pad
    return PanelLayout(int(height), int(width), title_h, colorbar_width(height, width, vmin, vmax))


def normalize_map(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``clip((map - vmin) / (vmax - vmin), 0, 1)`` as float32; NaN counts as ``vmin``."""
    out = (np.asarray(anomaly_map, dtype=np.float64) - vmin) / (vmax - vmin)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def heat_alpha(norm: np.ndarray) -> np.ndarray:
    """Overlay opacity for normalised values: 0 below ``HEAT_FLOOR``, ``ALPHA_MAX`` at 1."""
    ramp = np.clip((norm - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
    return (ALPHA_MAX * np.sqrt(ramp)).astype(np.float32)


def blend_heat(image: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """The image with the heat colours blended in (a new array; inputs untouched)."""
    colors = HEAT_LUT[np.round(norm * 255).astype(np.uint8)].astype(np.float32)
    alpha = heat_alpha(norm)[..., None]
    out = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    out = np.round(out).astype(np.uint8)
    keep = alpha[..., 0] == 0  # exactly the input where there is no heat
    out[keep] = image[keep]
    return out


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def resize_map(anomaly_map, height: int, width: int) -> np.ndarray:
    """A float32 COPY of the map at ``height x width`` (bilinear)."""
    amap = _to_numpy(anomaly_map)
    amap = np.squeeze(amap)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D, got shape {amap.shape}")
    amap = amap.astype(np.float32, copy=True)
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    return amap


def resize_mask(mask, height: int, width: int) -> np.ndarray:
    """A bool copy of the mask at ``height x width`` (nearest neighbour)."""
    m = np.squeeze(_to_numpy(mask))
    if m.ndim != 2:
        raise ValueError(f"gt_mask must be 2-D, got shape {m.shape}")
    m = (m > 0).astype(np.uint8)
    if m.shape != (height, width):
        m = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
    return m.astype(bool)


def _clip_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    ix1 = int(np.clip(np.floor(x1), 0, width - 1))
    iy1 = int(np.clip(np.floor(y1), 0, height - 1))
    ix2 = int(np.clip(np.ceil(x2) - 1, 0, width - 1))
    iy2 = int(np.clip(np.ceil(y2) - 1, 0, height - 1))
    if ix2 < ix1 or iy2 < iy1:
        return None
    return ix1, iy1, ix2, iy2


def lift_in_boxes(display_map: np.ndarray, boxes, reference: np.ndarray) -> np.ndarray:
    """A COPY of ``display_map`` raised to at least the 95th percentile of ``reference`` in boxes."""
    out = np.array(display_map, dtype=np.float32, copy=True)
    finite = np.asarray(reference, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or not boxes:
        return out
    floor = np.float32(np.percentile(finite, LIFT_PERCENTILE))
    h, w = out.shape
    for box in boxes:
        clipped = _clip_box(box, h, w)
        if clipped is None:
            continue
        x1, y1, x2, y2 = clipped
        region = out[y1:y2 + 1, x1:x2 + 1]
        np.maximum(region, floor, out=region)
    return out


def _draw_dashed_rect(canvas: np.ndarray, p1, p2, color, thickness: int) -> None:
    x1, y1 = p1
    x2, y2 = p2
    dash = max(4, 4 * thickness)
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)),
                               ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay))
        if length == 0:
            cv2.line(canvas, (ax, ay), (bx, by), color, thickness)
            continue
        for start in range(0, length + 1, 2 * dash):
            end = min(start + dash, length)
            sx = ax + (bx - ax) * start // length
            sy = ay + (by - ay) * start // length
            ex = ax + (bx - ax) * end // length
            ey = ay + (by - ay) * end // length
            cv2.line(canvas, (sx, sy), (ex, ey), color, thickness)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


LABEL_MAX_FRACTION = 0.4  # a box label is at most this fraction of the image width


def _overlap_area(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def label_rect(text_wh: tuple[int, int], box: tuple[int, int, int, int], canvas_hw,
               taken: Sequence[tuple[int, int, int, int]],
               boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Where a label of ``text_wh`` (w, h) goes for ``box``: outside it (above, below, right,
    left; left- or right-aligned), the first place that covers no label already placed
    (``taken``) and no box of ``boxes``; when none is free, the place that covers the least
    (labels weigh more than boxes), inside-the-box places last. Always inside the canvas."""
    h, w = canvas_hw
    lw, lh = min(text_wh[0], w), min(text_wh[1], h)
    x1, y1, x2, y2 = box
    xs = [x1, x2 - lw + 1]
    spots = [(x, y1 - lh) for x in xs] + [(x, y2 + 1) for x in xs]
    spots += [(x2 + 1, y) for y in (y1, y2 - lh + 1)] + [(x1 - lw, y) for y in (y1, y2 - lh + 1)]
    inside = [(x1, y1), (x1, y2 - lh + 1)]
    rects = []
    for x, y in spots + inside:
        cx, cy = int(np.clip(x, 0, w - lw)), int(np.clip(y, 0, h - lh))
        rects.append((cx, cy, cx + lw, cy + lh))

    def cost(rect):
        on_labels = sum(_overlap_area(rect, t) for t in taken)
        on_boxes = sum(_overlap_area(rect, (b[0], b[1], b[2] + 1, b[3] + 1)) for b in boxes)
        return (on_labels > 0, on_labels * 4 + on_boxes)

    return min(rects, key=cost)  # min keeps the first of equal cost (the preferred order)


def _draw_label(canvas: np.ndarray, text: str, box: tuple[int, int, int, int], color,
                style: TextStyle, taken: list[tuple[int, int, int, int]],
                boxes: Sequence[tuple[int, int, int, int]] = ()) -> None:
    """Label on a filled background next to its box (:func:`label_rect`)."""
    if not text:
        return
    th, base = _text_height(style)
    size = (text_width(text, style) + 2 * style.pad, th + base + 2 * style.pad)
    rect = label_rect(size, box, canvas.shape[:2], taken, boxes)
    taken.append(rect)
    x, y, x2, y2 = rect
    cv2.rectangle(canvas, (x, y), (x2 - 1, y2 - 1), color, thickness=-1)
    cv2.putText(canvas, text, (x + style.pad, y + style.pad + th), FONT, style.scale, TEXT_RGB,
                style.thickness, cv2.LINE_AA)


def _draw_gt(canvas: np.ndarray, mask: np.ndarray, style: TextStyle) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return
    cv2.drawContours(canvas, contours, -1, GT_EDGE_RGB, style.line + 2)
    cv2.drawContours(canvas, contours, -1, GT_RGB, style.line)


def _draw_colorbar(strip: np.ndarray, vmin: float, vmax: float, style: TextStyle,
                   bar: int) -> None:
    h, w = strip.shape[:2]
    strip[:] = BACKGROUND_RGB
    th, _ = _text_height(style)
    margin = min(th // 2 + style.pad, max(0, h // 2 - 1))
    top, bottom = margin, h - 1 - margin
    x0 = style.pad
    bar = min(bar, max(1, w - 2 * style.pad))
    if bottom > top:
        values = np.linspace(1.0, 0.0, bottom - top + 1, dtype=np.float32)
        strip[top:bottom + 1, x0:x0 + bar] = HEAT_LUT[np.round(values * 255).astype(np.uint8)][:, None]
        cv2.rectangle(strip, (x0, top), (x0 + bar - 1, bottom), TEXT_RGB, 1)
    tx = x0 + bar + 2 * style.pad
    for value in _tick_values(vmin, vmax):
        frac = (vmax - value) / (vmax - vmin)
        y = int(round(top + frac * (bottom - top)))
        cv2.line(strip, (x0 + bar, y), (x0 + bar + style.pad, y), TEXT_RGB, 1)
        baseline_y = int(np.clip(y + th // 2, th, h - 1))
        cv2.putText(strip, _tick_text(value), (tx, baseline_y), FONT, style.scale, TEXT_RGB,
                    style.thickness, cv2.LINE_AA)


def render_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    gt_mask: np.ndarray | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    box_labels: Sequence[str] | None = None,
    box_scores: Sequence[float] | None = None,
    box_matched: Sequence[bool] | None = None,
    title: str | None = None,
    lift_boxes: bool = False,
) -> np.ndarray:
    """Render the input | overlay | colour-bar panel (RGB uint8); see the module docstring.

    ``image`` is the ORIGINAL image (HxWx3 uint8, RGB); ``anomaly_map`` any 2-D size (bilinear
    resize); ``gt_mask`` any 2-D size (nearest resize); ``boxes`` are (x1, y1, x2, y2) in original
    image pixels. ``lift_boxes`` raises the DISPLAYED heat inside the boxes to at least the map's
    95th percentile; no argument is ever modified.
    """
    if not np.isfinite(vmin) or not np.isfinite(vmax) or vmax <= vmin:
        raise ValueError(f"need finite vmin < vmax, got vmin={vmin}, vmax={vmax}")
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    boxes = [tuple(b) for b in (boxes or [])]
    n = len(boxes)
    labels = list(box_labels) if box_labels is not None else [""] * n
    scores = list(box_scores) if box_scores is not None else [None] * n
    matched = list(box_matched) if box_matched is not None else [True] * n
    if not (len(labels) == len(scores) == len(matched) == n):
        raise ValueError(f"boxes ({n}), box_labels ({len(labels)}), box_scores ({len(scores)}) "
                         f"and box_matched ({len(matched)}) must have the same length")
    if any(len(b) != 4 for b in boxes):
        raise ValueError("every box must be (x1, y1, x2, y2)")

    style = text_style(h, w)
    layout = panel_layout(h, w, vmin=vmin, vmax=vmax, title=title)

    display = resize_map(anomaly_map, h, w)
    if lift_boxes and boxes:
        display = lift_in_boxes(display, boxes, _to_numpy(anomaly_map))
    overlay = blend_heat(img, normalize_map(display, vmin, vmax))

    if gt_mask is not None:
        _draw_gt(overlay, resize_mask(gt_mask, h, w), style)

    order = sorted(range(n), key=lambda i: bool(matched[i]))  # counted boxes drawn last (on top)
    placed = []
    for i in order:
        clipped = _clip_box(boxes[i], h, w)
        if clipped is None:
            continue
        x1, y1, x2, y2 = clipped
        color = BOX_MATCHED_RGB if matched[i] else BOX_OTHER_RGB
        if matched[i]:
            cv2.rectangle(overlay, (x1, y1), (x2, y2), color, style.line)
        else:
            _draw_dashed_rect(overlay, (x1, y1), (x2, y2), color, style.line)
        placed.append((i, clipped, color))
    taken: list[tuple[int, int, int, int]] = []
    all_boxes = [c for _, c, _ in placed]
    room = max(1, min(w - 2 * style.pad, int(LABEL_MAX_FRACTION * w)))
    for i, clipped, color in reversed(placed):  # after all boxes: no box line crosses a label
        text = box_label(labels[i], scores[i], room, style)
        _draw_label(overlay, text, clipped, color, style, taken, all_boxes)

    panel = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    panel[:] = BACKGROUND_RGB
    y0 = layout.image_y
    panel[y0:, layout.input_x:layout.input_x + w] = img
    panel[y0:, layout.overlay_x:layout.overlay_x + w] = overlay
    _draw_colorbar(panel[y0:, layout.colorbar_x:], vmin, vmax, style, _bar_width(h, w))
    if title:
        th, _ = _text_height(style)
        text = fit_text(" ".join(title.split()), layout.width - 2 * style.pad, style)
        cv2.putText(panel[:y0], text, (style.pad, style.pad + th), FONT, style.scale, TEXT_RGB,
                    style.thickness, cv2.LINE_AA)
    return panel


def fixed_scale(maps_or_values, percentile: float | None = None) -> tuple[float, float]:
    """One colour scale for a whole run: ``(min, max)`` of all finite values.

    FiLo maps are probabilities, so callers normally just pass ``vmin=0, vmax=1``; use this for
    other maps (e.g. raw scores). With ``percentile`` (e.g. 99) the top is that percentile
    instead of the max. A constant input gives ``(v, v + 1)``.
    """
    if isinstance(maps_or_values, np.ndarray):
        parts = [maps_or_values]
    else:
        parts = [_to_numpy(m) for m in maps_or_values]
    flat = [np.asarray(p, dtype=np.float64).ravel() for p in parts]
    values = np.concatenate(flat) if flat else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo = float(values.min())
    hi = float(np.percentile(values, percentile)) if percentile is not None else float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
