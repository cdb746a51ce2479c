"""Linear layers through oneDNN's matrix products on a CPU: transforms of an unmodified model.

PyTorch's fp32 `F.linear` on a CPU calls MKL's sgemm. On an AMD CPU MKL takes a generic path unless
`llmmo.cpu.mkl_fast_path` applies: on this project's machines (2-core AMD EPYC with AVX-512) that path reaches
~210 GFLOP/s on large products where oneDNN (the library behind Intel's IPEX, and Inductor's CPU freezing in bf16)
reaches ~500. With few rows (decoding: one token per sequence) MKL re-packs the weight into its kernel's layout
at every call, which costs as much as the product (docs/LOG.md). Two transforms:

- `onednn_linears(model)`: every nn.Linear computes its forward and both backward products with oneDNN (to
  rounding, the same numbers). For training; the parameters are untouched.
- `pack_linears(model)`: for inference, oneDNN packs each weight once and reuses it. A weight changed later
  is not seen, and the packed op has no backward.

Both apply only where oneDNN is `available` (an x86-64 CPU, oneDNN in this torch build), and only to layers
whose weights are plain fp32 tensors on the CPU; other layers stay as they are.
"""

from __future__ import annotations

import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.compress.quantize import is_tensor_subclass


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *post_op) -> torch.Tensor:
    """x @ weight^T + bias with oneDNN; weight is (out, in), a packed or a plain (strided) tensor. Looked up when
    called: a torch build without oneDNN imports this module too."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *post_op)


def available() -> bool:
    """An x86-64 CPU (where oneDNN's JIT kernels were measured), and oneDNN in this torch build."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b, and its gradients, as three oneDNN products (transposes are strides, not copies)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's op has no derivative: refuse a second backward
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))  # (M, out), (M, in)
        grad_x = _linear(g, weight.t(), None, "none", [], "").view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # g^T x, (out, in). oneDNN copies a transposed input to rows: the smaller one
            if x2.size(1) < g.size(1):
                grad_w = _linear(x2.t(), g.t(), None, "none", [], "").t()  # (x^T g)^T
            else:
                grad_w = _linear(g.t(), x2.t(), None, "none", [], "")
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear whose products are oneDNN's; made by `onednn_linears` changing a layer's class (same state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fits(x, self.weight) or torch.is_autocast_enabled("cpu"):  # autocast casts inside F.linear
            return F.linear(x, self.weight, self.bias)
        return _LinearFunction.apply(x, self.weight, self.bias)


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's op takes this input (fp32 on the CPU, not empty) and this weight (a plain fp32 CPU tensor, not
    a quantized tensor subclass)."""
    plain = not is_tensor_subclass(weight) and weight.dtype == torch.float32
    return plain and x.dtype == torch.float32 and x.device.type == weight.device.type == "cpu" and x.numel() > 0


def onednn_linears(model: nn.Module) -> nn.Module:
    """Make every plain fp32 nn.Linear of `model` an OneDNNLinear, in place; return the model."""
    if available():
        for module in model.modules():
            if type(module) is nn.Linear and _fits(module.weight, module.weight):
                module.__class__ = OneDNNLinear
    return model


class PackedLinear(nn.Module):
    """nn.Linear for inference through oneDNN, with the weight packed for products of about `rows` rows."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: state_dict and tying unchanged
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)  # not in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fits(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return _linear(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows: int = 8) -> nn.Module:
    """Replace every nn.Linear of `model` (plain or OneDNNLinear) by a PackedLinear, in place; return the model.
    `rows` tunes the packing for products of that many rows (decoding a batch of that size); other sizes work
    too. The packed copies are extra memory of the weights' size."""
    if not available():
        return model
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) in (nn.Linear, OneDNNLinear) and _fits(child.weight, child.weight):
                    setattr(module, name, PackedLinear(child, rows))
    return model
