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


# ---- Real-IAD split variants: multi-class, single-view, FUIAD ---------------------------------

RIAD_CLASSES = ("riad_a", "riad_b", "riad_c")
RIAD_PARAMS = dict(n_train_samples=2, n_test_good_samples=1, n_test_ng_samples=2, size=32,
                   defect_views=2)


def _riad_tree(root, **kw):
    from filo.data.synthetic import make_realiad_like

    return make_realiad_like(root, classes=RIAD_CLASSES, **RIAD_PARAMS, **kw)


def _as_tuples(split):
    return {c: [(s.img_path, s.mask_path, s.cls_name, s.anomaly) for s in g]
            for c, g in split.items()}


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("class_relative", [False, True])
def test_realiad_multi_class_json_lists_the_same_samples_as_the_per_class_files(
        tmp_path, class_relative):
    from filo.data.layouts import realiad_sample_key, scan_realiad
    from filo.data.synthetic import REALIAD_MULTICLASS_FILE

    _riad_tree(tmp_path, class_relative_paths=class_relative, multi_class_json=True)
    views, n_views = 5, RIAD_PARAMS["defect_views"]
    n_train = RIAD_PARAMS["n_train_samples"] * views
    n_good, n_ng = RIAD_PARAMS["n_test_good_samples"], RIAD_PARAMS["n_test_ng_samples"]
    for split in ("train", "test"):
        per_class = load_split(tmp_path, "realiad", split)
        by_folder = scan_realiad(tmp_path, split, split_path="realiad_jsons_multiclass")
        by_file = scan_realiad(tmp_path, split, split_path=tmp_path / REALIAD_MULTICLASS_FILE)
        assert list(per_class) == list(by_folder) == list(by_file) == list(RIAD_CLASSES)
        assert _as_tuples(by_folder) == _as_tuples(per_class) == _as_tuples(by_file)
        for cls, samples in by_folder.items():
            # expectations from the generator's parameters, not from another reader
            if split == "train":
                assert len(samples) == n_train and not any(s.anomaly or s.mask_path
                                                           for s in samples)
                continue
            assert len(samples) == (n_good + n_ng) * views
            assert sum(s.anomaly for s in samples) == n_ng * n_views
            assert len({realiad_sample_key(s) for s in samples}) == n_good + n_ng
            for s in samples:
                assert s.cls_name == cls and s.img_path.startswith(f"realiad_1024/{cls}/")
                assert (tmp_path / s.img_path).is_file()
                assert bool(s.mask_path) == bool(s.anomaly)
                if s.anomaly:
                    assert s.mask_path == s.img_path[:-4] + ".png"
                    assert np.asarray(Image.open(tmp_path / s.mask_path)).any()


def test_realiad_multi_class_json_groups_by_category_in_first_seen_order(tmp_path):
    from filo.data.layouts import realiad_sample_key, scan_realiad
    from filo.data.synthetic import REALIAD_MULTICLASS_FILE

    _riad_tree(tmp_path, multi_class_json=True)
    reference = _as_tuples(load_split(tmp_path, "realiad", "test"))
    path = tmp_path / REALIAD_MULTICLASS_FILE
    data = json.loads(path.read_text())
    by_cls = {c: [it for it in data["test"] if it["category"] == c] for c in RIAD_CLASSES}
    # interleave the classes, riad_c first, then riad_a, then riad_b; a misleading meta prefix
    # (one class folder) must not apply to the other classes' items
    order = ("riad_c", "riad_a", "riad_b")
    data["test"] = [by_cls[c][i] for i in range(len(by_cls["riad_a"])) for c in order]
    data["meta"]["prefix"] = "riad_c/"
    path.write_text(json.dumps(data))
    split = scan_realiad(tmp_path, "test", split_path=path)
    assert list(split) == list(order)
    assert _as_tuples(split) == {c: reference[c] for c in order}
    # sample-level grouping: the 5 views of a sample share a key, samples of classes do not mix
    keys = {c: {realiad_sample_key(s) for s in g} for c, g in split.items()}
    assert all(len(k) == 3 for k in keys.values())
    assert not keys["riad_a"] & keys["riad_b"]
    # the same file as {split: {class: [items]}}
    data["test"] = {c: by_cls[c] for c in order}
    path.write_text(json.dumps(data))
    assert _as_tuples(scan_realiad(tmp_path, "test", split_path=path)) == \
        {c: reference[c] for c in order}
    # classes= keeps the dataset order
    assert list(scan_realiad(tmp_path, "test", "riad_b,riad_c", split_path=path)) == \
        ["riad_c", "riad_b"]


def test_realiad_variant_root_and_flat_archive_are_found_without_arguments(tmp_path, capsys):
    from filo.cli.data import main
    from filo.data.synthetic import REALIAD_MULTICLASS_FILE

    data = tmp_path / "Real-IAD"
    _riad_tree(data, multi_class_json=True)
    reference = _as_tuples(load_split(data, "realiad", "test"))
    # a root whose realiad_jsons/ is the multi-class variant (links to the real folders)
    variant = tmp_path / "Real-IAD-multiclass"
    variant.mkdir()
    (variant / "realiad_1024").symlink_to(data / "realiad_1024", target_is_directory=True)
    (variant / "realiad_jsons").symlink_to((data / REALIAD_MULTICLASS_FILE).parent,
                                           target_is_directory=True)
    got = _as_tuples(load_split(variant, "realiad", "test"))
    assert got == reference
    assert main(["summary", "--dataset", "realiad", "--root", str(variant)]) == 0
    assert "riad_b: 15 images (11 normal, 4 anomalous)" in capsys.readouterr().out
    # the archive unpacked flat: ROOT/realiad_jsons/<class>.json
    nested = data / "realiad_jsons" / "realiad_jsons"
    for f in nested.glob("*.json"):
        f.rename(data / "realiad_jsons" / f.name)
    nested.rmdir()
    assert _as_tuples(load_split(data, "realiad", "test")) == reference


def test_realiad_single_view_variant_skips_the_five_view_check(tmp_path):
    from filo.data.layouts import realiad_sample_key, realiad_view, scan_realiad
    from filo.data.synthetic import REALIAD_SINGLE_VIEW_DIR
    from filo.errors import FiloError

    _riad_tree(tmp_path, single_view_json=True)
    n_good, n_ng = RIAD_PARAMS["n_test_good_samples"], RIAD_PARAMS["n_test_ng_samples"]
    test = scan_realiad(tmp_path, "test", split_path="realiad_jsons_sv")
    train = scan_realiad(tmp_path, "train", split_path=REALIAD_SINGLE_VIEW_DIR)
    assert list(test) == list(RIAD_CLASSES)
    for cls in RIAD_CLASSES:
        assert len(train[cls]) == RIAD_PARAMS["n_train_samples"]
        assert len(test[cls]) == n_good + n_ng  # one image per sample
        assert {realiad_view(s) for s in test[cls]} == {"C1"}
        assert len({realiad_sample_key(s) for s in test[cls]}) == n_good + n_ng
        assert sum(s.anomaly for s in test[cls]) == n_ng  # C1 shows the defect
        assert all((tmp_path / s.img_path).is_file() for s in test[cls])
    # the rule also holds when the folder is not named *_sv (one image per sample) ...
    other = tmp_path / "realiad_jsons" / "top_view_only"
    (tmp_path / REALIAD_SINGLE_VIEW_DIR).rename(other)
    assert _as_tuples(scan_realiad(tmp_path, "test", split_path=other)) == _as_tuples(test)
    # ... and the check can still be forced
    with pytest.raises(FiloError, match=r"riad_a\.json: sample .* lacks view\(s\) C2, C3"):
        scan_realiad(tmp_path, "test", split_path=other, check_views=True)


def test_realiad_fuiad_variant_keeps_noisy_train_images_unlabelled(tmp_path):
    from filo.data.layouts import scan_realiad
    from filo.errors import FiloError

    _riad_tree(tmp_path, class_relative_paths=True)
    fuiad = tmp_path / "realiad_jsons" / "realiad_jsons_fuiad_0.2"
    fuiad.mkdir()
    for cls in RIAD_CLASSES:
        data = json.loads((tmp_path / "realiad_jsons" / "realiad_jsons" / f"{cls}.json")
                          .read_text())
        moved = [it for it in data["test"] if "/S0005/" in it["image_path"]]  # one NG sample
        data["test"] = [it for it in data["test"] if it not in moved]
        data["train"] += moved
        (fuiad / f"{cls}.json").write_text(json.dumps(data))
    train = scan_realiad(tmp_path, "train", split_path="realiad_jsons_fuiad_0.2")
    test = scan_realiad(tmp_path, "test", split_path="realiad_jsons_fuiad_0.2")
    for cls in RIAD_CLASSES:
        assert len(train[cls]) == 15 and len(test[cls]) == 10
        assert not any(s.anomaly or s.mask_path for s in train[cls])  # training is unlabelled
        assert sorted(s.specie_name for s in train[cls] if s.specie_name != "OK") == \
            ["blob", "blob"]
        assert sum(s.anomaly for s in test[cls]) == 2
    # one view of a test sample moved alone: that variant has 5 views, the check fires
    data = json.loads((fuiad / "riad_b.json").read_text())
    data["train"].append(data["test"].pop(2))
    (fuiad / "riad_b.json").write_text(json.dumps(data))
    with pytest.raises(FiloError, match=r"fuiad_0\.2/riad_b\.json: sample .*S0003 lacks view"):
        scan_realiad(tmp_path, "test", split_path=fuiad)


def test_realiad_variant_bad_input_is_one_line_naming_the_file(tmp_path):
    from filo.data.layouts import scan_realiad
    from filo.data.synthetic import REALIAD_MULTICLASS_FILE
    from filo.errors import FiloError

    _riad_tree(tmp_path, multi_class_json=True)
    path = tmp_path / REALIAD_MULTICLASS_FILE
    good = path.read_text()
    data = json.loads(good)

    def broken(change, pattern, split="test", **kw):
        d = json.loads(good)
        change(d)
        path.write_text(json.dumps(d))
        with pytest.raises(FiloError, match=pattern) as exc:
            scan_realiad(tmp_path, split, split_path=path, **kw)
        return _one_line(exc)

    # an item without category in a file of several classes
    broken(lambda d: d["test"][7].pop("category"),
           r"realiad_multiclass\.json test\[7\]: item has no category.*riad_a, riad_b, riad_c")
    # an item naming a file that is not there
    name = "riad_b/" + data["test"][16]["image_path"]  # relative to its class folder
    (tmp_path / "realiad_1024" / name).unlink()
    broken(lambda d: None,
           rf"realiad_multiclass\.json test\[16\] names a missing file .*{Path(name).name}")
    (tmp_path / "realiad_1024").joinpath(name).write_bytes(b"")  # back (content unused)
    # a view missing from a sample of the 5-view variant
    broken(lambda d: d["test"].pop(17),
           r"realiad_multiclass\.json: sample realiad_1024/riad_b/OK/S0003 lacks view\(s\) C3")
    # malformed JSON, a wrong type, an item without image_path
    path.write_text(good[:-20])
    with pytest.raises(FiloError, match=r"realiad_multiclass\.json is not a valid Real-IAD "
                                        r"split file \(JSONDecodeError") as exc:
        scan_realiad(tmp_path, "test", split_path=path)
    _one_line(exc)
    broken(lambda d: d.update(test="x"), r"realiad_multiclass\.json: 'test' must be a list")
    broken(lambda d: d["train"][0].pop("image_path"),
           r"realiad_multiclass\.json train\[0\]: needs image_path and anomaly_class", "train")
    broken(lambda d: d["test"][0].update(image_path="../../../etc/x.jpg"),
           r"realiad_multiclass\.json test\[0\]: .*outside the dataset root")
    broken(lambda d: d.update(test={"riad_a": [dict(d["test"][20], category="riad_z")]}),
           r"realiad_multiclass\.json test/riad_a\[0\]: category 'riad_z' differs")
    # the same class in two files of one folder
    path.write_text(good)
    (path.parent / "riad_a.json").write_text(
        (tmp_path / "realiad_jsons" / "realiad_jsons" / "riad_a.json").read_text())
    with pytest.raises(FiloError, match=r"class riad_a is listed by both .*realiad_multiclass"
                                        r"\.json and .*riad_a\.json") as exc:
        scan_realiad(tmp_path, "test", split_path=path.parent)
    _one_line(exc)
    # a split that is not there, and a realiad_jsons/ that only holds variant folders
    with pytest.raises(FiloError, match=r"Real-IAD split 'realiad_jsons_sv' not found"):
        scan_realiad(tmp_path, "test", split_path="realiad_jsons_sv")
    (tmp_path / "realiad_jsons" / "realiad_jsons").rename(tmp_path / "elsewhere")
    with pytest.raises(FiloError, match=r"only holds the variant folder\(s\) "
                                        r"realiad_jsons_multiclass") as exc:
        load_split(tmp_path, "realiad", "test")
    _one_line(exc)


def test_realiad_split_flag_runs_a_variant_and_is_refused_elsewhere(tmp_path, tiny_filo_ckpt,
                                                                      capsys):
    from filo.cli.test import main
    from filo.data.synthetic import make_mvtec_like, make_realiad_like

    make_realiad_like(tmp_path / "data", classes=("toothbrush",), n_train_samples=0,
                      n_test_good_samples=2, n_test_ng_samples=2, size=48, single_view_json=True)

    def run(*extra, data=tmp_path / "data", save="run"):
        try:
            return main(["--data_path", str(data), "--ckpt_path", str(tiny_filo_ckpt[0]),
                         "--image_size", "32", "--device", "cpu", "--num_workers", "0",
                         "--save_path", str(tmp_path / save), *extra])
        except SystemExit as exc:
            return exc.code

    assert run("--dataset", "realiad", save="all") in (0, None), capsys.readouterr().err
    assert run("--dataset", "realiad", "--realiad_split", "realiad_jsons_sv",
               save="sv") in (0, None), capsys.readouterr().err
    every = json.loads((tmp_path / "all" / "results.json").read_text())["classes"]["toothbrush"]
    single = json.loads((tmp_path / "sv" / "results.json").read_text())["classes"]["toothbrush"]
    assert every["n_images"] == 4 * 5 and single["n_images"] == 4  # 4 samples, C1 only
    for col in ("auroc_sp", "f1_sp", "ap_sp"):  # one view per sample: sample = image metrics
        assert single[f"{col}_sample"] == pytest.approx(single[col])

    make_mvtec_like(tmp_path / "mv", classes=("bottle",), n_train_good=1, n_test_good=1,
                    n_test_defect=1, size=32)
    capsys.readouterr()
    assert run("--dataset", "mvtec", "--realiad_split", "realiad_jsons_sv",
               data=tmp_path / "mv", save="mv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --realiad_split applies to --dataset realiad only (this run "
                       "reads mvtec); drop it")
