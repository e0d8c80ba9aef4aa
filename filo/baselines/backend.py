"""Everything that touches anomalib and Lightning (the one module that imports them).

- :func:`model_names` / :func:`model_class`: the image models anomalib provides;
- :class:`SampleDataset` / :class:`SampleDataModule`: filo's :class:`~filo.data.records.Sample`
  lists as an anomalib dataset / datamodule (no anomalib downloader, any layout filo reads);
- :func:`build_model`: a model from its name and plain init arguments, never downloading
  (``pre_trained=False``; a local backbone file via :func:`load_backbone_weights`);
- :func:`fit_one`: anomalib's Engine on one class, checkpoints where the caller says;
- :func:`load_trained`: a model rebuilt from its init arguments, then only the checkpoint's
  state dict read with ``torch.load(weights_only=True)`` (docs/design.md §17).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from filo.errors import FiloError

INSTALL_HINT = "pip install 'filo[anomalib]'"

try:  # the optional dependency: one clear line without it
    import anomalib
    import anomalib.models as _models
    from anomalib.data.datamodules.base.image import AnomalibDataModule
    from anomalib.data.datasets.base.image import AnomalibDataset
    from anomalib.utils.path import convert_to_snake_case
    from pandas import DataFrame
except ImportError as _err:  # pragma: no cover - exercised without anomalib
    anomalib = None
    _IMPORT_ERROR = _err
    AnomalibDataModule = AnomalibDataset = object  # type: ignore[assignment,misc]
else:
    _IMPORT_ERROR = None

# models that need a data set or weights anomalib would download: the init argument that must
# name a local folder instead
NEEDS_LOCAL = {
    "efficient_ad": ("imagenet_dir", "a local ImageNet-like image folder (anomalib's imagenette)"),
    "draem": ("dtd_dir", "a local texture image folder (anomalib uses DTD)"),
    "glass": ("anomaly_source_path", "a local texture image folder (anomalib uses DTD)"),
}
# video, foundation-model and vision-language models: not trained baselines of this command
EXCLUDED = {"ai_vad", "fuvas", "vlm_ad", "winclip"}


def _by_name() -> dict[str, type]:
    """snake_case name (the model's anomalib package: ``efficient_ad``) -> model class."""
    from anomalib.models import image

    out = {}
    for cls_name in getattr(image, "__all__", []):
        cls = getattr(image, cls_name, None)
        if inspect.isclass(cls) and issubclass(cls, _models.AnomalibModule):
            parts = cls.__module__.split(".")
            name = parts[3] if len(parts) > 3 else convert_to_snake_case(cls_name)
            if name not in EXCLUDED:
                out[name] = cls
    return out


def require() -> None:
    """One line when anomalib is missing."""
    if anomalib is None:
        raise FiloError(f"trained baselines need anomalib ({_IMPORT_ERROR}): {INSTALL_HINT}")


def version() -> str:
    require()
    return str(anomalib.__version__)


def model_names() -> list[str]:
    """snake_case names of anomalib's image models (``padim``, ``fastflow``, ...)."""
    require()
    return sorted(_by_name())


def model_class(name: str):
    require()
    by_name = _by_name()
    if name not in by_name:
        raise FiloError(f"--model {name!r}: not an anomalib image model this command trains; "
                        f"see `python -m filo.baselines --list`")
    return by_name[name]


def init_parameters(name: str) -> dict[str, Any]:
    """The model's constructor arguments and defaults (the ``--model_args`` it takes)."""
    out = {}
    for p in inspect.signature(model_class(name).__init__).parameters.values():
        if p.name in ("self", "pre_processor", "post_processor", "evaluator", "visualizer") or \
                p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        out[p.name] = getattr(default, "value", default)  # enums as their plain values
    return out


@contextlib.contextmanager
def no_downloads():
    """Any anomalib download attempt becomes one :class:`FiloError` line (filo runs offline)."""
    def refuse(directory, info, *_a, **_k):
        raise FiloError(f"anomalib wants to download {getattr(info, 'name', info)} into "
                        f"{directory}; filo runs offline: put the files there yourself or pass "
                        f"the local folder with --model_args (see `python -m filo.baselines "
                        f"--list`)")

    patched = []
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("anomalib") and hasattr(mod, "download_and_extract"):
            patched.append((mod, mod.download_and_extract))
            mod.download_and_extract = refuse
    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for mod, fn in patched:
            mod.download_and_extract = fn
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- data ------------------------------------------------------------------------------------

def _frame(samples: Sequence, root: Path, split: str):
    rows = {"image_path": [], "mask_path": [], "label_index": [], "label": [], "split": []}
    for s in samples:
        rows["image_path"].append(str(Path(root) / s.img_path))
        rows["mask_path"].append(str(Path(root) / s.mask_path) if s.mask_path else "")
        rows["label_index"].append(int(s.anomaly))
        rows["label"].append("abnormal" if s.anomaly else "normal")
        rows["split"].append(split)
    df = DataFrame(rows)
    df["label_index"] = df["label_index"].astype("Int64")
    anomalous = [s for s in samples if s.anomaly]
    segmentation = bool(anomalous) and all(s.mask_path for s in anomalous)
    df.attrs["task"] = "segmentation" if segmentation else "classification"
    return df


class SampleDataset(AnomalibDataset):
    """filo samples of one split as an anomalib dataset (images read by anomalib's reader)."""

    def __init__(self, samples: Sequence, root: Path, split: str, category: str,
                 augmentations=None) -> None:
        super().__init__(augmentations=augmentations)
        self.category = category
        self.samples = _frame(samples, root, split)

    @property
    def name(self) -> str:
        return "filo"


class SampleDataModule(AnomalibDataModule):
    """Train and test samples of one class; validation = the test split (anomalib's MVTec
    default, so the post-processor's threshold and normalisation are those anomalib uses)."""

    def __init__(self, root: Path, category: str, train: Sequence, test: Sequence, *,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(train_batch_size=batch_size, eval_batch_size=batch_size,
                         num_workers=num_workers, val_split_mode="same_as_test",
                         test_split_mode="from_dir", seed=seed)
        self.root = Path(root)
        self.category = category
        self._train, self._test = list(train), list(test)

    @property
    def name(self) -> str:
        return "filo"

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = SampleDataset(self._train, self.root, "train", self.category)
        self.test_data = SampleDataset(self._test, self.root, "test", self.category)


# ---- models ----------------------------------------------------------------------------------

def build_model(name: str, init_args: dict[str, Any], input_size: int | None, *,
                training: bool = True):
    """The anomalib model ``name`` from plain init arguments; ``pre_trained`` forced off (no
    download); ``input_size``: the pre-processor's square resize (None: the model's default).
    ``training``: also require the local folders the model's training reads."""
    cls = model_class(name)
    params = init_parameters(name)
    unknown = [k for k in init_args if k not in params]
    if unknown:
        raise FiloError(f"--model_args {unknown[0]}: {name} takes "
                        f"{', '.join(sorted(params)) or 'no arguments'}")
    kwargs = dict(init_args)
    if "visualizer" in inspect.signature(cls.__init__).parameters:
        kwargs["visualizer"] = False  # filo draws its own gallery; no image files from anomalib
    if "pre_trained" in params:
        kwargs["pre_trained"] = False
    if training and name in NEEDS_LOCAL:
        arg, what = NEEDS_LOCAL[name]
        value = kwargs.get(arg)
        if not value or not Path(value).is_dir():
            raise FiloError(f"--model {name} needs --model_args {arg}=DIR, {what} (filo never "
                            f"downloads)")
    if input_size is not None:
        try:
            kwargs["pre_processor"] = cls.configure_pre_processor(
                image_size=(int(input_size), int(input_size)))
        except TypeError:
            raise FiloError(f"--input_size: {name} sets its own input size; drop the flag") \
                from None
    with no_downloads():
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise FiloError(f"--model {name} with {init_args}: {err}") from None


def model_input_size(model) -> int | None:
    """The square size the model's pre-processor resizes to (None if it does not)."""
    from anomalib.data.transforms.utils import extract_transforms_by_type
    from torchvision.transforms.v2 import Resize

    transform = getattr(getattr(model, "pre_processor", None), "transform", None)
    resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
    if not resizes:
        return None
    size = resizes[0].size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _timm_backbones(model) -> list[torch.nn.Module]:
    """The outermost timm networks inside ``model`` (their parameters are the backbone's)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, mod in model.named_modules():
        if hasattr(mod, "feature_info") and hasattr(mod, "state_dict") and \
                not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, mod))
    return [m for _, m in found]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict (``weights_only=True``; ``state_dict`` / ``model``
    wrappers and ``module.`` prefixes accepted)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line
        raise FiloError(f"--weights {path} cannot be read as a PyTorch state dict "
                        f"({type(err).__name__}); pass a torchvision/timm .pth file") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FiloError(f"--weights {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}


def load_backbone_weights(model, path: Path) -> int:
    """Load a local backbone weights file into every timm backbone of ``model``; returns the
    number of tensors loaded. Every backbone tensor must be in the file with its shape."""
    state = read_state_dict(Path(path))
    targets = _timm_backbones(model)
    if not targets:
        raise FiloError(f"--weights {path}: this model has no timm backbone to load it into")
    n = 0
    for net in targets:
        own = net.state_dict()
        missing = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
        if missing:
            raise FiloError(f"--weights {path} does not fit the backbone ({len(missing)} of "
                            f"{len(own)} tensors missing or of another shape, first: "
                            f"{missing[0]}); pass the weights of the --backbone architecture")
        net.load_state_dict({k: state[k] for k in own}, strict=True)
        n += len(own)
    return n


def engine_args(device: str | None, epochs: int | None) -> dict[str, Any]:
    dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args: dict[str, Any] = {"accelerator": "gpu" if dev.startswith("cuda") else "cpu",
                            "devices": [int(dev.split(":")[1])] if dev.startswith("cuda:") else 1,
                            "logger": False, "enable_progress_bar": False,
                            "enable_model_summary": False}
    if epochs is not None:
        args["max_epochs"] = int(epochs)
    return args


def fit_one(model, datamodule, out_dir: Path, *, device: str | None, epochs: int | None,
            resume: Path | None = None):
    """anomalib's Engine.fit on one class; the last checkpoint is ``out_dir/last.ckpt``."""
    import shutil
    import tempfile

    from anomalib.callbacks.checkpoint import ModelCheckpoint  # (anomalib's own subclass)
    from anomalib.engine import Engine

    ckpt = ModelCheckpoint(dirpath=str(out_dir), filename="model", save_last=True,
                           save_top_k=0, every_n_epochs=1)
    work = tempfile.mkdtemp(prefix="filo_anomalib_")  # anomalib's workspace: nothing kept
    try:
        engine = Engine(callbacks=[ckpt], default_root_dir=work, **engine_args(device, epochs))
        with no_downloads():
            engine.fit(model=model, datamodule=datamodule,
                       ckpt_path=str(resume) if resume is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return engine


def checkpoint_state(path: Path, model) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (anomalib's enums allow-listed)."""
    from anomalib.utils.serialization import anomalib_safe_globals

    try:
        with anomalib_safe_globals(extra=list(model.checkpoint_safe_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise FiloError(f"checkpoint {path} cannot be read with weights_only=True "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); rebuild it "
                        f"with `python -m filo.baselines fit`") from None


def load_trained(name: str, init_args: dict[str, Any], input_size: int | None, ckpt: Path,
                 device: torch.device | str = "cpu"):
    """The trained model: rebuilt from its init arguments, the checkpoint's state dict loaded."""
    model = build_model(name, init_args, input_size, training=False)
    state = checkpoint_state(ckpt, model)
    try:
        model.load_state_dict(state["state_dict"], strict=True)
    except (KeyError, RuntimeError) as err:
        raise FiloError(f"checkpoint {ckpt} does not fit {name} with {init_args} "
                        f"({type(err).__name__}); was it written by `python -m filo.baselines "
                        f"fit` with these settings?") from None
    with contextlib.suppress(AttributeError):
        model.on_load_checkpoint(state)
    return model.to(device).eval()


def infer(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly maps [B, h, w], image scores [B]) of anomalib's forward: pre-processor, model,
    post-processor -- the values anomalib's predict writes."""
    out = model(images)
    amap = out.anomaly_map
    if amap.dim() == 4:
        amap = amap[:, 0]
    return amap.float(), out.pred_score.reshape(-1).float()


def resize_transform(size: int):
    """anomalib's default pre-processor resize (what the datamodule applies per image)."""
    from torchvision.transforms.v2 import Resize

    return Resize((size, size), antialias=True)


def read_image_tensor(img) -> torch.Tensor:
    """A PIL image as anomalib's reader makes it: RGB float32 in [0, 1], [3, H, W]."""
    from torchvision.transforms.v2.functional import to_dtype, to_image

    return to_dtype(to_image(img.convert("RGB")), torch.float32, scale=True)
