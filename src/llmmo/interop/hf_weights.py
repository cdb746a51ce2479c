"""Weights between llmmo's names and transformers' (GPT2LMHeadModel, LlamaForCausalLM, and Qwen3ForCausalLM for
the llama family with QK-norm), and the safetensors files of a transformers folder: one `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

Every tensor is moved, never recomputed: GPT-2's Conv1D stores (in, out), the transpose of nn.Linear, and
our fused qkv is the row-wise concatenation q | k | v of Llama's q_proj, k_proj, v_proj, so both directions
are exact. A gpt2-family model without biases is written with zero biases, which GPT2LMHeadModel always has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from llmmo.config import ModelConfig
from llmmo.errors import InteropError
from llmmo.model import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = {"gpt2": "transformer.", "llama": "model."}  # the base model's attribute in the *LMHeadModel classes
# Buffers some saved folders carry that are not weights: GPT-2's causal masks, old Llama rotary tables.
IGNORED = re.compile(r".*\.attn\.(bias|masked_bias)$|.*rotary_emb\.inv_freq$")
# (our Linear, their layer) in each block, q/k/v aside
GPT2_LINEARS = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"))
GPT2_LINEARS += (("mlp.proj", "mlp.c_proj"),)
LLAMA_LINEARS = (("attn.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"))
LLAMA_LINEARS += (("mlp.proj", "mlp.down_proj"),)
QK_NORMS = ("q_norm", "k_norm")  # the same names in our Attention and in Qwen3's


def to_hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, each its own contiguous CPU tensor (safetensors refuses
    tensors that share memory). A tied output head is left out, as transformers saves it."""
    cfg, sd = model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def bias(name: str, rows: int) -> torch.Tensor:
        """Our bias, or the zeros that a bias-free layer is equal to."""
        return sd[name] if name in sd else torch.zeros(rows, dtype=sd["tok_emb.weight"].dtype)

    if cfg.family == "gpt2":
        p = PREFIX["gpt2"]
        out[p + "wte.weight"], out[p + "wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"{p}h.{i}."
            for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{theirs}{ln}.weight"] = sd[f"{ours}{norm}.weight"]
                out[f"{theirs}{ln}.bias"] = bias(f"{ours}{norm}.bias", cfg.n_embd)
            for linear, conv in GPT2_LINEARS:
                weight = sd[f"{ours}{linear}.weight"]  # (out, in) -> Conv1D's (in, out)
                out[f"{theirs}{conv}.weight"] = weight.t()
                out[f"{theirs}{conv}.bias"] = bias(f"{ours}{linear}.bias", weight.size(0))
        out[p + "ln_f.weight"], out[p + "ln_f.bias"] = sd["norm_f.weight"], bias("norm_f.bias", cfg.n_embd)
    else:
        p = PREFIX["llama"]
        out[p + "embed_tokens.weight"] = sd["tok_emb.weight"]
        sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"{p}layers.{i}."
            out[f"{theirs}input_layernorm.weight"] = sd[f"{ours}norm1.weight"]
            out[f"{theirs}post_attention_layernorm.weight"] = sd[f"{ours}norm2.weight"]
            if cfg.qk_norm:
                for norm in QK_NORMS:
                    out[f"{theirs}self_attn.{norm}.weight"] = sd[f"{ours}attn.{norm}.weight"]
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                parts = sd[f"{ours}attn.qkv.{kind}"].split(sizes)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    out[f"{theirs}self_attn.{name}.{kind}"] = part
                for linear, proj in LLAMA_LINEARS:
                    out[f"{theirs}{proj}.{kind}"] = sd[f"{ours}{linear}.{kind}"]
        out[p + "norm.weight"] = sd["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' weights (with or without the base-model prefix) -> a state dict for `Transformer(cfg)`,
    biases included as the folder has them. Refuses tensors that have no place in our model."""
    left = dict(tensors)
    p = PREFIX[cfg.family]

    def take(name: str) -> torch.Tensor:
        for key in (p + name, name):
            if key in left:
                return left.pop(key)
        raise InteropError(f"the weights have no tensor '{p}{name}'; the folder is incomplete or of another model")

    sd: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        sd["tok_emb.weight"], sd["pos_emb.weight"] = take("wte.weight"), take("wpe.weight")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"h.{i}."
            for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
                sd[f"{ours}{norm}.weight"] = take(f"{theirs}{ln}.weight")
                sd[f"{ours}{norm}.bias"] = take(f"{theirs}{ln}.bias")
            for linear, conv in GPT2_LINEARS:
                sd[f"{ours}{linear}.weight"] = take(f"{theirs}{conv}.weight").t().contiguous()
                sd[f"{ours}{linear}.bias"] = take(f"{theirs}{conv}.bias")
        sd["norm_f.weight"], sd["norm_f.bias"] = take("ln_f.weight"), take("ln_f.bias")
        embedding = "wte.weight"
    else:
        sd["tok_emb.weight"] = take("embed_tokens.weight")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"layers.{i}."
            sd[f"{ours}norm1.weight"] = take(f"{theirs}input_layernorm.weight")
            sd[f"{ours}norm2.weight"] = take(f"{theirs}post_attention_layernorm.weight")
            if cfg.qk_norm:
                for norm in QK_NORMS:
                    sd[f"{ours}attn.{norm}.weight"] = take(f"{theirs}self_attn.{norm}.weight")
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                qkv = [take(f"{theirs}self_attn.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj")]
                sd[f"{ours}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
                for linear, proj in LLAMA_LINEARS:
                    sd[f"{ours}{linear}.{kind}"] = take(f"{theirs}{proj}.{kind}")
        sd["norm_f.weight"] = take("norm.weight")
        embedding = "embed_tokens.weight"
    head = left.pop("lm_head.weight", None)
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, sd["tok_emb.weight"]):
            raise InteropError(
                f"config.json ties the embeddings but lm_head.weight differs from {p}{embedding}; "
                "set tie_word_embeddings to false in config.json to import the two apart"
            )
        sd["lm_head.weight"] = sd["tok_emb.weight"]  # the same tensor, as Transformer ties them
    elif head is None:
        raise InteropError(
            "the weights have no lm_head.weight and config.json does not tie the embeddings: this is a base "
            "model without its language-model head, which llmmo cannot use"
        )
    else:
        sd["lm_head.weight"] = head
    unused = sorted(k for k in left if not IGNORED.fullmatch(k))
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise InteropError(f"tensors {shown} have no place in a {cfg.family}-family llmmo model; not importing")
    return sd


# ------------------------------------------------------------------------------------- safetensors files


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB', '100KB' or a number of bytes -> bytes (transformers' units: GB = 10^9)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise InteropError(f"size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        unit = (match[2] or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        value = int(float(match[1]) * scale)
    if value <= 0:
        raise InteropError(f"a shard size must be positive, got {size!r}")
    return value


def save_hf_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` into `folder` as transformers does: one file when they fit in `max_shard_bytes`, else
    shards filled in order (a tensor larger than the limit gets a shard of its own) plus the index file.
    Returns the file names written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        safetensors.torch.save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        safetensors.torch.save_file(shard, str(folder / name), metadata=metadata)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder, from `model.safetensors` or from the shards its index names."""
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InteropError(f"'{folder / INDEX_FILE}' is not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        legacy = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt*")]
        hint = (
            f"it holds {', '.join(sorted(legacy)[:2])} (pickled PyTorch weights), which llmmo does not unpickle; "
            "load it with transformers and save_pretrained() it again to get safetensors"
            if legacy
            else "pass the folder that save_pretrained() wrote"
        )
        raise InteropError(f"'{folder}' has no {SINGLE_FILE} or {INDEX_FILE}; {hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise InteropError(f"'{path}' is missing, though {INDEX_FILE} names it; download the folder again")
        try:
            tensors |= safetensors.torch.load_file(str(path))
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise InteropError(f"'{path}' is corrupt or truncated ({e}); download or save it again") from None
    return tensors
