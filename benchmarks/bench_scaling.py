"""Wall time of a test run with 1 and with N processes under torchrun (CPU, gloo).

The suite's tiny seeded models (tests/golden_runs.py: tiny FiLo, tiny GroundingDINO) on a
generated MVTec-layout dataset; every configuration is a fresh subprocess with its own results
folder, so nothing is cached between them. With P cores, N processes get P // N threads each.

    python benchmarks/bench_scaling.py [--images 64] [--nproc 1 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="test images (half per class)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    from golden_runs import build_assets

    from filo.data.synthetic import make_mvtec_like

    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp) / "assets")
        data = Path(tmp) / "data"
        per_class = max(2, args.images // 4)
        make_mvtec_like(data, classes=("tex_a", "obj_a"), n_train_good=0,
                        n_test_good=per_class, n_test_defect=per_class, size=128, seed=3)
        common = ["--dataset", "mvtec", "--data_path", str(data), "--ckpt_path",
                  str(assets["ckpt"]), "--grounded_checkpoint", str(assets["gdino"]),
                  "--prompts", str(assets["prompts"]), "--bert_dir", str(assets["bert"]),
                  "--image_size", "32", "--device", "cpu", "--num_workers", "0",
                  "--batch_size", "4"]
        for n in args.nproc:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)),
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            out = Path(tmp) / f"run{n}"
            launch = ([sys.executable] if n == 1 else
                      [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port())])
            start = time.perf_counter()
            proc = subprocess.run([*launch, str(ROOT / "test.py"), *common, "--save_path",
                                   str(out)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append((n, env["OMP_NUM_THREADS"], wall))
    n_images = 4 * per_class
    print(f"### test.py wall time, {n_images} images, tiny models, {cores} CPU cores\n")
    print("| processes | threads each | wall s | images/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, threads, wall in rows:
        print(f"| {n} | {threads} | {wall:.1f} | {n_images / wall:.2f} | {rows[0][2] / wall:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
