"""benchmarks/bench_pipeline.py --quick runs and prints the expected table (no timing checks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_table(tmp_path):
    out = tmp_path / "bench.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--quick",
         "--batch-sizes", "2", "--iters", "1", "--warmup", "0", "--metric-images", "4",
         "--cpu-only", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert out.read_text().strip() == text.strip()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    keys = [tuple(c.strip() for c in r.strip("|").split("|")[:4]) for r in rows[1:]]
    assert keys == [
        ("filo", "research-like", "cpu", "1"),
        ("filo", "optimized", "cpu", "2"),
        ("detector", "research-like", "cpu", "1"),
        ("detector", "optimized", "cpu", "2"),
        ("pipeline", "research-like", "cpu", "1"),
        ("pipeline", "optimized", "cpu", "2"),
        ("metrics", "pixel_metrics + image metrics", "cpu", "N=4"),
        ("metrics", "aupro", "cpu", "N=4"),
    ]
    for r in rows[1:]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[4]) > 0  # images/s
        assert float(cells[6].replace(",", "")) > 0  # peak RSS MB
    # optimized maps equal the research-like ones (the column the README relies on)
    diffs = [float(c) for c in re.findall(r"\| ([0-9.]+e[-+]\d+) \|$", text, flags=re.M)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4
    assert "pipeline speed-up vs research-like (cpu)" in text
    assert "detector speed-up vs research-like (cpu)" in text


def test_kernel_benchmark_table(tmp_path):
    """benchmarks/bench_kernels.py runs; its two kernels agree with the reference ones."""
    out = tmp_path / "kernels.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text().strip() == proc.stdout.strip()
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ") and "---" not in r]
    linear = [r for r in rows if "->" in r and not r.startswith("| layer")]
    deform = [r for r in rows if r.startswith("| encoder layer") or r.startswith("| decoder layer")]
    assert len(linear) == 7 and len(deform) == 2
    for r in linear:
        assert float(r.strip("|").split("|")[-1]) <= 1e-5  # max relative difference
    for r in deform:
        assert float(r.strip("|").split("|")[-1]) <= 1e-4  # max absolute difference


def test_memory_benchmark_table():
    """benchmarks/bench_memory.py --quick: every row; the aggregation equals the former one and
    faiss / torch scores equal the straightforward cdist ones (no timing checks)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"),
                           "--quick", "--images", "2", "--size", "64", "--repeats", "1",
                           "--n", "1000", "--bank", "500", "--queries", "300"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    steps = [c[0].split(" ")[0] for c in cells]
    assert steps.count("features") == 8 and steps[-1] == "coreset"
    heap = [c for c in cells if "freed pages kept" in c[0] or "default malloc" in c[0]]
    assert len(heap) == 2 and all("batch 8 / batch 1" in c[3] for c in heap)
    assert "original PatchCore" in " ".join(c[0] for c in cells)  # measured or skipped
    for c in cells:
        if c[0].startswith("features filo, batch"):
            assert float(c[4]) <= 1e-6  # against the former unfold aggregation
        if c[0].startswith("kNN"):
            assert float(c[4]) < 1e-3


def test_patchcore_peers_benchmark_tables():
    """benchmarks/bench_patchcore_peers.py on 3 images: filo's and anomalib's rows (the original
    is skipped without --original), ratios against the faster peer, the ceiling table."""
    pytest.importorskip("anomalib")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_patchcore_peers.py"),
                           "--train", "3", "--test", "1", "--repeats", "1", "--fractions", "0.1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| step | filo | anomalib | filo vs faster peer |" in out
    for label in ("features, 3 images", "bank build at 10% (features + coreset)",
                  "scoring per image"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label}"))
        assert row.rstrip().endswith("(anomalib) |")  # a ratio against the only peer
    assert "GFLOP/s" in out and "original PatchCore skipped" in out
