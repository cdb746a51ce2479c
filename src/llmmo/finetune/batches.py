"""Batches of whole task examples (a sentence and its label, a packed chat row and its targets).

Like the language-model samplers (llmmo.data.sampler) the training batches are a pure function of (seed, step,
micro-step), and the ranks of a step share one global batch. Examples of different lengths are grouped by
length (sorted within chunks of 64 batches, then the batches shuffled), so a batch is padded only to its own
longest example: sentences of 5 to 50 tokens then cost their own length, not the longest sentence's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from llmmo.errors import DataError

CHUNK = 64  # batches whose examples are sorted by length together


def pad_rows(rows: Sequence[Sequence[int]], value: int = -1) -> torch.Tensor:
    """Right-pad token rows to the longest with `value`: (B, T) int64."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class ExampleBatches:
    """Every example once per epoch (leftovers that do not fill a global batch sit that epoch out)."""

    def __init__(
        self,
        inputs: Sequence[Sequence[int]],
        targets: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.grad_accum = grad_accum
        self.lengths = np.array([len(x) for x in inputs])
        global_batch = batch_size * world_size
        self.steps_per_epoch = len(inputs) // global_batch
        self.optimizer_steps_per_epoch = self.steps_per_epoch // grad_accum
        if self.optimizer_steps_per_epoch == 0:
            raise DataError(
                f"{len(inputs)} training examples are fewer than one optimizer step takes ({global_batch * grad_accum}:"
                f" batch_size x grad_accum x processes); lower --train.batch_size or add examples"
            )
        self._epoch, self._batches = -1, np.empty((0, global_batch), dtype=np.int64)

    def _batches_of_epoch(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global batch) example indices of `epoch`: shuffled, grouped by length."""
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self.inputs))
            global_batch = self.batch_size * self.world_size
            order = order[: self.steps_per_epoch * global_batch]
            chunk = CHUNK * global_batch
            for start in range(0, len(order), chunk):  # sort by length within each chunk (stable: seeded ties)
                part = order[start : start + chunk]
                order[start : start + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
            batches = order.reshape(self.steps_per_epoch, global_batch)
            self._epoch, self._batches = epoch, batches[rng.permutation(self.steps_per_epoch)]
        return self._batches

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of micro-batch `micro` of optimizer step `step`: inputs (B, T) padded with -1, and
        their targets."""
        epoch, step_in_epoch = divmod(step, self.optimizer_steps_per_epoch)
        row = self._batches_of_epoch(epoch)[step_in_epoch * self.grad_accum + micro]
        mine = row[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return pad_rows([self.inputs[i] for i in mine]), torch.from_numpy(self.targets[mine])


def eval_batches(inputs: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Every example once, grouped by length: (indices of the examples, their inputs padded with -1)."""
    order = np.argsort([len(x) for x in inputs], kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield chosen, pad_rows([inputs[i] for i in chosen])
