"""Per-image predictions on disk, so a long run never loses finished work.

Entries live in ``{directory}/{settings key}/{image path relative to the dataset root}.npz`` and
hold the anomaly map (float32, evaluation size), the image score, the label, the ground-truth
mask (bit-packed) and a small JSON of extras (detector boxes, position). The settings key is a
hash of everything that changes the predictions (checkpoints, thresholds, prompts, image size,
switches, the dataset root), not of batch size, workers or device; each entry also records the
size and modification time of its image and mask, so an edited input is recomputed. Every write goes to a temporary file in the
same directory and is renamed into place, so a kill never leaves a half-written entry; an
unreadable entry is treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from filo.fileio import atomic_write, atomic_write_text, output_file


@dataclass
class Prediction:
    """What the model said about one image, plus its ground truth."""

    img_path: str
    cls_name: str
    label: int
    image_score: float
    anomaly_map: np.ndarray  # float32 [S, S]
    mask: np.ndarray  # bool [S, S]
    extras: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None  # identity of the input files (input_identity)


def input_identity(root: str | os.PathLike, img_path: str, mask_path: str = "") -> dict[str, Any]:
    """What identifies an image and its mask on disk: size and modification time of each file
    (a changed file gives another identity, so its prediction is recomputed)."""

    def ident(rel: str) -> list[int] | None:
        if not rel:
            return None
        try:
            st = (Path(root) / rel).stat()
        except OSError:
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    return {"img": ident(img_path), "mask": ident(mask_path)}


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of the settings that change predictions."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Identify a (possibly multi-GB) file cheaply: absolute path, size and mtime."""
    if not path:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p)}
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_digest(path: str | os.PathLike | None) -> str | None:
    """Content hash (first 16 hex digits of sha256) of a small file such as a prompt table."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return str(path)


class PredictionCache:
    """Atomic, resumable per-image storage of predictions for one set of settings."""

    def __init__(self, directory: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.key = settings_key(settings)
        self.dir = Path(directory) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "settings.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps(settings, indent=1, sort_keys=True, default=str))

    def path_for(self, img_path: str) -> Path:
        """``{dir}/{image path}.npz``; always inside ``dir`` (images listed outside the dataset
        root go to ``_outside/<hash>/``, symbolic links out of the folder are refused)."""
        return output_file(self.dir, img_path, ".npz", replace_suffix=False)

    def has(self, img_path: str, source: dict[str, Any] | None = None) -> bool:
        """An entry exists (and, with ``source``, was computed from these same input files)."""
        path = self.path_for(img_path)
        if not path.is_file():
            return False
        if source is None:
            return True
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return False  # unreadable: recomputed (and overwritten)
        return meta.get("source") == source

    def put(self, pred: Prediction) -> None:
        target = self.path_for(pred.img_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = np.asarray(pred.mask, dtype=bool)
        meta = json.dumps({"img_path": pred.img_path, "cls_name": pred.cls_name,
                           "extras": pred.extras, "source": pred.source},
                          default=_jsonable).encode()
        atomic_write(target, lambda fh: np.savez(
            fh,
            anomaly_map=np.asarray(pred.anomaly_map, dtype=np.float32),
            mask_bits=np.packbits(mask.ravel()),
            mask_shape=np.asarray(mask.shape, dtype=np.int64),
            image_score=np.float64(pred.image_score),
            label=np.int64(pred.label),
            meta=np.frombuffer(meta, dtype=np.uint8),
        ))

    def get(self, img_path: str) -> Prediction | None:
        """The cached prediction, or ``None`` when absent or unreadable (then it is removed)."""
        path = self.path_for(img_path)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                shape = tuple(int(v) for v in z["mask_shape"])
                mask = np.unpackbits(z["mask_bits"], count=int(np.prod(shape))).reshape(shape)
                meta = json.loads(bytes(z["meta"]).decode())
                return Prediction(
                    img_path=meta["img_path"], cls_name=meta["cls_name"],
                    label=int(z["label"]), image_score=float(z["image_score"]),
                    anomaly_map=z["anomaly_map"], mask=mask.astype(bool),
                    extras=meta.get("extras", {}), source=meta.get("source"),
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            path.unlink(missing_ok=True)
            return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
