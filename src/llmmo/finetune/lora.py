"""LoRA (Hu et al. 2021): train a low-rank update B A of chosen Linear layers while the model stays frozen.

y = W x + (alpha / r) B A dropout(x), A (r x in) random, B (out x r) zero, so the adapted model starts as the
base model. Applied as a transform to an unmodified model (`apply_lora`); only A and B train and are saved
(`save_adapter`: adapter.safetensors + adapter_config.json, a few percent of the checkpoint); `merge_lora`
folds them into the base weights, giving a plain model that computes the same logits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.data.cache import file_identity
from llmmo.errors import CheckpointError, ConfigError
from llmmo.fileio import atomic_folder
from llmmo.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmmo.checkpoint import Checkpoint

TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.gate", "mlp.proj", "lm_head")


@dataclass
class LoraConfig:
    r: int = 8  # the update's rank
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])  # of TARGETS

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA needs r > 0, alpha > 0 and 0 <= dropout < 1; got {self}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"--lora.targets {unknown or '(none)'}: choose among {list(TARGETS)}")


class LoRALinear(nn.Module):
    """A frozen Linear layer plus its trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises; B = 0 keeps y = W x
        self.scale = alpha / r
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in: W + (alpha / r) B A."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


class GrownEmbedding(nn.Module):
    """A token embedding whose rows from `first` on (tokens added for fine-tuning, e.g. chat markers) train while
    the others stay frozen: new tokens need embeddings of their own, which no low-rank update of the blocks gives
    (PEFT's trainable_token_indices). Its `weight` is the whole matrix, as nn.Embedding's is."""

    def __init__(self, base: nn.Embedding, first: int):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.first = base, first
        self.rows = nn.Parameter(base.weight[first:].detach().clone())  # (new tokens, C)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight[: self.first], self.rows])  # (V, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class GrownHead(nn.Module):
    """The output head of a `GrownEmbedding` model: its own trainable new rows, or, tied, the embedding's."""

    def __init__(self, base: nn.Linear, first: int, tied_to: GrownEmbedding | None):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.first = base, first
        self.in_features, self.out_features = base.in_features, base.out_features  # counted as a matmul
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered twice as a submodule
        self.rows = None if tied_to is not None else nn.Parameter(base.weight[first:].detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        if self._tied:
            return self._tied[0].weight
        return torch.cat([self.base.weight[: self.first], self.rows])  # (V, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def grow_rows(model: nn.Module, first: int) -> None:
    """Let the embedding rows (and output-head rows) of tokens `first`.. train, and only those, in place."""
    model.tok_emb = GrownEmbedding(model.tok_emb, first)
    model.lm_head = GrownHead(model.lm_head, first, model.tok_emb if model.cfg.tie_embeddings else None)


def _targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in cfg.targets)
    ]
    if not names:
        raise ConfigError(f"the model has no Linear layer named {cfg.targets}; choose among {list(TARGETS)}")
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target layers in LoRALinear and freeze everything else; the wrapped layers' names."""
    cfg.validate()
    if getattr(model, "tok_emb", None) is not None and "lm_head" in cfg.targets and model.cfg.tie_embeddings:
        raise ConfigError("lm_head is tied to the token embedding in this model; leave it out of --lora.targets")
    model.requires_grad_(False)
    names = _targets(model, cfg)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), cfg.r, cfg.alpha, cfg.dropout))
    return names


def _is_adapter(key: str) -> bool:
    return ".lora_" in key or key.endswith(".rows")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (what a LoRA run saves): A and B, and the rows of added tokens."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if _is_adapter(k)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter (and added token rows) into its base layer (in place); the model is plain again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.merged())
    if isinstance(getattr(model, "tok_emb", None), GrownEmbedding):
        with torch.no_grad():
            embedding, head = model.tok_emb.base, model.lm_head.base
            embedding.weight.copy_(model.tok_emb.weight)
            if not model.cfg.tie_embeddings:
                head.weight.copy_(model.lm_head.weight)
        model.tok_emb, model.lm_head = embedding, head
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
    return model


def save_adapter(
    model: nn.Module,
    cfg: LoraConfig,
    out: str | Path,
    base: str | Path,
    tokenizer: Tokenizer | None = None,
    task: dict[str, Any] | None = None,
    head: dict[str, torch.Tensor] | None = None,
) -> None:
    """adapter.safetensors and adapter_config.json (the LoRA settings and the base checkpoint) in `out`; a
    fine-tune adds its tokenizer, its task's description and head (stored beside the adapters as `head.*`)."""
    with atomic_folder(Path(out)) as tmp:
        tensors = adapter_state(model) | {f"head.{k}": v.detach().cpu().contiguous() for k, v in (head or {}).items()}
        safetensors.torch.save_file(tensors, str(tmp / "adapter.safetensors"))
        meta = asdict(cfg) | {"base_checkpoint": str(Path(base).resolve()), "base_sha256": weights_digest(Path(base))}
        if task is not None:
            meta["task"] = task
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")


def weights_digest(checkpoint: Path) -> str | None:
    """SHA-256 of a checkpoint's weights (model.safetensors; adapter.safetensors for an adapter used as a base):
    which base an adapter was trained on, whatever its path. None when it has no weights file."""
    file = checkpoint / "model.safetensors"
    file = file if file.is_file() else checkpoint / "adapter.safetensors"
    return _digest(*file_identity(file)) if file.is_file() else None


@functools.lru_cache(maxsize=8)  # a fine-tune saves its adapters at every evaluation
def _digest(path: str, *identity: int) -> str:  # (the file's identity keys the cache: a new file is hashed anew)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = json.loads((folder / "adapter_config.json").read_text())
        tensors = safetensors.torch.load_file(str(folder / "adapter.safetensors"))
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        raise CheckpointError(
            f"'{folder}' is not a LoRA adapter folder (adapter_config.json + adapter.safetensors): {e}"
        ) from None
    return meta, tensors


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Apply the adapter saved in `folder` to `model` (its base); the adapter's settings."""
    folder = Path(folder)
    meta, tensors = _read_adapter(folder)
    tensors = {k: v for k, v in tensors.items() if _is_adapter(k)}
    cfg = LoraConfig(**{k: meta[k] for k in ("r", "alpha", "dropout", "targets") if k in meta})
    apply_lora(model, cfg)
    missing = set(adapter_state(model)) ^ set(tensors)
    if missing:
        raise CheckpointError(
            f"the adapter in '{folder}' does not fit this model ({len(missing)} tensors differ, e.g. "
            f"{sorted(missing)[0]}); pass the base checkpoint it was trained on ({meta.get('base_checkpoint')})"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"the adapter in '{folder}' does not fit this model: {str(e).splitlines()[-1]}") from None
    return cfg


def load_adapted(folder: str | Path, device: str | torch.device = "cpu", base: str | Path | None = None) -> Checkpoint:
    """A LoRA fine-tune's folder as a checkpoint: its base checkpoint (or `base`), the adapter applied, and the
    fine-tune's tokenizer, task and head when it saved them."""
    from llmmo.checkpoint import load_checkpoint

    folder = Path(folder)
    meta, tensors = _read_adapter(folder)
    recorded = meta.get("base_checkpoint")
    base = base or recorded
    if not base or not Path(base).is_dir():
        raise CheckpointError(
            f"the base checkpoint of the adapter in '{folder}' ({base}) is missing; put it back at that path "
            "(adapter_config.json's base_checkpoint names it)"
        )
    # an adapter fits any base of its shape, and would silently compute something else on another: the base's
    # weights must be those it was trained on (another folder, or the same one rewritten by more training)
    trained_on, digest = meta.get("base_sha256"), weights_digest(Path(base))
    if trained_on and digest and trained_on != digest:  # (without weights, load_checkpoint says what is missing)
        raise CheckpointError(
            f"'{base}' is not the checkpoint the adapter in '{folder}' was trained on (its weights differ: another "
            f"checkpoint, or that one rewritten since); pass the base it was trained on (it was at {recorded})"
        )
    ckpt = load_checkpoint(base)
    if (folder / "tokenizer.json").is_file():
        ckpt.tokenizer = Tokenizer.load(folder / "tokenizer.json")
    if "tok_emb.rows" in tensors:  # the fine-tune added tokens (chat markers): their rows are in the adapter
        from llmmo.finetune.chat import resize_vocab

        resize_vocab(ckpt.model, ckpt.tokenizer.vocab_size)  # as the fine-tune did (no-op for padded rows)
        grow_rows(ckpt.model, ckpt.model.cfg.vocab_size - len(tensors["tok_emb.rows"]))
    load_adapter(ckpt.model, folder)
    ckpt.model.to(device).eval()
    ckpt.task = meta.get("task")
    head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
    ckpt.head = head or None
    ckpt.meta = ckpt.meta | {"adapter": str(folder)}
    ckpt.path = folder
    return ckpt
