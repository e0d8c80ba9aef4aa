"""Memory banks end to end: building (full-shot, k-shot, resumable), calibration, test.py with
--memory_bank and each --fusion mode, predict verdicts, and the bad-input cases. Tiny FiLo CLIP
tower as the backbone (a WideResNet is covered in test_memory_core.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from filo.data.synthetic import make_mvtec_like

CLASSES = ("tex_a", "tex_b")


_cli = run_cli


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error")]  # the rest: progress bars
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mem") / "data"
    make_mvtec_like(root, classes=CLASSES, n_train_good=6, n_test_good=2, n_test_defect=3,
                    size=64, seed=11)
    return root


def _build(tmp_path, data, ckpt, prompts, *extra, out=None) -> tuple[int, Path]:
    from filo.cli.memory import main

    out = out or tmp_path / "banks"
    rc = _cli(main, ["build", "--dataset", "mvtec", "--data_path", str(data), "--out", str(out),
                     "--backbone", "clip", "--layers", "2,3", "--ckpt_path", str(ckpt),
                     "--prompts", str(prompts), "--device", "cpu", "--resize", "40",
                     "--imagesize", "32", *extra])
    return rc, out


@pytest.fixture(scope="module")
def banks(tmp_path_factory, data, tiny_filo_ckpt, synthetic_prompts):
    tmp = tmp_path_factory.mktemp("banks")
    rc, out = _build(tmp, data, tiny_filo_ckpt[0], synthetic_prompts, "--calib_fraction", "0.5")
    assert rc == 0
    return out


def test_build_writes_one_calibrated_bank_per_class_and_resumes(banks, data, tiny_filo_ckpt,
                                                                synthetic_prompts, tmp_path,
                                                                capsys):
    from filo.memory.bank import load_bank

    for cls in CLASSES:
        bank, meta = load_bank(banks, cls)
        assert meta.backbone == "clip" and meta.n_images == 3  # 6 normals, 3 held out
        assert bank.shape == (meta.n_patches, 1024) and meta.n_patches == int(3 * 16 * 0.1)
        cal = meta.calibration
        assert cal["n_images"] == 3 and len(cal["images"]) == 3
        assert not set(cal["images"]) & set(meta.image_paths)  # held out of the bank
        assert cal["image_threshold"] >= cal["image_mean"] > 0
        assert {"pixel_mean", "pixel_std", "image_mean", "image_std"} <= set(cal["filo"])
    # a second build with the same settings keeps every bank (resume)
    rc, _ = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--calib_fraction",
                   "0.5", out=banks)
    assert rc == 0 and capsys.readouterr().out.count("kept") == 2


def test_k_shot_takes_k_seeded_images_with_leave_one_out_calibration(tmp_path, data,
                                                                     tiny_filo_ckpt,
                                                                     synthetic_prompts, capsys):
    from filo.memory.bank import load_bank

    rc, out = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--shots", "2")
    assert rc == 0
    metas = [load_bank(out, c)[1] for c in CLASSES]
    for meta in metas:
        assert meta.shots == 2 and meta.n_images == 2 and meta.coreset_percentage == 1.0
        assert meta.n_patches == 2 * 16 and meta.calibration["n_images"] == 2
        assert "leave-one-out" in meta.calibration["method"]
    # the same seed picks the same shots; another seed (usually) others
    rc, out2 = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--shots", "2",
                      out=tmp_path / "again")
    assert [load_bank(out2, c)[1].image_paths for c in CLASSES] == [m.image_paths for m in metas]
    rc, _ = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--shots", "9",
                   out=tmp_path / "too_many")
    assert rc == 2 and "--shots 9" in _one_line(capsys)


def _test_py(data, save, *argv) -> int:
    from filo.cli.test import main

    return _cli(main, ["--dataset", "mvtec", "--data_path", str(data), "--image_size", "32",
                       "--device", "cpu", "--num_workers", "0", "--save_path", str(save),
                       "--save_maps", str(save / "maps"), *argv])


def _maps(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.load(p) for p in sorted(folder.rglob("*.npy"))}


def _scores(folder: Path) -> dict[str, float]:
    rows = (folder / "scores.csv").read_text().splitlines()[1:]
    return {r.split(",")[0]: float(r.split(",")[-1]) for r in rows}


def test_memory_only_run_matches_a_brute_force_nearest_neighbour(tmp_path, data, banks,
                                                                 tiny_filo_ckpt, capsys):
    """--fusion memory: image score = max over patches of the squared distance to the nearest
    bank row, recomputed here with numpy broadcasting from the same patch features."""
    from filo.data.transforms import decode_image
    from filo.memory.bank import load_bank
    from filo.memory.scorer import MemoryScorer

    rc = _test_py(data, tmp_path / "run", "--memory_bank", str(banks), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "memory")
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["classes"]) == set(CLASSES) and res["mean"]["auroc_px"] is not None
    scores = _scores(tmp_path / "run" / "maps")
    scorer = MemoryScorer(banks, ckpt_path=tiny_filo_ckpt[0])
    for rel in list(scores)[:3]:
        cls = rel.split("/")[0]
        bank, _ = load_bank(banks, cls)
        x = scorer.transform()(decode_image(data / rel), cls)[None]
        rows, _ = scorer._embedders.get(scorer.config(cls)).embed(x)
        d2 = ((rows.numpy()[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2
              ).sum(-1).min(1)
        assert scores[rel] == pytest.approx(d2.max(), rel=1e-4)
    maps = _maps(tmp_path / "run" / "maps")
    assert all(m.shape == (32, 32) for m in maps.values())


def test_mean_and_max_fusion_follow_the_documented_formula(tmp_path, data, banks, tiny_filo_ckpt,
                                                           synthetic_prompts, capsys):
    from filo.memory.bank import load_bank

    ckpt = str(tiny_filo_ckpt[0])
    common = ["--memory_bank", str(banks), "--ckpt_path", ckpt, "--prompts",
              str(synthetic_prompts)]
    runs = {}
    for mode in ("filo", "memory", "mean", "max"):
        rc = _test_py(data, tmp_path / mode, *common, "--fusion", mode, "--fusion_weight", "0.3")
        assert rc == 0, capsys.readouterr().err
        runs[mode] = (_maps(tmp_path / mode / "maps"), _scores(tmp_path / mode / "maps"))
    # FiLo alone (no bank) gives the --fusion filo numbers
    assert _test_py(data, tmp_path / "plain", "--ckpt_path", ckpt, "--prompts",
                    str(synthetic_prompts)) == 0
    assert _scores(tmp_path / "plain" / "maps") == runs["filo"][1]

    def z(v, mean, std):
        return (v - mean) / std

    def sig(v):  # docs/design.md 13.2: 1/2 + z / (2 (1 + |z|))
        return 0.5 + 0.5 * v / (1 + np.abs(v))

    for rel, f_map in runs["filo"][0].items():
        cal = load_bank(banks, rel.split("/")[0])[1].calibration
        fc = cal["filo"]
        m_map = runs["memory"][0][rel]
        zf, zm = z(f_map, fc["pixel_mean"], fc["pixel_std"]), z(m_map, cal["pixel_mean"],
                                                                  cal["pixel_std"])
        np.testing.assert_allclose(runs["mean"][0][rel], sig(0.7 * zf + 0.3 * zm), atol=2e-6)
        np.testing.assert_allclose(runs["max"][0][rel], sig(np.maximum(zf, zm)), atol=2e-6)
        key = rel[:-4] + ".png"
        sf = z(runs["filo"][1][key], fc["image_mean"], fc["image_std"])
        sm = z(runs["memory"][1][key], cal["image_mean"], cal["image_std"])
        assert runs["mean"][1][key] == pytest.approx(sig(0.7 * sf + 0.3 * sm), abs=1e-6)
    for mode in ("mean", "max"):  # spread scores, not saturated 0 / 1
        assert len(set(runs[mode][1].values())) > 2
        assert all(0 < v < 1 for v in runs[mode][1].values())


def test_crop_protocol_evaluates_maps_and_masks_on_the_centre_crop(tmp_path, data, banks,
                                                                   tiny_filo_ckpt, capsys):
    """--protocol crop: maps at the bank's 32 x 32 crop (not the run's 48 x 48), and the metrics
    are those of masks resized to 40 (PIL bilinear), centre-cropped to 32 and defective only
    where exactly 255 -- computed here with PIL and scikit-learn."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from filo.data.layouts import load_split

    rc = _test_py(data, tmp_path / "crop", "--image_size", "48", "--memory_bank", str(banks),
                  "--ckpt_path", str(tiny_filo_ckpt[0]), "--fusion", "memory",
                  "--protocol", "crop")
    assert rc == 0, capsys.readouterr().err
    maps, scores = _maps(tmp_path / "crop" / "maps"), _scores(tmp_path / "crop" / "maps")
    assert all(m.shape == (32, 32) for m in maps.values())
    res = json.loads((tmp_path / "crop" / "results.json").read_text())["classes"]
    for cls, samples in load_split(data, "mvtec", "test").items():
        gts, px, labels, img = [], [], [], []
        for s in samples:
            if s.mask_path:
                m = Image.open(data / s.mask_path).convert("L").resize((40, 40),
                                                                       Image.Resampling.BILINEAR)
                gts.append(np.asarray(m)[4:36, 4:36] == 255)
            else:
                gts.append(np.zeros((32, 32), dtype=bool))
            px.append(maps[s.img_path[:-4] + ".npy"])
            labels.append(s.anomaly)
            img.append(scores[s.img_path])
        want_px = 100 * roc_auc_score(np.concatenate([g.ravel() for g in gts]),
                                      np.concatenate([p.ravel() for p in px]))
        assert res[cls]["auroc_px"] == pytest.approx(want_px, abs=1e-3)
        assert res[cls]["auroc_sp"] == pytest.approx(100 * roc_auc_score(labels, img), abs=1e-3)
    # a FiLo or fused run cannot use it
    rc = _test_py(data, tmp_path / "bad", "--memory_bank", str(banks), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "mean", "--protocol", "crop")
    assert rc == 2 and "--protocol crop" in _one_line(capsys)


def test_calib_dir_gives_filo_alone_verdicts_without_a_bank(tmp_path, data, tiny_filo_ckpt,
                                                          synthetic_prompts, capsys,
                                                          monkeypatch):
    """--calib_dir of normal images, no memory bank: the image threshold is the 0.99 quantile of
    FiLo's scores of those images (recomputed here from a plain predict run), the pixel threshold
    the 0.999 quantile of their maps; a second run reads the cached record."""
    from filo.predict import main as predict_main

    monkeypatch.setenv("FILO_CACHE_DIR", str(tmp_path / "cache"))
    normals = sorted((data / "tex_a" / "train" / "good").glob("*.png"))  # the 6 of --calib_dir
    common = ["--class", "tex_a", "--ckpt_path", str(tiny_filo_ckpt[0]), "--prompts",
              str(synthetic_prompts), "--image_size", "32", "--num_workers", "0"]
    assert _cli(predict_main, ["--images", *map(str, normals), *common, "--out",
                               str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["images"]
    assert all("verdict" not in r for r in plain)
    want = np.quantile([r["image_score"] for r in plain], 0.99)
    maps = np.stack([np.load(r["map"]) for r in plain])
    want_px = np.quantile(maps.astype(np.float64), 0.999)
    images = sorted((data / "tex_a" / "test").rglob("*.png"))
    for run in ("first", "cached"):
        out = tmp_path / run
        rc = _cli(predict_main, ["--images", *map(str, images), *common, "--calib_dir",
                                 str(data / "tex_a" / "train" / "good"), "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        for rec in json.loads((out / "summary.json").read_text())["images"]:
            assert rec["image_threshold"] == pytest.approx(want, rel=1e-5)
            assert rec["threshold"] == pytest.approx(want_px, rel=1e-5)  # the mask's
            assert rec["verdict"] == ("anomalous" if rec["image_score"] >= rec["image_threshold"]
                                      else "normal")
            assert "mask" in rec
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 1
    rec = json.loads(next((tmp_path / "cache" / "calibration").glob("*.json")).read_text())
    assert rec["n_images"] == 6 and rec["image_std"] > 0


def test_predict_gives_calibrated_verdicts_and_masks(tmp_path, data, banks, tiny_filo_ckpt,
                                                     synthetic_prompts, capsys):
    from filo.memory.bank import load_bank
    from filo.predict import main as predict_main

    images = sorted((data / "tex_a" / "test").rglob("*.png"))
    out = tmp_path / "pred"
    rc = _cli(predict_main, ["--images", *map(str, images), "--class", "tex_a", "--memory_bank",
                             str(banks), "--ckpt_path", str(tiny_filo_ckpt[0]), "--fusion",
                             "memory", "--out", str(out), "--image_size", "32",
                             "--num_workers", "0"])
    assert rc == 0, capsys.readouterr().err
    cal = load_bank(banks, "tex_a")[1].calibration
    summary = json.loads((out / "summary.json").read_text())
    for rec in summary["images"]:
        want = "anomalous" if rec["image_score"] >= cal["image_threshold"] else "normal"
        assert rec["verdict"] == want and rec["threshold"] == cal["pixel_threshold"]
        assert Path(rec["mask"]).is_file()


def test_bad_banks_are_one_clear_line(tmp_path, data, banks, tiny_filo_ckpt, synthetic_prompts,
                                      capsys):
    import shutil

    from filo.checkpoint import save_filo_checkpoint
    from filo.model import FiLo, FiLoConfig
    from filo.prompts import load_prompt_table

    # a bank of another FiLo checkpoint's CLIP tower
    torch.manual_seed(3)
    other = save_filo_checkpoint(tmp_path / "other.pth",
                                 FiLo(FiLoConfig.tiny(), load_prompt_table(synthetic_prompts)))
    rc = _test_py(data, tmp_path / "r1", "--memory_bank", str(banks), "--ckpt_path", str(other),
                  "--fusion", "memory")
    assert rc == 2 and "rebuild them with this checkpoint" in _one_line(capsys)
    # a truncated bank file
    broken = tmp_path / "broken"
    shutil.copytree(banks, broken)
    bank_file = broken / "tex_a" / "bank.npy"
    bank_file.write_bytes(bank_file.read_bytes()[:100])
    rc = _test_py(data, tmp_path / "r2", "--memory_bank", str(broken), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "memory")
    assert rc == 2 and "bank.npy" in _one_line(capsys)
    # a class without a bank
    rc = _test_py(data, tmp_path / "r3", "--memory_bank", str(banks), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "memory", "--classes", "tex_a")
    assert rc == 0
    capsys.readouterr()
    shutil.rmtree(broken / "tex_b")
    shutil.copy(banks / "tex_a" / "bank.npy", bank_file)
    rc = _test_py(data, tmp_path / "r4", "--memory_bank", str(broken), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "memory")
    assert rc == 2 and "no bank for class 'tex_b'" in _one_line(capsys)
    # --fusion mean needs the FiLo checkpoint
    rc = _test_py(data, tmp_path / "r5", "--memory_bank", str(banks), "--fusion", "mean")
    assert rc == 2 and "--fusion mean" in _one_line(capsys)


def test_a_class_without_normal_train_images_is_one_line(tmp_path, tiny_filo_ckpt,
                                                        synthetic_prompts, capsys):
    root = tmp_path / "d"
    make_mvtec_like(root, classes=("tex_a", "tex_b"), n_train_good=2, n_test_good=1,
                    n_test_defect=1, size=64)
    for p in (root / "tex_b" / "train").rglob("*.png"):
        p.unlink()
    rc, out = _build(tmp_path, root, tiny_filo_ckpt[0], synthetic_prompts)
    assert rc == 2 and "class tex_b has no normal train images" in _one_line(capsys)
    assert not (out / "tex_a").exists()  # checked before any bank is built


def test_presets_give_each_class_its_own_settings(tmp_path, data, tiny_filo_ckpt,
                                                  synthetic_prompts, capsys):
    from filo.errors import FiloError
    from filo.memory.bank import load_bank
    from filo.memory.config import MemoryConfig
    from filo.memory.presets import load_preset

    study = load_preset("patchcore_mvtec_study")
    assert len(study.classes) == 15
    bottle = study.config_for(MemoryConfig(), "bottle")
    cable = study.config_for(MemoryConfig(), "cable")
    assert (bottle.resize, bottle.imagesize, bottle.layers, bottle.coreset) == (256, 224,
                                                                                 "layer2", 0.01)
    assert (cable.resize, cable.imagesize, cable.layers) == (336, 320, "layer3")
    assert study.config_for(MemoryConfig(), "unknown_part").layers == "layer2,layer3"
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: {resize: 256, colour: red}\n")
    with pytest.raises(FiloError, match=r"bad\.yaml: default: unknown setting\(s\) colour"):
        load_preset(bad)
    bad.write_text("classes:\n  a: {coreset: 7}\n")
    with pytest.raises(FiloError, match=r"class a: --coreset 7"):
        load_preset(bad).config_for(MemoryConfig(), "a")

    preset = tmp_path / "mine.yaml"
    preset.write_text("default: {coreset: 0.25}\nclasses:\n"
                      "  tex_a: {score_rule: mean, coreset: 0.5}\n  tex_b: {resize: 48}\n")
    rc, out = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--preset",
                     str(preset), "--layers", "2,3")
    assert rc == 0, capsys.readouterr().err
    a, b = load_bank(out, "tex_a")[1], load_bank(out, "tex_b")[1]
    assert a.extra["score_rule"] == "mean" and a.coreset_percentage == 0.5
    assert b.extra["score_rule"] == "max" and b.coreset_percentage == 0.25 and b.resize == 48
    assert a.n_patches == int(a.n_images * 16 * 0.5)
    rc = _test_py(data, tmp_path / "run", "--memory_bank", str(out), "--ckpt_path",
                  str(tiny_filo_ckpt[0]), "--fusion", "memory")
    assert rc == 0, capsys.readouterr().err


def test_memory_inputs_of_different_sizes_stay_a_list():
    from filo.data.dataset import collate

    def item(size, cls):
        return {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.bool),
                "label": 0, "cls_name": cls, "img_path": cls, "orig_size": (8, 8),
                "mem_image": torch.zeros(3, size, size)}

    same = collate([item(16, "a"), item(16, "b")])
    assert isinstance(same.mem_images, torch.Tensor) and same.mem_images.shape == (2, 3, 16, 16)
    mixed = collate([item(16, "a"), item(24, "b")])
    assert isinstance(mixed.mem_images, list) and [t.shape[-1] for t in mixed.mem_images] == [16, 24]


@pytest.fixture(scope="module")
def wrn_weights(tmp_path_factory) -> Path:
    """A torchvision WideResNet-50-2 file with seeded random weights (torchvision's layout)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wrn") / "wide_resnet50_2-random.pth"
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), path)
    return path


def test_wideresnet_bank_end_to_end_and_weights_identity(tmp_path, data, wrn_weights, capsys):
    from filo.cli.memory import main
    from filo.memory.bank import load_bank

    out = tmp_path / "banks"
    argv = ["build", "--dataset", "mvtec", "--data_path", str(data), "--out", str(out),
            "--backbone", "wrn50", "--weights", str(wrn_weights), "--device", "cpu",
            "--resize", "64", "--imagesize", "64", "-p", "0.5", "--classes", "tex_a"]
    assert _cli(main, argv) == 0, capsys.readouterr().err
    bank, meta = load_bank(out, "tex_a")
    assert meta.backbone == "wrn50" and meta.layers == ["layer2", "layer3"]
    assert meta.grid == [8, 8] and bank.shape == (int(meta.n_images * 64 * 0.5), 1024)
    import hashlib

    assert meta.weights_sha256 == hashlib.sha256(wrn_weights.read_bytes()).hexdigest()
    rc = _test_py(data, tmp_path / "run", "--memory_bank", str(out), "--classes", "tex_a")
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    # other weights at the same path: the bank is refused, naming the setting
    torch.save({k: v + 1 for k, v in torch.load(wrn_weights, weights_only=True).items()},
               tmp_path / "other.pth")
    moved = tmp_path / "banks_moved"
    import shutil

    shutil.copytree(out, moved)
    meta_file = moved / "tex_a" / "meta.json"
    m = json.loads(meta_file.read_text())
    m["weights"] = str(tmp_path / "other.pth")
    meta_file.write_text(json.dumps(m))
    rc = _test_py(data, tmp_path / "run2", "--memory_bank", str(moved), "--classes", "tex_a")
    err = _one_line(capsys)
    assert rc == 2 and "backbone weights" in err and "rebuild" in err
    # a missing weights file stops the build before any work, naming the file
    rc = _cli(main, [*argv[:-1], "tex_b", "--weights", str(tmp_path / "nope.pth")])
    err = _one_line(capsys)
    assert rc == 2 and "nope.pth" in err and not (out / "tex_b").exists()


def test_fused_verdicts_use_the_calibration_images_fused_scores(tmp_path, data, banks,
                                                                tiny_filo_ckpt, synthetic_prompts,
                                                                capsys):
    from filo.memory.bank import load_bank
    from filo.predict import main as predict_main

    images = sorted((data / "tex_a" / "test").rglob("*.png"))
    out = tmp_path / "pred"
    rc = _cli(predict_main, ["--images", *map(str, images), "--class", "tex_a", "--memory_bank",
                             str(banks), "--ckpt_path", str(tiny_filo_ckpt[0]), "--prompts",
                             str(synthetic_prompts), "--fusion", "max", "--out", str(out),
                             "--image_size", "32", "--num_workers", "0"])
    assert rc == 0, capsys.readouterr().err
    cal = load_bank(banks, "tex_a")[1].calibration
    fc = cal["filo"]
    zf = (np.array(fc["image_scores"]) - fc["image_mean"]) / fc["image_std"]
    zm = (np.array(cal["image_scores"]) - cal["image_mean"]) / cal["image_std"]
    zmax = np.maximum(zf, zm)
    want = np.quantile(0.5 + 0.5 * zmax / (1 + np.abs(zmax)), cal["image_quantile"])
    for rec in json.loads((out / "summary.json").read_text())["images"]:
        assert rec["image_threshold"] == pytest.approx(want, rel=1e-9)
        assert rec["verdict"] == ("anomalous" if rec["image_score"] >= want else "normal")
        assert "mask" not in rec  # no calibrated pixel threshold for fused maps


# --------------------------------------------------------------------------------------------
# tiled banks


@pytest.mark.parametrize("h,w,tile,overlap", [(150, 200, 64, 16), (64, 64, 64, 8),
                                              (40, 130, 64, 0), (1200, 1600, 512, 64)])
def test_tile_grid_covers_the_image_with_equal_tiles(h, w, tile, overlap):
    from filo.memory.tiles import tile_boxes

    boxes = tile_boxes(max(h, tile), max(w, tile), tile, overlap)
    cover = np.zeros((max(h, tile), max(w, tile)), dtype=int)
    for y, x in boxes:
        assert 0 <= y and 0 <= x and y + tile <= cover.shape[0] and x + tile <= cover.shape[1]
        cover[y:y + tile, x:x + tile] += 1
    assert (cover[:h, :w] >= 1).all()
    ys = sorted({y for y, _ in boxes})
    assert all(b - a <= tile - overlap for a, b in zip(ys, ys[1:], strict=False))  # at least the overlap


def test_stitched_map_averages_overlaps():
    from filo.memory.tiles import split_tiles, stitch

    x = torch.arange(3 * 50 * 70, dtype=torch.float32).reshape(3, 50, 70)
    tiles, boxes = split_tiles(x, 32, 8)
    # the tiles' own pixels stitch back to the image exactly (every tile agrees)
    np.testing.assert_allclose(stitch(tiles[:, 0].numpy(), boxes, (50, 70)), x[0].numpy(),
                               rtol=1e-6)
    # tile i constant i: each pixel is the mean of the indices of the tiles covering it
    const = np.stack([np.full((32, 32), float(i)) for i in range(len(boxes))])
    got = stitch(const, boxes, (50, 70))
    want = np.zeros((50, 70))
    count = np.zeros((50, 70))
    for i, (y, x0) in enumerate(boxes):
        want[y:y + 32, x0:x0 + 32] += i
        count[y:y + 32, x0:x0 + 32] += 1
    np.testing.assert_allclose(got, want / count, rtol=1e-6)
    # an image smaller than the tile: padded, then cropped back
    small = torch.ones(3, 20, 25)
    tiles, boxes = split_tiles(small, 32, 8)
    assert tiles.shape == (1, 3, 32, 32) and boxes == [(0, 0)]
    assert stitch(tiles[:, 0].numpy(), boxes, (20, 25)).shape == (20, 25)


def test_tiled_bank_builds_and_scores_end_to_end(tmp_path, tiny_filo_ckpt, synthetic_prompts,
                                                 capsys):
    from filo.memory.bank import load_bank
    from filo.memory.scorer import MemoryScorer

    data = tmp_path / "wide"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=3, n_test_good=1, n_test_defect=1,
                    size=(100, 75), seed=3)
    rc, out = _build(tmp_path, data, tiny_filo_ckpt[0], synthetic_prompts, "--tile", "32",
                     "--tile_overlap", "8", "--shots", "2", "--classes", "tex_a")
    assert rc == 0, capsys.readouterr().err
    bank, meta = load_bank(out, "tex_a")
    n_tiles = 3 * 4  # 75 -> rows at 0, 24, 43; 100 -> columns at 0, 24, 48, 68
    p = meta.grid[0] * meta.grid[1]
    assert meta.tile == 32 and meta.tile_overlap == 8
    assert bank.shape[0] == 2 * n_tiles * p  # --shots: every patch kept
    assert meta.calibration["n_images"] == 2  # leave-one-out over whole images
    # a bank image scored against its own bank: every patch is in the bank, the map is zero
    scorer = MemoryScorer(out, ckpt_path=tiny_filo_ckpt[0])
    from filo.data.transforms import decode_image

    img = decode_image(data / meta.image_paths[0])
    x = scorer.transform()(img, "tex_a")
    assert tuple(x.shape) == (3, 75, 100)  # native resolution, no resize
    maps, scores = scorer.score([x], ["tex_a"], [img.size], 48)
    assert maps.shape == (1, 48, 48) and float(np.abs(maps).max()) < 1e-3
    assert abs(float(scores[0])) < 1e-3
    # test.py with the bank tiles the same way from the meta
    rc = _test_py(data, tmp_path / "run", "--memory_bank", str(out), "--fusion", "memory",
                  "--classes", "tex_a", "--ckpt_path", str(tiny_filo_ckpt[0]),
                  "--prompts", str(synthetic_prompts))
    assert rc == 0, capsys.readouterr().err
    assert len(_maps(tmp_path / "run" / "maps")) == 2


def test_bank_beyond_the_feature_budget_is_chosen_in_stages(data, tiny_filo_ckpt):
    from filo.data.layouts import load_split
    from filo.memory.build import PatchEmbedder, _streamed_bank, embed_units
    from filo.memory.config import MemoryConfig

    cfg = MemoryConfig(backbone="clip", layers="2,3", resize=40, imagesize=32, coreset=0.25)
    emb = PatchEmbedder(cfg, ckpt_path=tiny_filo_ckpt[0])
    imgs = [s for s in load_split(data, "mvtec", "train", ["tex_a"])["tex_a"] if not s.anomaly]
    assert _streamed_bank(data, imgs, emb, cfg, 4, None) is None  # fits: one-stage coreset
    cfg.feature_memory_mb = 0  # (below the flag's minimum) every image is its own block
    bank, grid = _streamed_bank(data, imgs, emb, cfg, 4, None)
    feats, grid1, _ = embed_units(data, imgs, emb, 4)
    rows = feats.reshape(-1, feats.shape[-1])
    assert grid == grid1 and bank.shape == (int(len(rows) * 0.25), rows.shape[1])
    # every bank row is one of the images' patch features
    d = torch.cdist(bank.double(), rows.double()).min(1).values
    assert float(d.max()) < 1e-4
    assert len({tuple(r.tolist()) for r in bank}) == len(bank)  # no row twice
