"""test.py end to end on a tiny random-weight FiLo and a generated dataset, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from filo.checkpoint import save_filo_checkpoint
from filo.cli.test import main
from filo.data.synthetic import make_mvtec_like
from filo.model import FiLo, FiLoConfig
from filo.prompts import load_prompt_table

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = """name: synthetic
classes:
  tex a: [scratch, blob, colour spot]
  tex b: [scratch, blob, colour spot]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    make_mvtec_like(data, classes=("tex_a", "tex_b"), n_train_good=0, n_test_good=2,
                    n_test_defect=3, size=48, seed=1)
    prompts = base / "prompts.yaml"
    prompts.write_text(PROMPTS)
    torch.manual_seed(0)
    model = FiLo(FiLoConfig.tiny(), load_prompt_table(prompts))
    ckpt = base / "filo_tiny.pth"
    save_filo_checkpoint(ckpt, model)
    return base, data, prompts, ckpt, model


def run_main(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # cli_entry turns errors into SystemExit(2)
        return int(exc.code)


def test_no_grounding_run_matches_direct_model(setup, capsys) -> None:
    base, data, prompts, ckpt, model = setup
    out = base / "run"
    rc = run_main(["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
                   "--prompts", str(prompts), "--image_size", "32", "--batch_size", "3",
                   "--num_workers", "0", "--device", "cpu", "--save_path", str(out),
                   "--save_maps", str(base / "maps"), "--viz_dir", str(base / "viz"),
                   "--viz_limit", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| objects" in printed and "| tex a" in printed and "| mean" in printed
    res = json.loads((out / "results.json").read_text())
    assert list(res["classes"]) == ["tex_a", "tex_b"]
    # the saved map of one image equals a direct forward of the same model on the same input
    from filo.data.transforms import clip_tensor, decode_image

    rel = "tex_b/test/blob/000.png"
    saved = np.load(base / "maps" / "tex_b/test/blob/000.npy")
    x = clip_tensor(decode_image(data / rel), 32)[None]
    direct = model.predict(x, ["tex_b"], [None]).anomaly_map[0].numpy()
    assert saved.shape == (32, 32)
    np.testing.assert_allclose(saved, direct, atol=1e-5)
    scores = (base / "maps" / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 10
    panels = sorted(p.relative_to(base / "viz").as_posix() for p in (base / "viz").rglob("*.png"))
    assert len([p for p in panels if not p.startswith("thumbs/")]) == 4  # --viz_limit 2 x 2 classes
    assert (base / "viz" / "index.html").is_file()


def test_errors_are_one_line(setup, tmp_path, capsys) -> None:
    base, data, prompts, ckpt, _ = setup
    common = ["--dataset", "mvtec", "--data_path", str(data), "--image_size", "32",
              "--num_workers", "0", "--device", "cpu", "--save_path", str(tmp_path / "o")]

    def err_of(args):
        rc = run_main(args)
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        return rc, lines

    rc, lines = err_of([*common, "--ckpt_path", str(tmp_path / "nope.pth"), "--prompts", str(prompts)])
    assert rc == 2 and len(lines) == 1 and "nope.pth" in lines[0]
    # classes the prompt file does not know run on the generic defect phrases, with a warning
    # that says how to give them their own
    rc = run_main([*common, "--ckpt_path", str(ckpt), "--classes", "tex_a"])
    out = capsys.readouterr().out
    warned = [ln for ln in out.splitlines() if "generic defect phrases" in ln]
    assert rc == 0 and len(warned) == 1 and "'tex_a'" in warned[0] and "--prompts" in warned[0]
    # a GroundingDINO checkpoint given as --ckpt_path
    wrong = tmp_path / "gdino.pth"
    torch.save({"model": {"backbone.0.patch_embed.proj.weight": torch.zeros(1),
                          "transformer.level_embed": torch.zeros(1), "bert.embeddings.x": torch.zeros(1)}}, wrong)
    rc, lines = err_of([*common, "--ckpt_path", str(wrong), "--prompts", str(prompts)])
    assert rc == 2 and len(lines) == 1 and "gdino.pth" in lines[0]
    # a corrupt image in the dataset
    bad = tmp_path / "bad"
    make_mvtec_like(bad, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1, size=32)
    (bad / "tex_a/test/good/000.png").write_bytes(b"not a png")
    rc, lines = err_of(["--dataset", "mvtec", "--data_path", str(bad), "--image_size", "32",
                        "--num_workers", "0", "--device", "cpu", "--save_path", str(tmp_path / "b"),
                        "--ckpt_path", str(ckpt), "--prompts", str(prompts)])
    errors = [ln for ln in lines if ln.startswith("error:")]  # progress bars may precede it
    assert rc == 2 and len(errors) == 1 and lines[-1] == errors[0]
    assert "tex_a/test/good/000.png" in errors[0]


def test_cli_script_help_runs() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "test.py"), "--help"], text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--dataset", "--data_path", "--ckpt_path", "--grounded_checkpoint",
                 "--box_threshold", "--text_threshold", "--area_threshold", "--image_size",
                 "--device", "--viz_dir", "--batch_size", "--classes", "--prompts",
                 "--no_grounding", "--position", "--save_path", "--save_maps", "--num_workers",
                 "--from_cache", "--save_boxes"):
        assert flag in res.stdout


def test_grounded_run_fuses_boxes_as_specified(tmp_path, tiny_filo_ckpt, synthetic_prompts,
                                               tiny_grounding_ckpt, bert_vocab_dir, capsys) -> None:
    """With a grounding checkpoint: the saved map = FiLo map at the box position word, times
    outside_box_factor outside the counted boxes (recomputed here from the saved boxes)."""
    ckpt, model = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=(80, 60), seed=2)
    rc = run_main(["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
                   "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
                   "--num_workers", "0", "--grounded_checkpoint", str(tiny_grounding_ckpt),
                   "--bert_dir", str(bert_vocab_dir), "--outside_box_factor", "0.5",
                   "--save_path", str(tmp_path / "run"), "--save_maps", str(tmp_path / "maps"),
                   "--save_boxes", str(tmp_path / "boxes")])
    assert rc == 0, capsys.readouterr().err
    from filo.data.transforms import clip_tensor, decode_image

    for rel in ("tex_a/test/good/000.png", "tex_a/test/blob/000.png"):
        det = json.loads((tmp_path / "boxes" / Path(rel).with_suffix(".json")).read_text())
        assert set(det) >= {"boxes", "scores", "phrases", "matched", "position"}
        assert len(det["boxes"]) >= 1
        for x1, y1, x2, y2 in det["boxes"]:
            assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 60
        x = clip_tensor(decode_image(data / rel), 32)[None]
        plain = model.predict(x, ["tex_a"], [det["position"]]).anomaly_map[0].numpy()
        inside = np.zeros((32, 32), dtype=bool)
        for (x1, y1, x2, y2), matched in zip(det["boxes"], det["matched"], strict=True):
            if matched:  # original pixels -> 32x32 map pixels, integer corners as the research code
                c0, c1 = int(np.floor(x1 * 32 / 80)), int(np.floor(x2 * 32 / 80))
                r0, r1 = int(np.floor(y1 * 32 / 60)), int(np.floor(y2 * 32 / 60))
                inside[r0:r1, c0:c1] = True
        expected = np.where(inside, plain, plain * 0.5)
        saved = np.load(tmp_path / "maps" / Path(rel).with_suffix(".npy"))
        np.testing.assert_allclose(saved, expected, atol=2e-5)


def test_legacy_box_slices_follow_the_research_geometry(tmp_path, tiny_filo_ckpt, synthetic_prompts,
                                                       tiny_grounding_ckpt, bert_vocab_dir,
                                                       capsys) -> None:
    """--legacy_box_slices: boxes straight from the detector's normalized output times the map
    size (float32, not clamped), int() corners as Python slices; position from that centre.
    Recomputed here from the saved normalized boxes with plain Python slicing."""
    ckpt, model = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=(80, 60), seed=2)
    rc = run_main(["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
                   "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
                   "--num_workers", "0", "--grounded_checkpoint", str(tiny_grounding_ckpt),
                   "--bert_dir", str(bert_vocab_dir), "--legacy_box_slices",
                   "--save_path", str(tmp_path / "run"), "--save_maps", str(tmp_path / "maps"),
                   "--save_boxes", str(tmp_path / "boxes")])
    assert rc == 0, capsys.readouterr().err
    from filo.data.transforms import clip_tensor, decode_image

    positions = ["top left", "top", "top right", "left", "center", "right", "bottom left",
                 "bottom", "bottom right"]
    rels = sorted(str(p.relative_to(data)) for p in (data / "tex_a" / "test").rglob("*.png"))
    assert len(rels) == 4
    n_negative = 0
    for rel in rels:
        det = json.loads((tmp_path / "boxes" / Path(rel).with_suffix(".json")).read_text())
        corners = []
        for cx, cy, w, h in det["boxes_cxcywh"]:
            b = torch.tensor([cx, cy, w, h], dtype=torch.float32) * 32
            x1, y1 = b[0] - b[2] / 2, b[1] - b[3] / 2
            corners.append([x1.item(), y1.item(), (b[2] + x1).item(), (b[3] + y1).item()])
        counted = [c for c, m in zip(corners, det["matched"], strict=True) if m]
        n_negative += sum(min(c) <= -1 for c in counted)
        if counted:
            best = max((s, -i) for i, (s, m) in enumerate(zip(det["scores"], det["matched"],
                                                              strict=True)) if m)
            x1, y1, x2, y2 = corners[-best[1]]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        else:
            cx = cy = 16.0
        col, row = (min(max(int(np.floor(v * 3 / 32)), 0), 2) for v in (cx, cy))
        assert det["position"] == positions[row * 3 + col]
        x = clip_tensor(decode_image(data / rel), 32)[None]
        plain = model.predict(x, ["tex_a"], [det["position"]]).anomaly_map[0].numpy()
        marker = plain.copy()
        for x1, y1, x2, y2 in counted:
            marker[int(y1):int(y2), int(x1):int(x2)] = 1.0
        expected = np.where(marker == 1.0, plain, plain * 0.7)
        saved = np.load(tmp_path / "maps" / Path(rel).with_suffix(".npy"))
        np.testing.assert_allclose(saved, expected, atol=2e-5)
    assert n_negative > 0  # the tiny detector does place boxes past the top / left border


def test_kernels_switch_reaches_both_models_and_keeps_the_maps(
        tmp_path, tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt, bert_vocab_dir,
        capsys) -> None:
    """--kernels reference (plain PyTorch CPU ops) and the default fast kernels: same boxes,
    maps equal to float rounding; the switch really reaches FiLo and the detector."""
    from filo.cli.test import build_parser, configs_from_args
    from filo.detector.deform_attn import GatherDeformableAttention
    from filo.kernels import OneDNNLinear
    from filo.pipeline import build_pipeline

    ckpt, _ = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=2,
                    size=(80, 60), seed=3)
    common = ["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
              "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
              "--num_workers", "0", "--grounded_checkpoint", str(tiny_grounding_ckpt),
              "--bert_dir", str(bert_vocab_dir)]
    for kernels in ("fast", "reference"):
        _, config = configs_from_args(build_parser().parse_args(
            [*common, "--kernels", kernels, "--save_path", str(tmp_path / kernels)]))
        predictor = build_pipeline(config)
        fast = kernels == "fast"
        options = getattr(predictor.model, "options", predictor.model.config)
        assert options.onednn_linear is fast
        modules = list(predictor.detector.model.modules())
        assert any(isinstance(m, OneDNNLinear) for m in modules) is fast
        assert any(isinstance(m, GatherDeformableAttention) for m in modules) is fast
        rc = run_main([*common, "--kernels", kernels, "--save_path", str(tmp_path / kernels),
                       "--save_maps", str(tmp_path / f"maps_{kernels}"),
                       "--save_boxes", str(tmp_path / f"boxes_{kernels}")])
        assert rc == 0, capsys.readouterr().err
    maps = sorted((tmp_path / "maps_fast").rglob("*.npy"))
    assert len(maps) == 3
    for path in maps:
        rel = path.relative_to(tmp_path / "maps_fast")
        np.testing.assert_allclose(np.load(path), np.load(tmp_path / "maps_reference" / rel),
                                   atol=1e-5)
        a = json.loads((tmp_path / "boxes_fast" / rel.with_suffix(".json")).read_text())
        b = json.loads((tmp_path / "boxes_reference" / rel.with_suffix(".json")).read_text())
        assert a["position"] == b["position"] and a["phrases"] == b["phrases"]
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.02)


def test_each_checkpoint_file_is_read_once_per_run(tmp_path, tiny_filo_ckpt, synthetic_prompts,
                                                   tiny_grounding_ckpt, bert_vocab_dir,
                                                   monkeypatch, capsys) -> None:
    """A whole test.py run with the box step opens the FiLo and the grounding file once each."""
    from collections import Counter

    ckpt, _ = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=(48, 40), seed=5)
    reads: Counter = Counter()
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads[str(Path(f).resolve()) if isinstance(f, (str, Path)) else repr(f)] += 1
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    rc = run_main(["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
                   "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
                   "--num_workers", "0", "--grounded_checkpoint", str(tiny_grounding_ckpt),
                   "--bert_dir", str(bert_vocab_dir), "--save_path", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    assert reads[str(Path(ckpt).resolve())] == 1
    assert reads[str(Path(tiny_grounding_ckpt).resolve())] == 1


def test_exact_runs_the_detector_one_image_at_a_time_with_reference_kernels(
        tmp_path, tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt, bert_vocab_dir,
        capsys) -> None:
    """--exact: results independent of --batch_size (bit for bit), reference kernels."""
    from filo.cli.test import build_parser, configs_from_args
    from filo.kernels import OneDNNLinear
    from filo.pipeline import build_pipeline

    ckpt, _ = tiny_filo_ckpt
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=(64, 48), seed=6)
    common = ["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path", str(ckpt),
              "--prompts", str(synthetic_prompts), "--image_size", "32", "--device", "cpu",
              "--num_workers", "0", "--grounded_checkpoint", str(tiny_grounding_ckpt),
              "--bert_dir", str(bert_vocab_dir), "--exact"]
    _, config = configs_from_args(build_parser().parse_args(common))
    pipeline = build_pipeline(config)
    assert pipeline.detector.params.batch_size == 1 and not pipeline.detector.params.fast_kernels
    assert not any(isinstance(m, OneDNNLinear) for m in pipeline.detector.model.modules())
    assert pipeline.model.options.onednn_linear is False
    for bs in ("1", "4"):
        rc = run_main([*common, "--batch_size", bs, "--save_path", str(tmp_path / f"run{bs}"),
                       "--save_maps", str(tmp_path / f"maps{bs}"),
                       "--save_boxes", str(tmp_path / f"boxes{bs}")])
        assert rc == 0, capsys.readouterr().err
    maps = sorted((tmp_path / "maps1").rglob("*.npy"))
    assert len(maps) == 4
    for path in maps:
        rel = path.relative_to(tmp_path / "maps1")
        np.testing.assert_array_equal(np.load(path), np.load(tmp_path / "maps4" / rel))
        a = json.loads((tmp_path / "boxes1" / rel.with_suffix(".json")).read_text())
        b = json.loads((tmp_path / "boxes4" / rel.with_suffix(".json")).read_text())
        assert a == b
    assert (tmp_path / "maps1" / "scores.csv").read_text() == \
        (tmp_path / "maps4" / "scores.csv").read_text()
