"""MuSc through the CLIs: test.py per class set (cached by membership), the pool CLI and
filo.predict against a pool (equal to the set path when the pool is the test split)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from filo.backbone import ClipConfig, build_clip

TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=128, vision_layers=12,
            vision_heads=2, text_width=32, text_heads=2, text_layers=1, text_vocab_size=100,
            text_context_length=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from filo.data.synthetic import make_mvtec_like

    tmp = tmp_path_factory.mktemp("musc_cli")
    torch.manual_seed(0)
    clip = tmp / "clip.pt"
    torch.save(build_clip(ClipConfig(**TINY, act="gelu")).state_dict(), clip)
    data = tmp / "data"
    make_mvtec_like(data, classes=["obj_a"], n_train_good=0, n_test_good=3, n_test_defect=3,
                    size=40, seed=0, style="object")
    return tmp, clip, data


def _test_run(tmp, clip, data, out, capsys, *extra):
    from filo.cli.test import main

    assert main(["--method", "musc", "--musc_clip", str(clip), "--image_size", "32",
                 "--dataset", "mvtec", "--data_path", str(data), "--save_path", str(out),
                 "--save_maps", str(out / "maps"), "--num_workers", "0", *extra]) == 0
    return capsys.readouterr().out


def test_test_py_runs_musc_per_class_and_caches_by_set(setup, capsys):
    from filo.data.layouts import load_split
    from filo.data.transforms import clip_tensor, decode_image
    from filo.musc.config import MuscSettings
    from filo.musc.scorer import MuscScorer
    from filo.musc.tower import load_tower

    tmp, clip, data = setup
    out = _test_run(tmp, clip, data, tmp / "run", capsys)
    assert "| obj a" in out and "auroc_px" in out
    again = _test_run(tmp, clip, data, tmp / "run", capsys)
    assert "6 cached" in again
    # the maps equal the scorer's on the whole split, in dataset order
    samples = load_split(data, "mvtec", "test")["obj_a"]
    scorer = MuscScorer(load_tower(clip, 32), MuscSettings(image_size=32))
    x = torch.stack([clip_tensor(decode_image(data / s.img_path), 32) for s in samples])
    res = scorer.score_set(*scorer.extract(x))
    for i, s in enumerate(samples):
        saved = np.load((tmp / "run" / "maps" / s.img_path).with_suffix(".npy"))
        assert np.abs(saved - res.maps[i]).max() < 1e-5
    scores = {r.split(",")[0]: float(r.split(",")[3]) for r in
              (tmp / "run" / "maps" / "scores.csv").read_text().splitlines()[1:]}
    assert max(abs(scores[s.img_path] - res.scores[i]) for i, s in enumerate(samples)) < 1e-6


def test_pool_then_predict_equals_the_set(setup, capsys):
    from filo.cli.musc import main as pool_main
    from filo.cli.predict import main as predict_main

    tmp, clip, data = setup
    _test_run(tmp, clip, data, tmp / "ref", capsys)
    images = data / "obj_a" / "test"
    assert pool_main(["pool", "--class", "obj_a", "--images", str(images), "--musc_clip",
                      str(clip), "--image_size", "32", "--out", str(tmp / "pool")]) == 0
    meta = json.loads((tmp / "pool" / "obj_a" / "meta.json").read_text())
    assert meta["n"] == 6 and meta["settings"]["layers"] == [2, 5, 8, 11]
    one = images / "blob" / "000.png"
    assert predict_main(["--method", "musc", "--musc_clip", str(clip), "--image_size", "32",
                         "--musc_pool", str(tmp / "pool"), "--class", "obj_a", "--images",
                         str(one), "--out", str(tmp / "pred"), "--num_workers", "0"]) == 0
    got = np.load(tmp / "pred" / "000.png.npy")
    want = np.load(tmp / "ref" / "maps" / "obj_a" / "test" / "blob" / "000.npy")
    assert np.abs(got - want).max() < 1e-5


def test_musc_without_pool_in_predict_and_small_sets_are_one_line(setup, capsys, tmp_path):
    from filo.cli.predict import main as predict_main
    from filo.cli.test import main as test_main
    from filo.data.synthetic import make_mvtec_like

    tmp, clip, data = setup
    with pytest.raises(SystemExit):
        predict_main(["--method", "musc", "--musc_clip", str(clip), "--image_size", "32",
                      "--class", "obj_a", "--images", str(data / "obj_a" / "test"), "--out",
                      str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert "--musc_pool" in err and "\n" not in err
    small = tmp_path / "small"
    make_mvtec_like(small, classes=["obj_b"], n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=40, seed=0, style="object", defect_types=("blob", "scratch"))
    with pytest.raises(SystemExit):
        test_main(["--method", "musc", "--musc_clip", str(clip), "--image_size", "32",
                   "--data_path", str(small), "--save_path", str(tmp_path / "r"),
                   "--num_workers", "0"])
    err = capsys.readouterr().err.strip()
    assert "at least 5 images" in err and "\n" not in err


@pytest.mark.parametrize("module", ["filo.cli.test", "filo.cli.predict", "filo.cli.serve"])
def test_method_flag_in_every_scoring_cli(module):
    import importlib

    text = importlib.import_module(module).build_parser().format_help()
    assert "--method" in text and "--musc_pool" in text and "--musc_fusion" in text


def test_torchrun_shares_out_whole_classes(setup, tmp_path, monkeypatch):
    """Under torchrun each process scores whole classes: rank 1 of 2 caches every image of the
    second class and none of the first."""
    from filo.data.synthetic import make_mvtec_like
    from filo.distributed import DistContext
    from filo.evaluation.runner import RunConfig, run_evaluation
    from filo.pipeline import PipelineConfig

    _, clip, _ = setup
    data = tmp_path / "two"
    make_mvtec_like(data, classes=["obj_a", "obj_b"], n_train_good=0, n_test_good=3,
                    n_test_defect=3, size=40, seed=0, style="object")
    monkeypatch.setattr(DistContext, "barrier", lambda self: None)
    run = RunConfig(dataset="mvtec", data_path=data, num_workers=0, save_path=tmp_path / "r")
    pipe = PipelineConfig(method="musc", musc_clip=clip, image_size=32)
    assert run_evaluation(run, pipe, dist=DistContext(rank=1, world_size=2)) == []
    entries = [p for p in (tmp_path / "r" / "cache").rglob("*") if p.is_file()]
    names = " ".join(str(p.relative_to(tmp_path / "r" / "cache")) for p in entries)
    assert names.count("obj_b") == 6 and "obj_a" not in names, names


def test_the_service_serves_the_classes_that_have_a_pool():
    """With --musc_pool the service offers exactly the prompt classes that have a pool (a
    prompt file of many classes and a pool of one serves that one, instead of refusing)."""
    from types import SimpleNamespace

    from filo.service.engine import Engine

    engine = Engine.__new__(Engine)
    engine._base_prompts = SimpleNamespace(class_names=["obj a", "obj b", "tex a"])
    pools = SimpleNamespace(classes=["obj_b"])
    engine.pipeline = SimpleNamespace(model=None, detector=object(), memory=None,
                                      musc=SimpleNamespace(pools=pools))
    assert engine.class_names() == ["obj_b"]
    engine.pipeline.detector = None  # MuSc alone: the pools' classes
    pools.classes = ["obj_a", "obj_b"]
    assert engine.class_names() == ["obj_a", "obj_b"]
    engine.pipeline.musc = None  # no MuSc: the prompt classes, as before
    engine.pipeline.detector = object()
    assert engine.class_names() == ["obj_a", "obj_b", "tex_a"]
