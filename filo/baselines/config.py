"""Settings of ``python -m filo.baselines fit`` and the named presets (docs/design.md §17)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filo.errors import FiloError
from filo.settings import at_least, setting

# named reproductions: model, backbone, epochs and init arguments
PRESETS: dict[str, dict[str, Any]] = {
    # FastFlow, ResNet-18, 50 epochs, 256 px (the survey's reproduction; anomalib's defaults)
    "fastflow_survey": {"model": "fastflow", "backbone": "resnet18", "epochs": 50,
                        "model_args": {"flow_steps": 8, "hidden_ratio": 1.0,
                                       "conv3x3_only": False}},
    # EfficientAD-S (anomalib's EfficientAd with model_size=small); needs a local imagenet_dir
    "efficient_ad_s": {"model": "efficient_ad", "epochs": None,
                       "model_args": {"model_size": "small"}},
}

RECORD_NAME = "filo_baseline.json"  # beside each checkpoint: how to rebuild the model
CHECKPOINT_NAME = "last.ckpt"


@dataclass
class FitConfig:
    """What ``fit`` trains (the data flags are :class:`~filo.evaluation.runner.RunConfig`'s)."""

    model: str | None = setting(None, "anomalib image model (see --list): padim, patchcore, "
                                "fastflow, stfpm, ...", default_help="the preset's")
    preset: str | None = setting(None, "named reproduction: model, backbone, epochs and model "
                                 "arguments", choices=tuple(PRESETS))
    backbone: str | None = setting(None, "timm backbone name (the model's backbone argument)",
                                   default_help="the model's default")
    weights: Path | None = setting(
        None, "local backbone weights file (torchvision/timm state dict) loaded before "
        "training; nothing is downloaded", default_help="random initialisation")
    out: Path | None = setting(None, "output folder: one sub-folder per class with "
                               f"{CHECKPOINT_NAME} and {RECORD_NAME}")
    epochs: int | None = setting(None, "training epochs", check=at_least(1),
                                 default_help="the preset's, else the model's (anomalib)")
    input_size: int | None = setting(None, "square input size of the model's pre-processor",
                                     check=at_least(16), default_help="the model's (256)")
    device: str | None = setting(None, "cpu, cuda or cuda:N", default_help="cuda if available")
    seed: int = setting(0, "random seed (weights, sampling)")
    resume: bool = setting(False, "continue a class from its last.ckpt (Lightning resume); "
                           "classes already finished are skipped either way")
    model_args: dict[str, Any] = field(default_factory=dict)  # --model_args key=value

    def resolved(self) -> FitConfig:
        """The preset applied under the explicit flags."""
        from dataclasses import replace

        out = replace(self, model_args=dict(self.model_args))
        if self.preset is not None:
            p = PRESETS[self.preset]
            if out.model is not None and out.model != p["model"]:
                raise FiloError(f"--preset {self.preset} trains {p['model']}, not --model "
                                f"{out.model}; drop one of them")
            out.model = p["model"]
            out.backbone = out.backbone or p.get("backbone")
            out.epochs = out.epochs if out.epochs is not None else p.get("epochs")
            out.model_args = {**p.get("model_args", {}), **out.model_args}
        if out.model is None:
            raise FiloError("give --model NAME (see --list) or --preset")
        if out.out is None:
            raise FiloError("--out DIR is required: where the checkpoints go")
        return out


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings -> init arguments (values read as YAML scalars / lists)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FiloError(f"--model_args {item!r}: write key=value (e.g. n_features=100)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise FiloError(f"--model_args {item!r}: the value is not a number, word or "
                            f"[list]") from None
    return out
