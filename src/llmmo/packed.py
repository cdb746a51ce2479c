"""Linear layers whose weights oneDNN packs once, for inference on a CPU (a transform of an unmodified model).

PyTorch's fp32 `F.linear` on a CPU goes to MKL's sgemm, which packs the weight into its kernel's layout at every
call. With few rows (decoding: one token per sequence) packing costs as much as the product itself, and on
AMD CPUs MKL does not take its AVX-512 kernels. oneDNN (the library behind Intel's IPEX and Inductor's CPU
freezing) packs a weight once and reuses it. Measured on this project's 2-core AMD EPYC (docs/LOG.md): an
8-row product 2.6x faster, a 2048 x 2048 product at ~500 GFLOP/s against MKL's ~210.

Inference only: the packed copy is made once, so a weight changed later (training) is not seen, and oneDNN's
op has no backward. The layer keeps the original parameters, so state_dict, tied weights and `model.cfg` are
unchanged; the packed copy is extra memory of the weights' size.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def can_pack(model: nn.Module) -> bool:
    """oneDNN is in this torch build, and the model's weights are fp32 on the CPU."""
    param = next(model.parameters())
    return torch.backends.mkldnn.is_available() and param.device.type == "cpu" and param.dtype == torch.float32


class PackedLinear(nn.Module):
    """nn.Linear through oneDNN, with the weight packed for products of about `rows` rows."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters, not copies
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)  # not in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows: int = 8) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a PackedLinear; return the model. A model that
    `can_pack` refuses is returned as it is. `rows` tunes the packing for products of that many rows
    (decoding a batch of that size); other sizes work too."""
    if not can_pack(model):
        return model
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, name, PackedLinear(child, rows))
    return model
