"""Checkpoint folders: safetensors weights + JSON config + tokenizer.json (+ trainer state), never pickles.

```
ckpt/
  model.safetensors        weights (a tied output head is stored once, as the token embedding)
  config.json              {"format_version", "llmmo_version", "model": {...}, "data": {...}, "step", "tokens"}
  tokenizer.json           the tokenizer, loadable alone with `tokenizers`
  trainer_state.json       step, token and FLOP counters, best val loss, optimizer hyper-parameters
  trainer_state.safetensors  optimizer moments and RNG states
  head.safetensors         a fine-tuned task head (classifier, QA span), described by config.json's "task"
```
A LoRA fine-tune's folder holds the adapter instead of the weights (llmmo.finetune.lora: adapter.safetensors,
adapter_config.json naming the base checkpoint); `load_checkpoint` loads the base and applies it.
A folder is written beside its target under a temporary name and then swapped in (`fileio.atomic_folder`),
so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from llmmo import __version__
from llmmo.config import DataConfig, ModelConfig, config_from_dict, resolve_model
from llmmo.errors import CheckpointError
from llmmo.fileio import atomic_folder, previous_folder
from llmmo.model import Transformer
from llmmo.tokenizer import Tokenizer

FORMAT_VERSION = 1
REQUIRED = ("model.safetensors", "config.json", "tokenizer.json")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, loaded."""

    model: Transformer
    tokenizer: Tokenizer
    data: DataConfig
    meta: dict[str, Any] = field(default_factory=dict)  # config.json as read (step, tokens, versions)
    trainer_state: dict[str, Any] | None = None  # JSON state + tensors, training checkpoints only
    task: dict[str, Any] | None = None  # a fine-tuned task's description (config.json "task"), e.g. its labels
    head: dict[str, torch.Tensor] | None = None  # that task's head weights (head.safetensors)
    path: Path | None = None  # the folder it was loaded from (None: made in memory)


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    data: DataConfig,
    trainer_state: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    compression: list[dict[str, Any]] | None = None,
    task: dict[str, Any] | None = None,
    head: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint folder; `trainer_state` ({"json": {...}, "tensors": {...}}) makes it resumable.

    `weights` replaces model.state_dict() when the model holds only this process's shards (FSDP): the whole
    tensors, gathered by the caller. `compression` lists the records of the compression methods applied to the
    model (llmmo.compress), which loading needs to rebuild its layout. `task` and `head` are a fine-tuned task
    head's description and weights (llmmo.finetune).
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "llmmo_version": __version__,
        "model": asdict(model.cfg),
        "data": asdict(data),
    }
    if trainer_state is not None:
        meta |= {k: trainer_state["json"][k] for k in ("step", "tokens") if k in trainer_state["json"]}
    metadata = {"format": "pt"}
    if compression:
        from llmmo.compress import flatten_state

        meta["compression"] = compression
    if task is not None:
        meta["task"] = task

    with atomic_folder(Path(path)) as tmp:
        weights = {k: v.detach().cpu() for k, v in (weights or model.state_dict()).items()}
        if model.cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
        if compression:  # torchao's quantized tensors, as their integer and scale tensors plus metadata
            weights, quantized = flatten_state(weights)
            metadata |= quantized or {}
        weights = {k: v.contiguous() for k, v in weights.items()}
        safetensors.torch.save_file(weights, str(tmp / "model.safetensors"), metadata=metadata)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp / "tokenizer.json")
        if head:
            tensors = {k: v.detach().cpu().contiguous() for k, v in head.items()}
            safetensors.torch.save_file(tensors, str(tmp / "head.safetensors"))
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state["json"], indent=2) + "\n")
            tensors = {k: v.detach().cpu().contiguous() for k, v in trainer_state["tensors"].items()}
            safetensors.torch.save_file(tensors, str(tmp / "trainer_state.safetensors"))


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, with its format checked."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"'{path}' is a file; pass a checkpoint folder (e.g. runs/NAME/ckpt-best)")
    if not path.is_dir():
        if previous_folder(path).is_dir():
            raise CheckpointError(
                f"checkpoint folder '{path}' is missing: a save was cut short; the checkpoint before it is "
                f"complete at '{previous_folder(path)}': rename it to '{path.name}'"
            )
        raise CheckpointError(
            f"checkpoint folder '{path}' does not exist; pass a folder with {', '.join(REQUIRED)} "
            "(e.g. runs/NAME/ckpt-best)"
        )
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete: {', '.join(missing)} missing; use another "
            "checkpoint (ckpt-best or ckpt-latest) or train again"
        )
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path / 'config.json'}' is corrupt ({e}); use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"'{path / 'config.json'}' is not a JSON object, so not a checkpoint's; use another checkpoint"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format_version {version!r}, this llmmo ({__version__}) reads "
            f"{FORMAT_VERSION}; load it with the llmmo version that wrote it ({meta.get('llmmo_version', '?')}) "
            "and export it, or train again"
        )
    return meta


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(file))
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"'{file}' is corrupt or truncated ({e}); use another checkpoint (ckpt-best or ckpt-latest) or train again"
        ) from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", trainer_state: bool = False) -> Checkpoint:
    """Load the model (eval mode), tokenizer and data config of a checkpoint folder (or of a LoRA adapter
    folder: its base checkpoint with the adapter applied)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from llmmo.finetune.lora import load_adapted

        return load_adapted(path, device)
    meta = read_config(path)
    try:
        model_cfg = resolve_model(ModelConfig(**meta["model"]))  # fills fields newer than the checkpoint
        data_cfg = config_from_dict({"data": meta.get("data", {})}).data
    except (TypeError, KeyError) as e:
        raise CheckpointError(
            f"'{path / 'config.json'}' does not describe a model ({e}); use another checkpoint"
        ) from None
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if tokenizer.vocab_size > model_cfg.vocab_size:  # ids the model has no rows for
        raise CheckpointError(
            f"'{path / 'tokenizer.json'}' has {tokenizer.vocab_size:,} tokens but the model {model_cfg.vocab_size:,}: "
            "it is not this checkpoint's tokenizer; put back the tokenizer.json the model was trained with"
        )
    model = Transformer(model_cfg)
    tensors = load_tensors(path / "model.safetensors")
    compression = meta.get("compression") or []
    if compression:
        from llmmo.compress import apply_layout, unflatten_state

        apply_layout(model, compression)
        with safetensors.safe_open(str(path / "model.safetensors"), "pt") as f:
            tensors = unflatten_state(tensors, f.metadata())
    if model_cfg.tie_embeddings and "tok_emb.weight" in tensors:
        tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    try:
        # quantized tensors replace the float parameters they stand for (assign), as they are stored
        model.load_state_dict(tensors, strict=True, assign=bool(compression))
    except (RuntimeError, KeyError) as e:
        # load_state_dict's first line is a header; the next ones name the tensors that differ
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3]) or str(e)
        raise CheckpointError(
            f"weights in '{path}' do not fit its config.json ({detail}); the folder mixes files of different "
            "models: use a checkpoint folder as llmmo wrote it"
        ) from None
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.to(device).eval()
    state = None
    if trainer_state:
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"'{path}' holds no trainer state (an inference checkpoint); it cannot resume")
        try:
            state_json = json.loads((path / "trainer_state.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"'{path / 'trainer_state.json'}' is corrupt ({e}); resume from a copy of ckpt-best instead, or start "
                "a new run"
            ) from None
        state = {"json": state_json, "tensors": load_tensors(path / "trainer_state.safetensors")}
    task = meta.get("task")
    head = load_tensors(path / "head.safetensors") if task and (path / "head.safetensors").is_file() else None
    return Checkpoint(model, tokenizer, data_cfg, meta=meta, trainer_state=state, task=task, head=head, path=path)
