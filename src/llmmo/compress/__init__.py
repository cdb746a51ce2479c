"""Compression: turn a checkpoint into a smaller one that every command loads like any checkpoint.

Each method is a function applied to an unmodified model (quantize, prune, lowrank) or a training run
(distill) and returns a record; the records go, in order, into the checkpoint's config.json under
"compression", so that `load_checkpoint` rebuilds the same module layout before it reads the stored tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from llmmo.compress.lowrank import lowrank_layout
from llmmo.compress.quantize import is_tensor_subclass, quantized_layout, torchao
from llmmo.config import Config, TrainConfig
from llmmo.errors import DivergedError

if TYPE_CHECKING:
    from llmmo.checkpoint import Checkpoint


def apply_layout(model: nn.Module, records: list[dict[str, Any]]) -> None:
    """Rebuild, on a freshly built model, the modules the compression `records` left (before loading weights)."""
    for record in records:
        if record["method"] == "quantize":
            quantized_layout(model, record)
        elif record["method"] == "lowrank":
            lowrank_layout(model, record)


def flatten_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Plain tensors for safetensors, and the metadata that rebuilds torchao's quantized tensors (None if none)."""
    if not any(is_tensor_subclass(t) for t in state.values()):
        return state, None
    support = torchao().prototype.safetensors.safetensors_support
    return support.flatten_tensor_state_dict(state)


def unflatten_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """What `flatten_state` took apart, put back together."""
    if not metadata or "tensor_names" not in metadata:
        return tensors
    support = torchao().prototype.safetensors.safetensors_support
    state, leftover = support.unflatten_tensor_state_dict(tensors, metadata)
    return state | leftover


def recover(ckpt: Checkpoint, steps: int, lr: float, batch_size: int = 12, device: str = "cpu") -> float:
    """Fine-tune `ckpt.model` in place for `steps` on its own training data (a short recovery after pruning or
    factorizing: masks stay on, so pruned weights stay zero); the val loss after it."""
    from llmmo.train import Trainer

    with tempfile.TemporaryDirectory(prefix="llmmo-recover-") as tmp:
        train = TrainConfig(
            batch_size=batch_size,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=max(1, steps // 10),
            max_steps=steps,
            eval_every=steps,
            eval_batches=20,
            log_every=max(1, steps // 10),
            out_dir=f"{tmp}/run",
            device=device,
        )
        cfg = Config(model=ckpt.model.cfg, data=ckpt.data, train=train)
        try:
            return Trainer(cfg, start=ckpt).run().best_val_loss
        except DivergedError as e:
            raise DivergedError(f"recovery {e.detail}", "nothing was written: lower --recover-lr") from None


def save_compressed(ckpt: Checkpoint, out: str | Path, record: dict[str, Any]) -> None:
    """Write `ckpt` (its model compressed by the method that returned `record`) as a checkpoint folder, its
    compression records (those it already had, then this one) in config.json; a fine-tune's task and head too."""
    from llmmo.checkpoint import save_checkpoint

    records = [*ckpt.meta.get("compression", []), record]
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.data, compression=records, task=ckpt.task, head=ckpt.head)


def dense(t: torch.Tensor) -> torch.Tensor:
    """A plain float32 copy of `t` (a torchao quantized tensor dequantized)."""
    return (t.dequantize() if is_tensor_subclass(t) else t).detach().float()


def effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) float weight and bias of a Linear layer as compressed (quantized, factorized, or both)."""
    from llmmo.compress.lowrank import LowRankLinear
    from llmmo.compress.quantize import Int4Linear

    if isinstance(module, LowRankLinear):
        (up, bias), (down, _) = effective_weight(module.up), effective_weight(module.down)
        return up @ down, bias
    weight = module.weight_float() if isinstance(module, Int4Linear) else dense(module.weight)
    return weight, None if module.bias is None else module.bias.detach().float()


def densify(model: nn.Module) -> nn.Module:
    """A plain Transformer computing with the weights the compressed `model` stands for: quantized weights
    dequantized, factorized layers multiplied out (what `export` writes for transformers)."""
    from llmmo.model import Transformer

    plain = Transformer(model.cfg)
    linears = {name for name, m in plain.named_modules() if isinstance(m, nn.Linear)}
    state = {k: dense(v) for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in linears}
    for name in linears:
        if model.cfg.tie_embeddings and name == "lm_head":
            continue
        weight, bias = effective_weight(model.get_submodule(name))
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
    state = {k: v for k, v in state.items() if k in plain.state_dict()}  # inner keys of compressed layers go
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device).eval()
