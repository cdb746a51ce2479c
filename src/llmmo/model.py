"""The Transformer language model, one forward pass read top to bottom.

Two families share this code (see `config.FAMILY_DEFAULTS`):
- gpt2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings (Radford et al. 2019);
- llama: rotary positions (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020),
  no biases, grouped-query attention (Ainslie et al. 2023).
Blocks are pre-norm residual: x = x + attn(norm(x)); x = x + mlp(norm(x)). Either family may normalise each
head's queries and keys (`qk_norm`; the llama family with it is Qwen3's architecture).

Shapes: B batch, T time (tokens), C = n_embd, H = n_head, Hkv = n_kv_head, D = head_dim (C / H unless heads
were pruned), V = vocab.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.config import ModelConfig
from llmmo.cpu import mkl_fast_path

# Before any product: MKL's AVX-512 kernels on AMD CPUs, ~2.3x its generic path (llmmo.cpu). Here because every
# llmmo command that computes imports the model first.
mkl_fast_path()


class KVCache:
    """Keys and values of every layer, allocated once for `max_len` positions, for incremental decoding.

    Rows of a batch may hold prompts of different lengths: they are left-padded, and `pad[b]` counts the
    padding of row b, which is masked out of attention and not counted in positions.

    New keys are written with a tensor of slot indices, and attention reads only the slots written so far
    (it reads them from memory: unwritten slots would cost time). Compiled (`generate.compile_decoder`), the
    position is a symbolic size after the second step (Dynamo's automatic dynamic shapes), so one decoding
    graph serves every position; reading all `max_len` slots instead, for static shapes, was 5-12% slower at
    batch 8 and no faster at batch 1 (docs/LOG.md). A server's running batch attends through `view`s.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        pad: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # one tensor per layer, so that writing a layer's slots is an in-place index_put on a whole tensor
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far (the same for every row)
        self.pad = pad.to(device) if pad is not None else None  # (B,) left-padding per row
        self.slots = torch.arange(max_len, device=device)  # (max_len,) slot index of every cached key

    def new_slots(self, T: int) -> torch.Tensor:
        """(T,) slots the next T tokens are written to."""
        return self.slots[:T] + self.pos

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens: (T,), or (B, T) when rows are padded."""
        pos = self.new_slots(T)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)

    def visible(self, T: int) -> int:
        """How many slots the next T queries attend over: the ones written, theirs included."""
        return self.pos + T

    def attn_mask(self, T: int) -> torch.Tensor:
        """Boolean (B or 1, 1, T, S) mask of the slots each of the next T queries may see (S = `visible`)."""
        q, slots = self.new_slots(T), self.slots[: self.visible(T)]
        mask = slots[None, :] <= q[:, None]  # (T, S): causal, and unwritten slots are in the future
        if self.pad is not None:
            mask = mask[None] & (slots[None, None, :] >= self.pad[:, None, None])  # (B, T, S)
            # a padding query would see no key at all, and some attention kernels answer NaN for an empty
            # softmax; letting it see itself keeps every value finite (its output is never used)
            mask |= slots[None, None, :] == q[None, :, None]
            return mask[:, None]
        return mask[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new (B, Hkv, T, D) keys and values; return the `visible` slots (B, Hkv, S, D)."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos + T} needed")
        slots = self.new_slots(T)
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        S = self.visible(T)
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def advance(self, T: int) -> None:
        self.pos += T

    def view(self, rows: int, start: int, stop: int, pad: torch.Tensor) -> KVCache:
        """Rows [0, rows) and slots [start, stop) of this cache as a cache of their own, sharing its memory (what
        the view writes lands here); `pad` (rows,) counts from `start`. A server's running batch
        (llmmo.serve.batch) attends through it to the slots its rows use, not to all `max_len`."""
        view = copy.copy(self)
        view.k = [t[:rows, :, start:stop] for t in self.k]  # (rows, Hkv, stop - start, D) each
        view.v = [t[:rows, :, start:stop] for t in self.v]
        view.max_len, view.pos, view.pad = stop - start, self.pos - start, pad
        view.slots = self.slots[: stop - start]
        return view


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension (the GPT-NeoX/LLaMA RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE (Su et al. 2021, eq. 34): rotate each pair of channels by an angle proportional to position."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (max_len, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (T,) or (B, T) -> cos, sin shaped to broadcast over heads: (1 or B, 1, T, D)
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per row, q (B, H, 1, D), over the cache's k, v (B, Hkv, S, D), written out.
    For the compiled decoding step: Inductor fuses it into its own loops, where SDPA stays an opaque call per
    layer that costs more than the work at batch 1 (+9% tokens/s for gpt2 10.7M, +14% for llama; docs/LOG.md).
    Eager, SDPA is faster."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    q = q.reshape(B, Hkv, H // Hkv, D)  # each key/value head's group of query heads
    scores = (q @ k.transpose(-2, -1)) * D**-0.5  # (B, Hkv, H/Hkv, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B or 1, 1, 1, S)
    return (scores.softmax(-1) @ v).reshape(B, H, 1, D)


class Attention(nn.Module):
    """Causal self-attention with H query heads sharing Hkv key/value heads (Hkv = H is plain multi-head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        # QK-norm (Dehghani et al. 2023; Wortsman et al. 2023; as in Qwen3): each head's queries and keys are
        # RMS-normalised, with a learned gain per channel, which keeps attention logits from growing large
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over D, before the rotation
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        # softmax(q k^T / sqrt(D)) v (Vaswani et al. 2017, eq. 1), causal; each group of H/Hkv query heads
        # reads one key/value head.
        if T == 1 and kv_cache is not None and torch.compiler.is_compiling():
            y = decode_attention(q, k, v, mask)  # (B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and kv_cache is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2, tanh approximation) or SwiGLU (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, mlp_hidden)
        else:
            h = F.gelu(self.up(x), approximate="tanh")  # (B, T, mlp_hidden)
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, kv_cache, layer):
        x = x + self.attn(self.norm1(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.block_size <= 0:
            raise ValueError("ModelConfig needs vocab_size and block_size; pass it through config.resolve_model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.positions == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # Press & Wolf 2017
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy when targets (B, T) are given.

        Targets of -1 are ignored. With a `kv_cache`, idx holds only the new tokens; the cache advances by T.
        """
        logits = self.lm_head(self.hidden(idx, kv_cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the last block's output after the final norm, (B, T, C): what the output head reads,
        and what task heads (llmmo.finetune.heads) pool."""
        B, T = idx.shape
        if kv_cache is not None:
            if kv_cache.pos + T > self.cfg.block_size:
                raise ValueError(f"{kv_cache.pos + T} positions exceed block_size {self.cfg.block_size}")
            positions, mask = kv_cache.positions(T), kv_cache.attn_mask(T)
        else:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once each (tied weights once); `non_embedding` leaves out the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int = 0) -> int:
        """Training FLOPs per token of sequences `seq_len` long (0: block_size): 6 per matmul weight (forward 2,
        backward 4) plus attention's 12 * n_layer * (n_head * head_dim) * seq_len (PaLM, Chowdhery et al. 2022,
        appendix B; n_head * head_dim is n_embd unless heads were pruned). The output head counts as a matmul
        even when tied; embedding lookups cost nothing. Layers of any module with in_features and out_features
        (quantized ones too) count as matmuls."""
        matmul_weights = sum(
            m.in_features * m.out_features
            for m in self.modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")
        )
        c = self.cfg
        return 6 * matmul_weights + 12 * c.n_layer * c.n_head * c.head_dim * (seq_len or c.block_size)
