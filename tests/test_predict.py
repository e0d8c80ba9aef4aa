"""python -m filo.predict on a folder of mixed image modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filo.predict import main


def make_images(folder: Path) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "b_gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "sub" / "d_palette.png")
    Image.fromarray(rng.integers(0, 65535, (30, 20), dtype=np.uint16)).save(folder / "e_16bit.png")
    Image.fromarray(rgb).save(folder / "f.jpg", quality=90)
    return {"a_rgb.png": (56, 40), "b_gray.png": (56, 40), "c_rgba.png": (56, 40),
            "sub/d_palette.png": (56, 40), "e_16bit.png": (20, 30), "f.jpg": (56, 40)}


def run(args):
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code)


def test_predict_folder_of_mixed_modes(tmp_path, tiny_filo_ckpt, synthetic_prompts, capsys):
    ckpt, model = tiny_filo_ckpt
    expected = make_images(tmp_path / "imgs")
    out = tmp_path / "out"
    rc = run(["--images", str(tmp_path / "imgs"), "--class", "tex_a", "--ckpt_path", str(ckpt),
              "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
              "--out", str(out), "--threshold", "0.5", "--batch_size", "4"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 6
    for stem, (w, h) in expected.items():
        amap = np.load(out / f"{stem}.npy")
        assert amap.shape == (32, 32) and amap.dtype == np.float32
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == (w, h)
        # the binary mask is the map, resized to the image, thresholded
        full = np.asarray(Image.fromarray(amap, mode="F").resize((w, h), Image.BILINEAR))
        assert np.array_equal(np.asarray(mask) > 0, full >= 0.5)
        # the map at the image's own size is written too
        np.testing.assert_allclose(np.load(out / f"{stem}.full.npy"), full)
        panel = Image.open(out / f"{stem}.png")
        assert panel.size[0] > 2 * w and panel.size[1] >= h
        record = json.loads((out / f"{stem}.json").read_text())
        assert 0.0 <= record["image_score"] <= 1.5
    scores = {Path(r["image"]).name: r["image_score"] for r in summary["images"]}
    assert len(scores) == 6


def test_predict_unknown_class_and_missing_input(tmp_path, tiny_filo_ckpt, synthetic_prompts,
                                                 capsys, caplog):
    ckpt, _ = tiny_filo_ckpt
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    # a class the prompt file lacks runs on the generic defect phrases, with one warning
    rc = run(["--images", str(tmp_path / "imgs"), "--class", "gearbox", "--ckpt_path", str(ckpt),
              "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
              "--num_workers", "0", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "gearbox" in r.getMessage()]
    assert len(warned) == 1 and "generic defect phrases" in warned[0] and "--prompts" in warned[0]
    capsys.readouterr()
    rc = run(["--images", str(tmp_path / "nothing"), "--class", "tex_a", "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nothing" in err[0]


# ---- filo.predict honours every pipeline flag (one test per switch family) -------------------

class _Captured(Exception):
    pass


def _config_of(argv: list[str]):
    """The PipelineConfig filo.predict builds from ``argv`` (captured at the pipeline factory)."""
    from filo.predict import build_parser, run_predict

    seen = {}

    def factory(config):
        seen["config"] = config
        raise _Captured

    args = build_parser().parse_args(["--images", "x.png", "--class", "tex_a", *argv])
    try:
        run_predict(args, pipeline_factory=factory)
    except _Captured:
        return seen["config"]
    except Exception as err:  # collect_images may fail on x.png first: give it a real file
        raise AssertionError(f"no pipeline built: {err}") from err


@pytest.fixture()
def one_image(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("argv,expected", [
    (["--box_threshold", "0.3", "--text_threshold", "0.4", "--area_threshold", "0.5",
      "--outside_box_factor", "0.9"],
     {"box_threshold": 0.3, "text_threshold": 0.4, "area_threshold": 0.5,
      "outside_box_factor": 0.9}),
    (["--legacy_macaroni", "--legacy_phrase_case", "--legacy_text_threshold", "--legacy_grid",
      "--legacy_box_slices"],
     {"legacy_macaroni": True, "legacy_phrase_case": True, "legacy_text_threshold": True,
      "legacy_grid": True, "legacy_box_slices": True}),
    (["--kernels", "reference", "--exact"], {"kernels": "reference", "exact": True}),
    (["--autocast", "bf16"], {"autocast": "bf16"}),
    (["--score_mode", "softmax", "--clip_act", "gelu"], {"score_mode": "softmax",
                                                          "clip_act": "gelu"}),
    (["--no_grounding", "--position", "top left", "--image_size", "32", "--device", "cpu"],
     {"no_grounding": True, "position": "top left", "image_size": 32, "device": "cpu"}),
    (["--ckpt_path", "f.pth", "--grounded_checkpoint", "g.pth", "--prompts", "p.yaml",
      "--bert_dir", "b"],
     {"ckpt_path": Path("f.pth"), "grounded_checkpoint": Path("g.pth"),
      "prompts": Path("p.yaml"), "bert_dir": Path("b")}),
])
def test_predict_passes_every_pipeline_flag(one_image, argv, expected):
    config = _config_of(argv)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("argv,message", [
    (["--box_threshold", "1.5"], "--box_threshold 1.5: must be in [0.0, 1.0]"),
    (["--text_threshold", "nan"], "--text_threshold nan: must be in [0.0, 1.0]"),
    (["--area_threshold", "0"], "--area_threshold 0.0: must be in (0.0, 1.0]"),
    (["--threshold", "1.5"], "--threshold 1.5: must be in [0.0, 1.0]"),
])
def test_predict_rejects_out_of_range_values_before_loading(one_image, capsys, argv, message):
    rc = run(["--images", "x.png", "--class", "tex_a", "--ckpt_path", "missing.pth", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {message}"]


def test_predict_and_test_py_give_the_same_maps_with_research_rules(
        tmp_path, tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt, bert_vocab_dir, capsys):
    """Same pipeline, same flags: predict's map of an image equals test.py's saved map."""
    from filo.cli.test import main as test_main
    from filo.data.synthetic import make_mvtec_like

    ckpt, _ = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=(80, 60), seed=4)
    flags = ["--ckpt_path", str(ckpt), "--prompts", str(synthetic_prompts), "--image_size", "32",
             "--device", "cpu", "--num_workers", "0", "--grounded_checkpoint",
             str(tiny_grounding_ckpt), "--bert_dir", str(bert_vocab_dir), "--legacy_box_slices",
             "--legacy_grid", "--score_mode", "softmax", "--outside_box_factor", "0.5",
             "--batch_size", "1"]
    try:
        test_main(["--dataset", "mvtec", "--data_path", str(data), "--save_path",
                   str(tmp_path / "run"), "--save_maps", str(tmp_path / "maps"), *flags])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    image = data / "tex_a" / "test" / "good" / "000.png"
    assert run(["--images", str(image), "--class", "tex_a", "--out", str(tmp_path / "pred"),
                *flags]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "pred" / "000.png.npy"),
                                  np.load(tmp_path / "maps" / "tex_a" / "test" / "good" / "000.npy"))
    scores = (tmp_path / "maps" / "scores.csv").read_text().splitlines()
    row = next(r for r in scores if r.startswith("tex_a/test/good/000.png"))
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["images"][0]["image_score"] == float(row.split(",")[-1])


def test_predict_outputs_keep_names_and_run_each_image_once(tmp_path, tiny_filo_ckpt,
                                                           synthetic_prompts, capsys):
    """Same-stem files get their own outputs; a file named and inside a named folder runs once;
    two same-name files from different places do not overwrite each other."""
    ckpt, _ = tiny_filo_ckpt
    imgs, other = tmp_path / "imgs", tmp_path / "other"
    (imgs / "sub").mkdir(parents=True)
    other.mkdir()
    rng = np.random.default_rng(1)
    for path in (imgs / "x.jpg", imgs / "x.png", imgs / "sub" / "x.png", other / "x.png"):
        Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    rc = run(["--images", str(imgs), str(imgs / "x.png"), str(other / "x.png"), "--class", "tex_a",
              "--ckpt_path", str(ckpt), "--prompts", str(synthetic_prompts), "--image_size", "32",
              "--device", "cpu", "--num_workers", "0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    images = [r["image"] for r in summary["images"]]
    assert len(images) == len(set(images)) == 4
    maps = [r["map"] for r in summary["images"]]
    assert len(set(maps)) == 4
    assert {Path(m).relative_to(out).as_posix() for m in maps} == {
        "x.jpg.npy", "x.png.npy", "sub/x.png.npy", "x~2.png.npy"}
    for r in summary["images"]:
        assert np.load(r["map_full"]).shape == (24, 36) == tuple(r["image_size"])
        assert np.load(r["map"]).shape == (32, 32)
