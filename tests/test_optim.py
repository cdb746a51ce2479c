"""Optimizers and the schedule: their formulas, checked directly."""

import copy
import math

import pytest
import torch

from llmmo.config import TrainConfig
from llmmo.train.muon import Muon, orthogonalize
from llmmo.train.optim import build_optimizer, lr_at


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos(pi/2) = 0
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4) == lr_at(500, cfg, 110)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 128)])  # a square random g has ~0 singular values
def test_newton_schulz_brings_singular_values_near_one(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 0, shape[1]))  # singular values spread 10x
    singular = torch.linalg.svdvals(orthogonalize(g))
    assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic's band around 1 (Jordan et al.)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(orthogonalize(g).flatten(), (u @ vt).flatten(), dim=0)
    assert cosine > 0.95  # close to U V^T


def test_muon_and_adamw_groups_update_as_their_formulas_say() -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(8, 4), torch.randn(4)
    opt = Muon([{"params": [w], "muon": True, "lr": 0.02}, {"params": [b], "lr": 1e-3}], betas=(0.9, 0.95))
    opt.step()
    # Muon, first step: buffer = 0.05 g, Nesterov g' = lerp(g, buffer, 0.95); update = NS(g') * sqrt(8 / 4)
    nesterov = w.grad.lerp(0.05 * w.grad, 0.95)
    torch.testing.assert_close(w.detach(), w0 - 0.02 * math.sqrt(2) * orthogonalize(nesterov))
    # AdamW, first step: the bias-corrected update is lr * g / (|g| + eps) = lr * sign(g)
    torch.testing.assert_close(b.detach(), b0 - 1e-3 * b.grad.sign(), atol=1e-7, rtol=0)


def test_adamw_decays_linear_weights_only_and_its_fused_cpu_kernel_matches_the_reference_loop() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference = copy.deepcopy(model)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    assert opt.defaults["fused"]  # measured faster on the CPU too (docs/LOG.md, session 6)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 4]  # Linear weight; embedding, bias, norm
    ref = torch.optim.AdamW(
        [{"params": [reference[1].weight], "weight_decay": 0.1},
         {"params": [reference[0].weight, reference[1].bias, *reference[2].parameters()], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.99), foreach=False,
    )  # fmt: skip
    for _ in range(5):
        x = torch.randint(0, 10, (4, 3))
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
