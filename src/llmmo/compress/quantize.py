"""Weight quantization of the blocks' Linear layers, applied to an unmodified model.

Three schemes:
- int8: weight-only int8, one scale per output channel (torchao `Int8WeightOnlyConfig`);
- dynamic-int8: int8 weights and activations, the activations quantized per token at run time (torchao
  `Int8DynamicActivationInt8WeightConfig`);
- int4: weight-only 4-bit, min-max (asymmetric) in groups of `group_size` inputs, each group with an fp16
  scale and offset (Frantar et al. 2022 and Lin et al. 2023 use this storage). Ours: torchao 0.18's int4 kernels
  need CUDA (its CPU "opaque" layout is gone, the plain one needs the mslk CUDA library), and PyTorch's
  `_weight_int4pack_mm_for_cpu` measured 13x slower than fp32 at one row here (docs/LOG.md). `Int4Linear`
  stores the packed nibbles and unpacks them in its forward, on any device.

The embeddings and the output head stay in full precision (a tied head is the embedding). A quantized
checkpoint stores the integers and scales (the file shrinks) and loads without quantizing again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.errors import ConfigError

SCHEMES = ("int8", "dynamic-int8", "int4")
TORCHAO = {"int8": "Int8WeightOnlyConfig", "dynamic-int8": "Int8DynamicActivationInt8WeightConfig"}


def is_tensor_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass (torchao's quantized weights), not a plain tensor or parameter: no plain kernel (oneDNN's,
    Inductor's constant folding, a dtype cast) may take it as a dense float tensor."""
    return type(t) not in (torch.Tensor, nn.Parameter)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The blocks' Linear layers by name (attention and MLP projections): what compression methods change."""
    return {name: m for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)}


def torchao() -> Any:
    """The torchao module, imported quietly (it logs about CUDA extensions a CPU machine lacks)."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401
        import torchao.quantization
    except ImportError:
        raise ConfigError(
            "int8 and dynamic-int8 quantization use torchao, not installed here: pip install 'llmmo[compress]'"
        ) from None
    return torchao


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored in 4 bits: W[o, i] = q[o, i] * scale[o, g] + low[o, g], g = i // group_size.

    `qweight` packs two 4-bit values per byte (input i even in the low nibble), `scales` and `lows` are fp16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ConfigError(
                f"int4 groups of {group_size} do not divide the layer's {in_features} inputs; pick a group size "
                "that divides every layer's input width (e.g. 32 or 64)"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("lows", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group_size)  # (out, groups, g)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).flatten(1)
        q.qweight.copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
        q.scales.copy_(scale.half())
        q.lows.copy_(low.half())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def weight_float(self) -> torch.Tensor:
        """The (out, in) float32 weight the integers stand for."""
        codes = torch.stack((self.qweight & 15, self.qweight >> 4), dim=-1).flatten(1)  # (out, in)
        codes = codes.reshape(self.out_features, -1, self.group_size).float()
        w = codes * self.scales.float()[..., None] + self.lows.float()[..., None]
        return w.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_float().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize(model: nn.Module, scheme: str, group_size: int = 64) -> dict[str, Any]:
    """Quantize the blocks' Linear layers in place; returns the record that lets a checkpoint load it again."""
    if scheme not in SCHEMES:
        raise ConfigError(f"quantization scheme '{scheme}' is not one of {list(SCHEMES)}")
    names = list(block_linears(model))
    if scheme == "int4":
        for name in names:
            replace_module(model, name, Int4Linear.from_linear(model.get_submodule(name), group_size))
        return {"method": "quantize", "scheme": scheme, "group_size": group_size, "layers": names}
    ao = torchao()
    config = getattr(ao.quantization, TORCHAO[scheme])()
    ao.quantization.quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return {"method": "quantize", "scheme": scheme, "layers": names}


def quantized_layout(model: nn.Module, record: dict[str, Any]) -> None:
    """Give a fresh model the modules of a quantized checkpoint, so that its tensors load as they are stored
    (the torchao schemes need nothing: their tensors replace the weights when loaded)."""
    if record["scheme"] == "int4":
        for name in record["layers"]:
            lin = model.get_submodule(name)
            replace_module(
                model, name, Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, record["group_size"])
            )
