"""Memory banks on disk: ``{directory}/{class}/bank.npy`` (float32 rows) and ``meta.json``.

``meta.json`` (:class:`BankMeta`) records every setting that produced the rows, so a run that
scores with other settings is stopped with the field that differs (:func:`load_bank` with
``expect``). Both files are written atomically, the bank first and the meta last (an existing
``meta.json`` is removed before the new bank is written), so a folder with a ``meta.json``
always holds a complete bank; :func:`load_bank` also checks that the two agree.

``meta.json`` also carries ``checksum``: sha256 over the bank's rows and every other meta field
(:func:`bank_checksum`). A bank whose rows or meta were changed after the build (an edited
``layers``, a ``bank.npy`` copied from another build) is refused in one line; a bank written
before checksums existed loads with one warning. The calibration values a run reads as numbers
are checked to be numbers when the meta is read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

import filo
from filo.errors import FiloError
from filo.fileio import atomic_save_npy, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["BANK_FILE", "BANK_FORMAT", "META_FILE", "BankMeta", "bank_dir",
           "list_bank_classes", "load_bank", "save_bank"]

BANK_FILE = "bank.npy"
META_FILE = "meta.json"
BANK_FORMAT = 1
BUILD_HINT = "build it with python -m filo.memory build"


@dataclass
class BankMeta:
    """Settings and provenance of one class's memory bank (stored as ``meta.json``)."""

    backbone: str = "wrn50"
    weights: str | None = None  # weight file path (None: the CLIP tower of a FiLo checkpoint)
    weights_sha256: str | None = None
    layers: list[str] = field(default_factory=lambda: ["layer2", "layer3"])
    patchsize: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    resize: int = 256
    imagesize: int = 224
    crop: bool = True
    coreset_percentage: float = 0.1
    coreset_seed: int = 0
    num_nn: int = 1
    n_images: int = 0
    n_patches: int = 0  # bank rows (save_bank sets it from the bank)
    grid: list[int] = field(default_factory=lambda: [28, 28])  # of one tile when tiled
    tile: int | None = None  # tiled bank: native-resolution tiles of this size (§13.2)
    tile_overlap: int = 0
    shots: int | None = None
    image_paths: list[str] = field(default_factory=list)
    filo_version: str = filo.__version__
    calibration: dict[str, Any] = field(default_factory=dict)  # thresholds, normal statistics
    extra: dict[str, Any] = field(default_factory=dict)
    bank_format: int = BANK_FORMAT
    checksum: str | None = None  # sha256 of rows + the other fields (bank_checksum)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "meta.json") -> BankMeta:
        known = {f.name for f in fields(cls)}
        required = known - {"calibration", "extra", "bank_format", "filo_version", "tile",
                             "tile_overlap", "checksum"}
        missing = sorted(required - set(d))
        if missing:
            raise FiloError(f"{source}: memory-bank meta lacks {', '.join(missing)}; the file "
                            f"is damaged or from another program; {BUILD_HINT}")
        unknown = sorted(set(d) - known)
        if unknown:
            logger.warning("%s: ignoring unknown meta field(s) %s (written by a newer filo?)",
                           source, ", ".join(unknown))
        meta = cls(**{k: v for k, v in d.items() if k in known})
        _check_values(meta, source)
        if int(meta.bank_format) > BANK_FORMAT:
            raise FiloError(f"{source}: bank format {meta.bank_format} is newer than this filo "
                            f"understands ({BANK_FORMAT}); update filo or rebuild the bank")
        return meta


# calibration entries read as numbers (top level and under "filo")
_CAL_NUMBERS = ("n_images", "image_threshold", "pixel_threshold", "image_quantile",
                "pixel_quantile", "image_mean", "image_std", "pixel_mean", "pixel_std")
_CAL_LISTS = ("image_scores",)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(meta: BankMeta, source: str) -> None:
    """One FiloError line for a meta value of the wrong type (a hand-edited file): sizes are
    positive integers, calibration statistics are numbers."""
    def bad(key: str, value: Any, want: str) -> FiloError:
        return FiloError(f"{source}: {key} is {value!r}, expected {want}; the file was edited "
                         f"or damaged; {BUILD_HINT}")

    for key in ("patchsize", "pretrain_dim", "target_dim", "resize", "imagesize", "num_nn",
                "n_images", "n_patches", "bank_format"):
        value = getattr(meta, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(key, value, "a non-negative integer")
    if not isinstance(meta.layers, list) or not all(isinstance(v, (str, int)) for v in meta.layers):
        raise bad("layers", meta.layers, "a list of layer names")
    if not isinstance(meta.grid, list) or len(meta.grid) != 2 or \
            not all(isinstance(v, int) and v > 0 for v in meta.grid):
        raise bad("grid", meta.grid, "two positive integers")
    if not isinstance(meta.calibration, dict):
        raise bad("calibration", meta.calibration, "an object")
    if not isinstance(meta.extra, dict):
        raise bad("extra", meta.extra, "an object")
    sections = [("calibration", meta.calibration)]
    if isinstance(meta.calibration.get("filo"), dict):
        sections.append(("calibration.filo", meta.calibration["filo"]))
    elif "filo" in meta.calibration:
        raise bad("calibration.filo", meta.calibration["filo"], "an object")
    for prefix, cal in sections:
        for key in _CAL_NUMBERS:
            if key in cal and not _is_number(cal[key]):
                raise bad(f"{prefix}.{key}", cal[key], "a number")
        for key in _CAL_LISTS:
            if key in cal and (not isinstance(cal[key], list)
                               or not all(_is_number(v) for v in cal[key])):
                shown = cal[key] if not isinstance(cal[key], list) else \
                    next(v for v in cal[key] if not _is_number(v))
                raise bad(f"{prefix}.{key}", shown, "a list of numbers")


def bank_checksum(bank: np.ndarray, meta: dict[str, Any]) -> str:
    """sha256 over the rows (float32, C order, with their shape) and the meta's fields other
    than ``checksum`` (canonical JSON)."""
    import hashlib

    arr = np.ascontiguousarray(bank, dtype=np.float32)
    h = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}:".encode())
    h.update(memoryview(arr).cast("B"))
    body = {k: v for k, v in _plain(meta).items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


_warned_unchecked: set[str] = set()


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples -> lists, paths -> str, numpy / torch scalars and arrays -> python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_class_name(cls_name: str) -> str:
    name = str(cls_name)
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
        raise FiloError(f"class name {cls_name!r} cannot be a memory-bank folder name")
    return name


def bank_dir(directory: str | os.PathLike, cls_name: str) -> Path:
    """``{directory}/{cls_name}``."""
    return Path(directory) / _check_class_name(cls_name)


def save_bank(directory: str | os.PathLike, cls_name: str, bank: np.ndarray | torch.Tensor,
              meta: BankMeta) -> Path:
    """Write ``bank.npy`` (float32) and ``meta.json`` of ``cls_name``; return the class folder.

    ``meta.n_patches`` is set from the bank's rows; the bank's columns must equal
    ``meta.target_dim``.
    """
    if isinstance(bank, torch.Tensor):
        bank = bank.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(bank, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"memory bank must be a [rows, dim] matrix, got shape {arr.shape}")
    if arr.shape[1] != int(meta.target_dim):
        raise ValueError(f"memory bank has {arr.shape[1]} columns, meta.target_dim is "
                         f"{meta.target_dim}")
    out = bank_dir(directory, cls_name)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    meta_path.unlink(missing_ok=True)  # the folder reads as "no bank" until both are written
    d = meta.to_dict()
    d["n_patches"] = int(arr.shape[0])
    meta.n_patches = int(arr.shape[0])
    d["checksum"] = meta.checksum = bank_checksum(arr, d)
    atomic_save_npy(out / BANK_FILE, arr)
    atomic_write_text(meta_path, json.dumps(d, indent=2) + "\n")
    return out


def load_bank(directory: str | os.PathLike, cls_name: str, expect: dict[str, Any] | None = None,
              *, mmap_mode: str | None = None) -> tuple[np.ndarray, BankMeta]:
    """Read ``cls_name``'s bank and meta; check they agree and, with ``expect``, the settings.

    ``expect`` maps :class:`BankMeta` field names to the values this run uses; the first
    field that differs stops with a one-line :class:`FiloError` giving both values and the fix.
    Every problem (missing folder or file, corrupt or truncated file, rows or dimension that
    disagree with the meta) is a one-line :class:`FiloError` naming the file.
    """
    folder = bank_dir(directory, cls_name)
    meta_path = folder / META_FILE
    bank_path = folder / BANK_FILE
    if not meta_path.is_file():
        where = "" if folder.is_dir() else f" ({folder} does not exist)"
        raise FiloError(f"no memory bank for class {cls_name}: {meta_path} not found{where}; "
                        f"{BUILD_HINT}")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FiloError(f"cannot read memory-bank meta {meta_path} ({type(err).__name__}): "
                        f"the file is corrupt or truncated; {BUILD_HINT}") from err
    if not isinstance(raw, dict):
        raise FiloError(f"memory-bank meta {meta_path} is not a JSON object; {BUILD_HINT}")
    try:
        meta = BankMeta.from_dict(raw, source=str(meta_path))
    except TypeError as err:  # pragma: no cover - from_dict filters fields; defensive
        raise FiloError(f"memory-bank meta {meta_path}: {err}; {BUILD_HINT}") from err

    if expect:
        known = {f.name for f in fields(BankMeta)}
        for key, want in expect.items():
            if key not in known:
                raise ValueError(f"load_bank: {key!r} is not a BankMeta field")
            have = getattr(meta, key)
            if _plain(have) != _plain(want):
                raise FiloError(
                    f"memory bank {meta_path} was built with {key}={_plain(have)!r} but this run "
                    f"uses {key}={_plain(want)!r}; rebuild the bank with {key}={_plain(want)!r} "
                    "or pass the matching setting")

    if not bank_path.is_file():
        raise FiloError(f"memory bank {bank_path} not found (meta.json is there); {BUILD_HINT}")
    try:
        bank = np.load(bank_path, allow_pickle=False, mmap_mode=mmap_mode)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, pickled: all a bad file
        raise FiloError(f"cannot read memory bank {bank_path} ({type(err).__name__}): the file "
                        f"is corrupt or truncated; {BUILD_HINT}") from err
    if bank.ndim != 2 or bank.dtype != np.float32:
        raise FiloError(f"memory bank {bank_path}: expected a float32 matrix, got {bank.dtype} "
                        f"of shape {bank.shape}; {BUILD_HINT}")
    if bank.shape[0] != int(meta.n_patches) or bank.shape[1] != int(meta.target_dim):
        raise FiloError(f"memory bank {bank_path} holds {bank.shape[0]} x {bank.shape[1]} but "
                        f"{META_FILE} says {meta.n_patches} x {meta.target_dim}; the two files "
                        f"are from different builds; {BUILD_HINT}")
    if meta.checksum is None:
        if str(folder) not in _warned_unchecked:
            _warned_unchecked.add(str(folder))
            logger.warning("memory bank %s has no checksum (built by an older filo): loaded "
                           "unchecked; rebuild it to have it checked", folder)
    elif bank_checksum(bank, raw) != meta.checksum:
        raise FiloError(f"memory bank {folder} fails its checksum: {BANK_FILE} or {META_FILE} "
                        f"was changed after the build (edited settings, or files from "
                        f"different builds); {BUILD_HINT} instead of editing it")
    return bank, meta


def list_bank_classes(directory: str | os.PathLike) -> list[str]:
    """Sorted class names under ``directory`` with both ``bank.npy`` and ``meta.json``
    (empty if the directory does not exist)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and (p / BANK_FILE).is_file() and (p / META_FILE).is_file())
