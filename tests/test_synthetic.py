"""Tests of filo.data.synthetic: layouts written, exact masks, visible defects, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from filo.data import flatten, load_split, read_meta
from filo.data.synthetic import (
    PHOTO_SOURCES,
    TEXTURE_SOURCES,
    _normal_image,
    _rng,
    _Sources,
    make_folder_like,
    make_mvtec_like,
    make_visa_like,
)

LUMA = np.array([0.299, 0.587, 0.114])


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sources_are_bundled_with_scikit_image():
    # every source must be a file shipped in the wheel (no pooch download)
    files = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
             "coffee": "coffee.png", "chelsea": "chelsea.png", "astronaut": "astronaut.png",
             "immunohistochemistry": "ihc.png", "hubble_deep_field": "hubble_deep_field.jpg",
             "rocket": "rocket.jpg"}
    data_dir = Path(skimage.__file__).parent / "data"
    for name in TEXTURE_SOURCES + PHOTO_SOURCES:
        assert (data_dir / files[name]).is_file(), name


@pytest.mark.parametrize("style", ["texture", "object"])
def test_mvtec_like_layout_and_counts(tmp_path, style):
    info = make_mvtec_like(tmp_path, classes=("c1", "c2"), n_train_good=3, n_test_good=2,
                           n_test_defect=5, size=64, seed=0, style=style, with_meta=True)
    assert info.n_images == 2 * 10 and info.n_anomalous == 10
    assert info.counts["c1"] == {"train/good": 3, "test/good": 2, "test/scratch": 2,
                                 "test/blob": 2, "test/color_spot": 1}
    test = load_split(tmp_path, "mvtec", "test")
    assert list(test) == ["c1", "c2"]
    assert [(s.specie_name, s.anomaly) for s in test["c1"]] == [
        ("blob", 1), ("blob", 1), ("color_spot", 1), ("good", 0), ("good", 0),
        ("scratch", 1), ("scratch", 1)]
    assert read_meta(tmp_path / "meta.json")["test"] == test
    for s in flatten(test):
        img = Image.open(tmp_path / s.img_path)
        assert img.size == (64, 64) and img.mode == "RGB"
        if s.anomaly:
            m = np.asarray(Image.open(tmp_path / s.mask_path))
            assert set(np.unique(m)) == {0, 255}
            assert (m > 0).sum() >= int(0.005 * 64 * 64)


@pytest.mark.parametrize("style", ["texture", "object"])
def test_masks_are_exact_and_defects_visible(tmp_path, style):
    kinds = ("scratch", "blob", "color_spot") + (("missing",) if style == "object" else ())
    make_mvtec_like(tmp_path, classes=("k",), n_train_good=0, n_test_good=0,
                    n_test_defect=2 * len(kinds), size=96, seed=5, style=style,
                    defect_types=kinds)
    sources = _Sources()
    for kind in kinds:
        for idx in range(2):
            img = np.asarray(Image.open(tmp_path / f"k/test/{kind}/{idx:03d}.png"), dtype=float)
            mask = np.asarray(Image.open(tmp_path / f"k/ground_truth/{kind}/{idx:03d}_mask.png")) > 0
            # the same generator stream gives the image before the defect was planted
            before, _ = _normal_image(style, 0, 96, 96, _rng(5, "k", "test", kind, idx), sources)
            before = np.rint(before)
            changed = np.abs(img - before).max(axis=2) > 0
            assert not (changed & ~mask).any(), f"{kind}: pixels changed outside the mask"
            assert changed[mask].mean() > 0.95, f"{kind}: mask covers unchanged pixels"
            # visible: mean luminance change inside the mask is large
            delta = np.abs((img - before) @ LUMA)[mask].mean()
            assert delta > 40, f"{kind}: defect contrast only {delta:.1f}"


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(classes=("a", "b"), n_train_good=1, n_test_good=1, n_test_defect=3, size=48)
    make_mvtec_like(tmp_path / "x", seed=7, **kw)
    make_mvtec_like(tmp_path / "y", seed=7, **kw)
    make_mvtec_like(tmp_path / "z", seed=8, **kw)
    dx, dy, dz = _digest(tmp_path / "x"), _digest(tmp_path / "y"), _digest(tmp_path / "z")
    assert dx == dy
    assert dx.keys() == dz.keys() and dx != dz
    # an image does not depend on later classes or on the image counts
    make_mvtec_like(tmp_path / "w", seed=7, classes=("a",), n_train_good=2, n_test_good=0,
                    n_test_defect=1, size=48)
    dw = _digest(tmp_path / "w")
    for key in ("a/test/scratch/000.png", "a/ground_truth/scratch/000_mask.png",
                "a/train/good/000.png"):
        assert dw[key] == dx[key]


def test_gray_mode_and_non_square(tmp_path):
    make_mvtec_like(tmp_path, classes=("g",), n_train_good=1, n_test_good=1, n_test_defect=1,
                    size=(80, 48), image_mode="L")
    img = Image.open(tmp_path / "g/test/scratch/000.png")
    assert img.mode == "L" and img.size == (80, 48)
    assert Image.open(tmp_path / "g/ground_truth/scratch/000_mask.png").size == (80, 48)


def test_visa_like(tmp_path):
    info = make_visa_like(tmp_path, classes=("p", "q"), n_train_good=2, n_test_good=1,
                          n_test_defect=2, size=40, mask_value=3)
    lines = (tmp_path / "split_csv" / "1cls.csv").read_text().splitlines()
    assert lines[0] == "object,split,label,image,mask"
    expected_p = [
        "p,train,normal,p/Data/Images/Normal/0000.JPG,",
        "p,train,normal,p/Data/Images/Normal/0001.JPG,",
        "p,test,normal,p/Data/Images/Normal/0002.JPG,",
        "p,test,anomaly,p/Data/Images/Anomaly/000.JPG,p/Data/Masks/Anomaly/000.png",
        "p,test,anomaly,p/Data/Images/Anomaly/001.JPG,p/Data/Masks/Anomaly/001.png",
    ]
    expected_q = [row.replace("p,", "q,", 1).replace("p/", "q/") for row in expected_p]
    assert lines[1:] == expected_p + expected_q
    assert len(lines) == 11 and info.n_images == 10
    m = np.asarray(Image.open(tmp_path / "p/Data/Masks/Anomaly/000.png"))
    assert set(np.unique(m)) == {0, 3}
    test = load_split(tmp_path, "visa", "test")
    assert [len(v) for v in test.values()] == [3, 3]


def test_folder_like(tmp_path):
    info = make_folder_like(tmp_path, classes=("x",), normal_only=("y",), n_train_good=1,
                            n_test_good=2, n_test_defect=2)
    assert info.classes == ("x", "y")
    assert info.counts["y"] == {"train/good": 1, "test/good": 2}
    assert not (tmp_path / "y" / "ground_truth").exists()
    img = Image.open(tmp_path / "x/test/scratch/000.jpg")
    assert img.size == (160, 120) and img.format == "JPEG"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="style"):
        make_mvtec_like(tmp_path, style="cartoon")
    with pytest.raises(ValueError, match="needs style='object'"):
        make_mvtec_like(tmp_path, defect_types=("missing",))
    with pytest.raises(ValueError, match="unknown defect type"):
        make_mvtec_like(tmp_path, defect_types=("dent",))
    with pytest.raises(ValueError, match="image_mode"):
        make_mvtec_like(tmp_path, image_mode="CMYK")
