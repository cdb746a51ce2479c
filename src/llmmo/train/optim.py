"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmmo.config import TrainConfig
from llmmo.train.muon import Muon


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names. Every group carries `base_lr`, the lr the schedule scales.

    adamw: decoupled weight decay (Loshchilov & Hutter 2019) on the Linear weights only: norms, biases and
    embeddings are not decayed, since shrinking them towards zero has no regularising meaning.
    adam: plain Adam (Kingma & Ba 2015) without decay.
    muon: Muon (lr `muon_lr`) for the blocks' matrices, AdamW (lr `lr`) for embeddings, head, norms, biases.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Linear weights that are not also an embedding (a tied output head is the token embedding)
    # (a Linear under torch.nn.utils.prune keeps its parameter as weight_orig; weight is the masked product)
    decayed = {id(getattr(m, "weight_orig", m.weight)) for m in model.modules() if isinstance(m, nn.Linear)}
    decayed -= embeddings
    params = [p for p in model.parameters() if p.requires_grad]  # each shared (tied) tensor once
    decay = [p for p in params if id(p) in decayed]
    no_decay = [p for p in params if id(p) not in decayed]
    betas = (cfg.beta1, cfg.beta2)
    # one fused kernel for all parameters, where measured faster: GPUs, and 2 CPU cores since MKL's fast path
    # (0.8M: 17.1 against 18.3 ms a step; 10.7M: no change; docs/LOG.md)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=betas, fused=fused)
    elif cfg.optimizer == "muon":
        head = getattr(model, "lm_head", None)
        matrices = [p for p in decay if head is None or p is not head.weight]
        others = [p for p in decay if not any(p is m for m in matrices)]
        optimizer = Muon(
            [
                {"params": matrices, "muon": True, "lr": cfg.muon_lr, "weight_decay": cfg.weight_decay},
                {"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            ],
            betas=betas,
        )
    else:
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr to min_lr at `total_steps`
    (Loshchilov & Hutter 2017, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= total_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
