"""Typed configuration: the one source of truth for a run.

A run's config comes from three layers, later ones winning: the dataclass defaults below, a YAML recipe
(`--config configs/x.yaml`), and dotted overrides (`--model.n_layer 4`). Unknown keys are rejected with a
"did you mean". `resolve_config` then fills in everything a family or a dial implies, so the config saved
with a run has every value spelled out.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llmmo.errors import ConfigError
from llmmo.fileio import absolute_path

# What the names `gpt2` and `llama` imply (GPT-2: Radford et al. 2019; LLaMA: Touvron et al. 2023).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": tuple(FAMILY_DEFAULTS),
    "model.positions": ("learned", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "data.tokenizer": ("char", "word", "bpe"),
    "train.optimizer": ("adamw", "adam", "muon"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.sampler": ("random", "epoch"),
    "train.matmul": ("auto", "torch", "onednn"),
    "train.parallel": ("ddp", "fsdp"),
}


@dataclass
class ModelConfig:
    """The Transformer's shape. Fields left as None take the family's default in `resolve_config`."""

    family: str = "gpt2"  # sets positions, norm, mlp, bias, tie_embeddings and norm_eps unless they are given
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention (query) heads
    n_kv_head: int | None = None  # key/value heads (None: n_head); fewer is grouped-query attention
    n_embd: int = 128  # the residual stream's width
    head_dim: int = 0  # each attention head's width; 0: n_embd / n_head (pruning heads keeps it)
    depth: int = 0  # the one dial: > 0 sets n_layer = depth, n_embd = aspect * depth, heads min(64, aspect) wide
    aspect: int = 64  # with depth: the width per layer (nanochat's 64; smaller makes finer steps for small models)
    vocab_size: int = 0  # 0: the tokenizer's size; larger pads the embedding (e.g. to a multiple of 64)
    block_size: int = 0  # 0: data.block_size
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, in training only
    positions: str | None = None  # learned | rope
    norm: str | None = None  # layernorm | rmsnorm
    mlp: str | None = None  # gelu | swiglu
    mlp_hidden: int = 0  # 0: 4 * n_embd for gelu, 8/3 * n_embd rounded up to a multiple of 32 for swiglu
    bias: bool | None = None  # biases in Linear layers and norms
    tie_embeddings: bool | None = None  # share the token embedding with the output head
    norm_eps: float | None = None  # the norms' epsilon
    rope_theta: float = 10000.0  # RoPE's base wavelength
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (Qwen3's; 1.886 in 0.7x the steps, docs/LOG.md)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token windows."""

    source: str = "tinyshakespeare"  # a named source (see llmmo.data.sources); ignored when `path` is set
    path: str = ""  # a text file, a folder, a glob, or a .jsonl or .json file of records; wins over `source`
    text_field: str = "text"  # the field of JSONL/JSON records that holds the text (a list of lines is joined)
    encoding: str = "utf-8"  # the encoding of local text files
    tokenizer: str = "char"  # char | word | bpe
    vocab_size: int = 0  # word and bpe: 0 means 10000 (word) or 4096 (bpe); char: the corpus's characters
    block_size: int = 64  # context length in tokens
    val_fraction: float = 0.1  # local paths: the share held out for validation
    train_split: str = "train"  # which split trains (a named source's split name)
    val_split: str = "val"  # which split evaluates during training


@dataclass
class TrainConfig:
    """The optimisation loop, its budget and its outputs."""

    batch_size: int = 12  # sequences per micro-batch and process; a step's batch: this x grad_accum x processes
    grad_accum: int = 1  # micro-batches per optimizer step (gradients are reduced over processes once, at the last)
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (no decay) | muon (Muon for matrices, AdamW rest)
    lr: float = 1e-3  # the peak learning rate, reached after warm-up
    muon_lr: float = 0.02  # optimizer=muon: the peak learning rate of the blocks' matrices
    min_lr: float = 1e-4  # the floor that cosine decay ends at
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW only; never applied to norms, biases or embeddings
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.99  # Adam's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 (or less) disables
    sampler: str = "random"  # random: seeded random windows | epoch: each window once per epoch
    epochs: int = 0  # > 0 (with sampler=epoch): train this many passes over the data
    max_steps: int = 2000  # the run ends at the first budget reached; 0 leaves this one unset
    max_tokens: int = 0  # > 0: stop once this many training tokens were seen
    max_minutes: float = 0.0  # > 0: stop after this much wall-clock time
    target_loss: float = 0.0  # > 0: stop at the first evaluation whose val loss is at or below it
    eval_every: int = 250  # evaluate and checkpoint every this many steps (and at the end)
    eval_batches: int = 0  # > 0: evaluate on this many batches (of batch_size x processes) only; 0: the whole split
    log_every: int = 10  # write a training record every this many steps
    seed: int = 1337  # seeds the initial weights, the batches and dropout
    out_dir: str = "runs/default"  # the run folder: config.yaml, metrics.jsonl, ckpt-latest/, ckpt-best/
    resume: bool = False  # continue from out_dir/ckpt-latest
    compile: bool = False  # torch.compile the model
    # linear layers' products: onednn (x86-64 CPU, fp32; llmmo.onednn) | torch | auto: onednn on an AMD CPU in fp32
    # without compile where MKL's fast path is off (llmmo.cpu; oneDNN is then ~2x MKL), torch elsewhere
    matmul: str = "auto"
    dtype: str = "auto"  # auto (bf16 autocast where the device supports it fast, else fp32) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    parallel: str = "ddp"  # under torchrun: ddp (replicate the model) | fsdp (shard it per block, FSDP2)
    dist_timeout_s: float = 600.0  # under torchrun: a collective waiting longer than this fails the job


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}


@functools.cache
def all_keys() -> Mapping[str, tuple[type, Any]]:
    """Every dotted key (`model.n_layer`) with its type and default, in declaration order (built once: every
    `set_key` looks keys up here)."""
    out: dict[str, tuple[type, Any]] = {}
    for section in fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in fields(cls):
            out[f"{section.name}.{f.name}"] = (hints[f.name], getattr(default, f.name))
    return types.MappingProxyType(out)


def key_help() -> dict[str, str]:
    """The comment written after each field above, by dotted key: the text of `--help` (one source of truth)."""
    out: dict[str, str] = {}
    for section in fields(Config):
        for line in inspect.getsource(section.default_factory).splitlines():  # type: ignore[arg-type]
            match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
            if match:
                out[f"{section.name}.{match[1]}"] = match[2]
    return out


def unknown_key(key: str) -> ConfigError:
    """The error for a key that no config section has, with the closest real key as a suggestion."""
    close = difflib.get_close_matches(key, list(all_keys()) + list(SECTIONS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; `llmmo train --help` lists every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say clearly why it cannot be."""
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # accepts "1e6"
            if not number.is_integer():
                raise ValueError
            return int(number)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {value!r}") from None
    raise ConfigError(f"config key '{key}' has an unsupported type {typ}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (`train.lr`) on `cfg`, coercing the value to the field's type."""
    keys = all_keys()
    if key not in keys:
        raise unknown_key(key)
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, coerce(key, value, keys[key][0]))


def config_from_dict(tree: dict[str, Any], cfg: Config | None = None) -> Config:
    """Apply a nested dict ({model: {n_layer: 4}, ...}) on top of `cfg` (defaults when None)."""
    cfg = cfg if cfg is not None else Config()
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections {list(SECTIONS)}, got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise unknown_key(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: str | Path | None = None,
    start: Config | None = None,
) -> Config:
    """`start` (or the defaults), then the YAML file `base` (a run's saved config.yaml, when resuming), then the
    YAML recipe at `path`, then dotted `overrides`; returned unresolved."""
    cfg = copy.deepcopy(start) if start is not None else Config()
    for file in (base, path):
        if file is None:
            continue
        file = Path(file)
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "does not exist"
            raise ConfigError(f"config file '{file}' {what}; pass a YAML recipe (see configs/)")
        try:
            tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{file}' is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{file}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        config_from_dict(tree, cfg)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def swiglu_hidden(n_embd: int) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4d, so the three matrices cost what GELU's two do, rounded up to 32."""
    return 32 * math.ceil(8 * n_embd / 3 / 32)


def resolve_model(m: ModelConfig) -> ModelConfig:
    """Fill in the family defaults and the depth dial; check that the shape can be built."""
    m = dataclasses.replace(m)
    if m.family not in FAMILY_DEFAULTS:
        raise ConfigError(f"model.family '{m.family}' is not one of {list(FAMILY_DEFAULTS)}")
    if m.depth > 0:  # nanochat's dial: width grows with depth, heads of 64 (n_kv_head kept if it is set)
        if m.aspect <= 0:
            raise ConfigError(f"model.aspect (width per layer of the depth dial) must be positive, got {m.aspect}")
        m.n_layer, m.n_embd = m.depth, m.aspect * m.depth
        m.n_head = math.ceil(m.n_embd / min(64, m.aspect))
    for name, value in FAMILY_DEFAULTS[m.family].items():
        if getattr(m, name) is None:
            setattr(m, name, value)
    if m.n_kv_head is None:
        m.n_kv_head = m.n_head
    if m.mlp_hidden == 0:
        m.mlp_hidden = 4 * m.n_embd if m.mlp == "gelu" else swiglu_hidden(m.n_embd)
    for key in ("positions", "norm", "mlp"):
        if getattr(m, key) not in CHOICES[f"model.{key}"]:
            raise ConfigError(f"model.{key} '{getattr(m, key)}' is not one of {list(CHOICES['model.' + key])}")
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    if m.depth > 0 or m.head_dim == 0:
        if m.n_embd % m.n_head:
            raise ConfigError(
                f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
                f"try n_head {max(h for h in range(1, m.n_head + 1) if m.n_embd % h == 0)}"
            )
        m.head_dim = m.n_embd // m.n_head
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim must be positive (0: n_embd / n_head), got {m.head_dim}")
    if m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({m.n_kv_head})")
    if m.positions == "rope" and m.head_dim % 2:
        raise ConfigError(f"rotary positions need an even head size, got model.head_dim = {m.head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    for key in ("norm_eps", "rope_theta"):  # `not x > 0` refuses NaN too
        if not 0.0 < getattr(m, key) < math.inf:
            raise ConfigError(f"model.{key} must be positive and finite, got {getattr(m, key)}")
    return m


def resolve_config(cfg: Config) -> Config:
    """A copy of `cfg` with every implied value filled in and every impossible combination refused."""
    cfg = copy.deepcopy(cfg)
    d, t = cfg.data, cfg.train
    for key in ("data.tokenizer", "train.optimizer", "train.dtype", "train.sampler", "train.parallel", "train.matmul"):
        section, name = key.split(".")
        if key == "data.tokenizer" and d.tokenizer == "hf":  # an imported checkpoint's own: used, never trained
            continue
        if getattr(getattr(cfg, section), name) not in CHOICES[key]:
            raise ConfigError(f"{key} '{getattr(getattr(cfg, section), name)}' is not one of {list(CHOICES[key])}")
    if d.block_size <= 0:
        raise ConfigError(f"data.block_size must be positive, got {d.block_size}")
    if d.path:  # absolute, so that a checkpoint's data config finds the text from any working folder
        d.path = absolute_path(d.path)
    if d.vocab_size == 0 and d.tokenizer != "char":
        d.vocab_size = 10000 if d.tokenizer == "word" else 4096
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        raise ConfigError(f"a byte-level BPE needs data.vocab_size >= 257 (256 bytes + 1 special), got {d.vocab_size}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if cfg.model.block_size == 0:
        cfg.model.block_size = d.block_size
    elif cfg.model.block_size < d.block_size:
        raise ConfigError(
            f"data.block_size ({d.block_size}) exceeds model.block_size ({cfg.model.block_size}); "
            "raise model.block_size or leave it 0 to follow data.block_size"
        )
    cfg.model = resolve_model(cfg.model)
    for key in ("batch_size", "grad_accum", "eval_every", "log_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
    # written as `not (... <= ...)` so that NaN, which compares false, is refused too
    if not (0 <= t.min_lr <= t.lr < math.inf and t.lr > 0):
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr, lr > 0 and finite, got lr={t.lr} min_lr={t.min_lr}")
    if not 0 < t.muon_lr < math.inf:
        raise ConfigError(f"train.muon_lr must be positive and finite, got {t.muon_lr}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key} must be in [0, 1) (Adam's moment decay), got {getattr(t, key)}")
    for key in ("warmup_steps", "weight_decay", "eval_batches", "seed"):
        if not 0 <= getattr(t, key) < math.inf:
            raise ConfigError(f"train.{key} must be 0 or more and finite, got {getattr(t, key)}")
    if math.isnan(t.grad_clip):  # (at or below 0 turns clipping off: runs saved with -1 resume as they were)
        raise ConfigError("train.grad_clip is NaN; give the largest gradient norm, or 0 to turn clipping off")
    if t.dist_timeout_s <= 0:
        raise ConfigError(f"train.dist_timeout_s must be positive, got {t.dist_timeout_s}")
    if t.matmul == "onednn" and t.compile:
        raise ConfigError("train.matmul=onednn is not compiled (oneDNN's op is opaque to Inductor); drop one of them")
    if t.epochs > 0 and t.sampler != "epoch":
        raise ConfigError("train.epochs needs train.sampler=epoch (each window once per epoch)")
    if t.max_steps <= 0 and t.epochs <= 0 and t.max_tokens <= 0:
        raise ConfigError(
            "set a budget: train.max_steps, train.max_tokens or train.epochs (with train.sampler=epoch) above 0"
        )
    if min(t.max_steps, t.epochs, t.max_tokens) < 0 or t.max_minutes < 0:
        raise ConfigError("budgets (train.max_steps, max_tokens, max_minutes, epochs) cannot be negative; 0 is unset")
    return cfg
