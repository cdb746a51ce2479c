"""Batches of (x, y) token windows for training and evaluation; y is x shifted left by one token.

The training samplers are stateless: the batch of (step, micro, rank) is a pure function of those numbers and
the seed. Resuming at step k therefore reproduces exactly the batches an uninterrupted run would have seen,
with no sampler state to save; the ranks of a step share out one global batch, so the windows a step trains
on do not depend on how many processes share it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llmmo.errors import DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[s : s + T] and y = tokens[s + 1 : s + T + 1] for each start s, as (B, T) int64 tensors."""
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check(tokens: np.ndarray, block_size: int, rank: int, world_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "lower --data.block_size or use more text"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _check_micro(micro: int, grad_accum: int) -> None:
    if not 0 <= micro < grad_accum:
        raise ValueError(f"micro-batch {micro} is not in [0, grad_accum={grad_accum}); pass grad_accum to the sampler")


class _Windows:
    """What both training samplers share: the token array, the batch shape, and who draws (rank, micro-step)."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        _check(tokens, block_size, rank, world_size)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum


class RandomWindows(_Windows):
    """Windows at uniformly random offsets, drawn afresh for every (step, micro) from a seeded generator.

    The draw is the global batch, world_size x batch_size windows, and rank r takes rows [r * batch_size,
    (r + 1) * batch_size): N processes of batch_size B train on exactly the windows of one process of N x B.
    """

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        _check_micro(micro, self.grad_accum)
        rng = np.random.default_rng((self.seed, step, micro, 0))  # the 0 keeps the seeds of earlier versions
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)


class EpochWindows(_Windows):
    """Every non-overlapping window once per epoch, in a permutation seeded by (seed, epoch).

    Window i starts at token i * block_size. Each epoch's permutation is dealt to the ranks in turn (rank r gets
    positions r, r + world_size, ...), and each rank cuts its share into `steps_per_epoch` batches of
    `batch_size`, leftovers dropped. So `steps_per_epoch` counts batches (micro-batches). An optimizer step takes
    `grad_accum` consecutive batches: an epoch has optimizer_steps_per_epoch = steps_per_epoch // grad_accum of
    them, and micro-batch `micro` of optimizer step `step` is batch (step % optimizer_steps_per_epoch) *
    grad_accum + micro of epoch step // optimizer_steps_per_epoch. Batches that would not fill a last optimizer
    step sit out that epoch, like the leftover windows.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_windows = (len(self.tokens) - 1) // self.block_size
        self.steps_per_epoch = self.n_windows // self.world_size // self.batch_size
        self.optimizer_steps_per_epoch = self.steps_per_epoch // self.grad_accum
        if self.optimizer_steps_per_epoch == 0:
            need = self.batch_size * self.grad_accum * self.world_size
            raise DataError(
                f"the split has {self.n_windows} windows of {self.block_size} tokens, fewer than the {need} "
                f"(batch_size {self.batch_size} x grad_accum {self.grad_accum} x ranks {self.world_size}) that one "
                "optimizer step takes; lower --train.batch_size or --data.block_size, or use more text"
            )
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _windows_of_epoch(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch` (the last epoch's are kept: consecutive steps share them)."""
        if epoch != self._epoch:
            permutation = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._epoch, self._order = epoch, permutation[self.rank :: self.world_size]
        return self._order

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        _check_micro(micro, self.grad_accum)
        epoch, step_in_epoch = divmod(step, self.optimizer_steps_per_epoch)
        first = (step_in_epoch * self.grad_accum + micro) * self.batch_size
        windows = self._windows_of_epoch(epoch)[first : first + self.batch_size]
        return _windows(self.tokens, windows * self.block_size, self.block_size)


def eval_windows(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the whole split, in order, so every token after the first is a target once.

    The last window may be shorter: its x is padded with 0 and its y with -1 (the loss's ignore_index). Padding
    x is harmless: in a causal model no real position attends to the later padded ones. `max_batches` > 0
    stops after that many batches; the last batch may have fewer than `batch_size` rows.
    """
    starts = np.arange(0, max(len(tokens) - 1, 0), block_size)
    for n, first in enumerate(range(0, len(starts), batch_size)):
        if 0 < max_batches <= n:
            return
        rows = starts[first : first + batch_size]
        x = np.zeros((len(rows), block_size), dtype=np.int64)
        y = np.full((len(rows), block_size), -1, dtype=np.int64)
        for r, start in enumerate(rows):
            window = np.asarray(tokens[start : start + block_size + 1], dtype=np.int64)
            x[r, : len(window) - 1] = window[:-1]
            y[r, : len(window) - 1] = window[1:]
        yield torch.from_numpy(x), torch.from_numpy(y)
