"""``--coco_eval``: ground-truth boxes from mask regions, COCO box AP against hand-computed values,
and the detector-only CLI run end to end (tiny seeded GroundingDINO, generated MVTec tree)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from filo.detect import main as detect_main
from filo.evaluation.coco_eval import (
    build_ground_truth,
    detections_of,
    evaluate,
    evaluate_by_class,
    mask_regions_to_boxes,
)

# ---- ground-truth boxes from masks ----------------------------------------------------------


def test_two_separate_blobs_give_two_tight_inclusive_boxes():
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[1:3, 2:5] = 255  # rows 1..2, columns 2..4
    mask[6, 9] = 1  # a single pixel: row 6, column 9
    mask[5:9, 7] = 7  # column 7, rows 5..8 (not touching the pixel at column 9)
    assert mask_regions_to_boxes(mask) == [
        [2, 1, 3, 2],  # x0 = 2, y0 = 1, w = 4 - 2 + 1, h = 2 - 1 + 1
        [7, 5, 1, 4],
        [9, 6, 1, 1],  # one pixel is a 1 x 1 box
    ]


def test_diagonal_neighbours_are_one_region_under_8_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal staircase
    mask[3, 1] = True  # touches (2, 2) diagonally too
    assert mask_regions_to_boxes(mask) == [[1, 1, 3, 3]]


def test_empty_mask_has_no_box():
    assert mask_regions_to_boxes(np.zeros((8, 5), dtype=np.uint8)) == []


def test_ground_truth_from_a_dataset_uses_the_original_size(tmp_path):
    from filo.data.records import Sample

    root = tmp_path / "d"
    (root / "c/test/bad").mkdir(parents=True)
    (root / "c/test/good").mkdir(parents=True)
    (root / "c/ground_truth/bad").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(root / "c/test/bad/000.png")
    Image.new("RGB", (30, 20)).save(root / "c/test/good/000.png")
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:5, 3:10] = 255
    mask[15:20, 25:30] = 255  # touches the image corner
    Image.fromarray(mask).save(root / "c/ground_truth/bad/000_mask.png")
    split = {"c": [Sample("c/test/good/000.png", "", "c", "good", 0),
                   Sample("c/test/bad/000.png", "c/ground_truth/bad/000_mask.png", "c", "bad", 1)]}
    gt = build_ground_truth(split, root)
    assert [(im["id"], im["width"], im["height"]) for im in gt["images"]] == [(1, 30, 20),
                                                                              (2, 30, 20)]
    assert [(a["image_id"], a["bbox"], a["area"]) for a in gt["annotations"]] == [
        (2, [3, 2, 7, 3], 21), (2, [25, 15, 5, 5], 25)]
    assert gt["categories"] == [{"id": 1, "name": "defect", "supercategory": "defect"}]


# ---- COCO metrics against hand computation --------------------------------------------------

def _gt(boxes_per_image, classes=None):
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 100,
                       "class": (classes or ["c"] * len(boxes_per_image))[i - 1]})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "defect"}]}


def _det(image_id, bbox, score):
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score}


def test_ap_matches_the_101_point_interpolation_by_hand():
    # one image, GT A = [0, 0, 10, 10] and GT B = [20, 0, 10, 10] (area 100 each, disjoint)
    gt = _gt([[[0, 0, 10, 10], [20, 0, 10, 10]]])
    dets = [
        _det(1, [0, 0, 10, 10], 0.9),  # on A exactly: IoU 1.0
        _det(1, [50, 50, 10, 10], 0.8),  # on nothing: IoU 0 (a false positive at every IoU)
        _det(1, [20, 0, 10, 7.2], 0.7),  # inside B: IoU = 72 / 100 = 0.72
    ]
    # Score order: d1, d2, d3. At an IoU threshold t <= 0.70 (0.50, 0.55, 0.60, 0.65, 0.70:
    # 5 of the 10 thresholds) d3 matches B: TP, FP, TP.
    #   recall    = [1/2, 1/2, 2/2];  precision = [1/1, 1/2, 2/3]
    #   precision made non-increasing from the right: [1, 2/3, 2/3]
    #   101 recall points r = 0.00 .. 1.00: for r <= 0.5 (51 points) the first detection with
    #   recall >= r is d1 -> precision 1; for r > 0.5 (50 points) it is d3 -> 2/3.
    ap_low = (51 * 1 + 50 * (2 / 3)) / 101  # = 253 / 303 = 0.83498...
    # At t >= 0.75 (0.75 .. 0.95: the other 5 thresholds) d3 misses: TP, FP, FP.
    #   recall = [1/2, 1/2, 1/2]: r <= 0.5 -> precision 1 (51 points); r > 0.5 is never
    #   reached -> precision 0 (50 points).
    ap_high = (51 * 1 + 50 * 0) / 101  # = 51 / 101 = 0.50495...
    expected_ap = (5 * ap_low + 5 * ap_high) / 10  # mean over IoU 0.50:0.05:0.95 = 0.66997...
    # AR@100: recall reached at each threshold (2/2 for the 5 low ones, 1/2 for the 5 high ones)
    expected_ar = (5 * 1.0 + 5 * 0.5) / 10  # = 0.75
    got = evaluate(gt, dets)
    assert got["AP50"] == pytest.approx(ap_low, abs=1e-12)
    assert got["AP75"] == pytest.approx(ap_high, abs=1e-12)
    assert got["AP"] == pytest.approx(expected_ap, abs=1e-12)
    assert got["AR100"] == pytest.approx(expected_ar, abs=1e-12)
    assert (got["n_images"], got["n_gt"], got["n_detections"]) == (1, 2, 3)
    assert ap_low == pytest.approx(253 / 303) and expected_ap == pytest.approx(406 / 606)


def test_perfect_detection_is_ap_one_and_no_detection_is_ap_zero():
    gt = _gt([[[0, 0, 10, 10], [20, 0, 10, 10]], [[5, 5, 30, 40]]])
    perfect = [_det(a["image_id"], a["bbox"], 0.5) for a in gt["annotations"]]
    got = evaluate(gt, perfect)
    assert [got[k] for k in ("AP", "AP50", "AP75", "AR100")] == pytest.approx([1.0] * 4)
    got = evaluate(gt, [])
    assert (got["AP"], got["AP50"], got["AP75"], got["AR100"]) == (0.0, 0.0, 0.0, 0.0)
    assert got["n_detections"] == 0


def test_a_class_without_ground_truth_is_null_not_zero():
    # class "a": image 1 with one GT box, found; class "b": image 2, no GT box, one false positive
    gt = _gt([[[0, 0, 10, 10]], []], classes=["a", "b"])
    dets = [_det(1, [0, 0, 10, 10], 0.9), _det(2, [0, 0, 10, 10], 0.95)]
    out = evaluate_by_class(gt, dets)
    assert out["classes"]["b"]["AP"] is None and out["classes"]["b"]["AR100"] is None
    assert out["classes"]["b"]["n_detections"] == 1 and out["classes"]["b"]["n_gt"] == 0
    assert out["classes"]["a"]["AP"] == pytest.approx(1.0)
    # overall: the higher-scored false positive on image 2 comes first: FP, TP
    #   recall [0, 1], precision [0, 1/2] -> interpolated [1/2, 1/2]: every recall point 1/2
    assert out["overall"]["AP50"] == pytest.approx(0.5)
    assert out["overall"]["AR100"] == 1.0


def test_pycocotools_printing_is_kept_off_stdout(capsys):
    gt = _gt([[[0, 0, 10, 10]]])
    evaluate(gt, [_det(1, [0, 0, 10, 10], 0.9)])
    assert capsys.readouterr().out == ""


def test_detections_of_a_record_are_xywh_of_every_kept_box():
    det = {"boxes": [[1.5, 2.0, 11.5, 7.0], [0, 0, 3, 3]], "scores": [0.4, 0.3],
           "phrases": ["scratch", "x"], "matched": [True, False], "image_size": [64, 64]}
    assert detections_of(7, det) == [_det(7, [1.5, 2.0, 10.0, 5.0], 0.4),
                                     _det(7, [0.0, 0.0, 3.0, 3.0], 0.3)]
    assert detections_of(7, None) == []


# ---- the detector-only CLI ------------------------------------------------------------------

@pytest.fixture()
def mvtec(tmp_path, tiny_grounding_ckpt, bert_vocab_dir):
    from filo.data.synthetic import make_mvtec_like

    root = tmp_path / "mvtec"
    make_mvtec_like(root, classes=["bottle", "cable"], n_train_good=0, n_test_good=2,
                    n_test_defect=2, size=64)
    return root, tiny_grounding_ckpt, bert_vocab_dir


def _regions_in_masks(root, cls_name):
    """Connected defect regions of the class's masks (8-connectivity), counted independently."""
    n = 0
    for path in sorted((root / cls_name / "ground_truth").rglob("*.png")):
        _, k = ndimage.label(np.asarray(Image.open(path)) > 0, structure=np.ones((3, 3)))
        n += k
    return n


def test_detect_cli_coco_eval_end_to_end(tmp_path, capsys, mvtec):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, ckpt, bert = mvtec
    shutil.rmtree(root / "cable" / "ground_truth")  # cable: no masks -> left out, warned
    out = tmp_path / "run"
    args = ["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint", str(ckpt),
            "--bert_dir", str(bert), "--device", "cpu", "--num_workers", "0", "--image_size",
            "64", "--save_path", str(out), "--coco_eval", "--save_coco", str(out / "dets.json")]
    assert detect_main(args) == 0
    printed = capsys.readouterr().out
    assert "cable" in printed and "left out of the --coco_eval table" in printed
    header = next(ln for ln in printed.splitlines() if "gt_boxes" in ln)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "objects", "images", "gt_boxes", "detections", "AP", "AP50", "AP75", "AR100"]
    assert printed.index("auroc_sp") < printed.index("gt_boxes")  # after the main table
    assert "Running per image evaluation" not in printed  # pycocotools' prints are captured

    results = json.loads((out / "results.json").read_text())
    assert {"columns", "classes", "mean", "settings"} <= set(results)  # the old keys stay
    coco = results["coco"]
    assert set(coco["classes"]) == {"bottle"} and coco["skipped_classes"] == ["cable"]
    for entry in (coco["classes"]["bottle"], coco["overall"]):
        assert set(entry) == {"AP", "AP50", "AP75", "AR100", "n_images", "n_gt", "n_detections"}
    gt = json.loads((out / "coco_gt.json").read_text())
    n_regions = _regions_in_masks(root, "bottle")
    assert len(gt["annotations"]) == n_regions == coco["overall"]["n_gt"] >= 2
    assert coco["overall"]["n_images"] == 4 and len(gt["images"]) == 4
    # the GT ids are the --save_coco file's ids (same image -> same id)
    saved = json.loads((out / "dets.json").read_text())
    saved_ids = {im["file_name"]: im["id"] for im in saved["images"]}
    assert all(saved_ids[im["file_name"]] == im["id"] for im in gt["images"])
    dets = json.loads((out / "coco_detections.json").read_text())
    bottle_ids = {im["id"] for im in gt["images"]}
    assert len(dets) == sum(1 for a in saved["annotations"] if a["image_id"] in bottle_ids)
    assert len(dets) == coco["overall"]["n_detections"]
    # pycocotools on the written files gives the same numbers
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(out / "coco_gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(out / "coco_detections.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for name, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("AR100", 8)):
        assert coco["overall"][name] == pytest.approx(ev.stats[index] * 100, abs=1e-3)
    csv_lines = (out / "coco_eval.csv").read_text().splitlines()
    assert csv_lines[0] == "objects,n_images,n_gt,n_detections,AP,AP50,AP75,AR100"
    assert [ln.split(",")[0] for ln in csv_lines[1:]] == ["bottle", "overall"]
    assert "AP50" in (out / "results.md").read_text()

    # --from_cache (no model) with the cached boxes replaced by the GT boxes (score 0.9) plus a
    # weaker false positive on each normal image: every TP ranks above every FP -> AP = AP50 =
    # AP75 = AR100 = 100 (x100)
    from filo.evaluation.cache import PredictionCache

    cache = PredictionCache.__new__(PredictionCache)
    (cache.dir,) = [d for d in (out / "cache").iterdir() if d.is_dir()]
    boxes: dict[str, list] = {im["file_name"]: [] for im in gt["images"]}
    by_id = {im["id"]: im["file_name"] for im in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[by_id[a["image_id"]]].append([x, y, x + w, y + h])
    for img_path, bs in boxes.items():
        pred = cache.get(img_path)
        det = pred.extras["detections"]
        if "/good/" in img_path:
            bs, scores = [[0, 0, 8, 8]], [0.1]
        else:
            scores = [0.9] * len(bs)
        det.update(boxes=bs, scores=scores, phrases=["x"] * len(bs), matched=[True] * len(bs))
        cache.put(pred)
    assert detect_main([*args, "--from_cache"]) == 0
    capsys.readouterr()
    doctored = json.loads((out / "results.json").read_text())["coco"]
    for entry in (doctored["classes"]["bottle"], doctored["overall"]):
        assert [entry[k] for k in ("AP", "AP50", "AP75", "AR100")] == pytest.approx([100.0] * 4)
        assert entry["n_detections"] == n_regions + 2  # + one box on each of the 2 good images


def test_detect_cli_coco_eval_without_masks_is_one_error_line(tmp_path, capsys, mvtec):
    root, ckpt, bert = mvtec
    for cls_name in ("bottle", "cable"):
        shutil.rmtree(root / cls_name / "ground_truth")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                     str(ckpt), "--bert_dir", str(bert), "--device", "cpu",
                     "--save_path", str(out), "--coco_eval"])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --coco_eval needs masks")
    assert not (out / "cache").exists()  # nothing was predicted


def test_test_py_grounded_run_has_coco_eval_and_no_grounding_is_an_error(
        tmp_path, capsys, tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt, bert_vocab_dir):
    from filo.cli.test import main as test_main
    from filo.data.synthetic import make_mvtec_like

    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=2,
                    size=(80, 60), seed=2)
    common = ["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path",
              str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts), "--image_size", "32",
              "--device", "cpu", "--num_workers", "0", "--coco_eval"]
    assert test_main([*common, "--grounded_checkpoint", str(tiny_grounding_ckpt), "--bert_dir",
                      str(bert_vocab_dir), "--save_path", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    coco = json.loads((tmp_path / "run" / "results.json").read_text())["coco"]
    gt = json.loads((tmp_path / "run" / "coco_gt.json").read_text())
    assert coco["overall"]["n_gt"] == _regions_in_masks(data, "tex_a") == len(gt["annotations"])
    assert {(im["width"], im["height"]) for im in gt["images"]} == {(80, 60)}  # original size
    # FiLo maps alone have no boxes to score: one line, before any model loads
    with pytest.raises(SystemExit) as exc:
        test_main([*common, "--no_grounding", "--save_path", str(tmp_path / "plain")])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--coco_eval" in err[0] and "--grounded_checkpoint" in err[0]
    assert not (tmp_path / "plain" / "cache").exists()
