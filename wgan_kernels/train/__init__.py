"""The thin trainer, its datasets, metrics and pictures (``wgan_kernels.train``)."""

from .datasets import DATASETS
from .trainer import LOSSES, TrainConfig, Trainer, TrainingDiverged, train

__all__ = ["DATASETS", "LOSSES", "TrainConfig", "Trainer", "TrainingDiverged", "train"]
