"""Bad input and faults, as a careful user would try them: no code runs from data files, no
output lands outside its folder, caches cannot go stale, and errors come early as one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from filo.data.synthetic import make_mvtec_like, make_visa_like

MARKER_NAME = "PAYLOAD_RAN"


class _Payload:
    """Unpickling this creates a file: proof that a loader executed code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


_cli = run_cli


def _one_line(capsys) -> str:
    """The single error line on stderr (progress bars aside), which must be the last line."""
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if not ("|" in line and "%" in line)]  # tqdm bars
    assert len(errors) == 1 and errors[0].startswith("error: ") and lines[-1] == errors[0], lines
    return errors[0]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def common(tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt, bert_vocab_dir):
    ckpt, _ = tiny_filo_ckpt
    return ["--ckpt_path", str(ckpt), "--prompts", str(synthetic_prompts), "--image_size", "32",
            "--device", "cpu", "--num_workers", "0", "--grounded_checkpoint",
            str(tiny_grounding_ckpt), "--bert_dir", str(bert_vocab_dir)]


def _test_main(argv):
    from filo.cli.test import main

    return _cli(main, argv)


# ---- 1. no code from data files -----------------------------------------------------------

def test_resume_never_runs_code_from_the_state_sidecar(tmp_path, capsys):
    from filo.cli.train import main as train_main

    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    save = tmp_path / "ckpt"
    save.mkdir()
    marker = tmp_path / MARKER_NAME
    torch.save({"version": 1, "settings": _Payload(marker)}, save / "filo_train_on_mvtec.state.pt")
    (save / "filo_train_on_mvtec.pth").write_bytes(b"")
    prompts = tmp_path / "p.yaml"
    prompts.write_text("name: t\nclasses:\n  tex a: [scratch, blob]\n")
    rc = _cli(train_main, ["--dataset", "mvtec", "--data_path", str(data), "--model_config",
                           "tiny", "--save_dir", str(save), "--resume", "--no_progress",
                           "--prompts", str(prompts)])
    err = _one_line(capsys)
    assert rc == 2 and "filo_train_on_mvtec.state.pt" in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["payload", "text", "truncated", "grounding"])
def test_a_bad_filo_checkpoint_is_one_line_for_test_py_and_predict(tmp_path, capsys, common,
                                                                   tiny_filo_ckpt,
                                                                   tiny_grounding_ckpt, kind):
    from filo.predict import main as predict_main

    bad = tmp_path / "bad.pth"
    marker = tmp_path / MARKER_NAME
    if kind == "payload":
        torch.save({"filo": _Payload(marker)}, bad)
    elif kind == "text":
        bad.write_text("this is a text file, not a checkpoint\n")
    elif kind == "truncated":
        bad.write_bytes(Path(tiny_filo_ckpt[0]).read_bytes()[:5000])
    else:
        shutil.copy(tiny_grounding_ckpt, bad)
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    argv = [*common[2:], "--ckpt_path", str(bad), "--no_grounding"]
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(data),
                     "--save_path", str(tmp_path / "run"), *argv])
    assert rc == 2 and str(bad) in _one_line(capsys)
    image = next((data / "tex_a" / "test").rglob("*.png"))
    rc = _cli(predict_main, ["--images", str(image), "--class", "tex_a", "--out",
                             str(tmp_path / "pred"), *argv])
    assert rc == 2 and str(bad) in _one_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("kind,expected", [
    ("truncated", "truncated"), ("grounding", "GroundingDINO"), ("payload", "references code"),
    ("text", "not a PyTorch checkpoint")])
def test_doctor_checks_what_a_checkpoint_holds(tmp_path, tiny_filo_ckpt, tiny_grounding_ckpt,
                                               kind, expected):
    from filo.doctor import WRONG_CONTENT, run_doctor

    bad = tmp_path / "filo_train_on_visa.pth"
    if kind == "truncated":
        bad.write_bytes(Path(tiny_filo_ckpt[0]).read_bytes()[:5000])
    elif kind == "grounding":
        shutil.copy(tiny_grounding_ckpt, bad)
    elif kind == "payload":
        torch.save({"filo": _Payload(tmp_path / MARKER_NAME)}, bad)
    else:
        bad.write_text("hello\n")
    report = run_doctor("test-mvtec", ckpt_path=bad)
    row = next(r for r in report.rows if r.path == bad)
    assert not row.ok and expected in row.fix, row
    assert not report.ready
    assert row.status in (WRONG_CONTENT, "not a torch file")
    assert not (tmp_path / MARKER_NAME).exists()
    # the real tiny checkpoints pass the same checks
    from filo.ckpt_check import checkpoint_problem

    assert checkpoint_problem(tiny_filo_ckpt[0], "filo") is None
    assert checkpoint_problem(tiny_grounding_ckpt, "grounding") is None


# ---- 2. no writes outside the output folders ----------------------------------------------

def _visa_with_row(tmp_path: Path, image_rel: str) -> Path:
    root = tmp_path / "visa"
    make_visa_like(root, classes=("obj_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                   size=48, seed=1)
    with open(root / "split_csv" / "1cls.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["obj_a", "test", "normal", image_rel, ""])
    return root


@pytest.mark.parametrize("entry", ["../outside/evil.JPG", "ABSOLUTE"])
def test_a_listed_image_outside_the_root_is_an_error_naming_the_line(tmp_path, capsys, common,
                                                                    entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (48, 48), (90, 20, 20)).save(outside / "evil.JPG")
    rel = str(outside / "evil.JPG") if entry == "ABSOLUTE" else entry
    root = _visa_with_row(tmp_path, rel)
    before = _files(tmp_path)
    rc = _test_main(["--dataset", "visa", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), "--save_maps", str(tmp_path / "maps"), *common])
    err = _one_line(capsys)
    assert rc == 2 and "1cls.csv line 4" in err and "--allow_outside_root" in err
    # nothing written anywhere but the (still empty) output folders checked for writability
    assert _files(tmp_path) - before <= {"run", "maps"}

    # opted in: it runs, and every output of that image stays inside its output folder
    rc = _test_main(["--dataset", "visa", "--data_path", str(root), "--allow_outside_root",
                     "--save_path", str(tmp_path / "run"), "--save_maps", str(tmp_path / "maps"),
                     "--save_boxes", str(tmp_path / "boxes"), *common])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in outside.iterdir()) == ["evil.JPG"]
    new = _files(tmp_path) - before
    assert all(p.split(os.sep)[0] in ("run", "maps", "boxes") for p in new), new
    assert any("_outside" in p for p in new if p.startswith("maps"))


def test_meta_json_entry_with_dotdot_is_refused(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    from filo.data.layouts import write_meta

    write_meta(root, "mvtec")
    meta = json.loads((root / "meta.json").read_text())
    meta["test"]["tex_a"][0]["img_path"] = "../../../../somewhere/x/evil.png"
    (root / "meta.json").write_text(json.dumps(meta))
    rc = _test_main(["--dataset", "meta", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), *common])
    err = _one_line(capsys)
    assert rc == 2 and "meta.json test/tex_a[0]" in err and "'..'" in err


def test_a_symlink_in_an_output_folder_cannot_redirect_writes(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "tex_a").symlink_to(elsewhere, target_is_directory=True)
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), "--save_maps", str(maps), *common])
    err = _one_line(capsys)
    assert rc == 2 and "outside the output folder" in err
    assert list(elsewhere.iterdir()) == []


def test_output_paths_stay_inside_by_construction(tmp_path):
    from filo.errors import FiloError
    from filo.fileio import output_file, safe_relative

    assert safe_relative("bottle/test/crack/000.png") == Path("bottle/test/crack/000.png")
    for bad in ("../../etc/passwd", "/abs/x.png", "a/../../b.png", "C:/x/y.png", ".."):
        rel = safe_relative(bad)
        assert rel.parts[0] == "_outside" and ".." not in rel.parts, bad
        assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve())
    assert output_file(tmp_path, "a/b.png", ".npy") == tmp_path / "a" / "b.npy"
    (tmp_path / "link").symlink_to("/", target_is_directory=True)
    with pytest.raises(FiloError, match="outside the output folder"):
        output_file(tmp_path, "link/tmp/x.png", ".npy")


# ---- 3./4. caches that cannot go stale ----------------------------------------------------

def _scores(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["classes"]


def test_cache_covers_the_dataset_root_and_each_input(tmp_path, capsys, common):
    a, b = tmp_path / "a", tmp_path / "b"
    make_mvtec_like(a, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=48, seed=1)
    make_mvtec_like(b, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=48, seed=2)
    run = tmp_path / "run"
    argv = ["--dataset", "mvtec", "--save_path", str(run), *common]
    assert _test_main([*argv, "--data_path", str(a)]) == 0
    first = capsys.readouterr().out
    assert "0 cached" in first
    assert _test_main([*argv, "--data_path", str(b)]) == 0
    out = capsys.readouterr().out
    assert "0 cached" in out  # another root: nothing reused
    on_b = _scores(run)
    # a fresh run on b alone gives the same numbers
    assert _test_main(["--dataset", "mvtec", "--save_path", str(tmp_path / "fresh"),
                       "--data_path", str(b), *common]) == 0
    capsys.readouterr()
    assert _scores(tmp_path / "fresh") == on_b
    # an edited mask (same path) is recomputed, the rest is reused
    mask = next((b / "tex_a" / "ground_truth").rglob("*.png"))
    m = np.asarray(Image.open(mask))
    Image.fromarray(np.where(m > 0, 0, 255).astype(np.uint8)).save(mask)
    assert _test_main([*argv, "--data_path", str(b)]) == 0
    assert "3 cached" in capsys.readouterr().out
    assert _scores(run) != on_b


def test_a_torn_cache_entry_is_recomputed_in_the_same_run(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=48)
    run = tmp_path / "run"
    argv = ["--dataset", "mvtec", "--data_path", str(root), "--save_path", str(run), *common]
    assert _test_main(argv) == 0
    capsys.readouterr()
    reference = _scores(run)
    entry = sorted((run / "cache").rglob("*.npz"))[0]
    data = entry.read_bytes()
    # keep the zip directory (so the entry still lists as present) but break a member
    entry.write_bytes(data[:64] + bytes(64) + data[128:])
    assert _test_main(argv) == 0
    out = capsys.readouterr().out
    assert "could not be read" in out and "recomputing" in out
    assert _scores(run) == reference


# ---- 6. empty classes, 8. ranges, 9. writability --------------------------------------------

def test_a_class_without_test_images_is_skipped_with_a_warning(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a", "tex_b"), n_train_good=0, n_test_good=2,
                    n_test_defect=2, size=48)
    for p in (root / "tex_b" / "test").rglob("*.png"):
        p.unlink()
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), *common])
    out = capsys.readouterr().out
    assert rc == 0 and "class tex_b has no test images" in out
    assert set(_scores(tmp_path / "run")) == {"tex_a"}


@pytest.mark.parametrize("flag,value", [("--box_threshold", "-0.1"), ("--text_threshold", "1.5"),
                                        ("--text_threshold", "nan"), ("--area_threshold", "2"),
                                        ("--outside_box_factor", "-1"), ("--batch_size", "0")])
def test_out_of_range_values_are_rejected_at_parsing(tmp_path, capsys, common, flag, value):
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(tmp_path), *common, flag, value])
    assert rc == 2 and _one_line(capsys).startswith(f"error: {flag} ")


@pytest.mark.parametrize("flag", ["--save_path", "--save_maps", "--save_boxes", "--viz_dir"])
def test_unwritable_outputs_fail_before_any_model_is_loaded(tmp_path, capsys, common, monkeypatch,
                                                            flag):
    import filo.pipeline

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(filo.pipeline, "build_pipeline", no_model)
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--dataset", "mvtec", "--data_path", str(root), *common,
            "--save_path", str(tmp_path / "run")]
    argv += [flag, str(blocker / "sub")]
    rc = _test_main(argv)
    err = _one_line(capsys)
    assert rc == 2 and flag in err and "not a writable folder" in err


def test_predict_and_train_check_their_output_folder_first(tmp_path, capsys, tiny_filo_ckpt,
                                                           synthetic_prompts):
    from filo.cli.train import main as train_main
    from filo.predict import main as predict_main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40)).save(image)
    rc = _cli(predict_main, ["--images", str(image), "--class", "tex_a", "--ckpt_path",
                             str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts),
                             "--out", str(blocker / "out")])
    assert rc == 2 and "--out" in _one_line(capsys)
    data = tmp_path / "data"
    make_mvtec_like(data, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    rc = _cli(train_main, ["--dataset", "mvtec", "--data_path", str(data), "--model_config",
                           "tiny", "--save_dir", str(blocker / "ckpt"), "--no_progress"])
    assert rc == 2 and "--save_dir" in _one_line(capsys)


def test_predict_skips_unreadable_images_and_exits_non_zero(tmp_path, capsys, tiny_filo_ckpt,
                                                           synthetic_prompts):
    from filo.predict import main as predict_main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "c.png")
    out = tmp_path / "out"
    rc = _cli(predict_main, ["--images", str(folder), "--class", "tex_a", "--ckpt_path",
                             str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts),
                             "--out", str(out), "--num_workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "b.png" in err.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(r["image"]).name for r in summary["images"]) == ["a.png", "c.png"]
    assert [Path(f["image"]).name for f in summary["failed"]] == ["b.png"]
    assert (out / "a.png.npy").is_file() and (out / "c.png.npy").is_file()


def test_a_wrong_image_size_is_refused_before_the_model_is_built(tmp_path, capsys,
                                                                tiny_filo_ckpt, monkeypatch):
    import filo.model

    def no_build(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(filo.model, "build_filo", no_build)
    from filo.checkpoint import build_filo_from_checkpoint
    from filo.errors import FiloError

    with pytest.raises(FiloError, match=r"built for 32x32 inputs; pass --image_size 32"):
        build_filo_from_checkpoint(tiny_filo_ckpt[0], image_size=518)


def test_a_malformed_prompt_file_stops_before_the_cache_folder_is_made(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=1, n_test_defect=1,
                    size=48)
    bad = tmp_path / "prompts.yaml"
    bad.write_text("classes: [this is: not valid\n")
    argv = [a for a in common]
    argv[argv.index("--prompts") + 1] = str(bad)
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), *argv])
    assert rc == 2 and "prompts.yaml" in _one_line(capsys)
    assert not (tmp_path / "run" / "cache").exists()


def test_a_corrupt_image_is_one_line_also_from_data_loader_workers(tmp_path, capsys, common):
    root = tmp_path / "data"
    make_mvtec_like(root, classes=("tex_a",), n_train_good=0, n_test_good=2, n_test_defect=2,
                    size=48)
    bad = sorted((root / "tex_a" / "test" / "good").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG broken")
    argv = [a for a in common]
    argv[argv.index("--num_workers") + 1] = "2"  # the default: errors come from worker processes
    rc = _test_main(["--dataset", "mvtec", "--data_path", str(root), "--save_path",
                     str(tmp_path / "run"), *argv])
    err = _one_line(capsys)
    assert rc == 2 and err.startswith(f"error: cannot read image {bad}")
