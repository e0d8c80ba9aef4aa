"""Deploy bundles (docs/design.md §18): ``python -m filo export`` -> ``python -m filo.deploy
predict`` gives the torch pipeline's maps, scores and verdicts (``python -m filo.predict`` is the
reference) at two input sizes, on onnxruntime and OpenVINO, without importing torch; the numpy
steps match their torch counterparts; bad bundles are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli

from filo.data.synthetic import make_mvtec_like

ROOT = Path(__file__).resolve().parent.parent
CLS = "tex_a"
MAP_TOL = 1e-4  # fp32 bundle vs torch: maps and scores in [0, 1]


_cli = run_cli


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_filo_ckpt, synthetic_prompts):
    """Synthetic data, a calibrated 32 px bank (CLIP tower, centre crop), test images of three
    sizes, and a second tiny FiLo for 48 px inputs."""
    from filo.checkpoint import save_filo_checkpoint
    from filo.cli.memory import main as memory_main
    from filo.model import FiLo, FiLoConfig
    from filo.prompts import load_prompt_table

    tmp = tmp_path_factory.mktemp("export")
    data = tmp / "data"
    make_mvtec_like(data, classes=(CLS,), n_train_good=5, n_test_good=1, n_test_defect=2,
                    size=(64, 48), seed=3)
    ckpt = tiny_filo_ckpt[0]
    banks = tmp / "banks"
    assert _cli(memory_main, ["build", "--dataset", "mvtec", "--data_path", str(data), "--out",
                              str(banks), "--backbone", "clip", "--layers", "2,3", "--ckpt_path",
                              str(ckpt), "--prompts", str(synthetic_prompts), "--device", "cpu",
                              "--resize", "40", "--imagesize", "32", "--calib_fraction",
                              "0.4"]) == 0
    images = [data / CLS / "test"]  # a folder: outputs named good/000, blob/000, ...
    torch.manual_seed(1)
    cfg = FiLoConfig.tiny()
    cfg.clip.image_size = 48
    model48 = FiLo(cfg, load_prompt_table(synthetic_prompts))
    with torch.no_grad():  # nudge every weight off its init (zero biases, contexts take part)
        for p in model48.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt48 = save_filo_checkpoint(tmp / "filo48.pth", model48)
    return {"tmp": tmp, "ckpt": ckpt, "ckpt48": ckpt48, "banks": banks, "images": images,
            "prompts": synthetic_prompts}


def _export(s, name, *argv) -> Path:
    from filo.cli.main import main

    out = s["tmp"] / name
    assert _cli(main, ["export", "--prompts", str(s["prompts"]), "--out", str(out),
                       "--classes", CLS, *argv]) == 0
    return out


def _torch_predict(s, name, *argv) -> dict:
    from filo.cli.predict import main

    out = s["tmp"] / name
    assert _cli(main, ["--images", *map(str, s["images"]), "--class", CLS, "--prompts",
                       str(s["prompts"]), "--device", "cpu", "--out", str(out), *argv]) == 0
    return json.loads((out / "summary.json").read_text())


def _deploy_predict(bundle: Path, images, out: Path) -> dict:
    from filo.cli.deploy import main

    assert _cli(main, ["predict", "--bundle", str(bundle), *map(str, images), "--out",
                       str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from filo.cli.deploy import main
try:
    main(["predict", *sys.argv[1:]])
except SystemExit as e:
    assert not e.code, e.code
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print("ok")
"""


def _deploy_predict_without_torch(bundle: Path, images, out: Path) -> dict:
    """``python -m filo.deploy predict`` in a fresh process where ``import torch`` fails (also
    keeps OpenVINO out of the test process, which holds torch)."""
    res = subprocess.run([sys.executable, "-c", NO_TORCH, "--bundle", str(bundle),
                          *map(str, images), "--out", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _compare(ref: dict, got: dict, tol: float) -> float:
    assert [r["image"] for r in ref["images"]] == [g["image"] for g in got["images"]]
    assert len({g["map"] for g in got["images"]}) == len(got["images"]) == 3  # one map each
    worst = 0.0
    for r, g in zip(ref["images"], got["images"], strict=True):
        a, b = np.load(r["map"]), np.load(g["map"])
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        worst = max(worst, float(np.abs(a - b).max()))
        assert abs(r["image_score"] - g["image_score"]) <= tol
        assert r.get("verdict") == g.get("verdict")
        assert r.get("image_threshold") == pytest.approx(g.get("image_threshold"), abs=1e-12)
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def fused(setup):
    """FiLo + memory bank (--fusion mean): the torch reference and the ONNX bundle."""
    flags = ["--ckpt_path", str(setup["ckpt"]), "--memory_bank", str(setup["banks"]),
             "--fusion", "mean"]
    return _torch_predict(setup, "ref_mean", *flags), _export(setup, "b_mean", *flags)


def test_fused_bundle_gives_the_torch_maps_scores_and_verdicts(setup, fused):
    ref, bundle = fused
    got = _deploy_predict(bundle, setup["images"], setup["tmp"] / "dep_mean")
    assert {r["verdict"] for r in got["images"]} <= {"normal", "anomalous"}
    _compare(ref, got, MAP_TOL)
    # the maps vary over the image: a constant map would pass a loose comparison
    assert np.load(got["images"][0]["map"]).std() > 1e-3


def test_openvino_bundle_gives_the_torch_maps(setup, fused):
    from filo.export.writer import convert_bundle

    ref, onnx_bundle = fused  # the same graphs as `--format openvino`, without tracing again
    bundle = convert_bundle(onnx_bundle, setup["tmp"] / "b_mean_ov", "openvino")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "openvino" and not list(bundle.glob("*.onnx"))
    got = _deploy_predict_without_torch(bundle, setup["images"], setup["tmp"] / "dep_ov")
    _compare(ref, got, MAP_TOL)


def test_memory_bank_alone_gives_the_torch_distances(setup):
    flags = ["--ckpt_path", str(setup["ckpt"]), "--memory_bank", str(setup["banks"]),
             "--fusion", "memory"]  # (the bank's features are the tiny FiLo's CLIP tower)
    ref = _torch_predict(setup, "ref_mem", *flags)
    bundle = _export(setup, "b_mem", *flags)
    got = _deploy_predict(bundle, setup["images"], setup["tmp"] / "dep_mem")
    scale = max(np.abs(np.load(r["map"])).max() for r in ref["images"])
    _compare(ref, got, MAP_TOL * scale)  # raw squared distances: relative tolerance


def test_second_size_and_a_fixed_position(setup):
    flags = ["--ckpt_path", str(setup["ckpt48"]), "--position", "top left"]
    ref = _torch_predict(setup, "ref48", *flags)
    bundle = _export(setup, "b48", *flags)
    got = _deploy_predict(bundle, setup["images"], setup["tmp"] / "dep48")
    assert np.load(got["images"][0]["map"]).shape == (48, 48)
    _compare(ref, got, MAP_TOL)


def test_deploy_predict_never_imports_torch(setup, fused):
    ref, bundle = fused
    got = _deploy_predict_without_torch(bundle, setup["images"], setup["tmp"] / "no_torch")
    _compare(ref, got, MAP_TOL)


def test_manifest_lists_every_file_with_its_sha256(fused):
    from filo.deploy.bundle import sha256_file

    _, bundle = fused
    m = json.loads((bundle / "manifest.json").read_text())
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert set(m["files"]) == files - {"manifest.json"}
    assert all(sha256_file(bundle / f) == h for f, h in m["files"].items())
    assert {"filo", "torch", "onnxruntime"} <= set(m["versions"])
    assert m["filo"]["image_size"] == 32 and m["classes"][CLS]["memory"]["calibration"]


def test_a_changed_or_missing_bundle_file_is_one_line(setup, fused, tmp_path, capsys):
    import shutil

    from filo.cli.deploy import main

    _, bundle = fused
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    bank = next(copy.glob("memory/*_bank.npy"))
    bank.write_bytes(bank.read_bytes()[:-4])
    img = str(next(setup["images"][0].rglob("*.png")))
    assert _cli(main, ["predict", "--bundle", str(copy), img, "--out", str(tmp_path / "o")]) == 2
    assert "does not match its sha256" in _one_line(capsys) and bank.name in bank.name
    bank.unlink()
    assert _cli(main, ["predict", "--bundle", str(copy), img, "--out", str(tmp_path / "o")]) == 2
    assert "is missing" in _one_line(capsys)
    assert _cli(main, ["predict", "--bundle", str(tmp_path), img]) == 2
    assert "not a filo bundle" in _one_line(capsys)
    assert _cli(main, ["predict", "--bundle", str(bundle), "--class", "nope", img]) == 2
    assert "serves tex_a" in _one_line(capsys)


def test_grounding_and_int8_openvino_are_refused_in_one_line(setup, capsys, tmp_path):
    from filo.cli.main import main

    base = ["export", "--ckpt_path", str(setup["ckpt"]), "--prompts", str(setup["prompts"]),
            "--classes", CLS, "--out", str(tmp_path / "x")]
    assert _cli(main, [*base, "--grounded_checkpoint", str(setup["ckpt"])]) == 2
    assert "GroundingDINO is not part of a bundle" in _one_line(capsys)
    assert _cli(main, [*base, "--precision", "int8", "--format", "openvino"]) == 2
    assert "--precision int8 is for --format onnx" in _one_line(capsys)
    assert not (tmp_path / "x").exists()


def test_a_missing_runtime_is_one_line(monkeypatch):
    import builtins

    from filo.deploy import runtimes
    from filo.errors import FiloError

    real = builtins.__import__

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(FiloError, match=r"install onnxruntime \(pip install 'filo\[onnx\]'\)"):
        runtimes.open_graph("x.onnx")


# ---- the numpy steps against their torch counterparts -----------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(4, 32), (6, 48), (7, 5), (28, 14), (1, 3)])
@pytest.mark.parametrize("align", [True, False])
def test_bilinear_matches_torch_interpolate(n_in, n_out, align):
    from filo.deploy.numerics import resize_bilinear

    x = torch.randn(3, n_in, n_in + 1, generator=torch.Generator().manual_seed(n_in))
    ref = F.interpolate(x[None], size=(n_out, n_out + 2), mode="bilinear",
                        align_corners=align)[0].numpy()
    got = resize_bilinear(x.numpy(), (n_out, n_out + 2), align_corners=align)
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_blur_matches_the_model_blur():
    from filo.deploy.numerics import gaussian_blur
    from filo.model import gaussian_blur as torch_blur

    x = torch.rand(2, 17, 23, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(gaussian_blur(x.numpy(), 3, 4.0), torch_blur(x, 3, 4.0).numpy(),
                               atol=1e-6, rtol=0)


def test_aggregate_and_knn_match_patchcore():
    from filo.deploy.numerics import aggregate, knn_scores
    from filo.memory.patchcore import NearestNeighbourScorer
    from filo.memory.patchcore import aggregate as torch_aggregate

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 5, 8, 6, generator=g), torch.randn(1, 7, 4, 3, generator=g)]
    ref, grid = torch_aggregate(feats, 3, 20, 13)
    got, grid_np = aggregate([f[0].numpy() for f in feats], 3, 20, 13)
    assert grid_np == tuple(grid) and got.shape == tuple(ref.shape)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6, rtol=0)
    bank = torch.randn(40, 13, generator=g)
    for k in (1, 3):
        want = NearestNeighbourScorer(bank, k=k, backend="torch", device="cpu").scores(ref)
        np.testing.assert_allclose(knn_scores(got, bank.numpy(), k), want, rtol=1e-5, atol=0)


def test_a_graph_with_one_file_per_weight_is_consolidated_into_one_data_file(tmp_path):
    """(What the exporter writes for graphs over 2 GB, e.g. the ViT-L FiLo image graph.)"""
    import onnx
    import onnxruntime as ort

    from filo.export.writer import consolidate_onnx

    lin = torch.nn.Linear(64, 32)
    (tmp_path / "t").mkdir()
    small = tmp_path / "t" / "g.onnx"
    torch.onnx.export(lin, (torch.zeros(1, 64),), str(small), dynamo=False,
                      input_names=["x"], output_names=["y"])
    scattered = tmp_path / "s" / "g.onnx"
    scattered.parent.mkdir()
    onnx.save_model(onnx.load(str(small)), str(scattered), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scattered.parent.iterdir())) > 2
    out = consolidate_onnx(scattered, tmp_path / "g.onnx")
    assert sorted(p.name for p in tmp_path.glob("g.onnx*")) == ["g.onnx", "g.onnx.data"]
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, lin(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
