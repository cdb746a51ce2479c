"""Low-rank factorization: each chosen Linear W (out x in) becomes U (out x r) times V (r x in), from the
truncated SVD W = U S V^T keeping the r largest singular values (Eckart-Young: the best rank-r approximation
in Frobenius norm), with sqrt(S) split between the two factors. The layer costs r * (in + out) weights instead
of in * out, so it shrinks when r < in * out / (in + out).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from llmmo.compress.quantize import block_linears, replace_module
from llmmo.errors import ConfigError


class LowRankLinear(nn.Module):
    """x -> up(down(x)): down (in -> rank, no bias), up (rank -> out, the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def rank_for(weight: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    """The rank to keep: a fraction of the full rank, or the fewest singular values holding `energy` of
    sum(S^2) (the share of the squared Frobenius norm the approximation keeps)."""
    full = min(weight.shape)
    if rank_ratio is not None:
        return max(1, round(rank_ratio * full))
    s = torch.linalg.svdvals(weight.detach().float())
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    return min(full, int((kept < energy).sum()) + 1)


def factorize(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-`rank` truncated SVD of the layer's weight, as a LowRankLinear."""
    w = linear.weight.detach().float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    low = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    low.down.weight.data.copy_(root[:, None] * vh[:rank])  # (rank, in)
    low.up.weight.data.copy_(u[:, :rank] * root[None, :])  # (out, rank)
    if linear.bias is not None:
        low.up.bias.data.copy_(linear.bias.detach())
    return low.to(linear.weight.device, linear.weight.dtype)


def lowrank(
    model: nn.Module, rank_ratio: float | None = None, energy: float | None = None, only_if_smaller: bool = True
) -> dict[str, Any]:
    """Factorize the blocks' Linear layers in place; returns the record (the rank of each layer).

    `only_if_smaller` leaves a layer whole when its factors would hold more weights than it does.
    """
    if (rank_ratio is None) == (energy is None):
        raise ConfigError("low-rank needs exactly one of --rank-ratio (0, 1] or --energy (0, 1]")
    value = rank_ratio if rank_ratio is not None else energy
    if not 0 < value <= 1:
        raise ConfigError(f"--rank-ratio and --energy are fractions in (0, 1], got {value}")
    ranks = {}
    for name, linear in block_linears(model).items():
        rank = rank_for(linear.weight, rank_ratio, energy)
        if only_if_smaller and rank * (linear.in_features + linear.out_features) >= linear.weight.numel():
            continue
        replace_module(model, name, factorize(linear, rank))
        ranks[name] = rank
    if not ranks:
        raise ConfigError(
            "no layer gets smaller at that rank (a rank-r factorization of an m x n layer saves weights only when "
            "r < mn / (m + n)); lower --rank-ratio or --energy"
        )
    return {"method": "lowrank", "ranks": ranks}


def lowrank_layout(model: nn.Module, record: dict[str, Any]) -> None:
    """Give a fresh model the factorized layers of a checkpoint, so that their weights load."""
    for name, rank in record["ranks"].items():
        lin = model.get_submodule(name)
        replace_module(model, name, LowRankLinear(lin.in_features, lin.out_features, rank, lin.bias is not None))
