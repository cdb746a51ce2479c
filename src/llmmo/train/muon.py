"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum SGD whose update for each weight
matrix is replaced by the nearest semi-orthogonal matrix, found by a Newton-Schulz iteration. It trains the
Transformer's hidden matrices in fewer steps than AdamW (modded-nanogpt's speedruns); embeddings, the output
head, norms and biases stay with AdamW, so this one optimizer runs both kinds of group (`muon` True or False).
"""

from __future__ import annotations

import torch

# The quintic iteration's coefficients, tuned to push singular values towards 1 in 5 steps (Jordan et al.)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by the Newton-Schulz iteration X <- aX + (b A + c A^2) X, A = X X^T."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.norm() + 1e-7)  # singular values now <= 1, where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups marked `muon=True` (2-D hidden matrices), AdamW for the others, in one optimizer so that
    schedules, state saving and resuming treat it like any torch optimizer."""

    def __init__(
        self,
        groups: list[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        for group in self.param_groups:
            update = self._muon_update if group["muon"] else self._adamw_update
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        g = p.grad.lerp(buf, group["momentum"])  # Nesterov
        # scaled so that the update's RMS does not shrink for wide-output matrices (Jordan et al.)
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(orthogonalize(g), alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]  # a tensor: no device-to-host sync per parameter on a GPU
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step).sqrt()).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(state["exp_avg"] / denom * (-group["lr"] / (1 - beta1**step)))
