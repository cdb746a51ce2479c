"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmmo.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay (Loshchilov & Hutter 2019) on the Linear weights only: norms, biases
    and embeddings are not decayed, since shrinking them towards zero has no regularising meaning.
    `adam` is plain Adam (Kingma & Ba 2015) without decay."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Linear weights that are not also an embedding (a tied output head is the token embedding)
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    params = [p for p in model.parameters() if p.requires_grad]  # each shared (tied) tensor once
    decay = [p for p in params if id(p) in decayed]
    no_decay = [p for p in params if id(p) not in decayed]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr to min_lr at `total_steps`
    (Loshchilov & Hutter 2017, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= total_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
