"""Task heads on a pretrained Transformer: sequence classification and extractive QA spans.

Each wraps an unmodified backbone and reads its final hidden states (`Transformer.hidden`). Inputs are
right-padded with -1, so the padding is known without a separate mask; the backbone is causal, so real tokens
never see the padding after them. Like the language model, `forward(idx, targets)` returns (logits, loss), so the
trainer drives a head as it drives the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.errors import ConfigError

POOLING = ("last", "mean")


class _Head(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg

    def _hidden(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids with -1 padding -> hidden states (B, T, C) and the mask of real tokens (B, T)."""
        mask = idx >= 0
        return self.backbone.hidden(idx.clamp(min=0)), mask

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int = 0) -> int:
        return self.backbone.flops_per_token(seq_len)


class Classifier(_Head):
    """Pool the hidden states of a sequence (its last real token, or the mean of all) and map them to class logits.

    Last-token pooling is what a causal model offers naturally (the last position has read the whole text, as in
    GPT-1's classifier, Radford et al. 2018); mean pooling averages every position.
    """

    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str = "last"):
        super().__init__(backbone)
        if pooling not in POOLING:
            raise ConfigError(f"pooling '{pooling}' is not one of {list(POOLING)}")
        if n_labels < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {n_labels}")
        self.pooling = pooling
        self.head = nn.Linear(backbone.cfg.n_embd, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, idx: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> class logits (B, K), and the mean cross-entropy when labels (B,) are given."""
        h, mask = self._hidden(idx)
        if self.pooling == "last":
            last = mask.sum(1) - 1  # (B,) index of each row's last real token
            pooled = h[torch.arange(h.size(0), device=h.device), last]  # (B, C)
        else:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
        logits = self.head(pooled)  # (B, K)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss


class SpanExtractor(_Head):
    """Extractive QA (BERT's SQuAD head, Devlin et al. 2019): a start and an end logit for every position.

    The input is question first, then context, so that every context position has read the question; `allowed`
    positions (the context's) are the only ones that may start or end an answer.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.head = nn.Linear(backbone.cfg.n_embd, 2)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T), question tokens stored as -2 - id (input, never an answer) and padding as -1 -> logits
        (B, 2, T) of start and end, -inf outside the context; with targets (B, 2) of start and end positions,
        the mean of the two cross-entropies."""
        question = idx <= -2
        h, _ = self._hidden(torch.where(question, -2 - idx, idx))
        logits = self.head(h).transpose(1, 2)  # (B, 2, T)
        logits = logits.masked_fill((idx < 0)[:, None], float("-inf"))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss
