"""Bad input and faults that used to get through: each is one line naming the culprit (or runs
correctly), no traceback, nothing written outside the output folders (README's fault table)."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from filo.data.synthetic import make_mvtec_like, make_visa_like
from filo.errors import FiloError

_cli = run_cli


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def visa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visa")
    make_visa_like(root, classes=("obj_a",), n_train_good=2, n_test_good=1, n_test_defect=1,
                   size=32, seed=1)
    return root


def _visa_copy(visa: Path, tmp_path: Path, extra_rows: list[list[str]]) -> Path:
    import shutil

    root = tmp_path / "visa"
    shutil.copytree(visa, root)
    with open(root / "split_csv" / "1cls.csv", "a", newline="") as fh:
        csv.writer(fh).writerows(extra_rows)
    return root


def _csv_lines(root: Path) -> list[list[str]]:
    with open(root / "split_csv" / "1cls.csv", newline="") as fh:
        return list(csv.reader(fh))


# ---- paths from data stay inside their roots ------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../../evil", "a/b", "a\\b", "bell\x07"])
def test_a_visa_class_name_that_is_not_one_folder_name_is_refused(visa, tmp_path, name):
    from filo.data.layouts import scan_visa

    rows = _csv_lines(visa)
    image = next(r[3] for r in rows[1:] if r[1] == "test" and r[2] == "normal")
    root = _visa_copy(visa, tmp_path, [[name, "test", "normal", image, ""]])
    line = len(rows) + 1
    with pytest.raises(FiloError) as err:
        scan_visa(root, "test")
    msg = str(err.value)
    assert f"1cls.csv line {line}" in msg and "class name" in msg and "\n" not in msg


def test_a_meta_json_class_key_with_dotdot_is_refused(tmp_path):
    from filo.data.layouts import read_meta

    item = {"img_path": "a/test/good/0.png", "mask_path": "", "cls_name": "..",
            "specie_name": "good", "anomaly": 0}
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"..": [item]}}))
    with pytest.raises(FiloError, match=r"meta.json test: class name '\.\.' is '\.' or '\.\.'"):
        read_meta(tmp_path / "meta.json")


def test_viz_writes_refuse_a_link_out_of_the_folder(tmp_path):
    from filo.viz.writer import VizWriter

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    viz = tmp_path / "viz"
    viz.mkdir()
    (viz / "obj_a").symlink_to(elsewhere, target_is_directory=True)
    writer = VizWriter(viz, 0.0, 1.0)
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(FiloError, match="outside the output folder"):
        writer.add("obj_a/test/0.png", "obj_a", 0, 0.5, image, np.zeros((16, 16), np.float32))
    assert list(elsewhere.iterdir()) == []


def test_an_output_folder_that_is_a_link_is_refused(tmp_path, capsys, tiny_filo_ckpt,
                                                    synthetic_prompts):
    from filo.cli.test import main

    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "viz").symlink_to(target, target_is_directory=True)
    data = tmp_path / "data"
    data.mkdir()
    rc = _cli(main, ["--dataset", "mvtec", "--data_path", str(data), "--save_path",
                     str(tmp_path / "run"), "--viz_dir", str(tmp_path / "viz"), "--ckpt_path",
                     str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts)])
    err = _one_line(capsys)
    assert rc == 2 and "--viz_dir" in err and "symbolic link" in err and str(target) in err
    assert list(target.iterdir()) == []


# ---- duplicates and link loops ----------------------------------------------------------------

def test_a_duplicated_split_csv_row_is_refused_naming_both_lines(visa, tmp_path):
    from filo.data.layouts import scan_visa

    rows = _csv_lines(visa)
    first = next(i for i, r in enumerate(rows) if r[1] == "test")
    root = _visa_copy(visa, tmp_path, [rows[first]])
    with pytest.raises(FiloError) as err:
        scan_visa(root, "test")
    msg = str(err.value)
    assert f"line {len(rows) + 1} lists {rows[first][3]} again" in msg
    assert f"already at {root / 'split_csv' / '1cls.csv'} line {first + 1}" in msg
    # the train split has no duplicate: it still reads
    assert len(scan_visa(root, "train")["obj_a"]) == 2


def test_a_duplicated_meta_json_entry_is_refused(tmp_path):
    from filo.data.layouts import read_meta

    item = {"img_path": "a/test/good/0.png", "mask_path": "", "cls_name": "a",
            "specie_name": "good", "anomaly": 0}
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"a": [item, dict(item)]}}))
    with pytest.raises(FiloError, match=r"test/a\[1\] lists a/test/good/0.png again .*test/a\[0\]"):
        read_meta(tmp_path / "meta.json")


@pytest.mark.parametrize("where", ["class", "defect", "image"])
def test_a_symlink_loop_in_a_class_folder_is_named(tmp_path, where):
    from filo.data.layouts import scan_mvtec

    make_mvtec_like(tmp_path, classes=("tex_a",), n_train_good=0, n_test_good=1,
                    n_test_defect=1, size=32)
    parent = {"class": tmp_path, "defect": tmp_path / "tex_a" / "test",
              "image": tmp_path / "tex_a" / "test" / "good"}[where]
    loop = parent / "loop.png" if where == "image" else parent / "loop"
    os.symlink(loop.name, loop)  # points at itself
    with pytest.raises(FiloError, match=f"{loop} is a symbolic link loop"):
        scan_mvtec(tmp_path, "test")


# ---- memory banks: checksum, values, weights -------------------------------------------------

def _bank(tmp_path: Path, **meta_fields):
    from filo.memory.bank import BankMeta, save_bank

    rows = np.random.default_rng(0).random((6, 4), dtype=np.float32)
    meta = BankMeta(target_dim=4, pretrain_dim=4, n_images=2, grid=[2, 3],
                    calibration={"n_images": 1, "image_threshold": 0.5, "pixel_mean": 0.1},
                    **meta_fields)
    save_bank(tmp_path / "banks", "obj_a", rows, meta)
    return tmp_path / "banks", rows


def test_a_bank_loads_and_a_tampered_one_is_refused(tmp_path):
    from filo.memory.bank import load_bank

    banks, rows = _bank(tmp_path)
    loaded, meta = load_bank(banks, "obj_a")
    assert np.array_equal(loaded, rows) and len(meta.checksum) == 64
    meta_path = banks / "obj_a" / "meta.json"
    original = meta_path.read_text()
    # meta edited: the layers (the run would then extract other features)
    edited = json.loads(original)
    edited["layers"] = ["layer3"]
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(FiloError, match="obj_a fails its checksum"):
        load_bank(banks, "obj_a")
    # rows from another build of the same shape
    meta_path.write_text(original)
    np.save(banks / "obj_a" / "bank.npy", rows[::-1].copy())
    with pytest.raises(FiloError, match="fails its checksum"):
        load_bank(banks, "obj_a")


def test_a_bank_without_checksum_warns_once_and_loads(tmp_path, caplog):
    from filo.memory.bank import load_bank

    banks, rows = _bank(tmp_path)
    meta_path = banks / "obj_a" / "meta.json"
    old = json.loads(meta_path.read_text())
    del old["checksum"]
    meta_path.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="filo.memory.bank"):
        for _ in range(3):
            assert np.array_equal(load_bank(banks, "obj_a")[0], rows)
    warned = [r for r in caplog.records if "no checksum" in r.getMessage()]
    assert len(warned) == 1


@pytest.mark.parametrize("key,value,shown", [
    ("image_threshold", "high", "calibration.image_threshold is 'high'"),
    ("image_scores", [0.1, "x"], "calibration.image_scores is 'x'"),
    ("pixel_mean", None, "calibration.pixel_mean is None"),
])
def test_a_non_numeric_calibration_value_is_one_line(tmp_path, key, value, shown):
    from filo.memory.bank import load_bank

    banks, _ = _bank(tmp_path)
    meta_path = banks / "obj_a" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"][key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FiloError) as err:
        load_bank(banks, "obj_a")
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_a_clip_bank_is_refused_when_the_checkpoint_at_its_path_changed(tmp_path):
    from filo.memory.build import weights_checksum
    from filo.memory.scorer import MemoryScorer

    ckpt = tmp_path / "filo.pth"
    ckpt.write_bytes(b"the checkpoint the bank was built with")
    banks, _ = _bank(tmp_path, backbone="clip", weights=str(ckpt.resolve()), layers=["1"],
                     weights_sha256=weights_checksum(ckpt))
    MemoryScorer(banks, ckpt_path=ckpt)  # unchanged: accepted
    ckpt.write_bytes(b"retrained weights written to the same path")
    with pytest.raises(FiloError, match="now has sha256"):
        MemoryScorer(banks, ckpt_path=ckpt)


# ---- flags without effect ---------------------------------------------------------------------

@pytest.mark.parametrize("fields,needle", [
    ({"ckpt_path": Path("f.pth"), "fusion": "mean"}, "--fusion mean combines FiLo with a "
                                                      "memory bank: it has no effect"),
    ({"ckpt_path": Path("f.pth"), "grounded_checkpoint": Path("g.pth"), "position": "top"},
     "--position top has no effect with the box step"),
    ({"grounded_checkpoint": Path("g.pth"), "no_grounding": False, "position": "top"},
     "--position top has no effect with the box step"),
])
def test_flags_without_effect_are_refused(fields, needle):
    from filo.pipeline import PipelineConfig

    with pytest.raises(FiloError, match=needle):
        PipelineConfig(**fields).check_usable()
    # the intended combinations pass
    PipelineConfig(ckpt_path=Path("f.pth"), no_grounding=True, position="top").check_usable()
    PipelineConfig(ckpt_path=Path("f.pth"), memory_bank=Path("b"), fusion="max").check_usable()


@pytest.mark.parametrize("extra,needle", [
    (["--fusion", "max"], "--fusion max combines FiLo with a memory bank: it has no effect "
                          "without --memory_bank"),
    (["--viz_limit", "3"], "--viz_limit shapes the visualisations"),
    (["--viz_only_errors"], "--viz_only_errors shapes the visualisations"),
])
def test_test_py_refuses_flags_without_effect_before_loading(tmp_path, capsys, extra, needle):
    from filo.cli.test import main

    rc = _cli(main, ["--dataset", "mvtec", "--data_path", str(tmp_path), "--save_path",
                     str(tmp_path / "run"), "--ckpt_path", str(tmp_path / "missing.pth"),
                     *extra])
    err = _one_line(capsys)
    assert rc == 2 and needle in err


@pytest.mark.parametrize("extra,needle", [
    (["--backbone", "clip", "--ckpt_path", "f.pth", "--weights", "w.pth"], "--weights"),
    (["--prompts", "p.yaml"], "--prompts p.yaml is used for FiLo's normal statistics"),
    (["--topk", "5"], "--topk 5 applies to --score_rule topk_mean only"),
])
def test_memory_build_refuses_flags_without_effect(tmp_path, capsys, extra, needle):
    from filo.cli.memory import main

    rc = _cli(main, ["build", "--dataset", "mvtec", "--data_path", str(tmp_path), "--out",
                     str(tmp_path / "banks"), *extra])
    err = _one_line(capsys)
    assert rc == 2 and needle in err and not (tmp_path / "banks").exists()


# ---- degenerate images --------------------------------------------------------------------------

@pytest.mark.parametrize("size,detector,memory,refused", [
    ((6000, 2), True, False, "too elongated for the box step"),
    ((6000, 2), False, True, "too elongated for the memory bank"),
    ((6000, 2), False, False, None),  # FiLo alone: a square resize
    ((1, 40), True, False, None),  # the detector input is 33 x 1333
    ((1, 1), False, False, None),
    ((2000, 48), True, True, None),
])
def test_degenerate_shapes_run_or_are_one_line(size, detector, memory, refused):
    from filo.data.dataset import image_inputs

    img = Image.new("RGB", size, (90, 30, 30))
    transform = (lambda im, cls: None) if memory else None
    if refused:
        with pytest.raises(FiloError, match=refused) as err:
            image_inputs(img, "obj", 32, with_detector_input=detector, memory_transform=transform,
                         name="wide.png")
        assert str(err.value).startswith("wide.png: a 6000x2 image")
    else:
        item = image_inputs(img, "obj", 32, with_detector_input=detector,
                            memory_transform=transform)
        assert tuple(item["image"].shape) == (3, 32, 32) and item["orig_size"] == size
        if detector:
            assert min(item["det_image"].shape[1:]) >= 32


def test_a_memory_bank_build_refuses_an_extreme_aspect_image_in_one_line(tmp_path):
    from filo.data.records import Sample
    from filo.memory.build import _load_images

    Image.new("RGB", (6000, 2)).save(tmp_path / "wide.png")
    with pytest.raises(FiloError, match="wide.png: a 6000x2 image is too elongated for the "
                                        "memory bank"):
        _load_images(tmp_path, [Sample("wide.png", "", "obj", "good", 0)], embedder=None)


# ---- a full disk -----------------------------------------------------------------------------

def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path):
    from filo.errors import WriteError
    from filo.fileio import atomic_write, atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, "complete\n")

    def full(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as err:
        atomic_write(target, full)
    assert str(err.value).startswith(f"cannot write {target}: No space left on device; free "
                                     f"space")
    assert target.read_text() == "complete\n" and sorted(os.listdir(tmp_path)) == ["results.json"]


def test_a_full_disk_mid_run_is_one_line_and_keeps_finished_work(tmp_path, capsys, monkeypatch,
                                                                 tiny_filo_ckpt,
                                                                 synthetic_prompts):
    from filo.predict import main

    for i in range(2):
        Image.new("RGB", (40, 40), (30 * i, 60, 90)).save(tmp_path / f"img{i}.png")
    real_save = np.save
    calls = []

    def save(fh, arr, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second image's map (each image: its map, then full size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(fh, arr, *a, **k)

    monkeypatch.setattr(np, "save", save)
    out = tmp_path / "out"
    rc = _cli(main, ["--images", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"),
                     "--class", "tex a", "--ckpt_path",
                     str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts),
                     "--image_size", "32", "--device", "cpu", "--num_workers", "0",
                     "--batch_size", "1", "--out", str(out)])
    lines = [x for x in capsys.readouterr().err.splitlines()
             if x.strip() and not ("|" in x and "%" in x)]
    assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert str(out / "img1.png.npy") in lines[0]
    # the first image is complete; nothing of the second is presented as done, no temp files
    assert sorted(p.name for p in out.iterdir()) == ["img0.png.full.npy", "img0.png.json",
                                                     "img0.png.npy", "img0.png.png"]


def test_a_write_error_outside_the_atomic_writers_is_one_line(capsys):
    from filo.errors import cli_entry

    @cli_entry
    def main():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/log.txt")

    assert _cli(lambda argv: main(), []) == 2
    assert _one_line(capsys) == ("error: cannot write /ro/log.txt: Read-only file system; make "
                                 "the folder writable or choose another output folder")


# ---- the service -------------------------------------------------------------------------------

fastapi = pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tiny_filo_ckpt, tiny_grounding_ckpt, bert_vocab_dir, synthetic_prompts,
           tmp_path_factory):
    from fastapi.testclient import TestClient
    from service_helpers import tiny_pipeline_config

    from filo.pipeline import build_pipeline
    from filo.service.app import create_app
    from filo.service.config import ServiceConfig
    from filo.service.engine import Engine

    pipeline = build_pipeline(tiny_pipeline_config(tiny_filo_ckpt, tiny_grounding_ckpt,
                                                   bert_vocab_dir, synthetic_prompts))
    cfg = ServiceConfig(max_upload_mb=0.05)
    engine = Engine(pipeline, cfg, tmp_path_factory.mktemp("serve"))
    with TestClient(create_app(engine, cfg), raise_server_exceptions=False) as c:
        yield c


def _png(size) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (80, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _detail(res) -> str:
    body = res.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "\n" not in body["detail"]
    return body["detail"]


def test_service_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(20):
            yield b"x" * 8192  # 160 KiB, no Content-Length

    res = client.post("/v1/predict", content=chunks(),
                      headers={"content-type": "multipart/form-data; boundary=zz"})
    assert res.status_code == 413 and "--max_upload_mb" in _detail(res)


@pytest.mark.parametrize("fails_early", [False, True])
def test_body_limit_answers_413_for_a_streamed_body_whatever_the_app_does(fails_early):
    """ASGI level: a body arriving in chunks without Content-Length; the app either reads it
    all (its reads are interrupted at the limit) or answers 400 after the first chunk (a
    malformed form): the client gets 413 and one JSON body either way."""
    import asyncio

    from filo.service.app import BodyLimit

    async def app(scope, receive, send):
        while True:
            message = await receive()
            if fails_early or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"There was an error parsing"})

    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 5 + \
        [{"type": "http.request", "body": b"", "more_body": False}]
    sent = []

    async def run():
        it = iter(chunks)

        async def receive():
            return next(it)

        async def send(message):
            sent.append(message)

        await BodyLimit(app, limit=2500)({"type": "http", "headers": []}, receive, send)

    asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413
    assert "--max_upload_mb" in json.loads(sent[1]["body"])["detail"]


@pytest.mark.parametrize("form,files,needle", [
    ({}, True, "class_name: required form field is missing"),
    ({"class_name": "tex a"}, False, "image: required form field is missing"),
    ({"class_name": "tex a", "box_threshold": "abc"}, True,
     "box_threshold: must be a number, got 'abc'"),
])
def test_service_form_errors_are_one_line(client, form, files, needle):
    res = client.post("/v1/predict", data=form,
                      files={"image": ("p.png", _png((40, 40)), "image/png")} if files else None)
    assert res.status_code == 422 and _detail(res) == needle


def test_service_a_full_disk_is_507_in_one_line(client, monkeypatch):
    import filo.fileio

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filo.fileio.os, "replace", full)
    res = client.post("/v1/predict", data={"class_name": "tex a"},
                      files={"image": ("p.png", _png((40, 40)), "image/png")})
    assert res.status_code == 507 and "No space left on device" in _detail(res)


def test_service_an_extreme_aspect_image_is_4xx(client):
    res = client.post("/v1/predict", data={"class_name": "tex a"},
                      files={"image": ("wide.png", _png((6000, 2)), "image/png")})
    assert res.status_code == 422 and "too elongated for the box step" in _detail(res)
    res = client.post("/v1/predict", data={"class_name": "tex a"},
                      files={"image": ("thin.png", _png((1, 40)), "image/png")})
    assert res.status_code == 200, res.text


# ---- the doctor: each checkpoint's kind against its slot ------------------------------------

def test_doctor_names_a_checkpoint_in_the_wrong_slot(tmp_path, tiny_filo_ckpt):
    import torch

    from filo.ckpt_check import checkpoint_problem
    from filo.demo import make_tiny_detector_checkpoint
    from filo.doctor import WRONG_CONTENT, run_doctor

    grounding = make_tiny_detector_checkpoint(tmp_path / "grounding.pth", seed=0)  # converted
    filo = Path(tiny_filo_ckpt[0])
    report = run_doctor("test-mvtec", ckpt_path=grounding, grounded_checkpoint=filo)
    rows = {r.path: r for r in report.rows}
    assert rows[grounding].status == WRONG_CONTENT and not report.ready
    assert "is a GroundingDINO checkpoint, not a FiLo checkpoint" in rows[grounding].fix
    assert rows[filo].status == WRONG_CONTENT
    assert "is a FiLo checkpoint, not a GroundingDINO checkpoint" in rows[filo].fix
    # a memory bank folder in a checkpoint slot
    banks, _ = _bank(tmp_path)
    row = next(r for r in run_doctor("test-mvtec", ckpt_path=banks / "obj_a").rows
               if r.path == banks / "obj_a")
    assert row.status == WRONG_CONTENT and "is a memory bank" in row.fix
    # CLIP and WideResNet weights are told apart from FiLo (which holds a CLIP tower too)
    t = torch.zeros(1)
    torch.save({"visual.conv1.weight": t, "token_embedding.weight": t}, tmp_path / "clip.pt")
    torch.save({"conv1.weight": t, "layer1.0.conv1.weight": t, "fc.weight": t},
               tmp_path / "wrn.pth")
    assert checkpoint_problem(tmp_path / "clip.pt", "clip") is None
    assert checkpoint_problem(tmp_path / "wrn.pth", "wideresnet") is None
    assert "is OpenAI CLIP weights, not a FiLo" in checkpoint_problem(tmp_path / "clip.pt", "filo")
    assert "is torchvision WideResNet weights, not OpenAI CLIP" in \
        checkpoint_problem(tmp_path / "wrn.pth", "clip")
    assert "is a FiLo checkpoint, not OpenAI CLIP" in checkpoint_problem(filo, "clip")


def test_doctor_checks_a_memory_bank_folder(tmp_path, tiny_filo_ckpt):
    from filo.doctor import OK, WRONG_CONTENT, check_banks

    banks, _ = _bank(tmp_path)
    assert [(r.item, r.status) for r in check_banks(banks)] == [("memory bank obj_a", OK)]
    meta_path = banks / "obj_a" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["layers"] = ["layer4"]
    meta_path.write_text(json.dumps(meta))
    (row,) = check_banks(banks)
    assert row.status == WRONG_CONTENT and "fails its checksum" in row.fix
    # a checkpoint given where the bank folder goes
    (row,) = check_banks(Path(tiny_filo_ckpt[0]))
    assert row.status == WRONG_CONTENT and "is a FiLo checkpoint, not a memory-bank folder" in row.fix
