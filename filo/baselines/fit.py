"""``fit``: one anomalib model per class of a filo dataset (docs/design.md §17)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from filo.assets import sha256_file
from filo.baselines.config import CHECKPOINT_NAME, RECORD_NAME, FitConfig
from filo.baselines.record import BaselineRecord
from filo.data.layouts import load_split
from filo.errors import FiloError
from filo.heap import batch_work

logger = logging.getLogger(__name__)


def init_args(cfg: FitConfig) -> dict:
    args = dict(cfg.model_args)
    if cfg.backbone is not None:
        args["backbone"] = cfg.backbone
    return args


@batch_work
def fit_baselines(cfg: FitConfig, data_path: Path, dataset: str = "auto",
                  classes: list[str] | None = None, *, batch_size: int = 8,
                  num_workers: int = 0, allow_outside_root: bool = False,
                  realiad_split: Path | None = None,
                  log: Callable[[str], None] = print) -> list[BaselineRecord]:
    """Train ``cfg.model`` on each class's normal training images (test split = validation,
    for anomalib's threshold and normalisation); returns the class records."""
    import torch

    from filo.baselines import backend

    backend.require()
    cfg = cfg.resolved()
    kw = dict(source="--data_path", allow_outside_root=allow_outside_root,
              realiad_split=realiad_split)
    train = load_split(data_path, dataset, "train", classes, **kw)
    test = load_split(data_path, dataset, "test", classes, **kw)
    args = init_args(cfg)
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FiloError(f"--weights {cfg.weights} is not a file")
    backend.build_model(cfg.model, args, cfg.input_size)  # bad --model_args: before any work
    out = []
    for cls_name, test_samples in test.items():
        normals = [s for s in train.get(cls_name, []) if not s.anomaly]
        if not normals:
            log(f"[filo] warning: class {cls_name} has no normal training images under "
                f"{data_path}; skipped")
            continue
        folder = Path(cfg.out) / cls_name
        folder.mkdir(parents=True, exist_ok=True)
        rec_path = folder / RECORD_NAME
        old = None
        if rec_path.is_file():
            old = BaselineRecord.read(rec_path)
            if old.finished and (folder / old.checkpoint).is_file() and \
                    old.model == cfg.model and old.init_args == args and \
                    old.epochs == cfg.epochs and \
                    (cfg.input_size is None or old.input_size == cfg.input_size):
                log(f"[filo] {cls_name}: finished model in {folder}; skipped")
                out.append(old)
                continue
        torch.manual_seed(cfg.seed)
        model = backend.build_model(cfg.model, args, cfg.input_size)
        if cfg.weights is not None:
            n = backend.load_backbone_weights(model, Path(cfg.weights))
            logger.info("loaded %d backbone tensors from %s", n, cfg.weights)
        rec = BaselineRecord(
            model=cfg.model, class_name=cls_name, init_args=args,
            input_size=backend.model_input_size(model), epochs=cfg.epochs,
            train_images=len(normals), weights=str(cfg.weights) if cfg.weights else None,
            weights_sha256=sha256_file(Path(cfg.weights)) if cfg.weights else None,
            anomalib_version=backend.version(), dataset=dataset, data_path=str(data_path))
        rec.write(folder)
        resume = folder / CHECKPOINT_NAME if cfg.resume and (folder / CHECKPOINT_NAME).is_file() \
            else None
        dm = backend.SampleDataModule(Path(data_path), cls_name, normals, test_samples,
                                      batch_size=batch_size, num_workers=num_workers,
                                      seed=cfg.seed)
        log(f"[filo] {cls_name}: fitting {cfg.model} on {len(normals)} normal images"
            + (f" (resuming {resume})" if resume else ""))
        t0 = time.perf_counter()
        backend.fit_one(model, dm, folder, device=cfg.device, epochs=cfg.epochs, resume=resume)
        prior = old.train_seconds if resume is not None and old is not None else 0.0
        rec.train_seconds = round(prior + time.perf_counter() - t0, 3)  # resumed: both parts
        if not (folder / CHECKPOINT_NAME).is_file():
            raise FiloError(f"training {cfg.model} on {cls_name} wrote no {CHECKPOINT_NAME} in "
                            f"{folder}")
        rec.finished = True
        rec.write(folder)
        log(f"[filo] {cls_name}: {folder / CHECKPOINT_NAME} ({rec.train_seconds:.1f} s)")
        out.append(rec)
    if not out:
        raise FiloError(f"no class of {data_path} has normal training images: nothing to fit")
    return out
