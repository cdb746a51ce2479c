"""Magnitude pruning: zero the smallest weights of the blocks' Linear layers (Han et al. 2015), with PyTorch's
own `torch.nn.utils.prune`.

`scope="global"` ranks every weight of every layer together (layers that matter less lose more);
`scope="layer"` takes the same fraction from each layer. While the masks are on, a recovery fine-tune only
moves the surviving weights; `bake` then makes the zeros permanent (plain weights again). The file keeps its
size (the zeros are stored); the report counts them.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.nn.utils import prune

from llmmo.compress.quantize import block_linears
from llmmo.errors import ConfigError

SCOPES = ("global", "layer")


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> dict[str, Any]:
    """Mask the `sparsity` fraction of smallest-magnitude weights; returns the record."""
    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity is the fraction of weights to zero, in (0, 1); got {sparsity}")
    if scope not in SCOPES:
        raise ConfigError(f"--scope '{scope}' is not one of {list(SCOPES)}")
    targets = [(m, "weight") for m in block_linears(model).values()]
    if not targets:
        raise ConfigError("the model has no float Linear layers in its blocks to prune (factorized already?)")
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=sparsity)
    return {"method": "prune", "kind": "magnitude", "sparsity": sparsity, "scope": scope}


def bake(model: nn.Module) -> int:
    """Make the masks' zeros permanent (the weights become plain parameters again); the number of zeros."""
    zeros = 0
    for module in block_linears(model).values():
        if prune.is_pruned(module):
            prune.remove(module, "weight")
        zeros += int((module.weight == 0).sum())
    return zeros
