"""From the pipeline's ``--musc_*`` flags to :class:`~filo.musc.config.MuscSettings`.

Takes the :class:`filo.pipeline.PipelineConfig` duck-typed (this package never imports the
pipeline, which imports it lazily).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filo.errors import FiloError
from filo.musc.config import DEFAULT_K, MuscSettings, parse_ints


def musc_weights(cfg) -> Path:
    """The file MuSc's CLIP comes from: ``--musc_clip``, else ``--ckpt_path``."""
    path = cfg.musc_clip or cfg.ckpt_path
    if path is None:
        raise FiloError("--method musc needs CLIP weights: give --musc_clip (e.g. "
                        "ckpt/ViT-L-14-336px.pt) or --ckpt_path (a FiLo checkpoint)")
    return Path(path)


def check_musc_config(cfg) -> None:
    """One line for a MuSc configuration that cannot run (before anything is loaded)."""
    musc_weights(cfg)
    if cfg.musc_fusion != "musc" and cfg.ckpt_path is None:
        raise FiloError(f"--musc_fusion {cfg.musc_fusion} combines MuSc with FiLo: give "
                        f"--ckpt_path (a FiLo checkpoint) or use --musc_fusion musc")
    if cfg.memory_bank is not None:
        raise FiloError("--method musc does not combine with --memory_bank; fuse MuSc with "
                        "FiLo (--musc_fusion mean/max) or the boxes (--grounded_checkpoint)")
    if cfg.musc_pool is not None and not Path(cfg.musc_pool).is_dir():
        raise FiloError(f"--musc_pool {cfg.musc_pool} is not a folder; build one with "
                        f"`python -m filo.musc pool --class NAME --images DIR --out "
                        f"{cfg.musc_pool}`")
    settings_from(cfg, 518)


def settings_from(cfg, image_size: int) -> MuscSettings:
    """MuscSettings of the flags at ``image_size`` (``--musc_k`` None: 1,2,3)."""
    s = MuscSettings(image_size=int(image_size),
                     layers=parse_ints(cfg.musc_layers, "musc_layers"),
                     r_list=parse_ints(cfg.musc_r, "musc_r"),
                     k_list=parse_ints(cfg.musc_k, "musc_k") or DEFAULT_K,
                     divide=int(cfg.musc_divide), block=int(cfg.musc_block or 0))
    s.validate()
    return s


def musc_cache_key(cfg) -> dict[str, Any]:
    from filo.evaluation.cache import file_fingerprint

    key: dict[str, Any] = {
        "method": "musc", "musc_clip": file_fingerprint(musc_weights(cfg)),
        "musc": settings_from(cfg, cfg.image_size or 518).key(), "musc_fusion": cfg.musc_fusion,
        "musc_weight": cfg.fusion_weight if cfg.musc_fusion == "mean" else None}
    if cfg.musc_pool is not None:
        from filo.musc.pool import pool_folder_key

        key["musc_pool"] = pool_folder_key(cfg.musc_pool)
    return key
