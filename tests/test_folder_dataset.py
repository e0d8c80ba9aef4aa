"""The folder dataset a user makes for their own part: a root that is one class, named folders
(anomalib's Folder names), masks optional per defect folder, data summary per split folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from filo.data.layouts import FolderSpec, detect_dataset, load_split
from filo.data.synthetic import make_folder_like, make_part_folder
from filo.errors import FiloError


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "bracket"
    make_part_folder(root, n_train_good=4, n_test_good=2, n_test_defect=2, size=(64, 48))
    return root


def _paths(split):
    return {c: [(s.img_path, s.mask_path, s.anomaly, s.specie_name) for s in v]
            for c, v in split.items()}


def test_a_root_that_is_one_class(part):
    assert detect_dataset(part) == "folder"
    train = load_split(part, "auto", "train")
    test = load_split(part, "folder", "test")
    assert list(train) == list(test) == ["bracket"]
    assert [s.img_path for s in train["bracket"]] == [f"train/good/{i:03d}.png" for i in range(4)]
    got = {(s.specie_name, s.anomaly, bool(s.mask_path)) for s in test["bracket"]}
    assert got == {("good", 0, False), ("ng1", 1, True), ("ng2", 1, False)}
    ng1 = [s for s in test["bracket"] if s.specie_name == "ng1"]
    assert [s.mask_path for s in ng1] == ["ground_truth/ng1/000_mask.png",
                                          "ground_truth/ng1/001_mask.png"]
    assert all((part / s.img_path).is_file() for s in test["bracket"])
    # the same tree inside a folder of classes reads the same samples, paths below the root
    assert _paths(load_split(part.parent, "folder", "test"))["bracket"] == [
        (f"bracket/{p}", f"bracket/{m}" if m else "", a, d)
        for p, m, a, d in _paths(test)["bracket"]]


def test_a_one_class_root_read_as_mvtec_says_what_to_pass(part):
    with pytest.raises(FiloError, match=r"is one class .*--dataset folder"):
        load_split(part, "mvtec", "test")


def test_same_name_masks_and_a_defect_folder_with_masks_missing_one(tmp_path):
    make_folder_like(tmp_path, classes=("p",), n_train_good=1, n_test_good=1, n_test_defect=2,
                     size=(48, 36), defect_types=("scratch",))
    gt = tmp_path / "p" / "ground_truth" / "scratch"
    (gt / "000_mask.png").rename(gt / "000.png")  # same-name matching
    test = load_split(tmp_path, "folder", "test")["p"]
    assert [s.mask_path for s in test if s.anomaly] == ["p/ground_truth/scratch/000.png",
                                                       "p/ground_truth/scratch/001_mask.png"]
    (gt / "001_mask.png").unlink()  # a mask folder that lacks one mask: a mistake, one line
    with pytest.raises(FiloError, match=r"001.jpg has no mask: expected .*001_mask"):
        load_split(tmp_path, "folder", "test")


def test_named_folders(part):
    spec = FolderSpec(normal_dir="train/good", abnormal_dirs=("test/ng1", "test/ng2"),
                      mask_dir="ground_truth", normal_test_dir="test/good")
    test = load_split(part, "auto", "test", folders=spec)["bracket"]
    assert [(s.specie_name, s.mask_path) for s in test] == [
        ("good", ""), ("good", ""), ("ng1", "ground_truth/ng1/000_mask.png"),
        ("ng1", "ground_truth/ng1/001_mask.png"), ("ng2", ""), ("ng2", "")]
    assert len(load_split(part, "folder", "train", folders=spec)["bracket"]) == 4
    # without --normal_test_dir the last fifth (at least one) of the normal images is tested
    held = FolderSpec(normal_dir="train/good", abnormal_dirs=("test/ng1",))
    train = load_split(part, "folder", "train", folders=held)["bracket"]
    test = load_split(part, "folder", "test", folders=held)["bracket"]
    assert [s.img_path for s in train] == [f"train/good/{i:03d}.png" for i in range(3)]
    assert [s.img_path for s in test if not s.anomaly] == ["train/good/003.png"]
    with pytest.raises(FiloError, match=r"--abnormal_dir test/ng9: folder .* does not exist"):
        load_split(part, "folder", "test", folders=FolderSpec("train/good", ("test/ng9",)))
    with pytest.raises(FiloError, match=r"pass --dataset folder"):
        load_split(part, "visa", "test", folders=held)


def test_repeatable_abnormal_dir_flag_and_summary(part, capsys):
    from filo.cli.data import main

    assert main(["summary", "--root", str(part)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "bracket: 6 images (2 normal, 4 anomalous) in test; 4 images in train"
    assert out[2:] == ["  train/good: 4 normal", "  test/good: 2 normal",
                       "  test/ng1: 2 anomalous, 2 with masks",
                       "  test/ng2: 2 anomalous, 0 with masks"]
    assert main(["summary", "--root", str(part), "--normal_dir", "train/good", "--abnormal_dir",
                 "test/ng1", "--abnormal_dir", "test/ng2", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "test/ng1: 2 anomalous, 0 with masks" in out and "test/ng2: 2 anomalous" in out
    from filo.cli.main import main as filo_main  # python -m filo data ... is the same tool

    assert filo_main(["data", "summary", "--root", str(part)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "  train/good: 4 normal"


def test_pixel_metrics_over_the_images_with_ground_truth(part):
    """Half the defect folders have masks: pixel metrics from normal + masked images, image
    metrics from all (compared with metrics computed independently on those subsets)."""
    from sklearn.metrics import roc_auc_score

    from filo.evaluation.runner import _evaluate_classes

    test = load_split(part, "folder", "test")
    rng = np.random.default_rng(0)
    preds = {}
    for s in test["bracket"]:
        mask = np.zeros((8, 8), bool)
        if s.mask_path:
            mask[2:5, 2:5] = True
        amap = rng.random((8, 8)).astype(np.float32) * 0.5 + mask * 0.4
        preds[s.img_path] = type("P", (), dict(anomaly_map=amap, mask=mask, label=s.anomaly,
                                               image_score=float(amap.max())))
    cache = type("C", (), {"get": lambda self, p: preds[p]})()
    (result,) = _evaluate_classes(test, cache, pixel=True)
    keep = [s for s in test["bracket"] if not s.anomaly or s.mask_path]
    want_px = roc_auc_score(np.concatenate([preds[s.img_path].mask.ravel() for s in keep]),
                            np.concatenate([preds[s.img_path].anomaly_map.ravel() for s in keep]))
    assert result.values["auroc_px"] == pytest.approx(want_px)
    labels = [s.anomaly for s in test["bracket"]]
    scores = [preds[s.img_path].image_score for s in test["bracket"]]
    assert result.values["auroc_sp"] == pytest.approx(roc_auc_score(labels, scores))


def test_generator_writes_camera_sized_part_folder(tmp_path):
    from PIL import Image

    info = make_part_folder(tmp_path / "cam", n_train_good=0, n_test_good=0, n_test_defect=1,
                            defect_dirs=("ng1",), image_ext="jpg")
    assert info.counts["cam"] == {"test/ng1": 1}
    assert Image.open(tmp_path / "cam" / "test" / "ng1" / "000.jpg").size == (1600, 1200)
    assert Image.open(tmp_path / "cam" / "ground_truth" / "ng1" / "000_mask.png").size == \
        (1600, 1200)
    json.dumps(info.counts)


def test_test_py_on_a_one_class_root_without_a_prompt_entry(part, tmp_path, tiny_filo_ckpt,
                                                            synthetic_prompts, capsys):
    """test.py --dataset auto on train/good + test/{good,ng1,ng2}: runs (generic prompts for a
    class the table lacks), pixel metrics from the masked folder, image metrics from all."""
    from filo.cli.test import main

    ckpt, _ = tiny_filo_ckpt
    try:
        rc = main(["--dataset", "auto", "--data_path", str(part), "--ckpt_path", str(ckpt),
                   "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
                   "--num_workers", "0", "--save_path", str(tmp_path / "run")])
    except SystemExit as exc:
        rc = exc.code
    assert rc in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    assert "no box step; maps: FiLo map" in out and "generic defect phrases" in out
    row = json.loads((tmp_path / "run" / "results.json").read_text())["classes"]["bracket"]
    assert row["auroc_px"] is not None and row["auroc_sp"] is not None


def test_memory_build_on_a_part_folder_and_the_clip_size_flags(part, tmp_path, tiny_filo_ckpt,
                                                               synthetic_prompts, capsys):
    """`filo.memory build --backbone clip` at another size names the flags that fix it (with
    the tower's size); with them the bank of the one-class root is built."""
    from filo.cli.memory import main

    ckpt, _ = tiny_filo_ckpt  # a 32 px CLIP tower
    base = ["build", "--dataset", "folder", "--data_path", str(part), "--out",
            str(tmp_path / "banks"), "--backbone", "clip", "--layers", "2,3", "--ckpt_path",
            str(ckpt), "--prompts", str(synthetic_prompts), "--device", "cpu"]

    def run(*extra):
        try:
            return main([*base, *extra])
        except SystemExit as exc:
            return exc.code

    assert run() == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--resize 32 --imagesize 32 --no_crop" in err[0]
    assert "Traceback" not in err[0] and "image_size=" not in err[0]
    assert run("--resize", "32", "--imagesize", "32", "--no_crop") in (0, None)
    assert (tmp_path / "banks" / "bracket" / "meta.json").is_file()
    meta = json.loads((tmp_path / "banks" / "bracket" / "meta.json").read_text())
    assert meta["imagesize"] == 32 and all(p.startswith("train/good/") for p in meta["image_paths"])
    # the paper run: every train image in the bank, each calibrated leave-one-out
    assert meta["n_images"] == 4 and meta["calibration"]["n_images"] == 4


def test_doctor_reports_an_own_dataset(part, tmp_path):
    from filo.doctor import OK, check_own_dataset

    row = check_own_dataset(part)
    assert row.status == OK
    assert "folder layout: 1 class(es), 4 train, 6 test images, 4 anomalous" in row.item
    (tmp_path / "empty" / "test").mkdir(parents=True)
    bad = check_own_dataset(tmp_path / "empty")
    assert bad.status != OK and str(tmp_path / "empty") in bad.fix


@pytest.mark.parametrize("module", ["filo.cli.test", "filo.cli.detect", "filo.cli.memory"])
def test_every_data_cli_takes_the_named_folder_flags(module):
    """--normal_dir / --abnormal_dir (repeatable) / --mask_dir / --normal_test_dir, as the
    README shows them, reach RunConfig.folder_spec in test.py, detector-only runs and memory
    builds."""
    import importlib

    from filo.evaluation.runner import RunConfig
    from filo.settings import from_args

    parser = importlib.import_module(module).build_parser()
    flags = ["--dataset", "folder", "--data_path", "/data/line3", "--normal_dir", "ok",
             "--abnormal_dir", "scratched", "--abnormal_dir", "dented", "--mask_dir", "masks",
             "--normal_test_dir", "ok_test"]
    args = parser.parse_args((["build", "--out", "b"] if module.endswith("memory") else [])
                             + flags)
    spec = from_args(RunConfig, args).folder_spec()
    assert spec == FolderSpec("ok", ("scratched", "dented"), "masks", "ok_test")
