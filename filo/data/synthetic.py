"""Synthetic anomaly datasets with planted defects and exact masks (tests and the demo).

Backgrounds come from images bundled inside scikit-image (no download): the textures
``brick``, ``grass``, ``gravel`` (``style="texture"``, like MVTec's carpet/tile/wood classes) and
the colour photos ``coffee``, ``chelsea``, ``astronaut``, ``immunohistochemistry``,
``hubble_deep_field``, ``rocket`` used to fill a centred object (ring, rotated square or pill)
on a dark background (``style="object"``, like MVTec's objects or VisA).

Defects (the ``specie_name``): ``scratch`` (thick two-segment line), ``blob`` (stain made of two
ellipses), ``color_spot`` (saturated discs), ``missing`` (object style only: a bite of the object
replaced by background). Colours are chosen to contrast with the local background (dark defects
on bright areas, bright ones on dark areas). The mask is exactly the set of repainted pixels.

Everything is deterministic from ``seed``: every image draws from its own generator seeded by
(seed, class name, split, defect type, index), so appending classes or images does not change
the others (the i-th class uses the i-th texture/photo/shape/tint).
"""

from __future__ import annotations

import csv
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import draw

from filo.data.layouts import write_meta as _write_meta

DEFECT_TYPES = ("scratch", "blob", "color_spot", "missing")
DEFAULT_DEFECTS = ("scratch", "blob", "color_spot")
STYLES = ("texture", "object")
IMAGE_MODES = ("RGB", "L")
TEXTURE_SOURCES = ("brick", "grass", "gravel")
PHOTO_SOURCES = ("coffee", "chelsea", "astronaut", "immunohistochemistry", "hubble_deep_field",
                 "rocket")
OBJECT_SHAPES = ("ring", "square", "pill")
# per-class tints of the gray textures / base colours of the objects (RGB multipliers in 0..1)
_TINTS = ((1.0, 0.72, 0.55), (0.62, 0.9, 0.55), (0.85, 0.85, 0.9), (0.95, 0.85, 0.6),
          (0.6, 0.75, 1.0), (0.9, 0.65, 0.85))
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class SyntheticInfo:
    """What a generator wrote: root, layout name, classes and image counts."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    n_images: int
    n_anomalous: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # cls -> {split/specie: n}


def _size_wh(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        w = h = size
    else:
        w, h = (int(v) for v in size)
    if w < 32 or h < 32:
        raise ValueError(f"synthetic images must be at least 32x32, got {w}x{h}")
    return w, h


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    return np.random.default_rng(words)


class _Sources:
    """scikit-image's bundled images, loaded lazily once per generator call."""

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            import skimage.data as skdata

            arr = np.asarray(getattr(skdata, name)())
            if arr.ndim == 3:
                arr = arr[..., :3]
            self._cache[name] = arr.astype(np.uint8)
        return self._cache[name]


def _random_crop(src: np.ndarray, w: int, h: int, rng: np.random.Generator,
                 zoom: tuple[float, float]) -> np.ndarray:
    """A random crop with the aspect w/h, resized to (w, h), randomly flipped (float64)."""
    H0, W0 = src.shape[:2]
    crop_h = int(H0 * rng.uniform(*zoom))
    crop_w = int(round(crop_h * w / h))
    if crop_w > W0:
        crop_w = W0
        crop_h = max(8, int(round(crop_w * h / w)))
    crop_h, crop_w = min(crop_h, H0), min(crop_w, W0)
    y0 = int(rng.integers(0, H0 - crop_h + 1))
    x0 = int(rng.integers(0, W0 - crop_w + 1))
    patch = Image.fromarray(src[y0:y0 + crop_h, x0:x0 + crop_w])
    out = np.asarray(patch.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# normal images
# --------------------------------------------------------------------------------------------

def _texture_image(cls_idx: int, w: int, h: int, rng: np.random.Generator,
                   sources: _Sources) -> tuple[np.ndarray, np.ndarray]:
    gray = _random_crop(sources.get(TEXTURE_SOURCES[cls_idx % len(TEXTURE_SOURCES)]), w, h, rng,
                        zoom=(0.35, 0.6))
    tint = np.array(_TINTS[cls_idx % len(_TINTS)])
    gain = rng.uniform(0.92, 1.08)
    rgb = np.clip(gray[..., None] * tint[None, None, :] * gain + 15.0, 0, 255)
    return rgb, np.ones((h, w), dtype=bool)


def _object_region(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    cy = h / 2 + rng.uniform(-0.04, 0.04) * h
    cx = w / 2 + rng.uniform(-0.04, 0.04) * w
    r = 0.36 * min(w, h) * rng.uniform(0.95, 1.05)
    region = np.zeros((h, w), dtype=bool)
    if shape == "ring":
        rr, cc = draw.disk((cy, cx), r, shape=(h, w))
        region[rr, cc] = True
        rr, cc = draw.disk((cy, cx), 0.38 * r, shape=(h, w))
        region[rr, cc] = False
    elif shape == "square":
        a = rng.uniform(0, np.pi / 2)
        half = 0.78 * r
        corners = [(np.cos(a + k * np.pi / 2), np.sin(a + k * np.pi / 2)) for k in range(4)]
        ys = [cy + np.sqrt(2) * half * s for _, s in corners]
        xs = [cx + np.sqrt(2) * half * c for c, _ in corners]
        rr, cc = draw.polygon(ys, xs, shape=(h, w))
        region[rr, cc] = True
    else:  # pill
        rr, cc = draw.ellipse(cy, cx, 0.55 * r, 1.15 * r, shape=(h, w),
                              rotation=rng.uniform(-np.pi, np.pi))
        region[rr, cc] = True
    return region


def _object_image(cls_idx: int, w: int, h: int, rng: np.random.Generator,
                  sources: _Sources) -> tuple[np.ndarray, np.ndarray]:
    yy = np.linspace(0.0, 1.0, h)[:, None, None]
    bg_level = 38.0 + 10.0 * (cls_idx % 3)
    background = np.broadcast_to(bg_level + 14.0 * yy, (h, w, 3)).copy()
    background += rng.normal(0.0, 2.0, size=(h, w, 1))
    region = _object_region(OBJECT_SHAPES[cls_idx % len(OBJECT_SHAPES)], w, h, rng)
    photo = _random_crop(sources.get(PHOTO_SOURCES[cls_idx % len(PHOTO_SOURCES)]), w, h, rng,
                         zoom=(0.3, 0.55))
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    base = 235.0 * np.array(_TINTS[(cls_idx + 2) % len(_TINTS)])
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean(), xs.mean()
    dist = np.hypot(np.arange(h)[:, None] - cy, np.arange(w)[None, :] - cx)
    shade = 1.0 - 0.3 * np.clip(dist / (0.4 * min(w, h)), 0.0, 1.0)
    obj = (0.6 * base[None, None, :] + 0.4 * photo) * shade[..., None] * rng.uniform(0.94, 1.06)
    rgb = np.where(region[..., None], obj, background)
    return np.clip(rgb, 0, 255), region


def _normal_image(style: str, cls_idx: int, w: int, h: int, rng: np.random.Generator,
                  sources: _Sources) -> tuple[np.ndarray, np.ndarray]:
    if style == "texture":
        return _texture_image(cls_idx, w, h, rng, sources)
    return _object_image(cls_idx, w, h, rng, sources)


# --------------------------------------------------------------------------------------------
# defects
# --------------------------------------------------------------------------------------------

def _thick_segment(mask: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                   width: float) -> None:
    (y0, x0), (y1, x1) = p0, p1
    length = max(np.hypot(y1 - y0, x1 - x0), 1e-6)
    ny, nx = -(x1 - x0) / length * width / 2, (y1 - y0) / length * width / 2
    rr, cc = draw.polygon([y0 + ny, y1 + ny, y1 - ny, y0 - ny],
                          [x0 + nx, x1 + nx, x1 - nx, x0 - nx], shape=mask.shape)
    mask[rr, cc] = True
    for y, x in (p0, p1):
        rr, cc = draw.disk((y, x), width / 2, shape=mask.shape)
        mask[rr, cc] = True


def _defect_shape(kind: str, w: int, h: int, centre: tuple[float, float],
                  rng: np.random.Generator) -> np.ndarray:
    m = min(w, h)
    mask = np.zeros((h, w), dtype=bool)
    cy, cx = centre
    if kind == "scratch":
        width = max(2.0, m / 40.0) * rng.uniform(1.0, 1.5)
        length = rng.uniform(0.25, 0.45) * m
        a = rng.uniform(0, np.pi)
        bend = a + rng.uniform(-0.6, 0.6)
        half = length / 2
        p0 = (cy - half * np.sin(a), cx - half * np.cos(a))
        p1 = (cy, cx)
        p2 = (cy + half * np.sin(bend), cx + half * np.cos(bend))
        _thick_segment(mask, p0, p1, width)
        _thick_segment(mask, p1, p2, width)
    elif kind == "blob":
        for k in range(2):
            oy, ox = (0.0, 0.0) if k == 0 else rng.uniform(-0.06, 0.06, size=2) * m
            rr, cc = draw.ellipse(cy + oy, cx + ox, rng.uniform(0.04, 0.09) * m,
                                  rng.uniform(0.05, 0.11) * m, shape=mask.shape,
                                  rotation=rng.uniform(-np.pi, np.pi))
            mask[rr, cc] = True
    elif kind == "color_spot":
        for k in range(int(rng.integers(1, 3))):
            oy, ox = (0.0, 0.0) if k == 0 else rng.uniform(-0.1, 0.1, size=2) * m
            rr, cc = draw.disk((cy + oy, cx + ox), rng.uniform(0.035, 0.065) * m,
                               shape=mask.shape)
            mask[rr, cc] = True
    elif kind == "missing":
        rr, cc = draw.ellipse(cy, cx, rng.uniform(0.09, 0.15) * m, rng.uniform(0.09, 0.15) * m,
                              shape=mask.shape, rotation=rng.uniform(-np.pi, np.pi))
        mask[rr, cc] = True
    else:
        raise ValueError(f"unknown defect type {kind!r}; use one of {', '.join(DEFECT_TYPES)}")
    return mask


def _boundary(region: np.ndarray) -> np.ndarray:
    inner = region.copy()
    inner[1:, :] &= region[:-1, :]
    inner[:-1, :] &= region[1:, :]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return region & ~inner


def _plant_defect(rgb: np.ndarray, region: np.ndarray, kind: str, rng: np.random.Generator,
                  background: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = region.shape
    min_area = max(12, int(0.005 * w * h))
    ys, xs = np.nonzero(_boundary(region) if kind == "missing" else region)
    if kind != "missing":
        # keep defect centres away from the image border
        margin = 0.12 * min(w, h)
        keep = (ys > margin) & (ys < h - margin) & (xs > margin) & (xs < w - margin)
        if keep.any():
            ys, xs = ys[keep], xs[keep]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(50):
        i = int(rng.integers(0, len(ys)))
        mask = _defect_shape(kind, w, h, (float(ys[i]), float(xs[i])), rng) & region
        if mask.sum() >= min_area:
            break
    out = rgb.copy()
    n = int(mask.sum())
    if n == 0:
        return out, mask
    local = float((rgb[mask] @ _LUMA).mean())
    dark = local > 127.5  # the defect takes the farther end of the luminance range
    noise = rng.normal(0.0, 4.0, size=(n, 1))
    if kind == "missing":
        if background is None:
            raise ValueError("the 'missing' defect needs the object style")
        out[mask] = background[mask]
    elif kind == "scratch":
        level = rng.uniform(8, 30) if dark else rng.uniform(225, 250)
        out[mask] = level + noise
    elif kind == "blob":
        colour = np.array([70.0, 45.0, 25.0]) * rng.uniform(0.5, 0.8) if dark else \
            np.array([245.0, 235.0, 205.0]) * rng.uniform(0.95, 1.0)
        out[mask] = colour[None, :] + noise
    else:  # color_spot: saturated colour, dark or bright in luminance too
        palette = ([30.0, 35.0, 190.0], [120.0, 10.0, 135.0]) if dark else \
            ([250.0, 210.0, 30.0], [60.0, 250.0, 230.0])
        colour = np.array(palette[int(rng.integers(0, 2))])
        out[mask] = colour[None, :] + noise
    return np.clip(out, 0, 255), mask


def _object_background(rgb: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The dark background behind an object (for the 'missing' defect)."""
    bg_pixels = rgb[~region]
    level = bg_pixels.mean(axis=0) if len(bg_pixels) else np.array([40.0, 40.0, 40.0])
    return np.broadcast_to(level, rgb.shape).copy()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _save_image(rgb: np.ndarray, path: Path, image_mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.rint(rgb).astype(np.uint8))
    if image_mode != "RGB":
        img = img.convert(image_mode)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95, subsampling=0)
    else:
        img.save(path)


def _save_mask(mask: np.ndarray, path: Path, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * np.uint8(value)).save(path)


def _check_args(style: str, image_mode: str, defect_types: Sequence[str], counts: Sequence[int]):
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"unknown image_mode {image_mode!r}; use one of {', '.join(IMAGE_MODES)}")
    if not defect_types:
        raise ValueError("defect_types must name at least one defect type")
    for kind in defect_types:
        if kind not in DEFECT_TYPES:
            raise ValueError(f"unknown defect type {kind!r}; use one of {', '.join(DEFECT_TYPES)}")
        if kind == "missing" and style != "object":
            raise ValueError("the 'missing' defect needs style='object'")
    if any(int(c) < 0 for c in counts):
        raise ValueError("image counts must be >= 0")


@dataclass(frozen=True)
class _Planned:
    split: str       # train | test
    specie: str      # good or a defect type
    index: int       # index within (split, specie)


def _plan(n_train_good: int, n_test_good: int, n_test_defect: int,
          defect_types: Sequence[str]) -> list[_Planned]:
    plan = [_Planned("train", "good", i) for i in range(n_train_good)]
    plan += [_Planned("test", "good", i) for i in range(n_test_good)]
    per_type = {k: 0 for k in defect_types}
    for j in range(n_test_defect):  # round-robin over the defect types
        kind = defect_types[j % len(defect_types)]
        plan.append(_Planned("test", kind, per_type[kind]))
        per_type[kind] += 1
    return plan


def _render(p: _Planned, style: str, cls_name: str, cls_idx: int, w: int, h: int, seed: int,
            sources: _Sources) -> tuple[np.ndarray, np.ndarray | None]:
    rng = _rng(seed, cls_name, p.split, p.specie, p.index)
    rgb, region = _normal_image(style, cls_idx, w, h, rng, sources)
    if p.specie == "good":
        return rgb, None
    background = _object_background(rgb, region) if style == "object" else None
    return _plant_defect(rgb, region, p.specie, rng, background)


def _write_tree_class(root: Path, cls_name: str, cls_idx: int, plan: list[_Planned], style: str,
                      w: int, h: int, seed: int, sources: _Sources, image_mode: str,
                      ext: str) -> dict[str, int]:
    """One class of an MVTec-style tree (images, ``ground_truth`` masks); counts per split/specie."""
    counts: dict[str, int] = {}
    for p in plan:
        rgb, mask = _render(p, style, cls_name, cls_idx, w, h, seed, sources)
        name = f"{p.index:03d}"
        _save_image(rgb, root / cls_name / p.split / p.specie / f"{name}.{ext}", image_mode)
        if mask is not None:
            _save_mask(mask, root / cls_name / "ground_truth" / p.specie / f"{name}_mask.png")
        key = f"{p.split}/{p.specie}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _default_classes(style: str, classes: Sequence[str] | None, prefix: str | None = None,
                     ) -> tuple[str, ...]:
    if classes is not None:
        out = tuple(classes)
        if not out or len(set(out)) != len(out):
            raise ValueError("classes must be a non-empty list of distinct names")
        return out
    p = prefix or ("tex" if style == "texture" else "obj")
    return (f"{p}_a", f"{p}_b")


def make_mvtec_like(root: str | os.PathLike, classes: Sequence[str] | None = None,
                    n_train_good: int = 4, n_test_good: int = 3, n_test_defect: int = 3,
                    size: int | Sequence[int] = 128, seed: int = 0, style: str = "texture",
                    image_mode: str = "RGB", defect_types: Sequence[str] = DEFAULT_DEFECTS,
                    with_meta: bool = False, first_index: int = 0) -> SyntheticInfo:
    """Write an MVTec AD tree under ``root``.

    ``{cls}/train/good/000.png``, ``{cls}/test/good/000.png``, ``{cls}/test/{defect}/000.png``,
    ``{cls}/ground_truth/{defect}/000_mask.png`` (0/255). ``n_test_defect`` anomalous test
    images per class, spread round-robin over ``defect_types``. ``size`` is an int or (w, h).
    ``classes`` defaults to ("tex_a", "tex_b") or ("obj_a", "obj_b") by ``style``; the i-th class
    uses the i-th texture/photo/shape and tint (counting from ``first_index``, so another call
    with a larger ``first_index`` makes classes that look different). ``with_meta`` also writes
    ``{root}/meta.json``.
    """
    _check_args(style, image_mode, defect_types, (n_train_good, n_test_good, n_test_defect))
    w, h = _size_wh(size)
    root = Path(root)
    names = _default_classes(style, classes)
    sources = _Sources()
    n_images = n_anom = 0
    counts: dict[str, dict[str, int]] = {}
    for ci, cls_name in enumerate(names):
        plan = _plan(n_train_good, n_test_good, n_test_defect, defect_types)
        counts[cls_name] = _write_tree_class(root, cls_name, first_index + ci, plan, style, w, h,
                                             seed, sources, image_mode, "png")
        n_images += len(plan)
        n_anom += sum(p.specie != "good" for p in plan)
    if with_meta:
        _write_meta(root, "mvtec")
    return SyntheticInfo(root, "mvtec", names, n_images, n_anom, counts)


def make_visa_like(root: str | os.PathLike, classes: Sequence[str] | None = None,
                   n_train_good: int = 4, n_test_good: int = 3, n_test_defect: int = 3,
                   size: int | Sequence[int] = 128, seed: int = 0, style: str = "object",
                   image_mode: str = "RGB", defect_types: Sequence[str] = DEFAULT_DEFECTS,
                   image_ext: str = "JPG", mask_value: int = 1,
                   with_meta: bool = False, first_index: int = 0) -> SyntheticInfo:
    """Write a VisA-style tree: ``{cls}/Data/Images/{Normal,Anomaly}/NNNN.<image_ext>``, masks
    ``{cls}/Data/Masks/Anomaly/NNNN.png`` (pixel value ``mask_value``, not 255, so readers must
    binarize with ``> 0``) and ``split_csv/1cls.csv`` (object,split,label,image,mask) listing each
    class's train rows then its test rows. Defaults to the object style; ``classes`` default
    ("obj_a", "obj_b"); ``first_index`` as in :func:`make_mvtec_like`.
    """
    _check_args(style, image_mode, defect_types, (n_train_good, n_test_good, n_test_defect))
    if not 1 <= int(mask_value) <= 255:
        raise ValueError("mask_value must be in 1..255")
    w, h = _size_wh(size)
    root = Path(root)
    names = _default_classes(style, classes)
    sources = _Sources()
    ext = image_ext.lstrip(".")
    rows: list[tuple[str, str, str, str, str]] = []
    n_images = n_anom = 0
    counts: dict[str, dict[str, int]] = {}
    for ci, cls_name in enumerate(names):
        counts[cls_name] = {}
        n_normal = n_abnormal = 0
        for p in _plan(n_train_good, n_test_good, n_test_defect, defect_types):
            rgb, mask = _render(p, style, cls_name, first_index + ci, w, h, seed, sources)
            if mask is None:
                rel = f"{cls_name}/Data/Images/Normal/{n_normal:04d}.{ext}"
                n_normal += 1
                rows.append((cls_name, p.split, "normal", rel, ""))
            else:
                rel = f"{cls_name}/Data/Images/Anomaly/{n_abnormal:03d}.{ext}"
                mask_rel = f"{cls_name}/Data/Masks/Anomaly/{n_abnormal:03d}.png"
                n_abnormal += 1
                _save_mask(mask, root / mask_rel, value=int(mask_value))
                rows.append((cls_name, p.split, "anomaly", rel, mask_rel))
                n_anom += 1
            _save_image(rgb, root / rel, image_mode)
            key = f"{p.split}/{p.specie}"
            counts[cls_name][key] = counts[cls_name].get(key, 0) + 1
            n_images += 1
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    if with_meta:
        _write_meta(root, "visa")
    return SyntheticInfo(root, "visa", names, n_images, n_anom, counts)


def make_folder_like(root: str | os.PathLike, classes: Sequence[str] | None = None,
                     normal_only: Sequence[str] = (), n_train_good: int = 3,
                     n_test_good: int = 3, n_test_defect: int = 3,
                     size: int | Sequence[int] = (160, 120), seed: int = 0,
                     style: str = "object", image_mode: str = "RGB",
                     defect_types: Sequence[str] = DEFAULT_DEFECTS,
                     image_ext: str = "jpg") -> SyntheticInfo:
    """Write the generic folder layout a user would make for their own data:
    ``{cls}/train/good/NNN.<image_ext>``, ``{cls}/test/good``, ``{cls}/test/{defect}``, masks
    ``{cls}/ground_truth/{defect}/NNN_mask.png``. Classes in ``normal_only`` (appended after
    ``classes``) get normal test images only. Default size is non-square (160x120);
    ``classes`` default ("part_a", "part_b").
    """
    _check_args(style, image_mode, defect_types, (n_train_good, n_test_good, n_test_defect))
    w, h = _size_wh(size)
    root = Path(root)
    names = _default_classes(style, classes, prefix="part")
    extra = tuple(c for c in normal_only if c not in names)
    sources = _Sources()
    ext = image_ext.lstrip(".")
    n_images = n_anom = 0
    counts: dict[str, dict[str, int]] = {}
    for ci, cls_name in enumerate(names + extra):
        n_def = 0 if (cls_name in extra or cls_name in normal_only) else n_test_defect
        plan = _plan(n_train_good, n_test_good, n_def, defect_types)
        counts[cls_name] = _write_tree_class(root, cls_name, ci, plan, style, w, h, seed, sources,
                                             image_mode, ext)
        n_images += len(plan)
        n_anom += sum(p.specie != "good" for p in plan)
    return SyntheticInfo(root, "folder", names + extra, n_images, n_anom, counts)


def make_part_folder(root: str | os.PathLike, n_train_good: int = 10, n_test_good: int = 3,
                     n_test_defect: int = 3, defect_dirs: Sequence[str] = ("ng1", "ng2"),
                     masked: Sequence[str] | None = None, size: int | Sequence[int] = (1600, 1200),
                     seed: int = 0, style: str = "object", image_ext: str = "png",
                     ) -> SyntheticInfo:
    """One part the way a user photographs it, the root *is* the class: ``train/good``,
    ``test/good``, ``test/<defect dir>`` (``n_test_defect`` images each) and masks
    ``ground_truth/<defect dir>/NNN_mask.png`` for the folders in ``masked`` (default: the first
    half of ``defect_dirs``, rounded up). Default size: camera resolution 1600x1200. The class
    is named after ``root``."""
    _check_args(style, "RGB", DEFAULT_DEFECTS, (n_train_good, n_test_good, n_test_defect))
    if not defect_dirs or len(set(defect_dirs)) != len(defect_dirs):
        raise ValueError("defect_dirs must be a non-empty list of distinct folder names")
    w, h = _size_wh(size)
    root = Path(root)
    masked = tuple(defect_dirs[:(len(defect_dirs) + 1) // 2] if masked is None else masked)
    sources = _Sources()
    name = root.resolve().name
    counts: dict[str, int] = {}
    n_images = n_anom = 0
    plan = [_Planned("train", "good", i) for i in range(n_train_good)]
    plan += [_Planned("test", "good", i) for i in range(n_test_good)]
    folder_of: dict[int, str] = {}
    for d, folder in enumerate(defect_dirs):
        for i in range(n_test_defect):
            folder_of[len(plan)] = folder
            plan.append(_Planned("test", DEFAULT_DEFECTS[(d + i) % len(DEFAULT_DEFECTS)],
                                 d * n_test_defect + i))
    for k, p in enumerate(plan):
        rgb, mask = _render(p, style, name, 0, w, h, seed, sources)
        folder = folder_of.get(k, "good")
        index = p.index - defect_dirs.index(folder) * n_test_defect if folder != "good" else p.index
        stem = f"{index:03d}"
        _save_image(rgb, root / p.split / folder / f"{stem}.{image_ext}", "RGB")
        if mask is not None and folder in masked:
            _save_mask(mask, root / "ground_truth" / folder / f"{stem}_mask.png")
        key = f"{p.split}/{folder}"
        counts[key] = counts.get(key, 0) + 1
        n_images += 1
        n_anom += folder != "good"
    return SyntheticInfo(root, "folder", (name,), n_images, n_anom, {name: counts})


# folder that holds the anomalous images of a layout (None: one folder per defect type)
_DEFECT_FOLDER = {"btad": "ko", "mvtec_ad2": "bad"}


def make_tree_like(root: str | os.PathLike, dataset: str, classes: Sequence[str] | None = None,
                   n_train_good: int = 3, n_test_good: int = 2, n_test_defect: int = 2,
                   size: int | Sequence[int] = 96, seed: int = 0, style: str = "object",
                   image_ext: str = "png", with_masks: bool = True,
                   defect_types: Sequence[str] = DEFAULT_DEFECTS) -> SyntheticInfo:
    """Write a small tree in the layout of ``dataset`` (``mpdd``, ``btad``, ``mvtec_ad2``, or
    any name of :data:`filo.data.layouts.TREE_LAYOUTS`), with planted defects and exact masks:

    * MPDD: as MVTec AD (``{cls}/test/{defect}``, ``ground_truth/{defect}/{name}_mask.png``);
    * BTAD: normal images in ``ok``, anomalous ones in ``ko``, masks ``ground_truth/ko/{name}.png``;
    * MVTec AD 2: test images in ``test_public/{good,bad}``, masks
      ``test_public/ground_truth/bad/{name}_mask.png``.

    ``with_masks=False`` leaves out every mask (a dataset without ground truth).
    """
    from filo.data.layouts import TREE_LAYOUTS

    layout = TREE_LAYOUTS[dataset]
    _check_args(style, "RGB", defect_types, (n_train_good, n_test_good, n_test_defect))
    w, h = _size_wh(size)
    root = Path(root)
    names = _default_classes(style, classes, prefix=dataset)
    sources = _Sources()
    n_images = n_anom = 0
    counts: dict[str, dict[str, int]] = {}
    for ci, cls_name in enumerate(names):
        plan = _plan(n_train_good, n_test_good, n_test_defect, defect_types)
        used: dict[str, int] = {}
        counts[cls_name] = {}
        for p in plan:
            rgb, mask = _render(p, style, cls_name, ci, w, h, seed, sources)
            split_dir = layout.split_dir(p.split)
            folder = (layout.normal[0] if p.specie == "good"
                      else _DEFECT_FOLDER.get(dataset, p.specie))
            key = f"{split_dir}/{folder}"
            name = f"{used.get(key, 0):03d}"
            used[key] = used.get(key, 0) + 1
            _save_image(rgb, root / cls_name / split_dir / folder / f"{name}.{image_ext}", "RGB")
            if mask is not None and with_masks:
                gt = root / cls_name / layout.gt_dir.format(split_dir=split_dir, defect=folder)
                mask_name = f"{name}.png" if dataset == "btad" else f"{name}_mask.png"
                _save_mask(mask, gt / mask_name)
            counts[cls_name][key] = counts[cls_name].get(key, 0) + 1
        n_images += len(plan)
        n_anom += sum(p.specie != "good" for p in plan)
    return SyntheticInfo(root, dataset, names, n_images, n_anom, counts)


REALIAD_MULTICLASS_FILE = "realiad_jsons/realiad_jsons_multiclass/realiad_multiclass.json"
REALIAD_SINGLE_VIEW_DIR = "realiad_jsons/realiad_jsons_sv"


def make_realiad_like(root: str | os.PathLike, classes: Sequence[str] | None = None,
                      n_train_samples: int = 2, n_test_good_samples: int = 2,
                      n_test_ng_samples: int = 2, size: int | Sequence[int] = 64, seed: int = 0,
                      style: str = "object", defect_views: int = 2,
                      defect_types: Sequence[str] = ("scratch", "blob"), *,
                      class_relative_paths: bool = False, multi_class_json: bool = False,
                      single_view_json: bool = False) -> SyntheticInfo:
    """Write a small Real-IAD tree: ``realiad_1024/<cls>/OK/S<nnnn>/<cls>_<nnnn>_OK_C<v>_0.jpg``
    and ``realiad_1024/<cls>/NG/<defect>/S<nnnn>/<cls>_<nnnn>_NG_<defect>_C<v>_0.jpg`` (5 views
    per sample; in an NG sample the first ``defect_views`` views show the defect, with a
    ``.png`` mask beside the image, the others are labelled OK), and the single-class split files
    ``realiad_jsons/realiad_jsons/<cls>.json``.

    Their image paths include the class folder (``meta.prefix`` is ``""``); with
    ``class_relative_paths`` they are relative to the class folder and ``meta.prefix`` is
    ``"<cls>/"``, as in the official files. ``multi_class_json`` also writes every class into one
    file, ``REALIAD_MULTICLASS_FILE`` (items relative to their class folder, meta without a
    prefix), class after class; ``single_view_json`` also writes ``REALIAD_SINGLE_VIEW_DIR/
    <cls>.json`` listing only view ``C1`` of every sample. ``counts`` are those of the
    per-class files (train/test images per class)."""
    import json

    from filo.data.layouts import REALIAD_VIEWS

    _check_args(style, "RGB", defect_types, (n_train_samples, n_test_good_samples,
                                             n_test_ng_samples))
    w, h = _size_wh(size)
    root = Path(root)
    names = _default_classes(style, classes, prefix="riad")
    sources = _Sources()
    n_images = n_anom = 0
    counts: dict[str, dict[str, int]] = {}
    json_root = root / "realiad_jsons"
    multi: dict[str, list[dict]] = {"train": [], "test": []}

    def dump(path: Path, meta: dict, entries: dict[str, list[dict]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, **entries}, indent=1))

    for ci, cls_name in enumerate(names):
        entries: dict[str, list[dict]] = {"train": [], "test": []}  # paths relative to class
        sample_no = 0
        plan = ([("train", None)] * n_train_samples + [("test", None)] * n_test_good_samples
                + [("test", defect_types[j % len(defect_types)])
                   for j in range(n_test_ng_samples)])
        for split, defect in plan:
            sample_no += 1
            sid = f"{sample_no:04d}"
            folder = (Path("OK") / f"S{sid}" if defect is None
                      else Path("NG") / defect / f"S{sid}")
            for v in range(1, REALIAD_VIEWS + 1):
                has_defect = defect is not None and v <= defect_views
                p = _Planned(split, defect if has_defect else "good", sample_no * 10 + v)
                rgb, mask = _render(p, style, cls_name, ci, w, h, seed, sources)
                tag = "OK" if defect is None else f"NG_{defect}"
                stem = f"{cls_name}_{sid}_{tag}_C{v}_0"
                class_dir = root / "realiad_1024" / cls_name
                _save_image(rgb, class_dir / folder / f"{stem}.jpg", "RGB")
                entry = {"category": cls_name, "anomaly_class": defect if has_defect else "OK",
                         "image_path": (folder / f"{stem}.jpg").as_posix(), "mask_path": None}
                if has_defect and mask is not None:
                    _save_mask(mask, class_dir / folder / f"{stem}.png")
                    entry["mask_path"] = (folder / f"{stem}.png").as_posix()
                    n_anom += 1
                entries[split].append(entry)
                n_images += 1

        def with_class(item: dict, cls: str = cls_name) -> dict:
            return {**item, "image_path": f"{cls}/{item['image_path']}",
                    "mask_path": f"{cls}/{item['mask_path']}" if item["mask_path"] else None}

        if class_relative_paths:
            dump(json_root / "realiad_jsons" / f"{cls_name}.json",
                 {"prefix": f"{cls_name}/", "normal_class": "OK", "pixel_level": True}, entries)
        else:
            dump(json_root / "realiad_jsons" / f"{cls_name}.json",
                 {"prefix": "", "normal_class": "OK", "pixel_level": True},
                 {k: [with_class(e) for e in v] for k, v in entries.items()})
        if single_view_json:
            dump(root / REALIAD_SINGLE_VIEW_DIR / f"{cls_name}.json",
                 {"prefix": f"{cls_name}/", "normal_class": "OK", "pixel_level": True},
                 {k: [e for e in v if "_C1_" in e["image_path"]] for k, v in entries.items()})
        for k, v in entries.items():
            multi[k].extend(v)
        counts[cls_name] = {k: len(v) for k, v in entries.items()}
    if multi_class_json:
        dump(root / REALIAD_MULTICLASS_FILE, {"normal_class": "OK", "pixel_level": True}, multi)
    return SyntheticInfo(root, "realiad", names, n_images, n_anom, counts)
