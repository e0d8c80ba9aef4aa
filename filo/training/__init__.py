"""FiLo training: losses, mosaic augmentation and the resumable two-stage trainer.

Public API::

    from filo.training import TrainSettings, train
    result = train(TrainSettings(dataset="mvtec", data_path=root, save_dir="ckpt/trained",
                                 clip_weights="ckpt/ViT-L-14-336px.pt"))
    result.checkpoint  # {save_dir}/filo_train_on_mvtec.pth ({"filo": state_dict})
"""

from __future__ import annotations

from filo.training.augment import TrainDataset, epoch_plan, mosaic_2x2, train_collate
from filo.training.losses import adapter_loss, dice_loss, focal_loss, segmentation_loss
from filo.training.trainer import (
    EpochRecord,
    Trainer,
    TrainResult,
    TrainSettings,
    build_model_config,
    build_training_model,
    output_paths,
    stage1_forward,
    stage2_cosines,
    train,
)

__all__ = [
    "EpochRecord", "TrainDataset", "TrainResult", "TrainSettings", "Trainer", "adapter_loss",
    "build_model_config", "build_training_model", "dice_loss", "epoch_plan", "focal_loss",
    "mosaic_2x2", "output_paths", "segmentation_loss", "stage1_forward", "stage2_cosines",
    "train", "train_collate",
]
