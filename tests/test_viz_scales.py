"""The gallery's colour scale comes from the run; box labels avoid each other and the boxes;
titles and page name the map shown."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from filo.data.records import Sample
from filo.evaluation.runner import visual_scales
from filo.pipeline import PipelineConfig
from filo.viz.render import label_rect


class _Cache:
    def __init__(self, maps):
        self.maps = maps

    def get(self, img_path):
        return SimpleNamespace(anomaly_map=self.maps[img_path])


def _split(maps, cls="part"):
    return {cls: [Sample(p, "", cls, "good", 0) for p in maps]}


def test_scale_is_the_runs_percentiles_without_a_bank(tmp_path):
    rng = np.random.default_rng(0)
    maps = {f"{i}.png": (0.2 + 0.05 * rng.random((16, 16))).astype(np.float32) for i in range(4)}
    maps["3.png"][0, 0] = 0.9  # one hot pixel does not set the top of the scale
    cfg = PipelineConfig(ckpt_path=tmp_path / "filo.pth")
    scales, how = visual_scales(cfg, _split(maps), _Cache(maps))
    lo, hi = scales["part"]
    assert 0.2 <= lo < 0.21 and 0.24 < hi <= 0.25  # ~0.25 FiLo maps fill the bar
    assert "percentiles 1 to 99.5" in how


def _bank(tmp_path, calibration):
    d = tmp_path / "bank" / "part"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"calibration": calibration}))
    return tmp_path / "bank"


def test_scale_of_raw_memory_maps_is_the_banks_calibrated_range(tmp_path):
    maps = {"0.png": np.full((8, 8), 50.0, np.float32)}
    bank = _bank(tmp_path, {"pixel_threshold": 43.5, "image_threshold": 80.0})
    cfg = PipelineConfig(memory_bank=bank, fusion="memory")
    scales, how = visual_scales(cfg, _split(maps), _Cache(maps))
    assert scales["part"] == (0.0, 87.0) and "memory bank" in how
    assert cfg.map_name.startswith("memory-bank map")


def test_scale_of_fused_maps_starts_at_the_normal_mean(tmp_path):
    maps = {"0.png": np.full((8, 8), 0.6, np.float32)}
    bank = _bank(tmp_path, {"pixel_threshold": 1.0, "filo": {"pixel_mean": 0.2,
                                                                "pixel_std": 0.01}})
    cfg = PipelineConfig(ckpt_path=tmp_path / "f.pth", memory_bank=bank, fusion="mean")
    scales, _ = visual_scales(cfg, _split(maps), _Cache(maps))
    assert scales["part"][0] == 0.5 and scales["part"][1] == pytest.approx(1 / (1 + np.exp(-6)))
    assert cfg.map_name.startswith("fused map") and "memory bank" in cfg.map_name
    # FiLo alone beside a bank with FiLo statistics: mean .. mean + 6 std
    cfg = PipelineConfig(ckpt_path=tmp_path / "f.pth", memory_bank=bank, fusion="filo")
    scales, how = visual_scales(cfg, _split(maps), _Cache(maps))
    assert scales["part"] == pytest.approx((0.2, 0.26)) and "normal-image statistics" in how
    assert cfg.map_name == "FiLo map"


def test_map_names():
    assert PipelineConfig(grounded_checkpoint=Path("g.pth")).map_name == "GroundingDINO box map"
    both = PipelineConfig(ckpt_path=Path("f.pth"), grounded_checkpoint=Path("g.pth"))
    assert both.map_name == "FiLo map with GroundingDINO boxes"


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_cover_neither_each_other_nor_any_box():
    canvas = (200, 300)
    boxes = [(100, 60, 140, 100), (120, 70, 170, 110), (60, 120, 110, 150)]
    taken = []
    for box in boxes:
        rect = label_rect((60, 14), box, canvas, taken, boxes)
        assert not any(_overlap(rect, t) for t in taken)
        assert not any(_overlap(rect, (b[0], b[1], b[2] + 1, b[3] + 1)) for b in boxes)
        assert 0 <= rect[0] and rect[2] <= canvas[1] and 0 <= rect[1] and rect[3] <= canvas[0]
        taken.append(rect)
    # the preferred place is just above the box, left-aligned
    assert label_rect((30, 10), (50, 50, 90, 90), canvas, [], []) == (50, 40, 80, 50)


def test_gallery_page_states_scale_map_and_full_phrases(tmp_path):
    from filo.viz import VizWriter

    img = np.full((40, 60, 3), 120, np.uint8)
    writer = VizWriter(tmp_path / "viz", scales={"part": (8.0, 87.0)},
                       scale_note="the memory bank's calibrated range", map_name="memory-bank map")
    writer.add("part/test/ng1/000.png", "part", 1, 60.0, img, np.full((40, 60), 50.0),
               boxes=[(5, 5, 30, 30)], labels=["scratches on the thread near the rim"],
               scores=[0.5], matched=[True])
    page = writer.finish().read_text()
    assert "Map shown: memory-bank map" in page and "calibrated range" in page
    assert "colour scale 8 (no colour) to 87 (red)" in page
    assert "<td>scratches on the thread near the rim</td>" in page
    assert 'title="scratches on the thread near the rim 0.50"' in page
