"""torchrun with 2 CPU processes (gloo) on tiny models: the same results as one process, and a
job killed mid-run completes on rerun with the same table and an intact cache."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from filo.data.synthetic import make_mvtec_like

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_filo_ckpt, synthetic_prompts, tiny_grounding_ckpt,
        bert_vocab_dir):
    base = tmp_path_factory.mktemp("dist")
    data = base / "data"
    make_mvtec_like(data, classes=("tex_a", "tex_b"), n_train_good=0, n_test_good=3,
                    n_test_defect=3, size=48, seed=4)
    args = ["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path",
            str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts), "--image_size", "32",
            "--device", "cpu", "--num_workers", "0", "--grounded_checkpoint",
            str(tiny_grounding_ckpt), "--bert_dir", str(bert_vocab_dir), "--exact"]
    single = base / "single"
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), *args, "--save_path",
                           str(single), "--save_maps", str(single / "maps")], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base, args, single


def _classes(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["classes"]


def test_two_processes_give_the_single_process_results(job):
    base, args, single = job
    multi = base / "multi"
    proc = subprocess.run(_torchrun([str(ROOT / "test.py"), *args, "--save_path", str(multi),
                                     "--save_maps", str(multi / "maps")]),
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes share the rest" in proc.stdout
    assert proc.stdout.count("| mean") == 1  # only rank 0 reports
    assert _classes(multi) == _classes(single)
    maps = sorted((single / "maps").rglob("*.npy"))
    assert len(maps) == 12
    for path in maps:
        np.testing.assert_array_equal(np.load(path),
                                      np.load(multi / "maps" / path.relative_to(single / "maps")))
    assert (multi / "maps" / "scores.csv").read_text() == (single / "maps" / "scores.csv").read_text()


def test_a_killed_job_completes_on_rerun_with_an_intact_cache(job):
    from filo.evaluation.cache import PredictionCache

    base, args, single = job
    run = base / "killed"
    cmd = _torchrun([str(ROOT / "test.py"), *args, "--batch_size", "1", "--save_path", str(run)])
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((run / "cache").rglob("*.npz"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        # every process of the job, mid-run (torchrun's workers run in their own sessions,
        # so they are found by their command line, which names this run's folder)
        subprocess.run(["pkill", "-KILL", "-f", str(run)], check=False)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finally:
        proc.wait(timeout=60)
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", str(run)], capture_output=True).returncode == 1
    entries = list((run / "cache").rglob("*.npz"))
    assert 3 <= len(entries) < 12
    again = subprocess.run(_torchrun([str(ROOT / "test.py"), *args, "--batch_size", "1",
                                      "--save_path", str(run)]),
                           env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(entries)} cached" in again.stdout
    assert _classes(run) == _classes(single)
    cache_dir = next(p for p in (run / "cache").iterdir() if p.is_dir())
    cache = PredictionCache(run / "cache", json.loads((cache_dir / "settings.json").read_text()))
    assert cache.dir == cache_dir
    for entry in cache_dir.rglob("*.npz"):
        rel = str(entry.relative_to(cache_dir))[: -len(".npz")]
        assert cache.get(rel) is not None
    assert not list(cache_dir.rglob(".*.tmp"))


def test_predict_and_memory_build_under_torchrun(tmp_path, job, tiny_filo_ckpt,
                                                 synthetic_prompts):
    """filo.predict: each process predicts its share, rank 0 writes the whole summary (same as
    one process); filo.memory build: classes split over the processes, same banks."""
    base, args, _ = job
    data = base / "data"
    images = sorted((data / "tex_a" / "test").rglob("*.png"))
    common = ["--images", *map(str, images), "--class", "tex_a", "--ckpt_path",
              str(tiny_filo_ckpt[0]), "--prompts", str(synthetic_prompts), "--image_size", "32",
              "--device", "cpu", "--num_workers", "0", "--exact"]
    one = subprocess.run([sys.executable, "-m", "filo.predict", *common, "--out",
                          str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun(["-m", "filo.predict", *common, "--out",
                                    str(tmp_path / "two")]),
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [r["image"] for r in a["images"]] == [r["image"] for r in b["images"]]
    assert [r["image_score"] for r in a["images"]] == [r["image_score"] for r in b["images"]]

    make_mvtec_like(tmp_path / "train", classes=("tex_a", "tex_b"), n_train_good=3,
                    n_test_good=1, n_test_defect=1, size=48, seed=2)
    build = ["-m", "filo.memory", "build", "--dataset", "mvtec", "--data_path",
             str(tmp_path / "train"), "--backbone", "clip", "--layers", "2,3", "--ckpt_path",
             str(tiny_filo_ckpt[0]), "--resize", "32", "--imagesize", "32", "--device", "cpu"]
    one = subprocess.run([sys.executable, *build, "--out", str(tmp_path / "b1")], env=_env(),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    two = subprocess.run(_torchrun([*build, "--out", str(tmp_path / "b2")]), env=_env(),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "(2 built now)" in two.stdout
    for cls in ("tex_a", "tex_b"):
        np.testing.assert_array_equal(np.load(tmp_path / "b1" / cls / "bank.npy"),
                                      np.load(tmp_path / "b2" / cls / "bank.npy"))
