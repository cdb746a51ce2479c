"""oneDNN's linear products for training (llmmo.onednn): the same outputs and gradients as nn.Linear, the same
parameters and state, and a model that trains the same."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from llmmo.config import ModelConfig, load_config, resolve_config, resolve_model
from llmmo.errors import ConfigError
from llmmo.model import Transformer
from llmmo.onednn import OneDNNLinear, available, onednn_linears

pytestmark = pytest.mark.skipif(not available(), reason="oneDNN is used on x86-64 CPUs with oneDNN only")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])  # the weight's gradient transposes either operand
def test_outputs_and_gradients_equal_nn_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(*shape, bias=bias)
    fast = onednn_linears(copy.deepcopy(plain))
    assert type(fast) is OneDNNLinear and isinstance(fast, nn.Linear)
    x = torch.randn(3, 7, shape[0], requires_grad=True)
    grad = torch.randn(3, 7, shape[1])
    out_plain = plain(x)
    out_plain.backward(grad)
    expected = [x.grad.clone()] + [p.grad.clone() for p in plain.parameters()]
    x.grad = None
    out_fast = fast(x)
    out_fast.backward(grad)
    torch.testing.assert_close(out_fast, out_plain, atol=1e-5, rtol=1e-5)
    for got, want in zip([x.grad] + [p.grad for p in fast.parameters()], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_model_trains_the_same_with_the_same_state(family):
    torch.manual_seed(0)
    cfg = resolve_model(ModelConfig(family=family, n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16))
    plain = Transformer(cfg)
    fast = onednn_linears(copy.deepcopy(plain))
    assert sum(type(m) is OneDNNLinear for m in fast.modules()) == sum(type(m) is nn.Linear for m in plain.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert fast.lm_head.weight is fast.tok_emb.weight or family == "llama"  # tying kept
    ids = torch.randint(0, 50, (4, 17))
    losses = []
    for model in (plain, fast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(5):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    half = copy.deepcopy(plain).to(torch.bfloat16)
    assert not any(type(m) is OneDNNLinear for m in onednn_linears(half).modules())  # bf16 layers stay


def test_autocast_empty_inputs_frozen_weights_and_double_backward():
    layer = onednn_linears(nn.Linear(8, 4))
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own path: bf16 out, as nn.Linear gives
        assert layer(x).dtype == torch.bfloat16
    assert layer(torch.randn(0, 8)).shape == (0, 4)  # oneDNN refuses an empty product; nn.Linear's path does not
    layer.weight.requires_grad_(False)  # a frozen base (LoRA): only the input's and the bias' gradients
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None
    layer.weight.requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        grad.sum().backward()  # no second derivative: an error, not a wrong number


def test_matmul_onednn_with_compile_is_refused():
    with pytest.raises(ConfigError, match="train.matmul=onednn"):
        resolve_config(load_config(overrides={"train.matmul": "onednn", "train.compile": True}))
