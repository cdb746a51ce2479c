"""Loss, perplexity and bits per byte of a model on a token split.

Every token after the first is predicted once, from non-overlapping windows of block_size tokens. Bits per
byte divides the summed loss (in bits) by the UTF-8 bytes of the text: the split's own byte count when the
whole split is evaluated, else the bytes of the predicted tokens. It makes models with different tokenizers
comparable (as in Gao et al. 2020, The Pile).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmmo.data import TokenSplit, eval_windows
from llmmo.distributed import World
from llmmo.model import Transformer


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token, nats
    ppl: float  # exp(loss)
    bpb: float  # bits per UTF-8 byte
    tokens: int  # tokens predicted
    bytes: int  # their UTF-8 bytes

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@torch.inference_mode()
def evaluate(
    model: Transformer,
    split: TokenSplit,
    token_bytes: np.ndarray,
    batch_size: int = 16,
    max_batches: int = 0,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    world: World | None = None,
    block_size: int = 0,
) -> EvalResult:
    """Evaluate `model` on `split` (the whole split, or its first `max_batches` batches), in windows of
    `block_size` tokens (0: the model's context; a training run passes the windows it trains on).

    With a `world` of N training processes, `batch_size` is the global batch: rank r takes rows [r * B, (r + 1)
    * B) of each batch, B = batch_size / N rounded up, and the sums of loss, tokens and bytes are added over the
    ranks, so every rank returns the result of the whole split. A rank left without rows in a short last batch
    runs a spare pass (uncounted): a sharded model gathers its weights in each forward, with every rank.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    nats, count, n_bytes = 0.0, 0, 0
    whole_split = max_batches == 0  # then its own byte count is exact: no need to add up the tokens' bytes
    byte_table = torch.from_numpy(token_bytes)
    share = -(-batch_size // world.size)
    block_size = block_size or model.cfg.block_size
    for x, y in eval_windows(split.tokens, block_size, batch_size, max_batches):
        x, y = x[world.rank * share : (world.rank + 1) * share], y[world.rank * share : (world.rank + 1) * share]
        if len(x) == 0:
            x = torch.zeros(1, block_size, dtype=torch.long)
            y = torch.full_like(x, -1)
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        targets = y[y >= 0]
        if targets.numel() == 0:
            continue
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum").item()
        count += targets.numel()
        if not whole_split:
            n_bytes += int(byte_table[targets.cpu()].sum())
    model.train(was_training)
    nats, count, n_bytes = world.sum([nats, count, n_bytes])
    count, n_bytes = int(count), int(n_bytes)
    if whole_split:  # the text's own bytes (exact also for the lossy word tokenizer)
        n_bytes = split.n_bytes
    loss = nats / max(count, 1)
    return EvalResult(
        loss=loss, ppl=math.exp(min(loss, 700.0)), bpb=nats / math.log(2) / max(n_bytes, 1), tokens=count, bytes=n_bytes
    )
