"""Trained baselines through anomalib: the adapter, fit, the --baseline scorer in filo's runner,
and parity with anomalib's own test metrics and predict maps (docs/design.md §17).

Tiny data (64 px, 4 normal training images), random-weight ResNet-18 backbones, PaDiM (no
training) and FastFlow for one epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("anomalib")

from filo.baselines import backend  # noqa: E402
from filo.baselines.config import FitConfig, parse_model_args  # noqa: E402
from filo.baselines.fit import fit_baselines  # noqa: E402
from filo.data.layouts import load_split  # noqa: E402
from filo.errors import FiloError  # noqa: E402

SIZE = 64
CLASSES = ["tex_a"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from filo.data.synthetic import make_mvtec_like

    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_like(root, classes=[*CLASSES, "tex_b"], n_train_good=4, n_test_good=3, n_test_defect=3,
                    size=SIZE, seed=3)
    return root


def _fit(data, out, model, classes=None, **kw):
    cfg = FitConfig(model=model, out=out, device="cpu", input_size=SIZE, **kw)
    return fit_baselines(cfg, data, "mvtec", classes, batch_size=4, num_workers=0,
                         log=lambda *_: None)


@pytest.fixture(scope="module")
def padim(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("padim")
    _fit(data, out, "padim", CLASSES, backbone="resnet18")
    return out


@pytest.fixture(scope="module")
def fastflow(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fastflow")
    _fit(data, out, "fastflow", CLASSES, backbone="resnet18", epochs=1,
         model_args={"flow_steps": 2})
    return out


def _evaluate(data, baseline, save, classes="tex_a", **run_kw):
    from filo.evaluation.runner import RunConfig, run_evaluation
    from filo.pipeline import PipelineConfig

    run = RunConfig(dataset="mvtec", data_path=data, save_path=save, num_workers=0,
                    batch_size=4, classes=classes, **run_kw)
    return {r.name: r for r in run_evaluation(run, PipelineConfig(baseline=baseline,
                                                                   device="cpu"),
                                              log=lambda *_: None)}


def _anomalib_run(data, baseline, cls_name):
    """anomalib's own Engine.test metrics and Engine.predict batches for one class."""
    from anomalib.engine import Engine

    from filo.baselines.record import find_records

    rec, ckpt = find_records(baseline)[cls_name]
    model = backend.load_trained(rec.model, rec.init_args, rec.input_size, ckpt)
    train = load_split(data, "mvtec", "train", [cls_name])[cls_name]
    test = load_split(data, "mvtec", "test", [cls_name])[cls_name]

    def dm():
        return backend.SampleDataModule(Path(data), cls_name, train, test, batch_size=4)

    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(baseline / "_check"))
    metrics = engine.test(model=model, datamodule=dm(), verbose=False)[0]
    preds = engine.predict(model=model, datamodule=dm())
    return metrics, preds


def test_fit_writes_one_checkpoint_and_record_per_class(padim):
    for cls_name in CLASSES:
        rec = json.loads((padim / cls_name / "filo_baseline.json").read_text())
        assert rec["model"] == "padim" and rec["class_name"] == cls_name and rec["finished"]
        assert rec["init_args"] == {"backbone": "resnet18"} and rec["input_size"] == SIZE
        assert rec["train_images"] == 4
        assert (padim / cls_name / "last.ckpt").stat().st_size > 0


def test_a_finished_class_is_skipped_unless_its_settings_change(padim, data):
    ckpt = padim / "tex_a" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    logged = []
    cfg = FitConfig(model="padim", backbone="resnet18", out=padim, device="cpu", input_size=SIZE)
    fit_baselines(cfg, data, "mvtec", CLASSES, num_workers=0, log=logged.append)
    assert ckpt.stat().st_mtime_ns == before
    assert any("finished model" in line and "skipped" in line for line in logged)


@pytest.mark.parametrize("which", ["padim", "fastflow"])
def test_filo_metrics_equal_anomalib_test_metrics_on_the_same_maps(which, data, request,
                                                                     tmp_path):
    baseline = request.getfixturevalue(which)
    maps_dir = tmp_path / "maps"
    results = _evaluate(data, baseline, tmp_path / "res", save_maps=maps_dir)
    for cls_name in CLASSES:  # (one class: each anomalib run costs seconds)
        metrics, preds = _anomalib_run(data, baseline, cls_name)
        values = results[cls_name].values
        assert abs(values["auroc_sp"] - float(metrics["image_AUROC"])) < 1e-4
        assert abs(values["auroc_px"] - float(metrics["pixel_AUROC"])) < 1e-4
        # the maps filo scored are the ones anomalib's predict writes (same size: 64 px)
        n = 0
        for batch in preds:
            for path, amap in zip(batch.image_path, batch.anomaly_map, strict=True):
                rel = Path(path).relative_to(data)
                ours = np.load(maps_dir / rel.with_suffix(".npy"))
                np.testing.assert_allclose(ours, amap.squeeze().numpy(), atol=1e-5)
                n += 1
        assert n == 6
        scores = {r[0]: float(r[3]) for r in
                  (line.split(",") for line in (maps_dir / "scores.csv").read_text().split()[1:])}
        for batch in preds:
            for path, score in zip(batch.image_path, batch.pred_score, strict=True):
                rel = str(Path(path).relative_to(data))
                assert abs(scores[rel] - float(score)) < 1e-5


def test_a_class_folder_or_checkpoint_scores_alone(padim, data, tmp_path):
    from filo.baselines.scorer import BaselineScorer

    whole = BaselineScorer(padim)
    one = BaselineScorer(padim / "tex_a" / "last.ckpt")
    assert sorted(whole.records) == CLASSES and list(one.records) == ["tex_a"]
    with pytest.raises(FiloError, match="no trained model for class 'tex_b'"):
        whole.check_classes(["tex_a", "tex_b"])
    one.check_classes(["tex_b"])  # one checkpoint scores any class
    assert whole.map_size == SIZE
    from PIL import Image

    img = Image.open(next((data / "tex_a" / "test").glob("*/000.png")))
    x = whole.transform()(img, "tex_a")
    assert tuple(x.shape) == (3, SIZE, SIZE) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    m1, s1 = whole.score(x[None], ["tex_a"], [img.size], 32)
    m2, s2 = one.score(x[None], ["tex_a"], [img.size], 32)
    assert m1.shape == (1, 32, 32)
    np.testing.assert_array_equal(m1, m2)
    assert s1[0] == s2[0]


def test_local_backbone_weights_are_loaded(tmp_path):
    import timm
    import torch

    net = timm.create_model("resnet18", pretrained=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    weights = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), weights)
    model = backend.build_model("padim", {"backbone": "resnet18"}, SIZE)
    assert backend.load_backbone_weights(model, weights) > 0
    [target] = backend._timm_backbones(model)
    torch.testing.assert_close(target.state_dict()["conv1.weight"], net.state_dict()["conv1.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(FiloError, match="does not fit the backbone"):
        backend.load_backbone_weights(model, bad)


@pytest.mark.parametrize("model, args, match", [
    ("no_such_model", {}, "not an anomalib image model"),
    ("padim", {"no_such_arg": 1}, "--model_args no_such_arg: padim takes"),
    ("efficient_ad", {}, "needs --model_args imagenet_dir=DIR"),
])
def test_bad_model_settings_are_one_line(model, args, match):
    with pytest.raises(FiloError, match=match):
        backend.build_model(model, args, SIZE)


def test_model_args_and_presets():
    assert parse_model_args(["n_features=100", "layers=[layer1, layer2]", "x=true"]) == {
        "n_features": 100, "layers": ["layer1", "layer2"], "x": True}
    with pytest.raises(FiloError, match="key=value"):
        parse_model_args(["n_features"])
    cfg = FitConfig(preset="fastflow_survey", out=Path("x")).resolved()
    assert (cfg.model, cfg.backbone, cfg.epochs) == ("fastflow", "resnet18", 50)
    assert FitConfig(preset="fastflow_survey", epochs=1, out=Path("x")).resolved().epochs == 1
    with pytest.raises(FiloError, match="not --model padim"):
        FitConfig(preset="fastflow_survey", model="padim", out=Path("x")).resolved()


def test_cli_errors_are_one_line_and_anomalib_loads_only_when_used(tmp_path, data):
    code = ("import sys, filo.cli.test, filo.pipeline, filo.scorers, filo.baselines.config; "
            "print(sorted(m for m in ('anomalib', 'lightning') if m in sys.modules)); "
            "sys.exit(filo.cli.test.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--baseline", str(tmp_path / "none"),
                          "--data_path", str(data), "--save_path", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.splitlines()[0] == "[]", out.stdout
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "--baseline" in line]
    assert len(lines) == 1 and "does not exist" in lines[0], out.stderr


def test_without_anomalib_one_line_names_the_extra(monkeypatch):
    monkeypatch.setattr(backend, "anomalib", None)
    with pytest.raises(FiloError, match=r"pip install 'filo\[anomalib\]'"):
        backend.model_names()


def test_the_adapter_gives_anomalib_filo_s_samples_and_masks(data):
    from dataclasses import replace

    from PIL import Image

    test = load_split(data, "mvtec", "test", CLASSES)["tex_a"]
    ds = backend.SampleDataset(test, data, "test", "tex_a")
    assert len(ds) == 6 and ds.task.value == "segmentation"
    by_path = {str(Path(data) / s.img_path): s for s in test}
    for i in range(len(ds)):
        item = ds[i]
        s = by_path[item.image_path]
        assert int(item.gt_label) == s.anomaly
        expect = (np.asarray(Image.open(data / s.mask_path).convert("L")) > 0) if s.anomaly \
            else np.zeros((SIZE, SIZE), bool)
        np.testing.assert_array_equal(item.gt_mask.numpy().astype(bool), expect)
    # an anomalous image without a mask: image-level (classification) task
    no_mask = [replace(s, mask_path="") if s.anomaly else s for s in test]
    assert backend.SampleDataset(no_mask, data, "test", "tex_a").task.value == "classification"


def test_compare_methods_table_and_plot(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import compare_methods as cm
    finally:
        sys.path.pop(0)
    s = cm.Setup(dataset="visa", data_path="d", out="o", ckpt_path="c.pth",
                 grounded_checkpoint="g.pth", models=["padim", "fastflow"], shots=3)
    keys = [k for k, _ in cm.methods(s)]
    assert keys == ["filo", "filo_boxes", "memory_kshot", "memory_full", "anomalib:padim",
                    "anomalib:fastflow"]
    assert [k for k, _ in cm.methods(cm.Setup(dataset="visa", data_path="d", out="o",
                                              models=["padim"]))] == ["anomalib:padim"]
    rows = [{"method": "a", "auroc_sp": 50.0, "ap_sp": 60.0, "auroc_px": 70.0, "aupro": 40.0,
             "train_s": 0.0, "ms_per_image": 12.5, "peak_rss_mib": 900.0},
            {"method": "b", "auroc_sp": 90.0, "ap_sp": 95.0, "auroc_px": 99.0, "aupro": 90.0,
             "train_s": 3.2, "ms_per_image": 20.0, "peak_rss_mib": 1000.0}]
    table = cm.render(rows).splitlines()
    assert table[0].startswith("| method | auroc_sp") and len(table) == 4
    assert table[3] == "| b | 90.0 | 95.0 | 99.0 | 90.0 | 3.2 | 20.0 | 1000.0 |"
    cm.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
