"""python -m filo.predict on a folder of mixed image modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    return {"a_rgb": (56, 40), "b_gray": (56, 40), "c_rgba": (56, 40), "sub/d_palette": (56, 40),
            "e_16bit": (20, 30), "f": (56, 40)}


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
        panel = Image.open(out / f"{stem}.png")
        assert panel.size[0] > 2 * w and panel.size[1] >= h
        record = json.loads((out / f"{stem}.json").read_text())
        assert 0.0 <= record["image_score"] <= 1.5
    scores = {Path(r["image"]).name: r["image_score"] for r in summary["images"]}
    assert len(scores) == 6


def test_predict_unknown_class_and_missing_input(tmp_path, tiny_filo_ckpt, synthetic_prompts, capsys):
    ckpt, _ = tiny_filo_ckpt
    make_images(tmp_path / "imgs")
    rc = run(["--images", str(tmp_path / "imgs"), "--class", "gearbox", "--ckpt_path", str(ckpt),
              "--prompts", str(synthetic_prompts), "--image_size", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "gearbox" in err[0]
    rc = run(["--images", str(tmp_path / "nothing"), "--class", "tex_a", "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nothing" in err[0]
