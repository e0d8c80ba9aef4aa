"""FiLo training (docs/design.md section 7), resumable epoch by epoch.

Stage 1 (``epochs``): linear heads + MMCI (lr ``lr``) and both prompt learners (lr ``prompt_lr``)
are trained with :func:`~filo.training.losses.segmentation_loss` on the 7 per-tap maps; CLIP is
frozen, the adapter is not used, the abnormal prompts are averaged over all positions.
Stage 2 (``adapter_epochs``): only the adapter (lr ``adapter_lr``), with the cross-entropy of
``cos(image, [normal, abnormal]) / 0.07`` against the image label. The text features are computed
without gradient (as in the research code), from the adapted image feature.
Both stages: AdamW, betas (0.5, 0.999), data = the full test split of the auxiliary dataset.

After every epoch the model is written to ``{save_dir}/filo_train_on_{dataset}.pth``
(:func:`filo.checkpoint.save_filo_checkpoint`, research layout) and the state needed to resume
(epoch counters, optimizer and AMP-scaler states, RNG state, settings, per-epoch losses and a
fingerprint of the trained weights) to the sidecar ``filo_train_on_{dataset}.state.pt``;
``filo_train_on_{dataset}.train_log.json`` records every setting and the per-epoch losses.
The data order and mosaics of epoch ``e`` of stage ``k`` come from a generator seeded by
``(seed, k, e)``, so an interrupted and resumed run retraces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from filo.backbone import CLIP_ACTS, TapConfig, encode_image_two_stream
from filo.data.layouts import flatten, load_split
from filo.data.records import Sample
from filo.device import resolve_device
from filo.errors import FiloError
from filo.fileio import atomic_torch_save, atomic_write_text
from filo.training.augment import TrainDataset, epoch_plan, train_collate
from filo.training.losses import adapter_loss, segmentation_loss

logger = logging.getLogger(__name__)

MODEL_CONFIGS = ("vit-l-14-336", "tiny")
TAP_MODES = ("reference", "true")
BETAS = (0.5, 0.999)
STATE_VERSION = 1
STAGE1_MODULES = ("decoder_linear", "decoder_cov", "normal_prompt_learner", "abnormal_prompt_learner")
STAGE2_MODULES = ("adapter",)
TRAINED_MODULES = STAGE1_MODULES + STAGE2_MODULES
# settings that must not change between an interrupted run and its --resume
RESUME_FIXED = ("dataset", "model_config", "taps", "image_size", "clip_act", "seed",
                "batch_size", "mosaic_prob", "classes", "data_path", "prompts")


@dataclass
class TrainSettings:
    """Everything that defines a training run (the CLI flags)."""

    dataset: str
    data_path: Path
    save_dir: Path = Path("ckpt")
    clip_weights: Path | None = None
    model_config: str = "vit-l-14-336"
    epochs: int = 15
    adapter_epochs: int = 5
    batch_size: int = 1
    lr: float = 1e-4
    prompt_lr: float = 1e-3
    adapter_lr: float = 1e-5
    image_size: int | None = None  # None: 518 (vit-l-14-336) / 32 (tiny)
    device: str | None = None
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    prompts: Path | None = None
    classes: list[str] | None = None
    mosaic_prob: float | None = None  # None: 0.2 for mvtec, else 0
    taps: str = "reference"
    clip_act: str | None = None  # None: research rule for vit-l-14-336 (GELU unless 336 px)
    amp: bool = False
    progress: bool = True

    def resolved(self) -> TrainSettings:
        """Defaults filled in (image size, mosaic probability), paths made Path objects."""
        s = replace(self)
        s.data_path = Path(s.data_path).resolve()
        s.save_dir = Path(s.save_dir)
        s.clip_weights = Path(s.clip_weights).resolve() if s.clip_weights is not None else None
        s.prompts = Path(s.prompts).resolve() if s.prompts is not None else None
        if s.image_size is None:
            s.image_size = 518 if s.model_config == "vit-l-14-336" else 32
        if s.mosaic_prob is None:
            s.mosaic_prob = 0.2 if s.dataset == "mvtec" else 0.0
        if s.clip_act is None:
            s.clip_act = build_model_config(s.model_config, s.image_size, s.taps).clip.act
        return s

    def validate(self) -> None:
        if self.model_config not in MODEL_CONFIGS:
            raise FiloError(f"--model_config must be one of {', '.join(MODEL_CONFIGS)}, "
                            f"got {self.model_config!r}")
        if self.clip_act is not None and self.clip_act not in CLIP_ACTS:
            raise FiloError(f"--clip_act must be one of {', '.join(CLIP_ACTS)}, got "
                            f"{self.clip_act!r}")
        if self.taps not in TAP_MODES:
            raise FiloError(f"--taps must be one of {', '.join(TAP_MODES)}, got {self.taps!r}")
        if self.epochs < 0 or self.adapter_epochs < 0:
            raise FiloError("--epochs and --adapter_epochs must be >= 0")
        if self.batch_size < 1:
            raise FiloError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise FiloError(f"--num_workers must be >= 0, got {self.num_workers}")
        for name in ("lr", "prompt_lr", "adapter_lr"):
            if not getattr(self, name) > 0:
                raise FiloError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.mosaic_prob is not None and not 0.0 <= self.mosaic_prob <= 1.0:
            raise FiloError(f"--mosaic_prob must be in [0, 1], got {self.mosaic_prob}")
        if self.image_size is not None and self.image_size < 8:
            raise FiloError(f"--image_size must be at least 8, got {self.image_size}")
        if not Path(self.data_path).is_dir():
            raise FiloError(f"--data_path {self.data_path} is not a directory; point it at the "
                            f"{self.dataset} dataset root (or set MVTEC_ROOT / VISA_ROOT in env.sh)")
        if self.model_config == "vit-l-14-336":
            if self.clip_weights is None:
                raise FiloError("--clip_weights is required for --model_config vit-l-14-336 "
                                "(OpenAI ViT-L-14-336px.pt; `python -m filo download clip-vit-l-14-336`)")
            if not Path(self.clip_weights).is_file():
                raise FiloError(f"CLIP weights {self.clip_weights} not found; download them with "
                                f"`python -m filo download` or pass --clip_weights / set "
                                f"FILO_CLIP_WEIGHTS")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise FiloError(f"--prompts {self.prompts} does not exist; pass an existing YAML file")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d


@dataclass
class EpochRecord:
    stage: int
    epoch: int  # 1-based within its stage
    loss: float
    steps: int
    seconds: float


@dataclass
class TrainResult:
    checkpoint: Path
    state_path: Path
    log_path: Path
    history: list[EpochRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------

def output_paths(save_dir: str | os.PathLike, dataset: str) -> tuple[Path, Path, Path]:
    """(checkpoint, resume-state sidecar, training log) for ``dataset``."""
    d = Path(save_dir)
    stem = f"filo_train_on_{dataset}"
    return d / f"{stem}.pth", d / f"{stem}.state.pt", d / f"{stem}.train_log.json"


def build_model_config(model_config: str, image_size: int, taps: str = "reference",
                       clip_act: str | None = None):
    """FiLoConfig for ``vit-l-14-336`` or ``tiny`` at ``image_size`` with reference/true taps.

    ``clip_act`` None: ViT-L-14-336 follows the research code's rule for OpenAI weights (exact
    GELU unless 336 px, so checkpoints trained here behave like the released ones); tiny keeps
    its QuickGELU default. The activation is recorded in the checkpoint's config.
    """
    from filo.model import FiLoConfig

    if model_config == "vit-l-14-336":
        cfg = FiLoConfig.vit_l_14_336(image_size, clip_act=clip_act)
        cfg.taps = TapConfig(mode=taps)
    elif model_config == "tiny":
        cfg = FiLoConfig.tiny()
        cfg.clip = replace(cfg.clip, image_size=image_size, act=clip_act or cfg.clip.act)
        cfg.taps = TapConfig.for_depth(cfg.clip.vision_layers, mode=taps)
    else:
        raise FiloError(f"--model_config must be one of {', '.join(MODEL_CONFIGS)}")
    if image_size % cfg.clip.patch_size:
        raise FiloError(f"--image_size {image_size} is not a multiple of the patch size "
                        f"{cfg.clip.patch_size}")
    cfg.use_adapter = True
    cfg.validate()
    return cfg


def build_training_model(settings: TrainSettings, prompts=None):
    """Seeded model construction (random heads/prompt contexts; tiny: random CLIP too)."""
    from filo.model import build_filo

    cfg = build_model_config(settings.model_config, settings.image_size, settings.taps,
                             settings.clip_act)
    torch.manual_seed(settings.seed)
    clip_weights = settings.clip_weights if settings.model_config == "vit-l-14-336" else None
    return build_filo(cfg, prompts=prompts, clip_weights=clip_weights, device="cpu")


def load_prompts(settings: TrainSettings):
    from filo.prompts import load_prompt_table

    if settings.prompts is not None:
        return load_prompt_table(settings.prompts)
    if settings.dataset in ("mvtec", "visa"):
        return load_prompt_table(dataset=settings.dataset)
    return load_prompt_table()


def load_training_samples(settings: TrainSettings) -> list[Sample]:
    """The full test split (normal + anomalous) of the auxiliary dataset, class by class."""
    split = load_split(settings.data_path, settings.dataset, "test", settings.classes,
                       source="--data_path")
    samples = flatten(split)
    if not samples:
        raise FiloError(f"no test images found under {settings.data_path}; check --data_path "
                        f"and --dataset {settings.dataset}")
    return samples


def check_prompt_classes(table, samples: Sequence[Sample]) -> None:
    missing = sorted({s.cls_name for s in samples if not table.has_class(s.cls_name)})
    if missing:
        raise FiloError(f"class {missing[0]!r} is not in prompt file {table.source}; add it under "
                        f"'classes:' (see prompts/README.md) and pass it with --prompts")


def epoch_generator(seed: int, stage: int, epoch: int) -> torch.Generator:
    """Generator of stage ``stage``'s epoch ``epoch`` (0-based): data order and mosaic choices."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + stage * 10_007 + epoch) % (2**63 - 1))
    return g


# --------------------------------------------------------------------------------------------
# forward passes of the two stages
# --------------------------------------------------------------------------------------------

def stage1_forward(model, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """Per-tap probabilities [B, K, 2, S, S] without the adapter, prompts over all positions.

    Same as ``model(images, ...).tap_probs`` with ``use_adapter=False`` (frozen CLIP run without
    autograd), without the blur/score work the loss does not need.
    """
    with torch.no_grad():
        feats = encode_image_two_stream(model.clip_model.visual, images, model.config.taps)
        img = F.normalize(feats.global_tokens[:, 0], dim=-1)
    text = model.text_features(img, class_names, [None] * images.shape[0])
    return model.tap_probabilities(feats, text, tuple(images.shape[-2:]))


def stage2_cosines(model, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """[B, 2] cosines of the adapted, normalized global feature with the (normal, abnormal)
    text rows ``T`` (Frobenius-normalized, all positions). Gradient flows to the adapter only.

    ``FiLoOutput.text_score`` is the abnormal column alone, so both columns are computed here
    from the model's public pieces (adapter, ``text_features``).
    """
    with torch.no_grad():
        feats = encode_image_two_stream(model.clip_model.visual, images, model.config.taps)
        tokens = feats.global_tokens[:, 0]
    img = F.normalize(model.adapter(tokens), dim=-1)
    with torch.no_grad():
        text = model.text_features(img, class_names, [None] * images.shape[0])
    return torch.einsum("be,bke->bk", img, text)


def set_trainable(model, modules: Sequence[str]) -> list[torch.nn.Parameter]:
    """Only ``modules`` require grad; returns their parameters."""
    for name in TRAINED_MODULES:
        getattr(model, name).requires_grad_(name in modules)
    model.clip_model.requires_grad_(False)
    return [p for name in modules for p in getattr(model, name).parameters()]


def make_optimizers(model, settings: TrainSettings) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    main = torch.optim.AdamW(
        [
            {"params": list(model.decoder_cov.parameters()), "lr": settings.lr},
            {"params": list(model.decoder_linear.parameters()), "lr": settings.lr},
            {"params": list(model.normal_prompt_learner.parameters()), "lr": settings.prompt_lr},
            {"params": list(model.abnormal_prompt_learner.parameters()), "lr": settings.prompt_lr},
        ],
        betas=BETAS,
    )
    adapter = torch.optim.AdamW([{"params": list(model.adapter.parameters()),
                                  "lr": settings.adapter_lr}], betas=BETAS)
    return main, adapter


def _set_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


# --------------------------------------------------------------------------------------------
# state files
# --------------------------------------------------------------------------------------------

def trained_fingerprint(model) -> str:
    """sha256 over the trained modules' tensors (name, dtype, shape, bytes), in key order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if key.split(".", 1)[0] not in TRAINED_MODULES:
            continue
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FiloError(f"--resume: no training state {path}; run without --resume to start a "
                        f"new training (or point --save_dir at the interrupted run)")
    try:
        # tensors, dicts, lists, numbers and strings only: a crafted sidecar cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        raise FiloError(f"--resume: cannot read training state {path} ({type(err).__name__}): "
                        f"it is corrupt or holds more than tensors and plain values; delete it "
                        f"and train without --resume") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise FiloError(f"--resume: {path} is not a training state of this version; delete it "
                        f"and train without --resume")
    return state


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Runs both stages with per-epoch checkpoints; ``run()`` returns the paths and losses.

    ``on_epoch(record)`` (optional) is called after each epoch has been saved.
    """

    def __init__(self, settings: TrainSettings,
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> None:
        settings.validate()
        self.settings = settings.resolved()
        self.on_epoch = on_epoch
        s = self.settings
        self.device = resolve_device(s.device)
        if s.amp and self.device.type != "cuda":
            raise FiloError("--amp needs a CUDA device; drop --amp or use --device cuda")
        self.ckpt_path, self.state_path, self.log_path = output_paths(s.save_dir, s.dataset)
        self.samples = load_training_samples(s)
        self.prompts = load_prompts(s)
        check_prompt_classes(self.prompts, self.samples)
        self.model = build_training_model(s, self.prompts).to(self.device)
        self.opt_main, self.opt_adapter = make_optimizers(self.model, s)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s.amp)  # --amp: CUDA only
        self.done = {1: 0, 2: 0}  # completed epochs per stage
        self.history: list[EpochRecord] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    # ---- resume ----------------------------------------------------------------------------
    def _resume(self) -> None:
        from filo.checkpoint import load_filo_checkpoint

        s = self.settings
        state = read_state(self.state_path)
        saved = state["settings"]
        for key in RESUME_FIXED:
            now = s.to_json()[key]
            if saved.get(key) != now:
                raise FiloError(f"--resume: {key} was {saved.get(key)!r} in the interrupted run "
                                f"({self.state_path}) but is {now!r} now; use the same value")
        if not self.ckpt_path.is_file():
            raise FiloError(f"--resume: checkpoint {self.ckpt_path} is missing next to "
                            f"{self.state_path}; train without --resume")
        report = load_filo_checkpoint(self.ckpt_path, self.model)
        if not report.clean:
            raise FiloError(f"--resume: {self.ckpt_path} does not match the model "
                            f"({report.summary()}); train without --resume")
        if trained_fingerprint(self.model) != state["fingerprint"]:
            raise FiloError(f"--resume: {self.ckpt_path} and {self.state_path} are from different "
                            f"epochs (the run stopped while saving); train without --resume")
        self.opt_main.load_state_dict(state["optimizer_main"])
        self.opt_adapter.load_state_dict(state["optimizer_adapter"])
        _set_lrs(self.opt_main, [s.lr, s.lr, s.prompt_lr, s.prompt_lr])
        _set_lrs(self.opt_adapter, [s.adapter_lr])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.done = {1: int(state["done"]["1"]), 2: int(state["done"]["2"])}
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.started = state.get("started", self.started)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.done[2] > 0 and s.epochs > self.done[1]:
            raise FiloError(f"--resume: the interrupted run finished stage 1 after {self.done[1]} "
                            f"epoch(s) and started adapter training; stage 1 cannot be extended "
                            f"to {s.epochs} epochs now; use --epochs {self.done[1]} or start over")
        for name in ("epochs", "adapter_epochs"):
            if saved.get(name) != getattr(s, name):
                logger.info("resume: %s %s -> %s", name, saved.get(name), getattr(s, name))
        logger.info("resumed from %s: stage 1 %d/%d, stage 2 %d/%d epochs done", self.state_path,
                    self.done[1], s.epochs, self.done[2], s.adapter_epochs)

    # ---- saving ----------------------------------------------------------------------------
    def _save(self, finished: bool) -> None:
        from filo.checkpoint import save_filo_checkpoint

        save_filo_checkpoint(self.ckpt_path, self.model)
        state = {
            "version": STATE_VERSION,
            "settings": self.settings.to_json(),
            "done": {"1": self.done[1], "2": self.done[2]},
            "optimizer_main": self.opt_main.state_dict(),
            "optimizer_adapter": self.opt_adapter.state_dict(),
            "scaler": self.scaler.state_dict() if self.settings.amp else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": [asdict(r) for r in self.history],
            "fingerprint": trained_fingerprint(self.model),
            "started": self.started,
        }
        atomic_torch_save(state, self.state_path)
        self._write_log(finished)

    def _write_log(self, finished: bool) -> None:
        s = self.settings
        classes = sorted({x.cls_name for x in self.samples})
        log = {
            "checkpoint": str(self.ckpt_path),
            "state": str(self.state_path),
            "finished": finished,
            "started": self.started,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": s.to_json(),
            "model": self.model.config.to_dict(),
            "optimizer": {"type": "AdamW", "betas": list(BETAS),
                          "stage1_lr": {"decoder_linear": s.lr, "decoder_cov": s.lr,
                                        "prompt_learners": s.prompt_lr},
                          "stage2_lr": {"adapter": s.adapter_lr}},
            "data": {"split": "test", "n_images": len(self.samples),
                     "n_anomalous": sum(x.anomaly for x in self.samples), "classes": classes,
                     "prompts": self.prompts.source},
            "epochs_done": {"stage1": self.done[1], "stage2": self.done[2]},
            "history": [asdict(r) for r in self.history],
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "device": str(self.device)},
        }
        atomic_write_text(self.log_path, json.dumps(log, indent=2) + "\n")

    # ---- epochs ----------------------------------------------------------------------------
    def _loader(self, stage: int, epoch: int) -> DataLoader:
        s = self.settings
        plan = epoch_plan(self.samples, epoch_generator(s.seed, stage, epoch), s.mosaic_prob)
        ds = TrainDataset(self.samples, s.data_path, s.image_size, plan)
        return DataLoader(ds, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers,
                          collate_fn=train_collate, pin_memory=self.device.type == "cuda")

    def _autocast(self):
        if self.settings.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _run_epoch(self, stage: int, epoch: int, total: int) -> EpochRecord:
        model, s = self.model, self.settings
        modules = STAGE1_MODULES if stage == 1 else STAGE2_MODULES
        optimizer = self.opt_main if stage == 1 else self.opt_adapter
        params = set_trainable(model, modules)
        model.train()
        model.clip_model.eval()
        t0 = time.perf_counter()
        losses: list[float] = []
        label = "stage 1 (heads+prompts)" if stage == 1 else "stage 2 (adapter)"
        bar = tqdm(self._loader(stage, epoch), desc=f"{label} epoch {epoch + 1}/{total}",
                   unit="batch", disable=not s.progress, dynamic_ncols=True)
        for batch in bar:
            images = batch["image"].to(self.device, non_blocking=True)
            with self._autocast():
                if stage == 1:
                    probs = stage1_forward(model, images, batch["cls_name"])
                    loss = segmentation_loss(probs.float(), batch["mask"].to(self.device))
                else:
                    cos = stage2_cosines(model, images, batch["cls_name"])
                    loss = adapter_loss(cos.float(), batch["label"].to(self.device))
            if not torch.isfinite(loss):
                raise FiloError(f"{label} epoch {epoch + 1}: the loss became {loss.item()}; "
                                f"lower the learning rates (or drop --amp) and start over")
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
        bar.close()
        for p in params:
            p.grad = None
        mean = sum(losses) / len(losses) if losses else math.nan
        return EpochRecord(stage, epoch + 1, mean, len(losses), time.perf_counter() - t0)

    def run(self) -> TrainResult:
        s = self.settings
        if s.resume:
            self._resume()
        else:
            if self.state_path.exists():
                logger.warning("starting a new training: %s and %s will be overwritten "
                               "(use --resume to continue them)", self.ckpt_path, self.state_path)
        plan = ((1, s.epochs), (2, s.adapter_epochs))
        saved_any = False
        for stage, total in plan:
            while self.done[stage] < total:
                record = self._run_epoch(stage, self.done[stage], total)
                self.done[stage] += 1
                self.history.append(record)
                finished = self.done[1] >= s.epochs and self.done[2] >= s.adapter_epochs
                self._save(finished=finished)
                saved_any = True
                logger.info("stage %d epoch %d/%d: loss %.4f (%d steps, %.1fs)", stage,
                            record.epoch, total, record.loss, record.steps, record.seconds)
                print(f"[train] stage {stage} epoch {record.epoch}/{total}: loss "
                      f"{record.loss:.4f}; saved {self.ckpt_path}")
                if self.on_epoch is not None:
                    self.on_epoch(record)
        if not saved_any:
            if not s.resume:
                self._save(finished=True)  # 0 epochs: still write the (untrained) model
            else:
                self._write_log(finished=True)
                print(f"[train] nothing left to do: {self.ckpt_path} already has "
                      f"{self.done[1]} + {self.done[2]} epochs")
        return TrainResult(self.ckpt_path, self.state_path, self.log_path, list(self.history))


def train(settings: TrainSettings, **kwargs) -> TrainResult:
    """Train FiLo with ``settings`` (see :class:`TrainSettings`); returns output paths and losses."""
    return Trainer(settings, **kwargs).run()
