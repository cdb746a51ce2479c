"""Training: the loop (trainer), the optimizer and schedule (optim), and the metrics record (metrics)."""

from llmmo.train.trainer import Reporter, Trainer, TrainResult, autocast_for, pick_device, train

__all__ = ["Reporter", "Trainer", "TrainResult", "autocast_for", "pick_device", "train"]
