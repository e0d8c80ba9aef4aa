"""More dataset layouts (MPDD, BTAD, MVTec AD 2), datasets without masks, and the mAD column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filo.data.layouts import load_split
from filo.data.synthetic import make_tree_like


@pytest.mark.parametrize("dataset,normal,anomalous_dir,mask_name", [
    ("mpdd", "test/good", "test/{defect}", "ground_truth/{defect}/{stem}_mask.png"),
    ("btad", "test/ok", "test/ko", "ground_truth/ko/{stem}.png"),
    ("mvtec_ad2", "test_public/good", "test_public/bad",
     "test_public/ground_truth/bad/{stem}_mask.png"),
])
def test_layouts_list_images_labels_and_masks(tmp_path, dataset, normal, anomalous_dir,
                                               mask_name):
    info = make_tree_like(tmp_path, dataset, n_train_good=2, n_test_good=2, n_test_defect=3,
                          size=48, seed=1)
    test = load_split(tmp_path, dataset, "test")
    train = load_split(tmp_path, dataset, "train")
    assert list(test) == list(info.classes)
    for cls in info.classes:
        samples = test[cls]
        assert [s.anomaly for s in samples].count(0) == 2 and sum(s.anomaly for s in samples) == 3
        assert len(train[cls]) == 2 and not any(s.anomaly for s in train[cls])
        for s in samples:
            path = Path(s.img_path)
            assert (tmp_path / path).is_file()
            if not s.anomaly:
                assert s.img_path.startswith(f"{cls}/{normal}/") and s.mask_path == ""
                continue
            defect = path.parent.name
            assert s.img_path.startswith(f"{cls}/{anomalous_dir.format(defect=defect)}/")
            expected = f"{cls}/" + mask_name.format(defect=defect, stem=path.stem)
            assert s.mask_path == expected
            mask = np.asarray(Image.open(tmp_path / s.mask_path))
            assert mask.shape == (48, 48) and mask.any()


def test_a_missing_mask_is_one_line_but_a_tree_without_ground_truth_is_image_level(tmp_path):
    from filo.errors import FiloError

    make_tree_like(tmp_path / "a", "btad", n_test_defect=2, size=48)
    victim = next((tmp_path / "a").rglob("ground_truth/ko/*.png"))
    victim.unlink()
    with pytest.raises(FiloError, match=rf"{victim.stem}.*has no mask"):
        load_split(tmp_path / "a", "btad", "test")
    make_tree_like(tmp_path / "b", "mpdd", n_test_defect=2, size=48, with_masks=False)
    split = load_split(tmp_path / "b", "mpdd", "test")
    assert all(s.mask_path == "" for g in split.values() for s in g)


def test_mad_is_the_mean_of_seven_metrics_and_missing_ones_are_null():
    from filo.evaluation.report import MAD_COLUMNS, class_metrics

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:9, 4:9] = True
    maps = rng.random((6, 16, 16)).astype(np.float32) + masks * 0.4
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = maps.reshape(6, -1).max(1)
    r = class_metrics("c", masks, maps, labels, scores)
    assert r.values["mAD"] == pytest.approx(np.mean([r.values[c] for c in MAD_COLUMNS]))
    no_px = class_metrics("c", masks, maps, labels, scores, pixel=False)
    assert math.isnan(no_px.values["auroc_px"]) and math.isnan(no_px.values["mAD"])
    assert not math.isnan(no_px.values["auroc_sp"])
    normal_only = class_metrics("c", np.zeros_like(masks), maps, np.zeros(6, dtype=int), scores)
    assert all(math.isnan(v) for v in normal_only.values.values())


def test_a_dataset_without_masks_gives_image_metrics_and_null_pixel_columns(
        tmp_path, tiny_filo_ckpt, synthetic_prompts, capsys):
    from filo.cli.test import main

    make_tree_like(tmp_path / "data", "mpdd", classes=("tex_a",), n_train_good=0, n_test_good=2,
                   n_test_defect=2, size=48, with_masks=False)
    try:
        rc = main(["--dataset", "mpdd", "--data_path", str(tmp_path / "data"), "--ckpt_path",
                   str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts), "--image_size",
                   "32", "--device", "cpu", "--num_workers", "0", "--save_path",
                   str(tmp_path / "run")])
    except SystemExit as exc:
        rc = exc.code
    assert rc in (0, None), capsys.readouterr().err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    row = res["classes"]["tex_a"]
    assert row["auroc_px"] is None and row["aupro"] is None and row["mAD"] is None
    assert row["auroc_sp"] is not None and res["mean"]["auroc_sp"] == row["auroc_sp"]
    assert "mAD" in res["columns"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| tex a" in table and "nan" in table


def test_data_cli_knows_the_new_layouts(tmp_path, capsys):
    from filo.cli.data import main

    assert main(["synth", "--layout", "btad", "--root", str(tmp_path / "b"), "--size", "48",
                 "--n-test-defect", "2"]) == 0
    assert main(["summary", "--dataset", "btad", "--root", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "btad_a: 5 images (3 normal, 2 anomalous)" in out
    assert main(["build-meta", "--dataset", "btad", "--root", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert {s["img_path"].split("/")[2] for s in meta["test"]["btad_a"]} == {"ok", "ko"}


# ---- Real-IAD -----------------------------------------------------------------------------

def test_realiad_splits_views_and_labels(tmp_path):
    from filo.data.layouts import realiad_sample_key, realiad_view
    from filo.data.synthetic import make_realiad_like

    make_realiad_like(tmp_path, classes=("riad_a",), n_train_samples=2, n_test_good_samples=2,
                      n_test_ng_samples=2, size=48)
    test = load_split(tmp_path, "realiad", "test")["riad_a"]
    train = load_split(tmp_path, "realiad", "train")["riad_a"]
    assert len(train) == 10 and not any(s.anomaly for s in train)
    assert len(test) == 20
    samples = {}
    for s in test:
        samples.setdefault(realiad_sample_key(s), []).append(s)
        assert s.img_path.startswith("realiad_1024/riad_a/")
        assert (tmp_path / s.img_path).is_file()
        if s.anomaly:
            assert s.mask_path.endswith(".png") and (tmp_path / s.mask_path).is_file()
    assert len(samples) == 4
    assert all(sorted(realiad_view(s) for s in g) == ["C1", "C2", "C3", "C4", "C5"]
               for g in samples.values())
    # NG samples: 2 of 5 views show the defect, the other views are labelled OK
    ng = [g for g in samples.values() if any(s.anomaly for s in g)]
    assert len(ng) == 2 and all(sum(s.anomaly for s in g) == 2 for g in ng)


def test_realiad_bad_input_is_one_line(tmp_path):
    from filo.data.synthetic import make_realiad_like
    from filo.errors import FiloError

    make_realiad_like(tmp_path, classes=("riad_a",), size=48)
    split_file = tmp_path / "realiad_jsons" / "realiad_jsons" / "riad_a.json"
    data = json.loads(split_file.read_text())
    dropped = data["test"].pop(3)  # one view of a sample
    split_file.write_text(json.dumps(data))
    with pytest.raises(FiloError, match=r"riad_a\.json: sample .*S\d+ lacks view\(s\) C4"):
        load_split(tmp_path, "realiad", "test")
    data["test"].insert(3, dropped)
    split_file.write_text(json.dumps(data))
    gone = tmp_path / "realiad_1024" / data["test"][0]["image_path"]
    gone.unlink()  # the split names a file that is not there
    with pytest.raises(FiloError, match=f"missing.*{gone.name}"):
        load_split(tmp_path, "realiad", "test")


def test_sample_level_metrics_take_the_max_over_views():
    from filo.evaluation.report import sample_metrics

    keys = ["s1"] * 3 + ["s2"] * 3 + ["s3"] * 3
    labels = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0])
    scores = np.array([0.1, 0.9, 0.2, 0.3, 0.5, 0.1, 0.2, 0.3, 0.4])
    # samples: s1 (normal, max 0.9), s2 (anomalous, max 0.5), s3 (normal, max 0.4)
    from sklearn.metrics import average_precision_score, roc_auc_score

    got = sample_metrics(keys, labels, scores)
    assert got["auroc_sp_sample"] == pytest.approx(roc_auc_score([0, 1, 0], [0.9, 0.5, 0.4]))
    assert got["ap_sp_sample"] == pytest.approx(average_precision_score([0, 1, 0],
                                                                         [0.9, 0.5, 0.4]))


def test_realiad_run_reports_sample_level_columns(tmp_path, tiny_filo_ckpt, capsys):
    from filo.cli.test import main
    from filo.data.synthetic import make_realiad_like

    make_realiad_like(tmp_path / "data", classes=("toothbrush",), n_train_samples=0,
                      n_test_good_samples=2, n_test_ng_samples=2, size=48)
    try:
        rc = main(["--dataset", "realiad", "--data_path", str(tmp_path / "data"), "--ckpt_path",
                   str(tiny_filo_ckpt[0]), "--image_size", "32", "--device", "cpu",
                   "--num_workers", "0", "--save_path", str(tmp_path / "run")])
    except SystemExit as exc:
        rc = exc.code
    assert rc in (0, None), capsys.readouterr().err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["columns"][-3:] == ["auroc_sp_sample", "f1_sp_sample", "ap_sp_sample"]
    row = res["classes"]["toothbrush"]
    assert row["auroc_sp_sample"] is not None and row["mAD"] is not None
