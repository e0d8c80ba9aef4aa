"""Settings of a PatchCore memory bank (the flags of ``python -m filo.memory build``).

Defaults are the PatchCore paper's reference run ``IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1_S0``:
WideResNet-50-2, layers 2 and 3, resize 256 then centre crop 224, 3x3 neighbourhoods, 1024-d
pretrain and target embeddings, approximate greedy coreset of 10 % with the original's random
sequence, 1 nearest neighbour, seed 0, every train image in the bank (docs/design.md section 13).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filo.errors import FiloError
from filo.settings import at_least, in_range, setting

BACKBONES = ("wrn50", "wrn101", "clip")
SCORE_RULES = ("max", "topk_mean", "mean", "var")
NN_BACKENDS = ("auto", "faiss", "torch")
CORESET_RNGS = ("original", "filo")
INDEXES = ("flat", "ivf", "hnsw")
FEATURE_DTYPES = ("float32", "float16")
WEIGHT_FILES = {"wrn50": "wide_resnet50_2-95faca4d.pth",
                "wrn101": "wide_resnet101_2-32ee1156.pth"}
DEFAULT_LAYERS = {"wrn50": "layer2,layer3", "wrn101": "layer2,layer3"}


@dataclass
class MemoryConfig:
    """How a bank is built (and, recorded in its meta.json, how it must be used)."""

    preset: str | None = setting(
        None, "per-class settings from a YAML file or a bundled preset (patchcore_paper, "
        "patchcore_mvtec_study); the other flags are the defaults it starts from")
    backbone: str = setting("wrn50", "feature backbone: torchvision WideResNet-50-2 / -101-2 "
                            "(ImageNet weights from --weights), or the CLIP ViT tower of the FiLo "
                            "checkpoint given with --ckpt_path", choices=BACKBONES)
    weights: Path | None = setting(
        None, "WideResNet weights file (torchvision's)",
        default_help="$CKPT_DIR/wide_resnet50_2-95faca4d.pth (wrn101: "
        "wide_resnet101_2-32ee1156.pth)")
    layers: str | None = setting(
        None, "comma-separated feature layers: layer1..layer4 for WideResNets, 1-based block "
        "numbers for clip", default_help="layer2,layer3; clip: half and three quarters depth")
    resize: int = setting(256, "shorter side after resizing", check=at_least(8))
    imagesize: int = setting(224, "centre crop (or square resize with --no_crop)",
                             check=at_least(8))
    no_crop: bool = setting(False, "square-resize the whole image to --imagesize instead of "
                            "resize + centre crop (the maps then cover the whole image)")
    patchsize: int = setting(3, "local neighbourhood aggregated per patch", check=at_least(1))
    pretrain_dim: int = setting(1024, "per-layer embedding size", check=at_least(1))
    target_dim: int = setting(1024, "fused embedding size", check=at_least(1))
    coreset: float | None = setting(
        None, "coreset fraction of the patch features kept in the bank (approximate greedy)",
        aliases=("-p",), check=in_range(0.0, 1.0, lo_open=True),
        default_help="0.1; 1 (no subsampling) with --shots")
    num_nn: int = setting(1, "nearest neighbours averaged per patch score", check=at_least(1))
    seed: int = setting(0, "seed of the shot choice, calibration split and coreset")
    shots: int | None = setting(None, "k-shot: use K normal train images per class (seeded "
                                "choice)", check=at_least(1), default_help="all")
    score_rule: str = setting("max", "image score from the patch scores: max (PatchCore), "
                              "topk_mean, mean or var", choices=SCORE_RULES)
    topk: int = setting(10, "patches averaged by --score_rule topk_mean", check=at_least(1))
    calib_fraction: float = setting(
        0.0, "full-shot: fraction of the normal train images held out of the bank to calibrate "
        "thresholds; 0: every train image is in the bank and is calibrated leave-one-out "
        "(scored against the bank without its own patches), also when the fraction would hold "
        "out fewer than 3 images", check=in_range(0.0, 0.9))
    calib_dir: Path | None = setting(
        None, "folder of normal images (searched recursively) scored against the whole bank to "
        "calibrate thresholds instead (at least 3)", default_help="leave-one-out")
    calib_quantile: float = setting(0.99, "image threshold: this quantile of the calibration "
                                    "images' scores", check=in_range(0.0, 1.0))
    pixel_quantile: float = setting(0.999, "pixel threshold: this quantile of the calibration "
                                    "maps' pixels", check=in_range(0.0, 1.0))
    nn_backend: str = setting("auto", "nearest-neighbour search: faiss, torch, or auto (faiss "
                              "when installed)", choices=NN_BACKENDS)
    index: str = setting("flat", "faiss index: flat (exact), ivf or hnsw (approximate, for "
                         "banks of millions of patches)", choices=INDEXES)
    coreset_rng: str | None = setting(
        None, "random projection and start points of the coreset: original (the original "
        "PatchCore run's sequence for --seed, so banks pick its patches) or filo (filo's own "
        "seeded generator)", choices=CORESET_RNGS,
        default_help="original; filo with --backbone clip")
    feature_dtype: str = setting(
        "float32", "precision of the bank images' patch features held while the coreset is "
        "chosen: float16 halves that memory (the bank rows are float16-rounded)",
        choices=FEATURE_DTYPES)
    channels_last: bool = setting(
        False, "bank builds run the WideResNet in channels-last layout: 12-20 %% faster on a "
        "CPU, features move by about 1e-6 of their maximum, so near-tie coreset picks may "
        "differ from the original PatchCore's (scoring against a bank always uses it)")
    batch_memory_mb: int = setting(
        1024, "working memory of one feature-extraction batch (MB): fewer images per batch "
        "than --batch_size when the images are large", check=at_least(64))
    feature_memory_mb: int = setting(
        16384, "most memory (MB) the bank images' patch features may take; beyond it the "
        "coreset is chosen in stages (a coreset of each block of images, then of their union)",
        check=at_least(64))
    tile: int | None = setting(
        None, "tiled bank: cut each image at its native resolution into SIZE x SIZE tiles "
        "(no resize or crop); scoring tiles the same way and stitches the maps",
        metavar="SIZE", check=at_least(32), default_help="off (resize + crop)")
    tile_overlap: int = setting(32, "pixels shared by neighbouring tiles (--tile)",
                                metavar="PX", check=at_least(0))
    no_bn_quirk: bool = setting(False, "skip the original's one train-mode forward of a ones "
                                "image at --imagesize before inference (its BatchNorm statistics "
                                "quirk)")

    def layer_list(self, n_blocks: int | None = None) -> tuple[str, ...]:
        if self.layers:
            return tuple(x.strip() for x in self.layers.split(",") if x.strip())
        if self.backbone == "clip":
            if n_blocks is None:
                raise FiloError("--layers: give CLIP block numbers, e.g. 12,18")
            return (str(n_blocks // 2), str(3 * n_blocks // 4))
        return tuple(DEFAULT_LAYERS[self.backbone].split(","))

    def coreset_fraction(self) -> float:
        if self.coreset is not None:
            return float(self.coreset)
        return 1.0 if self.shots is not None else 0.1

    def coreset_rng_name(self) -> str:
        """The effective --coreset_rng."""
        if self.coreset_rng is not None:
            return self.coreset_rng
        return "filo" if self.backbone == "clip" else "original"

    def weights_path(self) -> Path | None:
        if self.backbone == "clip":
            return None
        if self.weights is not None:
            return Path(self.weights)
        return Path(os.environ.get("CKPT_DIR") or "ckpt") / WEIGHT_FILES[self.backbone]

    def check_tiles(self) -> None:
        if self.tile is not None and self.tile_overlap >= self.tile:
            raise FiloError(f"--tile_overlap {self.tile_overlap} must be smaller than --tile "
                            f"{self.tile}")

    @property
    def crop(self) -> bool:
        return not self.no_crop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
