"""Build the transformers GroundingDINO, load converted weights, load the offline tokenizer."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from filo.detector.config import DetectorArch
from filo.detector.convert import (
    ConversionReport,
    hf_only_rule,
    installed_naming,
    read_checkpoint,
    to_naming,
)
from filo.errors import FiloError

log = logging.getLogger(__name__)

BERT_ENV = "FILO_BERT_LOCAL"
# the project's third_party/ folder (not the working directory's)
DEFAULT_BERT_DIR = Path(__file__).resolve().parents[2] / "third_party" / "bert-base-uncased"


def build_model(arch: DetectorArch):
    """An (untrained) ``GroundingDinoForObjectDetection`` of the given architecture, in eval mode."""
    from transformers import GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection(arch.to_hf_config())
    return model.eval()


@dataclass
class LoadReport:
    """Result of putting a converted state dict into the model."""

    missing: list[str] = field(default_factory=list)  # model keys left unfilled (harmful)
    harmless_missing: dict[str, str] = field(default_factory=dict)  # key -> reason
    unexpected: list[str] = field(default_factory=list)
    naming: str = ""  # installed transformers naming ("v5" or "v4"), see filo.detector.convert
    conversion: ConversionReport | None = None


def load_state_dict_checked(model, state_dict: dict[str, torch.Tensor],
                            source: str = "checkpoint") -> LoadReport:
    """Load a CANONICAL (converted) state dict into ``model``, renamed for the installed
    transformers; any key mismatch that is not a listed harmless one is a FiloError."""
    expected = model.state_dict()
    naming = installed_naming(expected)
    state_dict = to_naming(state_dict, naming)
    report = LoadReport(naming=naming)
    fill: list[str] = []
    for key in expected:
        if key not in state_dict:
            rule = hf_only_rule(key, naming)
            if rule is None:
                report.missing.append(key)
            else:
                report.harmless_missing[key] = rule[0]
                if rule[1] == "identity":
                    fill.append(key)
    report.unexpected = [k for k in state_dict if k not in expected]
    bad_shapes = [k for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if report.missing or report.unexpected or bad_shapes:
        import transformers

        first = (report.missing or report.unexpected or bad_shapes)[0]
        raise FiloError(
            f"{source}: weights do not fit the GroundingDINO model ({len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(bad_shapes)} wrong shape; first: {first}; "
            f"transformers {transformers.__version__}, naming {naming}); is the checkpoint a "
            "Swin-T GroundingDINO?"
        )
    model.load_state_dict(state_dict, strict=False)
    # parameters transformers keeps but the original lacks: fill them with identity values
    with torch.no_grad():
        for key in fill:
            model.get_parameter(key).fill_(1.0 if key.endswith("weight") else 0.0)
    return report


def load_detector_model(checkpoint: str | Path, device: str | torch.device = "cpu",
                        bert_dir: str | Path | None = None):
    """Read an original-layout or converted checkpoint and return ``(model, LoadReport)``."""
    loaded = read_checkpoint(checkpoint, bert_config=read_bert_config(bert_dir))
    model = build_model(loaded.arch)
    report = load_state_dict_checked(model, loaded.state_dict, source=str(checkpoint))
    report.conversion = loaded.report
    return model.to(device).eval(), report


def read_bert_config(bert_dir: str | Path | None = None) -> dict | None:
    """config.json of the local BERT directory, if there is one (it is optional)."""
    path = _bert_dir_or_none(bert_dir)
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise FiloError(f"{path / 'config.json'}: not valid JSON; delete it (optional) or "
                        "replace it with bert-base-uncased's config.json") from None


def _bert_dir_or_none(bert_dir: str | Path | None) -> Path | None:
    if bert_dir is not None:
        return Path(bert_dir)
    env = os.environ.get(BERT_ENV)
    if env:
        return Path(env)
    return DEFAULT_BERT_DIR if DEFAULT_BERT_DIR.is_dir() else None


def resolve_bert_dir(bert_dir: str | Path | None = None) -> Path:
    """The local bert-base-uncased directory: explicit, else $FILO_BERT_LOCAL, else the default."""
    if bert_dir is not None:
        path, origin = Path(bert_dir), "--bert_dir"
    elif os.environ.get(BERT_ENV):
        path, origin = Path(os.environ[BERT_ENV]), f"${BERT_ENV}"
    else:
        path, origin = DEFAULT_BERT_DIR, "default location"
    if not (path / "vocab.txt").is_file():
        raise FiloError(
            f"{path} ({origin}): no vocab.txt; put the bert-base-uncased vocab.txt (config.json "
            f"optional) in {DEFAULT_BERT_DIR}/ or point ${BERT_ENV} at a directory holding it"
        )
    return path


def load_tokenizer(bert_dir: str | Path | None = None):
    """bert-base-uncased tokenizer from a local directory, never from the network."""
    from transformers import BertTokenizerFast

    path = resolve_bert_dir(bert_dir)
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True,
                                                      do_lower_case=True)
    except (OSError, ValueError) as err:
        raise FiloError(f"{path}: cannot build the BERT tokenizer from vocab.txt ({err}); put "
                        "the bert-base-uncased vocab.txt there") from None
    probe = tokenizer("defect")["input_ids"]
    if tokenizer.unk_token_id in probe or len(probe) < 3:
        raise FiloError(f"{path / 'vocab.txt'}: does not tokenize plain English words; put the "
                        "bert-base-uncased vocab.txt there")
    return tokenizer
