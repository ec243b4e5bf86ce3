"""Training: YAML configs, the shared loop (EMA, checkpoints, exact resume) and the tasks it runs."""

from .config import OptimConfig, TrainConfig, load_config
from .trainer import Trainer, TrainingDiverged, lr_at

__all__ = ["OptimConfig", "TrainConfig", "load_config", "Trainer", "TrainingDiverged", "lr_at"]
