"""Structured pruning: remove whole attention heads and MLP neurons, so that the model itself gets smaller and
faster (not just sparser).

Importance is the first-order Taylor estimate of the loss change when a unit is removed (Molchanov et al.
2017; for heads, Michel et al. 2019): |sum over tokens of activation * d loss / d activation|, over the unit's
outputs, on a few training batches. Every layer loses the same number of heads and of neurons, the least
important ones of that layer, so that the shape stays one config (n_head, head_dim, mlp_hidden); the pruned
model is rebuilt at the new shape and the kept rows and columns copied in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from llmmo.config import ModelConfig
from llmmo.errors import ConfigError
from llmmo.model import Transformer


def importance(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
    """Per layer: (H,) head scores and (mlp_hidden,) neuron scores, Taylor first order over `batches`."""
    cfg = model.cfg
    grabbed: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # the projection's input: heads' outputs (B, T, H*D) or neurons (B, T, hidden)
            x.retain_grad()
            grabbed[kind, layer] = x

        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.proj.register_forward_pre_hook(keep("heads", i)))
        handles.append(block.mlp.proj.register_forward_pre_hook(keep("neurons", i)))
    heads = [torch.zeros(cfg.n_head) for _ in model.blocks]
    neurons = [torch.zeros(cfg.mlp_hidden) for _ in model.blocks]
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            for i in range(len(model.blocks)):
                a = grabbed["heads", i]
                taylor = (a * a.grad).flatten(0, 1).sum(0)  # (H*D,)
                heads[i] += taylor.view(cfg.n_head, cfg.head_dim).sum(-1).abs().detach().cpu()
                a = grabbed["neurons", i]
                neurons[i] += (a * a.grad).flatten(0, 1).sum(0).abs().detach().cpu()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return heads, neurons


def _take(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, into: nn.Linear) -> None:
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    into.weight.data.copy_(w)
    if linear.bias is not None:
        into.bias.data.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())


def pruned_config(cfg: ModelConfig, heads_removed: int, neurons_removed: int) -> ModelConfig:
    if heads_removed and cfg.n_kv_head != cfg.n_head:
        raise ConfigError(
            "removing heads needs plain multi-head attention (n_kv_head == n_head): a grouped key/value head "
            "serves several query heads; prune neurons only (--heads 0)"
        )
    if not 0 <= heads_removed < cfg.n_head or not 0 <= neurons_removed < cfg.mlp_hidden:
        raise ConfigError(
            f"cannot remove {heads_removed} of {cfg.n_head} heads and {neurons_removed} of {cfg.mlp_hidden} "
            "neurons per layer: keep at least one of each"
        )
    heads = cfg.n_head - heads_removed
    n_kv_head = heads if heads_removed else cfg.n_kv_head  # grouped key/value heads stay when no head goes
    hidden = cfg.mlp_hidden - neurons_removed
    return dataclasses.replace(cfg, n_head=heads, n_kv_head=n_kv_head, depth=0, mlp_hidden=hidden)


def prune_structured(
    model: Transformer, heads_removed: int, neurons_removed: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[Transformer, dict[str, Any]]:
    """A new, smaller model without the `heads_removed` least important heads and `neurons_removed` neurons of
    every layer; and the record."""
    cfg = model.cfg
    new_cfg = pruned_config(cfg, heads_removed, neurons_removed)
    layers = [type(m).__name__ for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.proj)]
    if any(name not in ("Linear", "OneDNNLinear") for name in layers):  # OneDNNLinear: a model trained on a CPU
        raise ConfigError(
            "structured pruning needs the float Linear layers; prune the checkpoint before quantizing or factorizing it"
        )
    head_scores, neuron_scores = importance(model, batches)
    small = Transformer(new_cfg).to(next(model.parameters()).device)
    small.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}, strict=False
    )  # embeddings, final norm, head: unchanged
    D = cfg.head_dim
    for block, new, hs, ns in zip(model.blocks, small.blocks, head_scores, neuron_scores, strict=True):
        if heads_removed:  # plain multi-head attention (pruned_config checks): q, k and v rows of the kept heads
            kept_heads = hs.argsort(descending=True)[: new_cfg.n_head].sort().values
            channels = (kept_heads[:, None] * D + torch.arange(D)).flatten()  # (H' * D,) of the H * D
            channels = channels.to(block.attn.qkv.weight.device)
            qkv_rows = torch.cat([channels + part * cfg.n_head * D for part in range(3)])
            _take(block.attn.qkv, qkv_rows, None, new.attn.qkv)
            _take(block.attn.proj, None, channels, new.attn.proj)
            for norm in ("q_norm", "k_norm"):  # QK-norm's gains act per channel of a head, shared by all heads
                if getattr(block.attn, norm) is not None:
                    getattr(new.attn, norm).load_state_dict(getattr(block.attn, norm).state_dict())
        else:
            new.attn.load_state_dict(block.attn.state_dict())
        kept = ns.argsort(descending=True)[: new_cfg.mlp_hidden].sort().values.to(block.mlp.up.weight.device)
        _take(block.mlp.up, kept, None, new.mlp.up)
        if cfg.mlp == "swiglu":
            _take(block.mlp.gate, kept, None, new.mlp.gate)
        _take(block.mlp.proj, None, kept, new.mlp.proj)
        new.norm1.load_state_dict(block.norm1.state_dict())
        new.norm2.load_state_dict(block.norm2.state_dict())
    record = {
        "method": "prune",
        "kind": "structured",
        "heads_removed_per_layer": heads_removed,
        "neurons_removed_per_layer": neurons_removed,
        "params_before": model.num_params(),
        "params_after": small.num_params(),
    }
    return small, record


def removal_for(cfg: ModelConfig, params_fraction: float) -> tuple[int, int]:
    """(heads, neurons) to remove per layer so that the model loses at least `params_fraction` of its
    parameters: that fraction of the heads (rounded down; none with grouped-query attention), then as few
    neurons as it takes."""
    if not 0 < params_fraction < 1:
        raise ConfigError(f"--params is the fraction of parameters to remove, in (0, 1); got {params_fraction}")

    def params(heads: int, neurons: int) -> int:
        with torch.device("meta"):
            return Transformer(pruned_config(cfg, heads, neurons)).num_params()

    heads = int(params_fraction * cfg.n_head) if cfg.n_kv_head == cfg.n_head else 0
    heads = min(heads, cfg.n_head - 1)
    goal = (1 - params_fraction) * params(0, 0)
    low, high = 0, cfg.mlp_hidden - 1  # the fewest neurons that reach the goal, by bisection
    if params(heads, high) > goal:
        raise ConfigError(f"removing {params_fraction:.0%} of the parameters would leave the blocks empty; ask less")
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if params(heads, mid) > goal else (low, mid)
    return heads, low


def training_batches(ckpt: Any, n: int = 8, batch_size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` seeded batches of the checkpoint's own training split, for the importance scores."""
    from llmmo.data import RandomWindows, prepare_data

    data = prepare_data(ckpt.data, tokenizer=ckpt.tokenizer, splits=(ckpt.data.train_split,))
    windows = RandomWindows(data.splits[ckpt.data.train_split].tokens, ckpt.data.block_size, batch_size, seed=0)
    device = next(ckpt.model.parameters()).device
    return [tuple(t.to(device) for t in windows.batch(step)) for step in range(n)]
