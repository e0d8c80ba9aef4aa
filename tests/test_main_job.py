"""The main job on a fresh machine: scripts/test_mvtec.sh runs the embedded demo when nothing is
in place, and stops with the doctor's message when the user points at a path that is missing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"MVTEC_ROOT", "VISA_ROOT", "CKPT_DIR", "FILO_CKPT", "GROUNDING_CKPT",
                        "FILO_BERT_LOCAL"}}
    env.update(FILO_ROOT=str(ROOT), MVTEC_ROOT=str(ROOT / "data" / "mvtec_anomaly_detection"),
               VISA_ROOT=str(ROOT / "data" / "VisA_20220922"), CKPT_DIR=str(ROOT / "ckpt"),
               RESULTS_DIR=str(tmp_path / "results"), VIZ_DIR=str(tmp_path / "viz"),
               FILO_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.update(overrides)
    return env


@pytest.mark.slow
def test_fresh_machine_runs_the_demo(tmp_path: Path) -> None:
    if (ROOT / "data" / "mvtec_anomaly_detection").exists() or (ROOT / "ckpt" / "filo_train_on_visa.pth").exists():
        pytest.skip("real assets are in place: the script would run the real evaluation")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "test_mvtec.sh")], cwd=tmp_path,
                         env=script_env(tmp_path), text=True, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "filo DEMO" in res.stdout and "scripts/test_mvtec.sh" in res.stdout
    out = tmp_path / "results" / "demo" / "results"
    table = (out / "results.md").read_text()
    assert table.startswith("| objects")
    data = json.loads((out / "results.json").read_text())
    assert set(data["classes"]) == {"obj_d", "obj_e"}
    assert data["mean"]["auroc_px"] > 70.0  # the heads learned defects they can find in unseen classes
    assert (out / "results.csv").is_file() and (out / "test_log.txt").is_file()
    index = tmp_path / "viz" / "demo" / "index.html"
    assert index.is_file() and len(list((tmp_path / "viz" / "demo").rglob("*.png"))) >= 20
    # the detector ran: every cached prediction has boxes
    boxes = [p for p in (tmp_path / "results" / "demo" / "results" / "cache").rglob("*.npz")]
    assert len(boxes) == 20
    # memory-bank rows: 2-shot bank alone and fused with the zero-shot maps, in the summary
    assert "| memory bank alone (2-shot) |" in res.stdout
    assert "| FiLo + boxes + 2-shot memory (mean) |" in res.stdout
    for name in ("results_memory_2shot", "results_mean_2shot"):
        mem = json.loads((tmp_path / "results" / "demo" / name / "results.json").read_text())
        assert set(mem["classes"]) == {"obj_d", "obj_e"}
        assert mem["settings"]["memory_bank"].endswith("target_2shot")
    # the demo names its models for the other tools and prints how to use them
    env_file = tmp_path / "results" / "demo" / "demo_models.env"
    assert env_file.is_file() and "source env.sh && source" in res.stdout
    try_readme_demo_tools(tmp_path, env_file)


def readme_block(marker: str) -> str:
    """The bash block that follows ``<!-- marker`` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- {marker}"):]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def try_readme_demo_tools(tmp_path: Path, env_file: Path) -> None:
    """The README's "Try every tool on the demo's models" commands run as written on the demo's
    output: detector alone, predict with boxes and bank, a bank build, test.py with a gallery,
    then the service answers an image."""
    import socket
    import time
    import urllib.request

    env = script_env(tmp_path, FILO_NO_INSTALL="1")
    block = readme_block("demo-tools").replace("outputs/results/demo/demo_models.env",
                                                str(env_file))
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                         text=True, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "results" / "demo" / "try"
    assert json.loads((out / "detect" / "results.json").read_text())["classes"]
    summary = json.loads((out / "predict" / "summary.json").read_text())
    assert summary["n_images"] == 6 and all("image_score" in r for r in summary["images"])
    assert {p.name for p in (out / "banks").iterdir() if p.is_dir()} == {"obj_d", "obj_e"}
    assert json.loads((out / "test" / "results.json").read_text())["settings"]["fusion"] == "mean"
    assert (out / "viz" / "index.html").is_file()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = (f"source env.sh && source {env_file} && exec "
             + readme_block("demo-serve").replace("\\\n", " "))
    proc = subprocess.Popen(["bash", "-c", serve], cwd=ROOT, env={**env, "DEMO_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.5)
        image = sorted((tmp_path / "results" / "demo" / "data" / "target_visa_like" / "obj_d"
                        / "Data" / "Images" / "Anomaly").glob("*.JPG"))[0]
        boundary = "filo-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"class_name\"\r\n\r\n"
                f"obj_d\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                f"filename=\"{image.name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() \
            + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{base}/v1/predict", data=body, method="POST", headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        assert isinstance(answer["image_score"], float)
        assert answer.get("verdict") in ("normal", "anomalous") or answer.get("verdict_note")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_user_path_that_does_not_exist_stops_with_the_doctor(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_mvtec"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "test_mvtec.sh")], cwd=tmp_path,
                         env=script_env(tmp_path, MVTEC_ROOT=str(missing)), text=True,
                         capture_output=True, timeout=300)
    assert res.returncode != 0
    assert "job test-mvtec: NOT ready" in res.stdout
    assert str(missing) in res.stdout
    assert "filo DEMO" not in res.stdout
    assert not (tmp_path / "results" / "demo").exists()


@pytest.mark.parametrize("rules,expect", [(None, True), ("research", True), ("fixed", False)])
def test_reproduction_scripts_pass_the_research_rules(tmp_path, rules, expect):
    """The scripts reproduce the published tables, so test.py gets every research switch
    (a stand-in `python` on PATH records the command lines instead of running them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    data = tmp_path / "mvtec"
    data.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FILO_ROOT": str(ROOT), "MVTEC_ROOT": str(data),
           "CKPT_DIR": str(tmp_path / "ckpt"), "RESULTS_DIR": str(tmp_path / "res"),
           "VIZ_DIR": str(tmp_path / "viz"), **({"RULES": rules} if rules else {})}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "_run_test.sh"), "mvtec", "visa"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m filo doctor --job test-mvtec")
    test_call = calls[1].split()
    assert test_call[0] == "test.py"
    switches = {"--legacy_box_slices", "--legacy_grid", "--legacy_text_threshold",
                "--legacy_phrase_case", "--legacy_macaroni"}
    assert (switches <= set(test_call)) is expect
    assert not (switches & set(test_call)) or expect


def test_reproduction_script_rejects_unknown_rules(tmp_path):
    data = tmp_path / "mvtec"
    data.mkdir()
    env = {"PATH": "/usr/bin:/bin", "FILO_ROOT": str(ROOT), "MVTEC_ROOT": str(data),
           "CKPT_DIR": str(tmp_path), "RESULTS_DIR": str(tmp_path), "VIZ_DIR": str(tmp_path),
           "RULES": "bogus", "FILO_CKPT": str(tmp_path / "x.pth")}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "_run_test.sh"), "mvtec", "visa"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "RULES must be" in res.stderr


@pytest.mark.parametrize("script,env_extra,expect", [
    ("patchcore_mvtec.sh", {}, [
        "-m filo doctor --job memory-mvtec",
        "-m filo.memory build --dataset mvtec",
        "test.py --dataset mvtec"]),
    ("fewshot_visa.sh", {"SHOTS": "2", "SEED": "3"}, [
        "-m filo doctor --job memory-visa",
        "-m filo doctor --job test-visa",
        "-m filo.memory build --dataset visa",
        "test.py --dataset visa"]),
])
def test_memory_bank_scripts_run_doctor_build_then_test(tmp_path, script, env_extra, expect):
    """The scripts' command lines, recorded by a stand-in `python` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FILO_ROOT": str(ROOT),
           "VIRTUAL_ENV": str(ROOT / ".venv"), "FILO_NO_INSTALL": "1",
           "CKPT_DIR": str(tmp_path / "ckpt"), "RESULTS_DIR": str(tmp_path / "res"),
           "VIZ_DIR": str(tmp_path / "viz"), "MVTEC_ROOT": str(tmp_path / "mvtec"),
           "VISA_ROOT": str(tmp_path / "visa"), **env_extra}
    res = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [any(c.startswith(e) for c in calls) for e in expect] == [True] * len(expect), calls
    build = next(c for c in calls if c.startswith("-m filo.memory build"))
    test = next(c for c in calls if c.startswith("test.py"))
    bank = build.split("--out ")[1].split()[0]
    assert f"--memory_bank {bank}" in test
    if script == "fewshot_visa.sh":
        assert "--shots 2" in build and "--seed 3" in build and "--ckpt_path" in build
        assert "--fusion mean" in test and "--grounded_checkpoint" in test
    else:
        assert "-p 0.1" in build and "--fusion memory" in test


def test_nproc_runs_the_scripts_under_torchrun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    data = tmp_path / "mvtec"
    data.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FILO_ROOT": str(ROOT), "MVTEC_ROOT": str(data),
           "CKPT_DIR": str(tmp_path / "ckpt"), "RESULTS_DIR": str(tmp_path / "res"),
           "VIZ_DIR": str(tmp_path / "viz"), "NPROC": "4", "NNODES": "2",
           "RDZV_ENDPOINT": "10.0.0.1:29400"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "_run_test.sh"), "mvtec", "visa"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    call = log.read_text().splitlines()[1]
    assert call.startswith("-m torch.distributed.run --nproc_per_node 4 --nnodes 2 "
                           "--rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400 test.py "), call
