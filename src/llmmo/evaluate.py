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
) -> EvalResult:
    """Evaluate `model` on `split` (the whole split, or its first `max_batches` batches).

    With a `world` of several training processes, rank r takes batches r, r + N, ..., and the sums of loss,
    tokens and bytes are added over the ranks: every rank returns the result of the whole split. Each rank runs
    the same number of forward passes (a sharded model gathers its weights in each), the spare ones uncounted.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    nats, count, n_bytes = 0.0, 0, 0
    whole_split = max_batches == 0  # then its own byte count is exact: no need to add up the tokens' bytes
    byte_table = torch.from_numpy(token_bytes)
    windows = -(-max(len(split.tokens) - 1, 0) // model.cfg.block_size)
    n_batches = -(-windows // batch_size)
    n_batches = min(n_batches, max_batches) if max_batches > 0 else n_batches
    passes = 0
    for i, (x, y) in enumerate(eval_windows(split.tokens, model.cfg.block_size, batch_size, max_batches)):
        if i % world.size != world.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        passes += 1
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum").item()
        targets = y[y >= 0].cpu()
        count += targets.numel()
        if not whole_split:
            n_bytes += int(byte_table[targets].sum())
    for _ in range(-(-n_batches // world.size) - passes):  # spare passes, results unused
        with autocast or contextlib.nullcontext():
            model(torch.zeros(1, model.cfg.block_size, dtype=torch.long, device=device))
    model.train(was_training)
    nats, count, n_bytes = world.sum([nats, count, n_bytes])
    count, n_bytes = int(count), int(n_bytes)
    if whole_split:  # the text's own bytes (exact also for the lossy word tokenizer)
        n_bytes = split.n_bytes
    loss = nats / max(count, 1)
    return EvalResult(
        loss=loss, ppl=math.exp(min(loss, 700.0)), bpb=nats / math.log(2) / max(n_bytes, 1), tokens=count, bytes=n_bytes
    )
