"""The test runner's cache, tables and resumability, with a stand-in predictor.

The stand-in predicts maps from image content (a deterministic function), so these tests check
the plumbing (listing, caching, resuming, metrics wiring, outputs) independently of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from filo.data.synthetic import make_mvtec_like
from filo.errors import FiloError
from filo.evaluation.cache import Prediction, PredictionCache
from filo.evaluation.report import ClassResult, render_table
from filo.evaluation.runner import RunConfig, cache_key, run_evaluation
from filo.pipeline import ImagePrediction, PipelineConfig


class ContentPipeline:
    """Stand-in pipeline: map = normalized distance of each pixel from the image's median colour."""

    image_size = 64
    needs_detector_input = False

    def __init__(self, fail_after: int | None = None, calls: list | None = None):
        self.fail_after, self.calls, self.batches = fail_after, calls, 0

    def check_classes(self, classes, where):
        pass

    def predict(self, batch):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the run
        self.batches += 1
        if self.calls is not None:
            self.calls.extend(batch.img_paths)
        img = batch.images.numpy()  # B,3,S,S normalized
        med = np.median(img, axis=(2, 3), keepdims=True)
        dist = np.sqrt(((img - med) ** 2).sum(1))
        maps = (dist / (dist.max(axis=(1, 2), keepdims=True) + 1e-6)).astype(np.float32)
        return [ImagePrediction(m, float(m.max()), None) for m in maps]


def content_predictor(config: PipelineConfig, **kw) -> ContentPipeline:
    return ContentPipeline(**kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_like(root, classes=("tex_a", "tex_b"), n_train_good=0, n_test_good=3,
                    n_test_defect=3, size=64, seed=3)
    return root


PIPE = PipelineConfig(ckpt_path=Path("stand-in.pth"), image_size=64)


def settings_for(root: Path, out: Path, **kw) -> RunConfig:
    return RunConfig(dataset="mvtec", data_path=root, batch_size=2, num_workers=0,
                     save_path=out, **kw)


def run_test(run: RunConfig, predictor_factory=None, log=print):
    return run_evaluation(run, PIPE, pipeline_factory=predictor_factory, log=log)


def test_run_writes_tables_and_matches_sklearn(dataset: Path, tmp_path: Path) -> None:
    s = settings_for(dataset, tmp_path / "run", save_maps=tmp_path / "maps")
    results = run_test(s, predictor_factory=content_predictor, log=lambda *_: None)
    assert [r.name for r in results] == ["tex_a", "tex_b"]
    # pixel AUROC of the first class recomputed independently from the saved maps
    scores = (tmp_path / "maps" / "scores.csv").read_text().splitlines()
    assert scores[0] == "image_path,class,label,image_score"
    assert len(scores) == 1 + 12
    cache = PredictionCache(tmp_path / "run" / "cache", cache_key(s, PIPE))
    rows = [line.split(",") for line in scores[1:] if line.split(",")[1] == "tex_a"]
    maps = np.stack([np.load(tmp_path / "maps" / Path(r[0]).with_suffix(".npy")) for r in rows])
    masks = np.stack([cache.get(r[0]).mask for r in rows])
    assert maps.shape == (6, 64, 64) and maps.dtype == np.float32
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert math.isclose(results[0].values["auroc_px"], expected, rel_tol=1e-9)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(data["classes"]) == {"tex_a", "tex_b"}
    assert math.isclose(data["classes"]["tex_a"]["auroc_px"], round(expected * 100, 4))
    table = (tmp_path / "run" / "results.md").read_text().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "objects", "auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp", "aupro_exact",
        "mAD"]
    assert "test_log.txt" in {p.name for p in (tmp_path / "run").iterdir()}
    log = (tmp_path / "run" / "test_log.txt").read_text()
    assert "box_threshold: 0.25" in log and "| mean" in log


def test_killed_run_resumes_to_identical_tables(dataset: Path, tmp_path: Path) -> None:
    ref = run_test(settings_for(dataset, tmp_path / "ref"), predictor_factory=content_predictor,
                   log=lambda *_: None)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_test(settings_for(dataset, out),
                 predictor_factory=lambda c: content_predictor(c, fail_after=2), log=lambda *_: None)
    cached = list((out / "cache").rglob("*.npz"))
    assert len(cached) == 4  # two batches of two finished before the kill
    calls: list[str] = []
    resumed = run_test(settings_for(dataset, out),
                       predictor_factory=lambda c: content_predictor(c, calls=calls), log=lambda *_: None)
    assert len(calls) == 8  # only the 8 missing images were predicted again
    assert render_table(resumed) == render_table(ref)
    # --from_cache recomputes the same tables without any model
    again = run_test(settings_for(dataset, out, from_cache=True),
                     predictor_factory=lambda s: pytest.fail("model used"), log=lambda *_: None)
    assert render_table(again) == render_table(ref)


def test_from_cache_with_missing_entries_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FiloError, match="--from_cache: 12 of 12 images have no cached prediction"):
        run_test(settings_for(dataset, tmp_path / "x", from_cache=True), log=lambda *_: None)


def test_cache_entry_is_atomic_and_corruption_is_recomputed(tmp_path: Path) -> None:
    cache = PredictionCache(tmp_path, {"a": 1})
    m = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    mask = m > 0.5
    cache.put(Prediction("c/test/x/000.png", "c", 1, 0.25, m, mask, {"boxes": [[1, 2, 3, 4]]}))
    got = cache.get("c/test/x/000.png")
    assert np.array_equal(got.anomaly_map, m) and np.array_equal(got.mask, mask)
    assert got.image_score == 0.25 and got.label == 1 and got.extras == {"boxes": [[1, 2, 3, 4]]}
    assert not list(tmp_path.rglob(".tmp-*"))
    path = cache.path_for("c/test/x/000.png")
    path.write_bytes(path.read_bytes()[:100])  # a torn file
    assert cache.get("c/test/x/000.png") is None and not path.exists()
    # another settings key is another folder
    assert PredictionCache(tmp_path, {"a": 2}).dir != cache.dir


def test_table_format_and_mean_row() -> None:
    keys = ["auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp", "aupro_exact",
            "mAD"]
    a = ClassResult("metal_nut", 3, dict.fromkeys(keys, 0.5))
    b = ClassResult("bottle", 3, {**dict.fromkeys(keys, 0.25), "ap_sp": math.nan})
    lines = render_table([a, b]).splitlines()
    assert lines[2].split("|")[1].strip() == "metal nut"
    assert [c.strip() for c in lines[2].strip("|").split("|")][1:] == ["50.0"] * 9
    mean = [c.strip() for c in lines[4].strip("|").split("|")]
    assert mean[0] == "mean" and mean[1] == "37.5" and mean[7] == "50.0"  # NaN left out of ap_sp mean
