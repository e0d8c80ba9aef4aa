"""``python -m filo.detect`` on tiny synthetic MVTec trees with the tiny seeded checkpoint:
image metrics, per-image JSON, box-map pixel metrics, visualisations, COCO output."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from filo.detect import main as detect_main

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gdino"


def test_detect_cli_writes_boxes_and_metrics(tmp_path, capsys, tiny_grounding_ckpt,
                                             bert_vocab_dir):
    from filo.data.synthetic import make_mvtec_like

    ckpt, bert = tiny_grounding_ckpt, bert_vocab_dir
    root = tmp_path / "mvtec"
    make_mvtec_like(root, classes=["bottle"], n_train_good=1, n_test_good=2, n_test_defect=2,
                    size=64)
    out = tmp_path / "boxes"
    code = detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                        str(ckpt), "--bert_dir", str(bert), "--device", "cpu",
                        "--save_boxes", str(out), "--batch_size", "3",
                        "--save_path", str(tmp_path / "run_fast")])
    assert code == 0
    table = capsys.readouterr().out
    files = sorted(out.rglob("*.json"))
    assert len(files) >= 4
    labels, scores = [], []
    for f in files:
        item = json.loads(f.read_text())
        assert set(item) == {"img_path", "boxes", "scores", "phrases", "matched", "position",
                             "boxes_cxcywh", "image_size"}
        assert len(item["boxes"]) >= 1 and item["position"] is not None
        labels.append(0 if "/good/" in item["img_path"] else 1)
        scores.append(max(item["scores"]))
    expected = round(roc_auc_score(labels, scores) * 100, 1)
    bottle_row = next(line for line in table.splitlines() if line.startswith("| bottle"))
    assert float(bottle_row.split("|")[2]) == pytest.approx(expected, abs=0.051)
    assert "| mean" in table
    # --kernels reference (transformers' own CPU ops): the same boxes to rounding
    ref_out = tmp_path / "boxes_reference"
    assert detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                        str(ckpt), "--bert_dir", str(bert), "--device", "cpu", "--kernels",
                        "reference", "--save_boxes", str(ref_out), "--batch_size", "3",
                        "--save_path", str(tmp_path / "run_reference")]) == 0
    for f in files:
        a = json.loads(f.read_text())
        b = json.loads((ref_out / f.relative_to(out)).read_text())
        assert a["phrases"] == b["phrases"] and a["position"] == b["position"]
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.02)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=2e-5)


@pytest.fixture()
def setup(tmp_path, tiny_grounding_ckpt, bert_vocab_dir):
    """A generated MVTec-like root, the tiny seeded detector and the local BERT vocab."""

    def make(n_good=2, n_defect=3, classes=("bottle",)):
        from filo.data.synthetic import make_mvtec_like

        root = tmp_path / "mvtec"
        make_mvtec_like(root, classes=list(classes), n_train_good=1, n_test_good=n_good,
                        n_test_defect=n_defect, size=64)
        return root, tiny_grounding_ckpt, bert_vocab_dir

    return make



def _slow_box_map(item, size, w, h):
    """Pixel by pixel: highest score of the counted boxes covering the pixel centre cell."""
    out = np.zeros((size, size))
    for (x1, y1, x2, y2), s, m in zip(item["boxes"], item["scores"], item["matched"],
                                      strict=True):
        if not m:
            continue
        c0, c1 = math.floor(x1 * size / w), math.floor(x2 * size / w)
        r0, r1 = math.floor(y1 * size / h), math.floor(y2 * size / h)
        for r in range(size):
            for c in range(size):
                if r0 <= r < r1 and c0 <= c < c1:
                    out[r, c] = max(out[r, c], s)
    return out


def _href_targets(page: str) -> list[str]:
    return [unquote(t) for t in re.findall(r'(?:src|href)="([^"#][^"]*)"', page)]


def test_detect_cli_viz_pixel_metrics_and_coco(tmp_path, capsys, setup):
    from PIL import Image

    root, ckpt, bert = setup()
    boxes_dir, viz, coco = tmp_path / "boxes", tmp_path / "viz", tmp_path / "out" / "coco.json"
    code = detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                        str(ckpt), "--bert_dir", str(bert), "--device", "cpu",
                        "--save_boxes", str(boxes_dir), "--pixel_metrics", "--image_size", "64",
                        "--viz_dir", str(viz), "--viz_limit", "3", "--save_coco", str(coco)])
    assert code == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| objects"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "objects", "auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp",
        "aupro_exact", "mAD"]

    # pixel AUROC of the box map, rebuilt from the per-image JSON with a slow loop + sklearn
    items = [json.loads(f.read_text()) for f in sorted(boxes_dir.rglob("*.json"))]
    assert len(items) == 5
    gts, maps = [], []
    for item in items:
        img = Image.open(root / item["img_path"])
        w, h = img.size
        maps.append(_slow_box_map(item, 64, w, h))
        if "/good/" in item["img_path"]:
            gts.append(np.zeros((64, 64), dtype=bool))
        else:
            mask_path = item["img_path"].replace("/test/", "/ground_truth/").replace(
                ".png", "_mask.png")
            gts.append(np.asarray(Image.open(root / mask_path)) > 0)  # 64 px: no resize
    y, s = np.concatenate([g.ravel() for g in gts]), np.concatenate([m.ravel() for m in maps])
    expected_px = round(roc_auc_score(y, s) * 100, 1)
    row = next(line for line in out.splitlines() if line.startswith("| bottle"))
    assert float(row.split("|")[2]) == pytest.approx(expected_px, abs=0.051)

    # visualisations: 3 panels (limit) + thumbnails, index referencing only existing files
    panels = sorted(p for p in viz.rglob("*.png") if "thumbs" not in p.parts)
    assert len(panels) == 3
    assert all(p.relative_to(viz).parts[0] == "bottle" for p in panels)
    page = (viz / "index.html").read_text()
    targets = _href_targets(page)
    assert targets and all((viz / t).is_file() for t in targets), targets
    assert {str(p.relative_to(viz)) for p in panels} <= set(targets)
    assert "auroc_px" in page  # the results table
    assert not (viz / ".pending").exists()
    panel = np.asarray(Image.open(panels[0]))
    assert panel.ndim == 3 and panel.shape[1] > 64  # input | overlay | colour bar

    # COCO: one image per sample, every kept box once, bbox = x, y, w, h of the JSON boxes
    data = json.loads(coco.read_text())
    assert [im["id"] for im in data["images"]] == list(range(1, 6))
    by_path = {im["file_name"]: im["id"] for im in data["images"]}
    cats = {c["id"]: c["name"] for c in data["categories"]}
    assert cats[1] == "anomaly" and len(set(cats.values())) == len(cats)
    assert len(data["annotations"]) == sum(len(it["boxes"]) for it in items)
    for item in items:
        anns = [a for a in data["annotations"] if a["image_id"] == by_path[item["img_path"]]]
        for ann, box, score, phrase, matched in zip(anns, item["boxes"], item["scores"],
                                                    item["phrases"], item["matched"],
                                                    strict=True):
            x1, y1, x2, y2 = box
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011)
            assert ann["score"] == pytest.approx(score, abs=1e-5)
            name = cats[ann["category_id"]]
            if matched:
                assert name in phrase.lower() or name == "anomaly"
            else:
                assert name == "anomaly"


def test_detect_cli_viz_only_errors(tmp_path, capsys, setup):
    root, ckpt, bert = setup(n_good=3, n_defect=3)
    boxes_dir, viz = tmp_path / "boxes", tmp_path / "viz"
    assert detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                        str(ckpt), "--bert_dir", str(bert), "--device", "cpu",
                        "--save_boxes", str(boxes_dir), "--viz_dir", str(viz),
                        "--viz_only_errors"]) == 0
    capsys.readouterr()
    items = [json.loads(f.read_text()) for f in sorted(boxes_dir.rglob("*.json"))]
    labels = [0 if "/good/" in it["img_path"] else 1 for it in items]
    scores = [max(it["scores"]) for it in items]
    # brute-force F1-optimal threshold (score >= t is anomalous; ties -> highest t)
    best_t, best_f1 = None, -1.0
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for y, s in zip(labels, scores, strict=True) if y and s >= t)
        fp = sum(1 for y, s in zip(labels, scores, strict=True) if not y and s >= t)
        f1 = 2 * tp / (2 * tp + fp + (sum(labels) - tp))
        if f1 > best_f1:
            best_t, best_f1 = t, f1
    errors = {it["img_path"] for it, y, s in zip(items, labels, scores, strict=True)
              if (s >= best_t) != bool(y)}
    panels = {p.relative_to(viz).as_posix() for p in viz.rglob("*.png") if "thumbs" not in p.parts}
    assert panels == errors
    targets = _href_targets((viz / "index.html").read_text())
    assert all((viz / t).is_file() for t in targets)
    assert not (viz / ".pending").exists()
