"""Tests for filo.viz: panel layout, overlay, outlines, boxes, labels, files and the index page."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import pytest
from sklearn.metrics import f1_score

from filo.errors import FiloError
from filo.viz import (
    VizWriter,
    box_label,
    colorbar_width,
    f1_optimal_threshold,
    fixed_scale,
    markdown_table_to_html,
    render_panel,
    text_style,
    viz_file_name,
    write_panel,
)
from filo.viz.render import ALPHA_MAX, FONT

MAGENTA = np.array([255, 0, 255], np.uint8)
GREY = np.array([190, 190, 190], np.uint8)
WHITE = np.array([255, 255, 255], np.uint8)


def _rng_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(30, 220, size=(h, w, 3), dtype=np.uint8)


def _overlay(panel: np.ndarray, h: int, w: int) -> np.ndarray:
    """The overlay half of an untitled panel (columns [w, 2w))."""
    return panel[panel.shape[0] - h:, w:2 * w]


def _is(arr: np.ndarray, color: np.ndarray) -> np.ndarray:
    return np.all(arr == color, axis=-1)


# -- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(64, 64), (100, 150), (300, 200)])
def test_panel_size_and_input_half(h, w):
    img = _rng_image(h, w)
    panel = render_panel(img, np.zeros((7, 9), np.float32), vmin=0.0, vmax=1.0)
    assert panel.dtype == np.uint8 and panel.shape == (h, 2 * w + colorbar_width(h, w, 0, 1), 3)
    assert np.array_equal(panel[:, :w], img)  # the left half is the untouched input
    titled = render_panel(img, np.zeros((7, 9)), title="a title")
    assert titled.shape[1] == panel.shape[1] and titled.shape[0] > h
    assert np.array_equal(titled[-h:, :w], img)


def test_colorbar_shows_the_scale():
    h, w = 200, 200
    panel = render_panel(_rng_image(h, w), np.zeros((8, 8)), vmin=0.0, vmax=1.0)
    bar = panel[:, 2 * w:]
    # the stripe: the colour of the map's max (turbo top, red) near the top, of 0 near the bottom
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]
    x = text_style(h, w).pad + 2

    def lut_index(pixel):  # the scale value whose colour is nearest to this pixel
        return int(np.argmin(np.abs(lut.astype(int) - pixel.astype(int)).sum(axis=1)))

    assert lut_index(bar[15, x]) >= 230
    assert lut_index(bar[h - 16, x]) <= 25
    assert lut_index(bar[h // 2, x]) in range(110, 146)
    # tick labels are drawn (dark text pixels right of the stripe) and differ with another scale
    other = render_panel(_rng_image(h, w), np.zeros((8, 8)), vmin=0.0, vmax=250.0)
    assert other.shape[1] > panel.shape[1]  # wider labels ("250", "125") get a wider bar column
    text_zone = bar[:, x + 12:]
    assert (text_zone.sum(axis=-1) < 200).sum() > 20


def test_render_rejects_bad_input():
    with pytest.raises(ValueError):
        render_panel(_rng_image(10, 10), np.zeros((4, 4)), vmin=1.0, vmax=1.0)
    with pytest.raises(ValueError):
        render_panel(_rng_image(10, 10).astype(np.float32), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        render_panel(_rng_image(10, 10), np.zeros((4, 4)), boxes=[(0, 0, 5, 5)], box_labels=[])


# -- overlay ---------------------------------------------------------------------------------
def test_overlay_equals_input_where_map_low_and_blends_where_high():
    h, w = 64, 96
    img = _rng_image(h, w, seed=1)
    amap = np.zeros((h, w), np.float32)
    amap[:, 48:] = 1.0
    amap[:10, :20] = 0.015  # below 2 % of the scale: still no colour
    panel = render_panel(img, amap, vmin=0.0, vmax=1.0)
    over = _overlay(panel, h, w)
    assert np.array_equal(over[:, :48], img[:, :48])
    # where the map is at vmax: (1 - ALPHA_MAX) * image + ALPHA_MAX * turbo(255), computed here
    top = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_TURBO)[0, 0, ::-1]
    expected = (1 - ALPHA_MAX) * img[:, 48:].astype(float) + ALPHA_MAX * top.astype(float)
    assert np.abs(over[:, 48:].astype(float) - expected).max() <= 1.0
    assert (over[:, 48:] != img[:, 48:]).any(axis=-1).mean() > 0.95


def test_map_is_resized_bilinear_to_the_image():
    h, w = 40, 80
    img = np.full((h, w, 3), 100, np.uint8)
    amap = np.zeros((4, 4), np.float32)
    amap[:, 2:] = 1.0  # after resizing: 0 on the left third, 1 on the right third
    over = _overlay(render_panel(img, amap), h, w)
    changed = (over != img).any(axis=-1)
    assert not changed[:, :25].any()
    assert changed[:, 55:].all()
    # the same map already at image size gives the same left/right split
    big = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(_overlay(render_panel(img, big), h, w), over)


# -- ground truth ----------------------------------------------------------------------------
def test_gt_outline_along_mask_border_and_mask_resized_nearest():
    h, w = 64, 64
    img = np.full((h, w, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2
    panel = render_panel(img, np.zeros((h, w)), gt_mask=mask)
    over = _overlay(panel, h, w)
    white = _is(over, WHITE)
    # border pixels: inside the mask with a 4-neighbour outside it
    eroded = cv2.erode(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    border = mask & ~eroded.astype(bool)
    assert border.sum() > 40
    assert white[border].mean() > 0.9  # the outline runs along the mask border
    near = cv2.dilate(border.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert not (white & ~near).any()  # and nowhere else
    assert np.array_equal(over[~cv2.dilate(near.astype(np.uint8), np.ones((5, 5))).astype(bool)],
                          img[~cv2.dilate(near.astype(np.uint8), np.ones((5, 5))).astype(bool)])
    # a 2x mask (each pixel a 2x2 block) resized with nearest neighbour is the same mask
    mask2 = np.kron(mask, np.ones((2, 2), bool))
    assert np.array_equal(render_panel(img, np.zeros((h, w)), gt_mask=mask2), panel)


# -- boxes -----------------------------------------------------------------------------------
def test_boxes_drawn_at_their_coordinates():
    h, w = 200, 300
    img = np.full((h, w, 3), 60, np.uint8)
    assert text_style(h, w).line == 1
    panel = render_panel(img, np.zeros((h, w)), boxes=[(50, 60, 150, 120), (200, 20, 280, 180)],
                         box_labels=["", ""], box_scores=[float("nan"), float("nan")],
                         box_matched=[True, False])
    over = _overlay(panel, h, w)
    # solid box: exactly the outline of columns 50..149 and rows 60..119 (x2, y2 exclusive)
    expected = np.zeros((h, w), bool)
    expected[60:120, [50, 149]] = True
    expected[[60, 119], 50:150] = True
    assert np.array_equal(_is(over, MAGENTA), expected)
    # dashed box: grey on its outline only, with gaps
    outline = np.zeros((h, w), bool)
    outline[20:180, [200, 279]] = True
    outline[[20, 179], 200:280] = True
    grey = _is(over, GREY)
    assert grey.any() and not (grey & ~outline).any()
    assert 0.3 < grey[outline].mean() < 0.8


def test_box_labels_drawn_with_phrase_and_score():
    h, w = 200, 300
    img = np.full((h, w, 3), 60, np.uint8)
    plain = render_panel(img, np.zeros((h, w)), boxes=[(50, 80, 150, 120)], box_labels=[""],
                         box_scores=[float("nan")])
    labelled = render_panel(img, np.zeros((h, w)), boxes=[(50, 80, 150, 120)],
                            box_labels=["scratch"], box_scores=[0.87])
    diff = (labelled != plain).any(axis=-1)
    ys, xs = np.nonzero(diff)
    # the label sits just above the box, starting at its left edge, in the overlay half
    assert xs.min() == w + 50 and ys.max() < 80
    assert box_label("scratch", 0.87, 1000, text_style(h, w)) == "scratch 0.87"


@pytest.mark.parametrize("size", [64, 2000])
def test_long_labels_are_truncated_and_stay_inside_the_overlay(size):
    h, w = (size * 3) // 4, size
    img = np.full((h, w, 3), 90, np.uint8)
    style = text_style(h, w)
    phrase = "an extremely long grounding phrase about a crack " * 6
    text = box_label(phrase, 0.93, w - 2 * style.pad, style)
    assert text.endswith("... 0.93")
    assert cv2.getTextSize(text, FONT, style.scale, style.thickness)[0][0] <= w
    box = (w - w // 8, h // 3, w - 1, h // 2)  # near the right edge: the label must shift left
    base = render_panel(img, np.zeros((8, 8)), boxes=[box], box_labels=[""],
                        box_scores=[float("nan")])
    with_label = render_panel(img, np.zeros((8, 8)), boxes=[box], box_labels=[phrase],
                              box_scores=[0.93])
    assert with_label.shape == base.shape
    ys, xs = np.nonzero((with_label != base).any(axis=-1))
    assert xs.size > 0
    assert xs.min() >= w and xs.max() < 2 * w  # only overlay pixels change
    assert ys.min() >= 0 and ys.max() < h


def test_text_size_adapts_to_the_image():
    small, large = text_style(64, 64), text_style(2000, 2000)
    h_small = cv2.getTextSize("Ag", FONT, small.scale, small.thickness)[0][1]
    h_large = cv2.getTextSize("Ag", FONT, large.scale, large.thickness)[0][1]
    assert 6 <= h_small <= 16
    assert h_large >= 40 and large.thickness >= 3 and large.line > small.line


# -- lift_boxes ------------------------------------------------------------------------------
def test_lift_boxes_is_display_only_and_raises_heat_in_boxes():
    h, w = 100, 100
    img = _rng_image(h, w, seed=3)
    amap = np.zeros((h, w), np.float32)
    amap[:20, :60] = 0.9  # 12 % of the pixels: the 95th percentile is 0.9
    amap_before = amap.copy()
    img_before = img.copy()
    box = [(50, 50, 90, 90)]
    kwargs = dict(boxes=box, box_labels=[""], box_scores=[float("nan")], box_matched=[True])
    lifted = render_panel(img, amap, lift_boxes=True, **kwargs)
    plain = render_panel(img, amap, lift_boxes=False, **kwargs)
    assert np.array_equal(amap, amap_before) and np.array_equal(img, img_before)
    assert not np.shares_memory(lifted, amap) and not np.shares_memory(lifted, img)
    inner = (slice(52, 88), slice(52, 88))
    assert np.array_equal(_overlay(plain, h, w)[inner], img[inner])  # map 0 there: no colour
    assert (_overlay(lifted, h, w)[inner] != img[inner]).any(axis=-1).all()
    outside = (slice(92, 100), slice(0, 100))
    assert np.array_equal(_overlay(lifted, h, w)[outside], _overlay(plain, h, w)[outside])


# -- files -----------------------------------------------------------------------------------
def test_write_panel_atomic_and_round_trip(tmp_path):
    panel = _rng_image(20, 30, seed=4)
    out = write_panel(tmp_path / "a" / "b" / "p.png", panel)
    back = cv2.imread(str(out), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(back, panel)
    assert sorted(os.listdir(out.parent)) == ["p.png"]  # no temp file left behind


def test_viz_file_name():
    assert viz_file_name("bottle/test/broken_large/000.png") == Path("bottle/test/broken_large/000.png")
    assert viz_file_name("candle/Data/Images/Anomaly/000.JPG") == Path("candle/Data/Images/Anomaly/000.png")
    assert viz_file_name("/data/mvtec/bottle/test/good/001.png", root="/data/mvtec") == \
        Path("bottle/test/good/001.png")
    assert viz_file_name("pcb1\\Data\\Images\\Normal\\0001.JPG") == Path("pcb1/Data/Images/Normal/0001.png")
    with pytest.raises(FiloError):
        viz_file_name("../etc/x.png")


def test_fixed_scale():
    assert fixed_scale([np.array([0.2, np.nan, 0.5]), np.array([[0.1, 0.9]])]) == (0.1, 0.9)
    assert fixed_scale(np.full((3, 3), 2.0)) == (2.0, 3.0)


def test_f1_optimal_threshold_matches_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(20):
        labels = rng.integers(0, 2, 15)
        labels[0] = 1
        scores = np.round(rng.random(15), 1)  # ties on purpose
        best_t, best_f1 = None, -1.0
        for t in sorted(set(scores.tolist()), reverse=True):  # highest t wins ties
            f1 = f1_score(labels, scores >= t)
            if f1 > best_f1 + 1e-12:
                best_t, best_f1 = t, f1
        assert f1_optimal_threshold(labels, scores) == pytest.approx(best_t)
    assert f1_optimal_threshold([0, 0], [0.1, 0.2]) is None


def test_markdown_table_to_html():
    md = "Title line\n\n| class | AUROC |\n|:------|------:|\n| a<b | 91.5 |\n| mean | 90.0 |\n"
    out = markdown_table_to_html(md)
    assert "<p>Title line</p>" in out
    assert '<th style="text-align:left">class</th>' in out
    assert '<th style="text-align:right">AUROC</th>' in out
    assert '<td style="text-align:left">a&lt;b</td>' in out and out.count("<tr>") == 3


# -- writer ----------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append(value)


def _check_index(index: Path) -> list[str]:
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    assert "script" not in parser.tags and "link" not in parser.tags
    files = []
    for link in parser.links:
        if link.startswith("#"):
            continue
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link
        path = index.parent / unquote(parsed.path)
        assert path.is_file(), link
        files.append(unquote(parsed.path))
    return files


def _add_images(writer: VizWriter, cls: str, items, image_size=(48, 64)):
    h, w = image_size
    for i, (label, score) in enumerate(items):
        sub = "broken" if label else "good"
        amap = np.full((16, 16), score, np.float32)
        writer.add(f"{cls}/test/{sub}/{i:03d}.png", cls, label, score, _rng_image(h, w, i), amap,
                   gt_mask=np.ones((h, w), bool) if label else None,
                   boxes=[(5, 5, 30, 30)], labels=["hole"], scores=[0.5], matched=[True])


def _panels(viz_dir: Path) -> set[str]:
    return {p.relative_to(viz_dir).as_posix() for p in viz_dir.rglob("*.png")
            if p.relative_to(viz_dir).parts[0] != "thumbs"}


def test_writer_writes_panels_thumbs_and_a_self_contained_index(tmp_path):
    writer = VizWriter(tmp_path / "viz", 0.0, 1.0, limit_per_class=None, only_errors=False,
                       threshold=None, lift_boxes=True)
    _add_images(writer, "zipper", [(0, 0.2), (1, 0.9), (1, 0.5)])
    _add_images(writer, "bottle", [(0, 0.3), (1, 0.8)])
    table = "| class | AUROC |\n|---|---|\n| zipper | 90.1 |\n| bottle | 99.0 |"
    index = writer.finish(table, title="run 1")
    files = _check_index(index)
    panels = [f for f in files if not f.startswith("thumbs/")]
    thumbs = [f for f in files if f.startswith("thumbs/")]
    # classes in the order first seen, images by score (highest first)
    assert panels == ["zipper/test/broken/001.png", "zipper/test/broken/002.png",
                      "zipper/test/good/000.png", "bottle/test/broken/001.png",
                      "bottle/test/good/000.png"]
    assert thumbs == ["thumbs/" + p[:-4] + ".jpg" for p in panels]
    assert _panels(tmp_path / "viz") == set(panels)
    img = cv2.imread(str(tmp_path / "viz" / panels[0]))
    assert img.shape[1] == 2 * 64 + colorbar_width(48, 64, 0.0, 1.0)
    page = index.read_text(encoding="utf-8")
    assert "<table" in page and "99.0" in page and "http" not in page
    assert page.count('class="anomalous') == 3 and page.count('class="normal') == 2
    assert not (tmp_path / "viz" / ".pending").exists()


def test_writer_limit_per_class(tmp_path):
    writer = VizWriter(tmp_path, 0.0, 1.0, limit_per_class=2, only_errors=False, threshold=None,
                       lift_boxes=False)
    _add_images(writer, "cable", [(0, 0.1), (0, 0.2), (1, 0.9), (1, 0.7), (0, 0.3)])
    _add_images(writer, "grid", [(1, 0.6)])
    _check_index(writer.finish(None, "limit"))
    assert _panels(tmp_path) == {"cable/test/good/000.png", "cable/test/good/001.png",
                                 "grid/test/broken/000.png"}


def test_writer_only_errors_with_given_threshold(tmp_path):
    writer = VizWriter(tmp_path, 0.0, 1.0, limit_per_class=None, only_errors=True, threshold=0.5,
                       lift_boxes=False)
    # errors at 0.5: the normal image at 0.7 and the anomalous one at 0.3
    _add_images(writer, "wood", [(0, 0.7), (0, 0.2), (1, 0.3), (1, 0.9), (0, 0.5)])
    assert not (tmp_path / ".pending").exists()  # threshold known: written immediately
    assert _panels(tmp_path) == {"wood/test/good/000.png", "wood/test/broken/002.png",
                                 "wood/test/good/004.png"}  # 0.5 >= 0.5 counts as anomalous
    _check_index(writer.finish(None, "errors"))


def test_writer_only_errors_with_f1_threshold_renders_at_finish(tmp_path):
    calls = []

    def load_image(path: str) -> np.ndarray:
        calls.append(path)
        return _rng_image(48, 64, 9)

    writer = VizWriter(tmp_path, 0.0, 1.0, limit_per_class=None, only_errors=True, threshold=None,
                       lift_boxes=False, load_image=load_image, root="/data/mvtec")
    # F1 by hand (P = 4), predicting anomalous at score >= t:
    # t=0.9: 2*1/(1+0+4)=.40  t=0.8: 4/6=.67  t=0.7: 4/7=.57  t=0.6: 6/8=.75  t=0.3: 6/9=.67
    # t=0.1: 6/10=.60  t=0.05: 8/11=.73  -> t = 0.6; errors: normal 0.7, anomalous 0.05
    items = [(0, 0.1), (0, 0.3), (0, 0.7), (1, 0.05), (1, 0.8), (1, 0.9), (1, 0.6)]
    for i, (label, score) in enumerate(items):
        sub = "broken" if label else "good"
        writer.add(f"/data/mvtec/screw/test/{sub}/{i:03d}.png", "screw", label, score, None,
                   np.full((16, 16), score, np.float32))
    assert _panels(tmp_path) == set() and calls == []
    assert writer.class_threshold("screw") == (pytest.approx(0.6), "F1-optimal")
    _check_index(writer.finish(None, "f1"))
    assert _panels(tmp_path) == {"screw/test/good/002.png", "screw/test/broken/003.png"}
    assert sorted(calls) == ["/data/mvtec/screw/test/broken/003.png",
                             "/data/mvtec/screw/test/good/002.png"]
    assert not (tmp_path / ".pending").exists()
