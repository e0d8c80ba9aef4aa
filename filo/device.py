"""Device selection from configuration: never a hard-coded accelerator."""

from __future__ import annotations

import torch

from filo.errors import FiloError


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"`` into a usable ``torch.device``.

    ``None`` and ``"auto"`` pick the first CUDA device when one is available, else the CPU.
    Asking for CUDA on a machine without it is a user error, reported in one line.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise FiloError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FiloError(f"--device {spec}: no CUDA device is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FiloError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device
