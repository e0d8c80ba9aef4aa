"""Tests of filo.data: layouts, meta.json, transforms, errors, EvalDataset."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as tvt

from filo.data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalDataset,
    Sample,
    clip_tensor,
    collate,
    decode_image,
    detector_resize_size,
    detector_tensor,
    flatten,
    load_mask,
    load_rgb,
    load_split,
    mask_tensor,
    read_meta,
    write_meta,
)
from filo.data.__main__ import main as data_main
from filo.data.synthetic import make_folder_like, make_mvtec_like, make_visa_like
from filo.errors import FiloError

# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_like(root, classes=("zipper", "bottle", "screw"), n_train_good=2, n_test_good=2,
                    n_test_defect=4, size=48, seed=1)
    make_mvtec_like(root, classes=("custom_part",), n_train_good=1, n_test_good=1,
                    n_test_defect=1, size=48, seed=1)
    return root


def test_mvtec_scan_order_counts_masks(mvtec_root):
    test = load_split(mvtec_root, "mvtec", "test")
    # research-code class order for known classes, then extra classes
    assert list(test) == ["bottle", "screw", "zipper", "custom_part"]
    bottle = test["bottle"]
    assert len(bottle) == 6
    assert [s.anomaly for s in bottle].count(1) == 4
    # species sorted by name, images sorted by name
    assert [(s.specie_name, Path(s.img_path).name) for s in bottle] == [
        ("blob", "000.png"), ("color_spot", "000.png"), ("good", "000.png"), ("good", "001.png"),
        ("scratch", "000.png"), ("scratch", "001.png")]
    for s in flatten(test):
        assert not Path(s.img_path).is_absolute()
        assert (mvtec_root / s.img_path).is_file()
        if s.anomaly:
            assert s.mask_path == f"{s.cls_name}/ground_truth/{s.specie_name}/" \
                                  f"{Path(s.img_path).stem}_mask.png"
            assert (mvtec_root / s.mask_path).is_file()
        else:
            assert s.mask_path == "" and s.specie_name == "good"
    train = load_split(mvtec_root, "mvtec", "train")
    assert {c: len(v) for c, v in train.items()} == {"bottle": 2, "screw": 2, "zipper": 2,
                                                     "custom_part": 1}
    assert all(s.anomaly == 0 for s in flatten(train))
    assert load_split(mvtec_root, "auto", "test") == test


def test_class_filter_keeps_dataset_order(mvtec_root):
    got = load_split(mvtec_root, "mvtec", "test", classes=["zipper", "bottle"])
    assert list(got) == ["bottle", "zipper"]
    assert list(load_split(mvtec_root, "mvtec", "test", classes="screw,bottle")) == ["bottle",
                                                                                   "screw"]
    with pytest.raises(FiloError) as err:
        load_split(mvtec_root, "mvtec", "test", classes=["bottle", "carpet"])
    msg = str(err.value)
    assert "'carpet'" in msg and "bottle, screw, zipper, custom_part" in msg
    assert "\n" not in msg


def test_visa_scan_order_and_fields(tmp_path):
    make_visa_like(tmp_path, classes=("pcb1", "zz_new", "candle", "aa_new"), n_train_good=2,
                   n_test_good=1, n_test_defect=2, size=40, seed=3)
    test = load_split(tmp_path, "visa", "test")
    # known VisA classes in research order, then the others by first appearance in the csv
    assert list(test) == ["candle", "pcb1", "zz_new", "aa_new"]
    for cls_name, samples in test.items():
        assert [s.anomaly for s in samples] == [0, 1, 1]
        assert all(s.specie_name == "" and s.cls_name == cls_name for s in samples)
        assert samples[0].mask_path == ""
        assert samples[1].mask_path == f"{cls_name}/Data/Masks/Anomaly/000.png"
        assert samples[1].img_path == f"{cls_name}/Data/Images/Anomaly/000.JPG"
    train = load_split(tmp_path, "visa", "train")
    assert [len(v) for v in train.values()] == [2, 2, 2, 2]
    assert load_split(tmp_path, "auto") == test


def test_visa_csv_order_within_class_and_errors(tmp_path):
    (tmp_path / "split_csv").mkdir()
    for name in ("b.png", "a.png", "m.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.write_text("object,split,label,image,mask\n"
                        "thing,test,normal,b.png,\n"
                        "thing,train,normal,a.png,\n"
                        "thing,test,anomaly,a.png,m.png\n")
    got = load_split(tmp_path, "visa")["thing"]
    assert [(s.img_path, s.mask_path, s.anomaly) for s in got] == [("b.png", "", 0),
                                                                    ("a.png", "m.png", 1)]
    csv_path.write_text("object,split,image\nthing,test,b.png\n")
    with pytest.raises(FiloError, match=r"1cls.csv is missing column\(s\) label, mask"):
        load_split(tmp_path, "visa")
    csv_path.write_text("object,split,label,image,mask\nthing,test,anomaly,b.png,\n")
    with pytest.raises(FiloError, match=r"anomalous image .*b.png has no mask"):
        load_split(tmp_path, "visa")
    csv_path.write_text("object,split,label,image,mask\nthing,test,anomaly,b.png,gone.png\n")
    with pytest.raises(FiloError, match=r"missing under .*gone.png"):
        load_split(tmp_path, "visa")


def test_folder_scan(tmp_path):
    info = make_folder_like(tmp_path, classes=("widget", "bolt"), normal_only=("plain",),
                            n_train_good=2, n_test_good=2, n_test_defect=3, size=(50, 40))
    assert info.classes == ("widget", "bolt", "plain")
    test = load_split(tmp_path, "folder", "test")
    assert list(test) == ["bolt", "plain", "widget"]  # sorted by name
    assert [s.anomaly for s in test["plain"]] == [0, 0]
    assert sum(s.anomaly for s in test["bolt"]) == 3
    assert all(s.img_path.endswith(".jpg") for s in flatten(test))
    assert load_split(tmp_path, "auto", "test") == test
    # masks named {name}.png (no _mask suffix) and other image extensions are accepted
    (tmp_path / "bolt" / "test" / "scratch" / "000.jpg").rename(
        tmp_path / "bolt" / "test" / "scratch" / "000.bmp")
    gt = tmp_path / "bolt" / "ground_truth" / "scratch"
    (gt / "000_mask.png").rename(gt / "000.png")
    s = [x for x in load_split(tmp_path, "folder")["bolt"] if x.specie_name == "scratch"][0]
    assert s.img_path == "bolt/test/scratch/000.bmp" and s.mask_path == "bolt/ground_truth/scratch/000.png"


def test_missing_mask_names_image_and_expected_path(tmp_path):
    make_mvtec_like(tmp_path, classes=("bottle",), n_train_good=0, n_test_good=1,
                    n_test_defect=1, size=40)
    mask = tmp_path / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    with pytest.raises(FiloError) as err:
        load_split(tmp_path, "mvtec")
    msg = str(err.value)
    assert str(tmp_path / "bottle" / "test" / "scratch" / "000.png") in msg
    assert str(mask) in msg and "\n" not in msg


def test_root_and_empty_errors(tmp_path):
    with pytest.raises(FiloError, match=r"does not exist; set the right folder with --data-path"):
        load_split(tmp_path / "nope", "mvtec", source="--data-path")
    with pytest.raises(FiloError, match=r"no classes found under"):
        load_split(tmp_path, "mvtec")
    with pytest.raises(FiloError, match=r"unknown dataset 'coco'"):
        load_split(tmp_path, "coco")
    with pytest.raises(FiloError, match=r"split_csv/1cls.csv"):
        load_split(tmp_path, "visa")


# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------


def test_meta_round_trip(mvtec_root, tmp_path):
    out = write_meta(mvtec_root, "mvtec", tmp_path / "meta.json")
    raw = json.loads(out.read_text())
    assert list(raw) == ["train", "test"]
    assert list(raw["test"]) == ["bottle", "screw", "zipper", "custom_part"]
    first = raw["test"]["bottle"][0]
    assert list(first) == ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]
    assert first == {"img_path": "bottle/test/blob/000.png",
                     "mask_path": "bottle/ground_truth/blob/000_mask.png",
                     "cls_name": "bottle", "specie_name": "blob", "anomaly": 1}
    meta = read_meta(out)
    for split in ("train", "test"):
        assert meta[split] == load_split(mvtec_root, "mvtec", split)


def test_hand_written_research_meta(tmp_path):
    for rel in ("zeta/Data/Images/Normal/0000.JPG", "zeta/Data/Images/Anomaly/000.JPG",
                "zeta/Data/Masks/Anomaly/000.png", "alpha/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / rel, format="PNG")
    text = """{
    "train": {"zeta": [], "alpha": []},
    "test": {
        "zeta": [
            {"img_path": "zeta/Data/Images/Normal/0000.JPG", "mask_path": "",
             "cls_name": "zeta", "specie_name": "", "anomaly": 0},
            {"img_path": "zeta/Data/Images/Anomaly/000.JPG",
             "mask_path": "zeta/Data/Masks/Anomaly/000.png",
             "cls_name": "zeta", "specie_name": "", "anomaly": 1}
        ],
        "alpha": [
            {"img_path": "alpha/x.png", "mask_path": "", "cls_name": "alpha",
             "specie_name": "good", "anomaly": 0}
        ]
    }
}
"""
    (tmp_path / "meta.json").write_text(text)
    got = load_split(tmp_path, "meta", "test")
    assert list(got) == ["zeta", "alpha"]  # file order, as the research code iterates
    assert got["zeta"][1] == Sample("zeta/Data/Images/Anomaly/000.JPG",
                                    "zeta/Data/Masks/Anomaly/000.png", "zeta", "", 1)
    assert load_split(tmp_path, "auto", "test") == got
    assert load_split(tmp_path, "meta", "train") == {"zeta": [], "alpha": []}
    (tmp_path / "meta.json").write_text('{"test": {"a": [{"img_path": "x.png"}]}}')
    with pytest.raises(FiloError, match=r"test/a\[0\]: item is missing mask_path"):
        load_split(tmp_path, "meta")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(FiloError, match=r"is not valid JSON"):
        read_meta(tmp_path / "meta.json")


def test_build_meta_cli(mvtec_root, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert data_main(["build-meta", "--dataset", "mvtec", "--root", str(mvtec_root),
                      "--out", str(out)]) == 0
    assert read_meta(out)["test"] == load_split(mvtec_root, "mvtec")
    with pytest.raises(SystemExit) as exc:
        data_main(["build-meta", "--dataset", "visa", "--root", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset root") and "--root" in err


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _rgb_of(path) -> np.ndarray:
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_modes_to_rgb(tmp_path):
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    got = _rgb_of(tmp_path / "l.png")
    assert got.shape == (2, 2, 3)
    assert got[:, :, 0].tolist() == [[0, 100], [200, 255]] and (got[..., 1] == got[..., 0]).all()

    Image.new("LA", (1, 1), (50, 0)).save(tmp_path / "la.png")
    assert _rgb_of(tmp_path / "la.png").tolist() == [[[50, 50, 50]]]

    Image.new("RGBA", (1, 1), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert _rgb_of(tmp_path / "rgba.png").tolist() == [[[10, 20, 30]]]  # alpha dropped

    sixteen = np.array([[0, 257, 25700, 65535, 128, 129]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert _rgb_of(tmp_path / "g16.png")[0, :, 1].tolist() == [0, 1, 100, 255, 0, 1]

    Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32)).save(tmp_path / "i8.tif")
    assert Image.open(tmp_path / "i8.tif").mode == "I"
    assert _rgb_of(tmp_path / "i8.tif")[0, :, 2].tolist() == [0, 7, 255]
    Image.fromarray(np.array([[0, 514, 65535]], dtype=np.int32)).save(tmp_path / "i16.tif")
    assert _rgb_of(tmp_path / "i16.tif")[0, :, 2].tolist() == [0, 2, 255]

    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    assert _rgb_of(tmp_path / "p.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]

    c = Image.new("CMYK", (2, 1))
    c.putpixel((0, 0), (100, 0, 0, 100))
    c.putpixel((1, 0), (0, 0, 0, 0))
    c.save(tmp_path / "c.tif")
    # (255 - C) * (255 - K) / 255 per channel
    assert _rgb_of(tmp_path / "c.tif").tolist() == [[[94, 155, 155], [255, 255, 255]]]

    b = Image.new("1", (2, 1))
    b.putpixel((1, 0), 1)
    b.save(tmp_path / "b.png")
    assert _rgb_of(tmp_path / "b.png")[0, :, 0].tolist() == [0, 255]


def test_grayscale_stays_gray_until_resized(tmp_path):
    Image.new("L", (5, 5), 9).save(tmp_path / "l.png")
    assert decode_image(tmp_path / "l.png").mode == "L"
    Image.fromarray(np.full((3, 3), 300, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert decode_image(tmp_path / "g16.png").mode == "L"


def test_corrupt_and_truncated_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(FiloError) as err:
        decode_image(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    good = tmp_path / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FiloError, match=r"cannot read image .*cut.png"):
        load_rgb(cut)
    with pytest.raises(FiloError, match=r"image .*none.png not found"):
        load_rgb(tmp_path / "none.png")


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def _reference_clip(img: Image.Image, size: int) -> torch.Tensor:
    """The research pipeline, written independently with torchvision."""
    t = tvt.Compose([
        tvt.Resize((size, size), interpolation=tvt.InterpolationMode.BICUBIC),
        tvt.Lambda(lambda im: im.convert("RGB")),
        tvt.ToTensor(),
        tvt.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return t(img)


def test_clip_transform_matches_torchvision_and_not_cv2(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "rgb.png")
    got = clip_tensor(decode_image(tmp_path / "rgb.png"), 37)
    ref = _reference_clip(Image.open(tmp_path / "rgb.png"), 37)
    assert got.shape == (3, 37, 37) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)
    # gray image: resized in L, then RGB
    gray = rng.integers(0, 256, (80, 64), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    got_g = clip_tensor(decode_image(tmp_path / "gray.png"), 37)
    assert torch.allclose(got_g, _reference_clip(Image.open(tmp_path / "gray.png"), 37), atol=1e-6)
    # a cv2 bicubic resize (no antialiasing) gives clearly different pixels
    cv = cv2.resize(arr, (37, 37), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    cv_t = (torch.from_numpy(cv).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert (got - cv_t).abs().max() > 0.5
    # same size: no resampling, exact normalized pixels
    same = clip_tensor(decode_image(tmp_path / "rgb.png").resize((16, 16)), 16)
    expect = (torch.from_numpy(np.array(Image.open(tmp_path / "rgb.png").resize((16, 16))))
              .permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(same, expect, atol=1e-6)


def test_mask_transform_hand_made():
    # 2x2 -> 4x4 bilinear: weights per axis for the left input pixel are [1, .75, .25, 0];
    # the 0/255 image times their outer product, /255, > 0.5
    mask = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    got = mask_tensor(mask, 4)
    w = np.array([1.0, 0.75, 0.25, 0.0])
    expect = np.outer(w, w) > 0.5
    assert got.dtype == torch.bool and got.numpy().tolist() == expect.tolist()
    # nonzero values other than 255 count as defect (binarize > 0 first)
    assert torch.equal(mask_tensor(mask * 3, 4), got)
    # independent: torchvision Resize (bilinear) of the 0/255 L image, ToTensor, > 0.5
    rng = np.random.default_rng(1)
    big = rng.random((30, 41)) > 0.6
    ref = tvt.ToTensor()(tvt.Resize((16, 16))(Image.fromarray(big.astype(np.uint8) * 255)))[0] > 0.5
    assert torch.equal(mask_tensor(big, 16), ref)


def test_load_mask_and_size_mismatch(tmp_path):
    m = np.zeros((6, 8), dtype=np.uint8)
    m[1, 2] = 7
    Image.fromarray(m).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", image_size=(8, 6))
    assert got.dtype == bool and got.sum() == 1 and got[1, 2]
    with pytest.raises(FiloError) as err:
        load_mask(tmp_path / "m.png", image_size=(16, 12), image_path=tmp_path / "img.png")
    msg = str(err.value)
    assert "m.png is 8x6" in msg and "img.png is 16x12" in msg and "\n" not in msg


@pytest.mark.parametrize("wh, expect", [
    ((700, 700), (518, 518)),          # shorter side 700 != 518: resized
    ((1000, 500), (1036, 518)),        # int(518 * 1000 / 500)
    ((500, 1000), (518, 1036)),
    ((800, 600), (690, 518)),          # int(690.67)
    ((4000, 500), (1336, 167)),        # cap: int(round(1333*500/4000)) = 167, int(167*8) = 1336
    ((518, 900), (518, 900)),          # shorter side already 518: untouched
    ((900, 518), (900, 518)),
    ((518, 2000), (345, 1332)),        # 518 side but long side over the cap: round(345.25), int(1332.05)
    ((1333, 400), (1333, 400)),        # capped target equals the shorter side: untouched
    ((2666, 518), (1333, 259)),
    ((300, 200), (777, 518)),          # upscaling
])
def test_detector_resize_size(wh, expect):
    assert detector_resize_size(*wh) == expect


def test_detector_tensor(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    t, orig = detector_tensor(img, short=20, max_size=1333)
    assert orig == (100, 50) and t.shape == (3, 20, 40)
    ref = tvt.Normalize(IMAGENET_MEAN, IMAGENET_STD)(
        tvt.ToTensor()(img.resize((40, 20), Image.Resampling.BILINEAR)))
    assert torch.allclose(t, ref, atol=1e-6)
    t2, _ = detector_tensor(img, short=50)  # shorter side already 50: no resize
    ref2 = tvt.Normalize(IMAGENET_MEAN, IMAGENET_STD)(tvt.ToTensor()(img))
    assert t2.shape == (3, 50, 100) and torch.allclose(t2, ref2, atol=1e-6)


# --------------------------------------------------------------------------------------------
# EvalDataset
# --------------------------------------------------------------------------------------------


def test_eval_dataset_items(mvtec_root):
    samples = flatten(load_split(mvtec_root, "mvtec", "test", classes=["bottle"]))
    ds = EvalDataset(samples, mvtec_root, image_size=32, with_detector_input=True)
    assert len(ds) == 6
    for i, s in enumerate(samples):
        item = ds[i]
        assert set(item) == {"image", "mask", "label", "cls_name", "specie_name", "img_path",
                             "orig_size", "det_image"}
        assert item["img_path"] == s.img_path and item["label"] == s.anomaly
        assert item["orig_size"] == (48, 48)
        ref = _reference_clip(Image.open(mvtec_root / s.img_path), 32)
        assert torch.allclose(item["image"], ref, atol=1e-6)
        assert item["det_image"].shape == (3, 518, 518)
        if s.anomaly:
            raw = np.asarray(Image.open(mvtec_root / s.mask_path)) > 0
            ref_m = tvt.ToTensor()(tvt.Resize((32, 32))(
                Image.fromarray(raw.astype(np.uint8) * 255)))[0] > 0.5
            assert torch.equal(item["mask"], ref_m) and item["mask"].any()
        else:
            assert not item["mask"].any() and item["mask"].shape == (32, 32)
    assert "det_image" not in EvalDataset(samples, mvtec_root, image_size=32)[0]


def test_eval_dataset_mask_errors(tmp_path):
    Image.new("RGB", (16, 12)).save(tmp_path / "img.png")
    Image.new("L", (8, 6)).save(tmp_path / "small_mask.png")
    ds = EvalDataset([Sample("img.png", "small_mask.png", "c", "d", 1)], tmp_path, image_size=8)
    with pytest.raises(FiloError) as err:
        ds[0]
    msg = str(err.value)
    assert "small_mask.png is 8x6" in msg and "img.png is 16x12" in msg
    ds = EvalDataset([Sample("img.png", "", "c", "d", 1)], tmp_path, image_size=8)
    with pytest.raises(FiloError, match=r"anomalous image .*img.png has no mask_path"):
        ds[0]


def _batches(ds, workers):
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=workers, collate_fn=collate)
    return list(loader)


def test_dataloader_collate_workers(tmp_path):
    make_folder_like(tmp_path, classes=("w",), n_train_good=0, n_test_good=2, n_test_defect=2,
                     size=(64, 48))
    Image.new("RGB", (30, 90), (200, 10, 10)).save(tmp_path / "w" / "test" / "good" / "tall.png")
    samples = flatten(load_split(tmp_path, "folder"))
    assert len(samples) == 5
    ds = EvalDataset(samples, tmp_path, image_size=24, with_detector_input=True)
    b0 = _batches(ds, 0)
    b2 = _batches(ds, 2)
    assert [len(b.img_paths) for b in b0] == [3, 2]
    for a, b in zip(b0, b2, strict=True):
        assert a.images.shape[1:] == (3, 24, 24) and a.masks.dtype == torch.bool
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
        assert torch.equal(a.labels, b.labels) and a.img_paths == b.img_paths
        assert a.orig_sizes == b.orig_sizes
        assert all(torch.equal(x, y) for x, y in zip(a.det_images, b.det_images, strict=True))
    flat = [(p, s, t.shape) for b in b0
            for p, s, t in zip(b.img_paths, b.orig_sizes, b.det_images, strict=True)]
    sizes = {p: (s, tuple(shape)) for p, s, shape in flat}
    assert sizes["w/test/good/tall.png"] == ((30, 90), (3, 1332, 444))
    assert sizes["w/test/good/000.jpg"] == ((64, 48), (3, 518, 690))
    labels = torch.cat([b.labels for b in b0]).tolist()
    assert labels == [s.anomaly for s in samples]
