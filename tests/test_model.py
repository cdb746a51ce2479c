"""The Transformer: its parts against their equations, the KV cache against full recomputation, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmmo.config import ModelConfig, resolve_model
from llmmo.model import KVCache, Transformer, apply_rotary


def make(family: str = "gpt2", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = resolve_model(ModelConfig(family=family, vocab_size=kw.pop("vocab_size", 50), block_size=32, **kw))
    return Transformer(cfg).eval()


FAMILIES = [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_head": 2}), ("llama", {"n_kv_head": 1})]
FAMILIES += [("gpt2", {"qk_norm": True}), ("llama", {"n_kv_head": 2, "qk_norm": True})]


def test_family_defaults() -> None:
    gpt2, llama = make("gpt2").cfg, make("llama").cfg
    assert (gpt2.positions, gpt2.norm, gpt2.mlp, gpt2.bias, gpt2.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    assert (llama.positions, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    assert llama.mlp_hidden == 352  # 8/3 * 128 rounded up to a multiple of 32


def test_attention_matches_its_equation() -> None:
    """softmax(q k^T / sqrt(D) + causal mask) v, each key/value head serving n_head / n_kv_head query heads."""
    model = make("llama", n_kv_head=2)
    attn, cfg = model.blocks[0].attn, model.cfg
    x = torch.randn(2, 10, cfg.n_embd)
    q, k, v = attn.qkv(x).split([cfg.n_embd, 2 * cfg.head_dim, 2 * cfg.head_dim], dim=-1)
    q = q.view(2, 10, cfg.n_head, cfg.head_dim).transpose(1, 2)
    k = k.view(2, 10, 2, cfg.head_dim).transpose(1, 2).repeat_interleave(cfg.n_head // 2, dim=1)
    v = v.view(2, 10, 2, cfg.head_dim).transpose(1, 2).repeat_interleave(cfg.n_head // 2, dim=1)
    cos, sin = model.rotary(torch.arange(10))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, cfg.n_embd))
    got = attn(x, model.rotary(torch.arange(10)), None, None, 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_qk_norm_scales_each_heads_queries_and_keys_to_unit_rms_times_the_gain() -> None:
    """With QK-norm, attention is the same equation on RMS-normalised queries and keys (per head, over D)."""
    model = make("llama", n_kv_head=2, qk_norm=True)
    attn, cfg = model.blocks[0].attn, model.cfg
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, cfg.n_embd)
    q, k, v = attn.qkv(x).split([cfg.n_embd, 2 * cfg.head_dim, 2 * cfg.head_dim], dim=-1)

    def rms_normed(t: torch.Tensor, heads: int, gain: torch.Tensor) -> torch.Tensor:
        t = t.view(2, 10, heads, cfg.head_dim).transpose(1, 2)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * gain

    q, k = rms_normed(q, cfg.n_head, attn.q_norm.weight), rms_normed(k, 2, attn.k_norm.weight)
    k, v = k.repeat_interleave(2, dim=1), v.view(2, 10, 2, cfg.head_dim).transpose(1, 2).repeat_interleave(2, dim=1)
    cos, sin = model.rotary(torch.arange(10))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, cfg.n_embd)
    got = attn(x, model.rotary(torch.arange(10)), None, None, 0)
    torch.testing.assert_close(got, attn.proj(expected), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    model = make("llama")
    q, k = torch.randn(1, 1, 1, model.cfg.head_dim), torch.randn(1, 1, 1, model.cfg.head_dim)

    def score(i: int, j: int) -> float:
        cq, sq = model.rotary(torch.tensor([i]))
        ck, sk = model.rotary(torch.tensor([j]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_norms_match_their_formulas() -> None:
    x = torch.randn(3, 128)
    rms = make("llama").blocks[0].norm1
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight)
    ln = make("gpt2").blocks[0].norm1
    torch.testing.assert_close(ln(x), F.layer_norm(x, (128,), ln.weight, ln.bias, 1e-5))


def test_output_is_causal() -> None:
    """Changing a later token never changes the logits of earlier positions."""
    for family, kw in FAMILIES:
        model = make(family, **kw)
        idx = torch.randint(0, 50, (1, 16))
        changed = idx.clone()
        changed[0, 10:] = (changed[0, 10:] + 1) % 50
        a, _ = model(idx)
        b, _ = model(changed)
        torch.testing.assert_close(a[:, :10], b[:, :10])
        assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize(("family", "kw"), FAMILIES)
def test_kv_cache_equals_full_forward(family: str, kw: dict) -> None:
    model = make(family, **kw)
    idx = torch.randint(0, 50, (3, 20))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3, model.cfg.block_size)
    pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 9), (9, 20)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20


@pytest.mark.parametrize(("family", "kw"), FAMILIES)
def test_left_padded_rows_equal_unpadded_rows(family: str, kw: dict) -> None:
    model = make(family, **kw)
    idx = torch.randint(0, 50, (3, 12))
    pad = torch.tensor([0, 4, 9])
    cache = KVCache(model.cfg, 3, model.cfg.block_size, pad=pad)
    batched, _ = model(idx, kv_cache=cache)
    step, _ = model(torch.randint(0, 50, (3, 1)), kv_cache=cache)
    for row in range(3):
        alone, _ = model(idx[row : row + 1, pad[row] :])
        torch.testing.assert_close(batched[row, pad[row] :], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(step).all()


def test_loss_at_init_is_near_uniform_and_ignores_minus_one() -> None:
    model = make("gpt2", vocab_size=65)
    idx = torch.randint(0, 65, (4, 32))
    _, loss = model(idx, torch.randint(0, 65, (4, 32)))
    assert abs(loss.item() - math.log(65)) < 0.1
    targets = torch.full((4, 32), -1)
    targets[:, 0] = 3
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 0], targets[:, 0]))


def test_parameter_count_and_flops_follow_the_formulas() -> None:
    """gpt2 shape 4 x 128 over 65 symbols: the 0.8M-parameter model of nanoGPT's CPU recipe."""
    model = make("gpt2", vocab_size=65)
    d, L, V, T = 128, 4, 65, 32
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert model.num_params() == V * d + T * d + L * per_block + 2 * d  # tied head counted once
    assert model.num_params(non_embedding=True) == L * per_block + 2 * d
    assert model.flops_per_token() == 6 * (L * 12 * d * d + V * d) + 12 * L * d * T
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = make("llama", vocab_size=65)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_dropout_acts_only_in_training() -> None:
    model = make("gpt2", dropout=0.5)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_too_long_input_is_refused() -> None:
    model = make("gpt2")
    with pytest.raises(ValueError, match="longer than block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
