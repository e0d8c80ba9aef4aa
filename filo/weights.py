"""Reading weight files that this process did not write: one reader, one error style.

The split follows timm's ``load_checkpoint``: read -> clean -> load into a model.

* :func:`read_weights` decodes a file on the CPU, ``torch.load(map_location="cpu",
  weights_only=True)``, or, for OpenAI's TorchScript CLIP archives when the caller allows them,
  :func:`filo.script_archive.read_script_state_dict`, which reads the tensors without running
  the archive's code (docs/design.md §2.1). A missing file and every decode failure (corrupt,
  truncated, a text file, a pickle that ``weights_only`` refuses, a code payload, ...) become a
  one-line :class:`FiloError` naming the file, what it should be and the fix.
* :func:`unwrap` takes the state dict out of its container (``{"filo": sd}``,
  ``{"model": sd}``, ``{"state_dict": sd}``), :func:`clean_state_dict` strips DataParallel
  ``module.`` prefixes.
* :func:`fit_pos_embed` resizes a ViT position embedding to the model's patch grid at load.

The layout checks and the loading into a model stay with the callers:
:func:`filo.checkpoint.read_filo_state_dict` (FiLo checkpoints),
:func:`filo.backbone.read_clip_state_dict` (CLIP weights) and
:func:`filo.detector.convert.read_checkpoint` (GroundingDINO checkpoints). This module
imports nothing of filo but its errors and the archive reader, so every reader can use it.
No file a user names is ever given to ``torch.jit.load`` or to an unrestricted unpickler.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from filo.errors import FiloError
from filo.script_archive import ArchiveRefused, is_torchscript_archive, read_script_state_dict

logger = logging.getLogger(__name__)

DATA_PARALLEL_PREFIX = "module."


def read_weights(path: str | Path, *, what: str, hint: str, torchscript: bool = False) -> Any:
    """Decode the weight file ``path`` on the CPU; nothing but tensors and plain containers.

    ``what`` names the expected file in errors ("FiLo checkpoint"), ``hint`` says how to get
    the right one. ``torchscript``: a TorchScript archive (OpenAI's CLIP file) is allowed; its
    parameters and buffers come back as its ``state_dict()`` names them, read without running
    any of its code, and one with a code payload is refused. Without it every TorchScript
    archive is refused. Raises :class:`FiloError` (one line) if the file is missing, cannot be
    decoded (whatever the reason the decoder gives) or is refused.
    """
    p = Path(path)
    if not p.is_file():
        state = "is a directory" if p.is_dir() else "does not exist"
        raise FiloError(f"{what} not found: {p} {state}; {hint}")
    try:
        if is_torchscript_archive(p):
            if not torchscript:  # never handed to torch.load, which would dispatch to torch.jit
                raise ArchiveRefused("it is a TorchScript archive (a program), not a weight file")
            return read_script_state_dict(p)
        # zip-format files are memory-mapped: reading is cheap, tensors are paged in when
        # copied into a model (a 2.6 GB checkpoint is not held twice in memory)
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except ArchiveRefused as err:
        raise FiloError(f"refusing {what} {p}: {err}; nothing of it was run; {hint}") from err
    except Exception as err:  # noqa: BLE001 - any decode failure is a wrong file for the user
        raise FiloError(
            f"cannot read {what} {p} ({type(err).__name__}): the file is corrupt, truncated, "
            "not a PyTorch weight file or holds Python objects besides tensors (not loaded, "
            f"for safety); {hint}"
        ) from err


def unwrap(obj: Any, containers: Sequence[str]) -> tuple[Any, str | None]:
    """The state dict inside a checkpoint container and the key it was under.

    Returns ``(obj[key], key)`` for the first of ``containers`` whose value is a dict, else
    ``(obj, None)``.
    """
    if isinstance(obj, Mapping):
        for key in containers:
            if isinstance(obj.get(key), Mapping):
                return obj[key], key
    return obj, None


def clean_state_dict(state: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``state`` with the DataParallel ``module.`` prefix stripped from every key."""
    n = len(DATA_PARALLEL_PREFIX)
    return {k[n:] if isinstance(k, str) and k.startswith(DATA_PARALLEL_PREFIX) else k: v
            for k, v in state.items()}


def resize_pos_embed(pos: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Resize a ``[1 + g*g, W]`` position embedding to ``grid`` (bicubic, align_corners=False).

    The class-token row is kept unchanged. Same size -> returned unchanged.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if pos.shape[0] == gh * gw + 1:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    old = math.isqrt(patch_pos.shape[0])
    if old * old != patch_pos.shape[0]:
        raise FiloError(f"position embedding with {patch_pos.shape[0]} patches is not a square grid")
    dtype = pos.dtype
    img = patch_pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
    patch_pos = img.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def fit_pos_embed(state: dict[str, torch.Tensor], key: str, target: torch.Tensor,
                  grid: int | tuple[int, int]) -> bool:
    """Resize ``state[key]`` in place to the model's ``grid`` if its token count differs from
    ``target``'s (a checkpoint trained at another input size).

    Returns True if it was resized. A width mismatch is left for the caller's shape check.
    """
    if key not in state or state[key].shape[0] == target.shape[0]:
        return False
    logger.info("resizing %s from %s to %s", key, tuple(state[key].shape), tuple(target.shape))
    state[key] = resize_pos_embed(state[key], grid)
    return True
