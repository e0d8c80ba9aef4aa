"""The JSON record beside each trained checkpoint: how to rebuild the model without unpickling
anything (docs/design.md §17)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filo.baselines.config import CHECKPOINT_NAME, RECORD_NAME
from filo.errors import FiloError
from filo.fileio import atomic_write_text

FORMAT = 1


@dataclass
class BaselineRecord:
    model: str  # anomalib snake_case name
    class_name: str
    init_args: dict[str, Any]  # plain JSON constructor arguments (pre_trained always False)
    input_size: int | None  # the pre-processor's square resize
    checkpoint: str = CHECKPOINT_NAME  # relative to the record's folder
    finished: bool = False
    epochs: int | None = None
    train_images: int = 0
    train_seconds: float = 0.0
    weights: str | None = None  # backbone weights file loaded before training
    weights_sha256: str | None = None
    anomalib_version: str = ""
    dataset: str = ""
    data_path: str = ""
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / RECORD_NAME
        atomic_write_text(path, json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> BaselineRecord:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')}")
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError) as err:
            raise FiloError(f"baseline record {path} cannot be read ({type(err).__name__}); "
                            f"retrain with `python -m filo.baselines fit --out "
                            f"{Path(path).parent.parent}`") from None


def find_records(target: Path) -> dict[str, tuple[BaselineRecord, Path]]:
    """``--baseline`` -> {class: (record, checkpoint path)}: a folder of class folders, one
    class folder, or one checkpoint file with its record beside it."""
    target = Path(target)
    if target.is_file():
        rec_path = target.parent / RECORD_NAME
        if not rec_path.is_file():
            raise FiloError(f"--baseline {target}: no {RECORD_NAME} beside it; pass a checkpoint "
                            f"written by `python -m filo.baselines fit`")
        rec = BaselineRecord.read(rec_path)
        return {rec.class_name: (rec, target)}
    if not target.is_dir():
        raise FiloError(f"--baseline {target} does not exist; train with `python -m "
                        f"filo.baselines fit --out {target}`")
    paths = [target / RECORD_NAME] if (target / RECORD_NAME).is_file() else \
        sorted(target.glob(f"*/{RECORD_NAME}"))
    out = {}
    for rec_path in paths:
        rec = BaselineRecord.read(rec_path)
        ckpt = rec_path.parent / rec.checkpoint
        if rec.finished and ckpt.is_file():
            out[rec.class_name] = (rec, ckpt)
    if not out:
        raise FiloError(f"--baseline {target} holds no finished model (<class>/{RECORD_NAME} "
                        f"and {CHECKPOINT_NAME}); train with `python -m filo.baselines fit "
                        f"--out {target}`")
    return out


def folder_key(target: Path) -> str:
    """Content identity of ``--baseline`` (records and checkpoint sizes/times): cache key."""
    h = hashlib.sha256()
    for cls_name, (rec, ckpt) in sorted(find_records(target).items()):
        h.update(cls_name.encode())
        h.update(json.dumps(asdict(rec), sort_keys=True).encode())
        st = ckpt.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
