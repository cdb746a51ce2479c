"""`llmmo export --format hf`: a checkpoint -> a transformers model folder that loads with no code of ours.

```
OUT/
  config.json                 LlamaForCausalLM (llama family), Qwen3ForCausalLM (llama with QK-norm) or
                              GPT2LMHeadModel (gpt2 family)
  model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  generation_config.json      bos / eos / pad ids
  tokenizer.json              our tokenizer.json as it is (it is HF `tokenizers` JSON already)
  tokenizer_config.json       PreTrainedTokenizerFast with the special tokens the tokenizer has
```
Only what the target class computes exactly is written; any other option is refused (`InteropError`), never
approximated. transformers itself is not needed to export: the files are written directly, and the tests
load them with transformers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llmmo import __version__
from llmmo.checkpoint import Checkpoint, load_checkpoint
from llmmo.config import ModelConfig
from llmmo.errors import InteropError
from llmmo.fileio import atomic_folder
from llmmo.finetune.chat import END, JINJA_TEMPLATE, has_chat_tokens
from llmmo.finetune.lora import LoRALinear, merge_lora
from llmmo.interop.hf_weights import parse_size, save_hf_tensors, to_hf_tensors
from llmmo.tokenizer import EOS, EOT, HF, UNK, Tokenizer

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers 5 defaults to 50GB; smaller shards download and resume better
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Special tokens an hf-kind tokenizer may name its roles with (the roles are not part of tokenizer.json).
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def hf_model_type(cfg: ModelConfig) -> str:
    """transformers' model_type for the model: its family's, or qwen3 for the llama family with QK-norm (Qwen3 is
    Llama with q_norm and k_norm)."""
    return "qwen3" if cfg.family == "llama" and cfg.qk_norm else cfg.family


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse a model that the family's transformers class would compute differently, naming the option."""
    family = cfg.family
    if family not in ("gpt2", "llama"):
        raise InteropError(f"model.family '{family}' has no transformers counterpart; llmmo exports gpt2 and llama")
    if cfg.qk_norm and family == "gpt2":
        raise InteropError(
            "GPT2LMHeadModel has no QK-norm (model.qk_norm true); use --model.family llama, exported as "
            "Qwen3ForCausalLM, or train without it"
        )
    if cfg.qk_norm and cfg.bias:
        raise InteropError(
            "Qwen3ForCausalLM (llama with QK-norm) has no MLP biases (model.bias true); train with --model.bias false"
        )
    # (option, the value the class computes)
    if family == "gpt2":
        fixed = [("positions", "learned"), ("norm", "layernorm"), ("mlp", "gelu")]
        if cfg.n_head * cfg.head_dim != cfg.n_embd:
            raise InteropError(
                f"GPT2LMHeadModel's heads split n_embd ({cfg.n_embd}) evenly, these are {cfg.n_head} x "
                f"{cfg.head_dim} (pruned heads); prune neurons only (--heads 0) to export a gpt2 model, or train "
                "the llama family, whose heads have their own width"
            )
        if cfg.n_kv_head != cfg.n_head:
            raise InteropError(
                f"GPT2LMHeadModel has no grouped-query attention (model.n_kv_head {cfg.n_kv_head} < n_head "
                f"{cfg.n_head}); use --model.family llama to export it as LlamaForCausalLM"
            )
    else:
        fixed = [("positions", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu")]
    for option, needed in fixed:
        value = getattr(cfg, option)
        if value != needed:
            # the other family, unless QK-norm (which only the llama family exports) rules it out
            other = "" if cfg.qk_norm else f", or use --model.family {'llama' if family == 'gpt2' else 'gpt2'},"
            raise InteropError(
                f"{ARCHITECTURES[hf_model_type(cfg)]} cannot compute model.{option} {value} (it has {needed} only); "
                f"keep model.{option} {needed} in the {family} family{other} to export"
            )


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's special tokens by role (bos_token, eos_token, unk_token, pad_token), as they exist."""
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    roles: dict[str, str] = {}
    if tokenizer.kind == "bpe" and EOT in vocab:
        roles |= {"bos_token": EOT, "eos_token": EOT}  # GPT-2's convention: one token starts and ends documents
    elif tokenizer.kind == "word":
        roles |= {"unk_token": UNK, "eos_token": EOS}
    elif tokenizer.kind == HF:
        specials = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special]
        if tokenizer.eot_id is not None:
            roles["eos_token"] = tokenizer.hf.id_to_token(tokenizer.eot_id)
        for role, names in (("bos_token", BOS_NAMES), ("pad_token", PAD_NAMES)):
            found = next((name for name in names if name in specials), None)
            if found is not None:
                roles[role] = found
        unk = json.loads(tokenizer.to_json())["model"].get("unk_token")
        if unk in vocab:
            roles["unk_token"] = unk
    return roles


def token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json and generation_config.json. eos is the token `llmmo generate` stops at
    (bpe and hf: end of text; char and word: none, as a word tokenizer's <eos> ends only a line), so that
    transformers' generate() stops where ours does; an instruction-tuned model's replies end at `<|end|>`."""
    roles = special_tokens(tokenizer)
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    eos = tokenizer.text_end_id
    return {
        "bos_token_id": vocab.get(roles.get("bos_token", "")),
        "eos_token_id": vocab[END] if has_chat_tokens(tokenizer) else eos,
        "pad_token_id": vocab.get(roles.get("pad_token", "")),
    }


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json for the family's transformers class. Every field whose transformers default differs from the
    model is written; `llmmo` records where the model came from, so that `llmmo import` restores it as it was."""
    cfg, ids = ckpt.model.cfg, token_ids(ckpt.tokenizer)
    dtype = ckpt.model.tok_emb.weight.dtype
    if dtype not in DTYPES:
        raise InteropError(f"weights of dtype {dtype} cannot be exported; export a float checkpoint")
    model_type = hf_model_type(cfg)
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size}
    if cfg.family == "gpt2":
        arch = {
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden,
            "activation_function": "gelu_new",  # GPT-2's own name for the tanh approximation ours computes
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,  # one rate for the three places ours applies it
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    else:
        arch = {
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.mlp_hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
            "rope_theta": cfg.rope_theta,  # where transformers 4 and other readers look for it
            "attention_bias": cfg.bias,
            # training only: LlamaForCausalLM drops out attention weights alone, ours also residuals/embeddings
            "attention_dropout": cfg.dropout,
        }
        if model_type == "qwen3":  # full attention in every layer, as ours
            arch |= {"use_sliding_window": False, "sliding_window": None}
        else:
            arch["mlp_bias"] = cfg.bias
    tail = {
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": DTYPES[dtype],
        **ids,
        "llmmo": {"version": __version__, "model": asdict(cfg), "data": asdict(ckpt.data)},
    }
    return common | arch | tail


def save_hf_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json (ours as it is) and a tokenizer_config.json that makes AutoTokenizer load it as the
    generic fast tokenizer, giving our ids. No add_bos_token/add_eos_token (a tokenizer.json's own
    post-processor, if any, stays in charge) and no clean-up of spaces on decode. Returns the file names."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **special_tokens(tokenizer),
    }
    if has_chat_tokens(tokenizer):  # an instruction-tuned model: its template, for apply_chat_template
        config["chat_template"] = JINJA_TEMPLATE
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]


def check_out_folder(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse to replace a folder with contents unless asked to (it is replaced whole, not merged), and never the
    `source` folder being converted or a folder that holds it, even when asked."""
    if source is not None and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise InteropError(f"'{out}' holds the folder being converted ('{source}'); write to another folder")
    if out.exists() and not out.is_dir():
        raise InteropError(f"'{out}' is a file; give a folder to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InteropError(f"'{out}' exists and is not empty; choose a new folder, or pass --overwrite to replace it")


def export_hf(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> list[str]:
    """Write `checkpoint` (a folder or a loaded one) as a transformers folder at `out`; returns its file names.

    The folder is written beside `out` and swapped in, so a failed export leaves nothing half-written.
    """
    out = Path(out)
    limit = parse_size(max_shard_size)
    check_out_folder(out, overwrite, checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint))
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if any(r["method"] in ("quantize", "lowrank") for r in ckpt.meta.get("compression", [])):
        from llmmo.compress import densify

        # transformers' classes have no int4 or factorized layers: the weights they stand for, in float
        ckpt = dataclasses.replace(ckpt, model=densify(ckpt.model))
    if any(isinstance(m, LoRALinear) for m in ckpt.model.modules()):  # a LoRA fine-tune: adapters folded in
        ckpt = dataclasses.replace(ckpt, model=merge_lora(ckpt.model))
    check_exportable(ckpt.model.cfg)
    if ckpt.tokenizer.vocab_size > ckpt.model.cfg.vocab_size:
        raise InteropError(
            f"the tokenizer has {ckpt.tokenizer.vocab_size} tokens, more than the model's {ckpt.model.cfg.vocab_size}"
        )
    config = hf_config(ckpt)
    generation = {k: v for k, v in token_ids(ckpt.tokenizer).items() if v is not None}
    with atomic_folder(out) as tmp:
        files = save_hf_tensors(to_hf_tensors(ckpt.model), tmp, limit)
        for name, content in (("config.json", config), ("generation_config.json", generation)):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
            files.append(name)
        files += save_hf_tokenizer(ckpt.tokenizer, tmp, ckpt.model.cfg.block_size)
    return sorted(files)
