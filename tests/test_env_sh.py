"""env.sh: idempotent, installs only when needed, never changes the caller's shell options."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A stand-in interpreter: answers the version check, "creates" a venv, logs pip calls.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf 'export VIRTUAL_ENV="%s"\nexport PATH="%s/bin:$PATH"\n' "$3" "$3" > "$3/bin/activate"
    cp "$0" "$3/bin/python"
    exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    case "$*" in *" -e "*) [ -n "${FAKE_PIP_FAIL:-}" ] && exit 1 ;; esac
    exit 0
fi
exit 0
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "env.sh", proj / "env.sh")
    (proj / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return proj


def run_bash(script: str, project: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in {"VIRTUAL_ENV", "FILO_ROOT", "MVTEC_ROOT", "VISA_ROOT", "CKPT_DIR",
                             "VIZ_DIR", "FILO_BERT_LOCAL", "RESULTS_DIR", "FILO_NO_INSTALL"}}
    full_env.update(FILO_PYTHON=str(project.parent / "fakepython"),
                    FAKE_LOG=str(project.parent / "calls.log"))
    full_env.update(env)
    return subprocess.run(["bash", "-c", script], cwd=project, env=full_env, text=True,
                          capture_output=True, timeout=60)


def pip_installs(project: Path) -> int:
    log = project.parent / "calls.log"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.startswith("-m pip install") and " -e " in line)


@pytest.mark.parametrize("opts", ["set -eu", "set +eu", "set -e -o pipefail"])
def test_sourced_twice_is_idempotent_and_keeps_options(project: Path, opts: str) -> None:
    script = f"""{opts}
before="$(set +o)"
source ./env.sh > first.out
after1="$(set +o)"; path1="$PATH"
source ./env.sh > second.out
after2="$(set +o)"
[ "$before" = "$after1" ] || {{ echo OPTIONS-CHANGED-1; exit 3; }}
[ "$before" = "$after2" ] || {{ echo OPTIONS-CHANGED-2; exit 3; }}
[ "$path1" = "$PATH" ] || {{ echo PATH-GREW; exit 3; }}
echo "VENV=$VIRTUAL_ENV"
echo "ROOT=$FILO_ROOT"
echo "OFF=$TRANSFORMERS_OFFLINE$HF_HUB_OFFLINE"
echo "BERT=$FILO_BERT_LOCAL"
echo "MVTEC=$MVTEC_ROOT"
echo "VISA=$VISA_ROOT"
echo "CKPT=$CKPT_DIR"
echo "VIZ=$VIZ_DIR"
"""
    res = run_bash(script, project)
    assert res.returncode == 0, res.stdout + res.stderr
    out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert out["VENV"] == str(project / ".venv")
    assert out["ROOT"] == str(project)
    assert out["OFF"] == "11"
    assert out["BERT"] == str(project / "third_party/bert-base-uncased")
    assert out["MVTEC"] == str(project / "data/mvtec_anomaly_detection")
    assert out["VISA"] == str(project / "data/VisA_20220922")
    assert out["CKPT"] == str(project / "ckpt")
    assert out["VIZ"]
    assert "setting up" in (project / "first.out").read_text()
    assert (project / "second.out").read_text() == ""
    assert pip_installs(project) == 1


def test_reinstalls_only_when_pyproject_changes(project: Path) -> None:
    assert run_bash("source ./env.sh", project).returncode == 0
    assert run_bash("source ./env.sh", project).returncode == 0
    assert pip_installs(project) == 1
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    res = run_bash("source ./env.sh", project)
    assert res.returncode == 0
    assert "pyproject.toml changed" in res.stdout
    assert pip_installs(project) == 2


def test_user_overrides_survive(project: Path, tmp_path: Path) -> None:
    res = run_bash('source ./env.sh >/dev/null; echo "$MVTEC_ROOT|$CKPT_DIR|$FILO_BERT_LOCAL"',
                   project, MVTEC_ROOT="/mnt/mvtec", CKPT_DIR="/mnt/ck", FILO_BERT_LOCAL="/b")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "/mnt/mvtec|/mnt/ck|/b"


def test_failed_install_returns_without_exiting_the_shell(project: Path) -> None:
    script = """set -u
before="$(set +o)"
source ./env.sh; rc=$?
after="$(set +o)"
[ "$before" = "$after" ] && echo SAME-OPTIONS
echo "STILL-HERE rc=$rc"
"""
    res = run_bash(script, project, FAKE_PIP_FAIL="1")
    assert "STILL-HERE rc=1" in res.stdout
    assert "SAME-OPTIONS" in res.stdout
    assert "installation failed" in res.stderr
    assert not (project / ".venv/.filo-install-stamp").exists()


def test_missing_python_is_reported(project: Path) -> None:
    res = run_bash("source ./env.sh; echo rc=$?", project, FILO_PYTHON="/nonexistent/python3")
    assert "rc=1" in res.stdout
    assert "FILO_PYTHON" in res.stderr


def test_extra_pip_options_reach_pip(project: Path) -> None:
    """FILO_PIP_ARGS (e.g. a CPU-only torch index) is passed to the install, word by word,
    before the project spec; without it the install line has no extra options."""
    index = "https://download.pytorch.org/whl/cpu"
    res = run_bash("source env.sh", project,
                   FILO_PIP_ARGS=f"--index-url {index} --extra-index-url https://pypi.org/simple")
    assert res.returncode == 0, res.stderr
    lines = [line for line in (project.parent / "calls.log").read_text().splitlines()
             if line.startswith("-m pip install") and " -e " in line]
    assert len(lines) == 1
    assert f"--index-url {index} --extra-index-url https://pypi.org/simple -e .[dev]" in lines[0]
    (project.parent / "calls.log").unlink()
    shutil.rmtree(project / ".venv")
    res = run_bash("source env.sh", project)
    assert res.returncode == 0, res.stderr
    plain = [line for line in (project.parent / "calls.log").read_text().splitlines()
             if line.startswith("-m pip install") and " -e " in line]
    assert plain == ["-m pip install --progress-bar on -e .[dev]"]
