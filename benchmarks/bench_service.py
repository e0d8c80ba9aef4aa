"""Load test of the inspection service on localhost (``python -m filo serve`` as a subprocess).

A tiny random-weight FiLo (``--detector``: and the demo's tiny GroundingDINO), so the numbers
measure the service: HTTP, decoding, batching, rendering, not ViT-L. Two servers are measured in this one
run, the same models with and without batching (``--max_batch_size 8`` against 1), each with

1. steady load: ``--clients`` concurrent clients (below the queue bound) posting images for
   ``--duration`` seconds: latency percentiles, throughput, failed requests (must be 0), the
   server's resident memory at the start and the end of the phase;
2. overload: more clients than the queue and a batch can hold, for a few seconds: how many
   requests were answered 503 (with Retry-After), and that every other one succeeded.

``--bursts``: memory under bursts instead (the batched server only): two bursts of
``--burst_size`` concurrent requests (one each, all sent at once; the overflow is answered 503
with Retry-After), printing the server's resident memory idle, after burst 1, after burst 2
and after ``--settle_s`` seconds of quiet.

Every request goes to 127.0.0.1 only; the loops are bounded in count and time.

    python benchmarks/bench_service.py                 # 8 clients x 20 s per server
    python benchmarks/bench_service.py --quick         # a few seconds (the suite's smoke test)
    python benchmarks/bench_service.py --bursts        # RSS across two bursts of 200 requests
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_assets(folder: Path, image_size: int, detector: bool) -> dict[str, Path]:
    """Tiny seeded FiLo and detector checkpoints, the demo's prompts and a vocab directory."""
    from dataclasses import replace

    import torch

    from filo.backbone import ClipConfig
    from filo.checkpoint import save_filo_checkpoint
    from filo.demo import DEMO_PROMPTS, demo_bert_dir, make_tiny_detector_checkpoint
    from filo.model import FiLo, FiLoConfig, TapConfig
    from filo.prompts import load_prompt_table

    torch.manual_seed(0)
    clip = replace(ClipConfig.tiny(), image_size=image_size)
    cfg = FiLoConfig(clip=clip, taps=TapConfig.for_depth(clip.vision_layers))
    model = FiLo(cfg, load_prompt_table(DEMO_PROMPTS))
    filo = folder / "filo_tiny.pth"
    save_filo_checkpoint(filo, model)
    assets = {"ckpt_path": filo, "prompts": DEMO_PROMPTS}
    if detector:
        assets["grounded_checkpoint"] = make_tiny_detector_checkpoint(
            folder / "grounding_tiny.pth", seed=0)
        assets["bert_dir"] = demo_bert_dir()
    return assets


def image_bytes(seed: int, size: int) -> bytes:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    """``python -m filo serve`` on 127.0.0.1 with the tiny assets."""

    def __init__(self, assets: dict[str, Path], out: Path, image_size: int, batch: int,
                 queue_size: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "filo", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--out_dir", str(out), "--device", "cpu",
               "--image_size", str(image_size), "--max_batch_size", str(batch),
               "--max_wait_ms", "10", "--queue_size", str(queue_size), "--keep_results", "200"]
        for key, value in assets.items():
            cmd += [f"--{key}", str(value)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def wait(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("server exited: " + self.proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, clients: int, duration: float, images: list[bytes], cls_name: str,
         max_requests: int = 100_000) -> dict:
    """``clients`` threads posting for ``duration`` seconds (or ``max_requests`` in all)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    retry_after: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration
    sent = [0]

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = k
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/predict", data={"class_name": cls_name},
                                  files={"image": ("part.png", images[i % len(images)],
                                                   "image/png")})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                took = time.perf_counter() - start
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        latencies.append(took)
                    elif code == 503:
                        retry_after.append(int(r.headers.get("retry-after", "0")))
                i += clients
                if code == 503:
                    time.sleep(0.05)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "wall_s": wall, "ok": int(statuses.get(200, 0)),
            "statuses": statuses, "throughput": statuses.get(200, 0) / wall,
            "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "retry_after_min": min(retry_after) if retry_after else None}


def measure(assets, tmp: Path, name: str, batch: int, args) -> dict:
    import httpx

    server = Server(assets, tmp / f"out_{name}", args.image_size, batch, args.queue_size)
    try:
        server.wait()
        images = [image_bytes(s, args.upload_size) for s in range(8)]
        load(server.url, 2, 2.0 if not args.quick else 1.0, images, "obj_d")  # warm-up
        rss_start = rss_mb(server.proc.pid)
        peak = [rss_start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                peak[0] = max(peak[0], rss_mb(server.proc.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        steady = load(server.url, args.clients, args.duration, images, "obj_d")
        rss_mid = rss_mb(server.proc.pid)
        steady2 = load(server.url, args.clients, args.duration, images, "obj_d")
        rss_end = rss_mb(server.proc.pid)
        over_clients = args.queue_size + batch + args.overload_extra
        overload = load(server.url, over_clients, args.overload_duration, images, "obj_d")
        done.set()
        sampler.join()
        stats = httpx.get(f"{server.url}/healthz", timeout=5).json()["batches"]
    finally:
        server.stop()
    return {"name": name, "batch": batch, "steady": steady, "steady2": steady2,
            "overload": overload, "rss_start": rss_start, "rss_mid": rss_mid,
            "rss_end": rss_end, "rss_peak": peak[0], "stats": stats}


def burst(url: str, n: int, images: list[bytes], cls_name: str) -> dict[int, int]:
    """``n`` requests sent at once (one thread each, released together): status counts."""
    import httpx

    statuses: dict[int, int] = {}
    lock = threading.Lock()
    gate = threading.Barrier(n)

    def one(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            gate.wait()
            try:
                r = http.post(f"{url}/v1/predict", data={"class_name": cls_name},
                              files={"image": ("part.png", images[k % len(images)],
                                               "image/png")})
                code = r.status_code
                if code == 503 and not r.headers.get("retry-after"):
                    code = -503  # a 503 without Retry-After counts as a failure
            except httpx.HTTPError:
                code = -1
        with lock:
            statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def measure_bursts(assets, tmp: Path, args) -> dict:
    server = Server(assets, tmp / "out_bursts", args.image_size, 8, args.queue_size)
    try:
        server.wait()
        images = [image_bytes(s, args.upload_size) for s in range(8)]
        load(server.url, 2, 2.0, images, "obj_d")  # warm-up: every code path ran once
        time.sleep(min(args.settle_s, 3.0))
        pid = server.proc.pid
        out = {"idle": rss_mb(pid)}
        out["burst1"] = burst(server.url, args.burst_size, images, "obj_d")
        out["after1"] = rss_mb(pid)
        out["burst2"] = burst(server.url, args.burst_size, images, "obj_d")
        out["after2"] = rss_mb(pid)
        time.sleep(args.settle_s)
        out["settled"] = rss_mb(pid)
    finally:
        server.stop()
    return out


def report_bursts(r: dict, args) -> str:
    def codes(st: dict[int, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(st.items()))

    growth = (r["settled"] - r["idle"]) / r["idle"] * 100
    return "\n".join([
        f"Service bursts: tiny FiLo ({args.image_size} px maps), {args.upload_size}x"
        f"{args.upload_size} PNG uploads, 2 bursts of {args.burst_size} concurrent requests, "
        f"queue bound {args.queue_size}, batch 8, {os.cpu_count()} CPU cores.", "",
        "| moment | RSS MB | responses |", "| --- | ---: | --- |",
        f"| idle (after warm-up) | {r['idle']:.0f} | |",
        f"| after burst 1 | {r['after1']:.0f} | {codes(r['burst1'])} |",
        f"| after burst 2 | {r['after2']:.0f} | {codes(r['burst2'])} |",
        f"| after {args.settle_s:g} s quiet | {r['settled']:.0f} | |", "",
        f"settled vs idle: {growth:+.1f} %"])


def report(rows: list[dict], args) -> str:
    models = "tiny FiLo + tiny GroundingDINO" if args.detector else "tiny FiLo"
    lines = [f"Service load test: {models} ({args.image_size} px maps), {args.upload_size}x"
             f"{args.upload_size} PNG uploads, {args.clients} clients x {args.duration:g} s twice "
             f"per server, queue bound {args.queue_size}, {os.cpu_count()} CPU cores.", "",
             "| server | phase | clients | requests ok | failed | 503 | img/s | p50 ms | "
             "p95 ms | p99 ms | RSS MB start -> end |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        for phase, key in (("steady 1", "steady"), ("steady 2", "steady2"),
                           ("overload", "overload")):
            m = r[key]
            failed = sum(v for k, v in m["statuses"].items() if k not in (200, 503))
            rss = (f"{r['rss_start']:.0f} -> {r['rss_mid']:.0f}" if key == "steady" else
                   f"{r['rss_mid']:.0f} -> {r['rss_end']:.0f}" if key == "steady2" else
                   f"peak {r['rss_peak']:.0f}")
            lines.append(f"| {r['name']} (batch {r['batch']}) | {phase} | {m['clients']} | "
                         f"{m['ok']} | {failed} | {m['statuses'].get(503, 0)} | "
                         f"{m['throughput']:.1f} | {m['p50']:.0f} | {m['p95']:.0f} | "
                         f"{m['p99']:.0f} | {rss} |")
    by = {r["name"]: r for r in rows}
    if "batched" in by and "unbatched" in by:
        b, u = by["batched"], by["unbatched"]
        tb = (b["steady"]["throughput"] + b["steady2"]["throughput"]) / 2
        tu = (u["steady"]["throughput"] + u["steady2"]["throughput"]) / 2
        lines += ["", f"batching speed-up (steady throughput): {tb / max(tu, 1e-9):.2f}x; "
                  f"largest batch formed: {b['stats']['largest_batch']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--queue_size", type=int, default=16)
    p.add_argument("--overload_extra", type=int, default=16)
    p.add_argument("--overload_duration", type=float, default=6.0)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--upload_size", type=int, default=256)
    p.add_argument("--detector", action="store_true",
                   help="also run the tiny GroundingDINO (its 518-px input dominates on a CPU)")
    p.add_argument("--quick", action="store_true", help="a few seconds: the suite's smoke test")
    p.add_argument("--bursts", action="store_true",
                   help="RSS idle / after burst 1 / after burst 2 / after settling")
    p.add_argument("--burst_size", type=int, default=200)
    p.add_argument("--settle_s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.duration, args.queue_size = 3, 2.0, 4
        args.overload_extra, args.overload_duration, args.upload_size = 8, 2.0, 64
    if args.bursts:
        with tempfile.TemporaryDirectory(prefix="filo-bench-service-") as tmp:
            tmp = Path(tmp)
            r = measure_bursts(make_assets(tmp, args.image_size, args.detector), tmp, args)
        text = report_bursts(r, args)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps(r, indent=1, default=str) + "\n")
        bad = sum(v for st in (r["burst1"], r["burst2"]) for k, v in st.items()
                  if k not in (200, 503))
        return 1 if bad or r["settled"] > 1.2 * r["idle"] else 0
    with tempfile.TemporaryDirectory(prefix="filo-bench-service-") as tmp:
        tmp = Path(tmp)
        assets = make_assets(tmp, args.image_size, args.detector)
        rows = [measure(assets, tmp, "batched", 8, args),
                measure(assets, tmp, "unbatched", 1, args)]
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    steady_failed = sum(v for r in rows for key in ("steady", "steady2")
                        for k, v in r[key]["statuses"].items() if k != 200)
    return 1 if steady_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
