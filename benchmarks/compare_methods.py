"""One split, every method: zero-shot FiLo, FiLo + boxes, k-shot and full-shot memory banks and
trained anomalib models, scored by filo's runner, with train time, ms/image and peak RSS.

Each method runs in its own process (so its peak RSS is its own): it trains what it needs
(memory banks; ``python -m filo.baselines fit`` for an anomalib model), then ``test.py``'s
evaluation with a fresh cache. ms/image is the pipeline's predict time per test image (data
loading and model loading excluded); train s is the bank build or the anomalib fit.

    python benchmarks/compare_methods.py --demo DEMO_DIR --out OUT --models padim,fastflow

``--demo DIR`` reads what ``python -m filo.demo --out DIR`` leaves (its VisA-like target data,
tiny FiLo checkpoint, tiny GroundingDINO, prompts); without it pass ``--dataset --data_path
--ckpt_path [--grounded_checkpoint --prompts --bert_dir]``. Writes ``OUT/compare.md``,
``compare.csv``, ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Setup:
    """The split and the files every method shares."""

    dataset: str
    data_path: str
    out: str
    ckpt_path: str | None = None
    grounded_checkpoint: str | None = None
    prompts: str | None = None
    bert_dir: str | None = None
    image_size: int | None = None
    box_threshold: float = 0.25
    text_threshold: float = 0.25
    device: str = "cpu"
    shots: int = 2
    models: list[str] = field(default_factory=list)
    epochs: int = 1
    input_size: int | None = None
    backbone: str = "resnet18"
    weights: str | None = None
    memory_backbone: str = "clip"
    memory_layers: str | None = None


def demo_setup(demo: Path, out: Path, **kw: Any) -> Setup:
    """The demo's target split and files (``python -m filo.demo --out DEMO``)."""
    from filo.demo import DEMO_PROMPTS, DemoConfig, demo_bert_dir

    cfg = DemoConfig(out=demo)
    target = demo / "data" / "target_visa_like"
    ckpt = demo / "ckpt" / "filo_train_on_mvtec.pth"
    det = demo / "ckpt" / "grounding_demo_tiny.pth"
    for p in (target, ckpt, det):
        if not p.exists():
            raise SystemExit(f"compare_methods: {p} is missing; build the demo first: "
                             f"python -m filo.demo --out {demo} --epochs 1 --no_banner")
    return Setup(dataset="visa", data_path=str(target), out=str(out), ckpt_path=str(ckpt),
                 grounded_checkpoint=str(det), prompts=str(DEMO_PROMPTS),
                 bert_dir=str(demo_bert_dir()), image_size=cfg.image_size, box_threshold=0.8,
                 text_threshold=0.6, input_size=cfg.image_size, memory_layers="2,3", **kw)


def methods(s: Setup) -> list[tuple[str, str]]:
    """(key, row label) of every method this setup can run."""
    out = []
    if s.ckpt_path:
        out.append(("filo", "zero-shot FiLo"))
        if s.grounded_checkpoint:
            out.append(("filo_boxes", "zero-shot FiLo + GroundingDINO boxes"))
        out.append(("memory_kshot", f"memory bank, {s.shots}-shot"))
        out.append(("memory_full", "memory bank, all normal images"))
    out += [(f"anomalib:{m}", f"anomalib {m} (trained, {s.epochs} epoch(s))") for m in s.models]
    return out


# ---- one method (child process) --------------------------------------------------------------

def _pipeline_config(s: Setup, key: str, work: Path):
    from filo.pipeline import PipelineConfig

    common = dict(device=s.device, prompts=Path(s.prompts) if s.prompts else None,
                  bert_dir=Path(s.bert_dir) if s.bert_dir else None, image_size=s.image_size)
    if key == "filo":
        return PipelineConfig(ckpt_path=Path(s.ckpt_path), no_grounding=True, **common)
    if key == "filo_boxes":
        return PipelineConfig(ckpt_path=Path(s.ckpt_path),
                              grounded_checkpoint=Path(s.grounded_checkpoint),
                              box_threshold=s.box_threshold, text_threshold=s.text_threshold,
                              **common)
    if key.startswith("memory"):
        return PipelineConfig(ckpt_path=Path(s.ckpt_path), memory_bank=work / "banks",
                              fusion="memory", no_grounding=True, **common)
    return PipelineConfig(baseline=work / "models", device=s.device, image_size=s.image_size)


def _train(s: Setup, key: str, work: Path) -> float:
    """Build what the method needs; its wall time in seconds (0 for zero-shot methods)."""
    from filo.data.layouts import load_split

    t0 = time.perf_counter()
    if key.startswith("memory"):
        from filo.memory.build import build_banks
        from filo.memory.config import MemoryConfig

        size = s.image_size or 224
        extra = {"layers": s.memory_layers} if s.memory_layers else {}
        mem = MemoryConfig(backbone=s.memory_backbone, resize=size, imagesize=size,
                           no_crop=True, shots=s.shots if key == "memory_kshot" else None,
                           **extra)
        split = load_split(Path(s.data_path), s.dataset, "train")
        build_banks(Path(s.data_path), split, mem, work / "banks",
                    ckpt_path=Path(s.ckpt_path) if s.ckpt_path else None, device=s.device,
                    log=lambda *_: None)
    elif key.startswith("anomalib:"):
        from filo.baselines.config import FitConfig
        from filo.baselines.fit import fit_baselines

        cfg = FitConfig(model=key.split(":", 1)[1], backbone=s.backbone, out=work / "models",
                        epochs=s.epochs, input_size=s.input_size, device=s.device,
                        weights=Path(s.weights) if s.weights else None)
        fit_baselines(cfg, Path(s.data_path), s.dataset, num_workers=0, log=lambda *_: None)
    else:
        return 0.0
    return time.perf_counter() - t0


def run_one(s: Setup, key: str) -> dict[str, Any]:
    from filo.evaluation.runner import RunConfig, run_evaluation
    from filo.pipeline import build_pipeline

    work = Path(s.out) / key.replace(":", "_")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_s = _train(s, key, work)
    pipeline = _pipeline_config(s, key, work)
    predict_s = [0.0]

    def factory(cfg):
        p = build_pipeline(cfg)
        inner = p.predict

        def timed(batch):
            t = time.perf_counter()
            try:
                return inner(batch)
            finally:
                predict_s[0] += time.perf_counter() - t

        p.predict = timed
        return p

    run = RunConfig(dataset=s.dataset, data_path=Path(s.data_path), save_path=work / "results",
                    num_workers=0, batch_size=8)
    results = run_evaluation(run, pipeline, pipeline_factory=factory, log=lambda *_: None)
    n = sum(r.n_images for r in results)
    mean = {c: sum(r.values[c] for r in results) / len(results)
            for c in ("auroc_sp", "ap_sp", "auroc_px", "aupro")}
    return {"key": key, "train_s": round(train_s, 2),
            "ms_per_image": round(1000.0 * predict_s[0] / max(n, 1), 2), "images": n,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **{k: round(100.0 * v, 2) for k, v in mean.items()}}


# ---- the table and the plot -----------------------------------------------------------------

COLUMNS = ("method", "auroc_sp", "ap_sp", "auroc_px", "aupro", "train_s", "ms_per_image",
           "peak_rss_mib")


def render(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "| --- |" + " ---: |" * (len(COLUMNS) - 1)
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 2), sharey=True)
    names = [r["method"] for r in rows]
    ys = range(len(rows))
    h = 0.38
    ax1.barh([y - h / 2 for y in ys], [r["auroc_sp"] for r in rows], h, label="image AUROC")
    ax1.barh([y + h / 2 for y in ys], [r["auroc_px"] for r in rows], h, label="pixel AUROC")
    ax1.set_yticks(list(ys), names)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("%")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax2.barh(list(ys), [r["ms_per_image"] for r in rows], color="grey")
    ax2.set_xlabel("ms / image")
    for y, r in zip(ys, rows, strict=True):
        ax2.text(r["ms_per_image"], y, f" train {r['train_s']} s, {r['peak_rss_mib']} MiB",
                 va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, help="a `python -m filo.demo --out DIR` folder")
    p.add_argument("--out", type=Path, default=Path("outputs/compare_methods"))
    p.add_argument("--dataset", default="visa")
    p.add_argument("--data_path", type=Path)
    p.add_argument("--ckpt_path", type=Path)
    p.add_argument("--grounded_checkpoint", type=Path)
    p.add_argument("--prompts", type=Path)
    p.add_argument("--bert_dir", type=Path)
    p.add_argument("--models", default="padim,fastflow",
                   help="comma-separated anomalib models to train (python -m filo.baselines "
                        "--list)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--weights", type=Path, help="local backbone weights for the anomalib models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", help="comma-separated method keys to run (default: all)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: JSON setup + key
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        row = run_one(Setup(**spec["setup"]), spec["key"])
        print("RESULT " + json.dumps(row))
        return 0
    models = [m for m in args.models.split(",") if m]
    kw = dict(device=args.device, shots=args.shots, models=models, epochs=args.epochs,
              weights=str(args.weights) if args.weights else None)
    if args.demo:
        s = demo_setup(args.demo, args.out, **kw)
    else:
        if args.data_path is None:
            p.error("give --demo DIR or --data_path")
        s = Setup(dataset=args.dataset, data_path=str(args.data_path), out=str(args.out),
                  ckpt_path=str(args.ckpt_path) if args.ckpt_path else None,
                  grounded_checkpoint=str(args.grounded_checkpoint)
                  if args.grounded_checkpoint else None,
                  prompts=str(args.prompts) if args.prompts else None,
                  bert_dir=str(args.bert_dir) if args.bert_dir else None,
                  memory_backbone="clip", **kw)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for key, label in methods(s):
        if only and key not in only:
            continue
        print(f"[compare] {label} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one",
                               json.dumps({"setup": asdict(s), "key": key})],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"[compare] {label}: failed: {tail[0]}", flush=True)
            continue
        row = {"method": label, **json.loads(lines[-1][len("RESULT "):])}
        print(f"[compare] {label}: image AUROC {row['auroc_sp']}, pixel AUROC "
              f"{row['auroc_px']}, {row['ms_per_image']} ms/image", flush=True)
        rows.append(row)
    if not rows:
        print("[compare] no method finished", file=sys.stderr)
        return 1
    table = render(rows)
    (args.out / "compare.md").write_text(
        f"Methods on {s.dataset} {s.data_path} (means over classes, %):\n\n{table}\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "key", "images"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    (args.out / "compare.csv").write_text(buf.getvalue())
    (args.out / "compare.json").write_text(json.dumps({"setup": asdict(s), "rows": rows},
                                                      indent=1) + "\n")
    plot(rows, args.out / "compare.png")
    print()
    print(table)
    print(f"[compare] {args.out / 'compare.md'}, compare.csv, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
