"""`llmmo finetune`: adapt a pretrained checkpoint to a task, with the training loop of `llmmo train`.

A fine-tune is a `Trainer` whose batches are task examples (`ExampleBatches`), whose model is the checkpoint's
Transformer (under a task head, and with LoRA adapters when asked), and whose evaluation is the task's metric:
- classify: a `Classifier` on labelled text; accuracy, macro-F1 and the confusion matrix;
- sft: instruction tuning on conversations in the chat template (llmmo.finetune.chat): the loss is on the
  assistant's tokens only, conversations are packed into rows of block_size;
- qa: a `SpanExtractor` on SQuAD-format data; exact match and F1 of the predicted spans.

Its checkpoints are inference checkpoints (no optimizer state: a fine-tune starts over rather than resumes):
the whole model with the task's head (head.safetensors) and description (config.json "task"), or, with LoRA,
only the adapters and the head beside the base checkpoint's path (a few percent of its size).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmmo.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from llmmo.config import Config
from llmmo.data import PreparedData
from llmmo.errors import ConfigError, DataError
from llmmo.finetune import qa
from llmmo.finetune.batches import ExampleBatches, eval_batches
from llmmo.finetune.chat import add_chat_tokens, encode_chat, pack
from llmmo.finetune.heads import POOLING, Classifier, SpanExtractor
from llmmo.finetune.lora import LoraConfig, apply_lora, grow_rows, merge_lora, save_adapter
from llmmo.finetune.metrics import classification_scores, confusion_matrix
from llmmo.finetune.taskdata import read_conversations, read_labelled
from llmmo.tokenizer import Tokenizer
from llmmo.train.trainer import Reporter, Trainer

TASKS = ("classify", "sft", "qa")


@dataclass
class FinetuneConfig:
    """What to fine-tune on, and how; the training loop's settings are the usual `train.*` keys."""

    task: str = "classify"  # classify | sft | qa
    train_file: str = ""  # labelled TSV/CSV/JSONL (classify), conversations JSONL (sft), SQuAD JSON (qa)
    eval_file: str = ""  # the same format; "" holds out eval_fraction of the training file
    eval_fraction: float = 0.05  # without eval_file: the share of training examples held out (seeded)
    text_field: str = "text"  # classify: the column or field of the text
    label_field: str = "label"  # classify: the column or field of the label
    prompt_field: str = "prompt"  # sft: the field of one-turn prompts (rows without "messages")
    response_field: str = "response"  # sft: the field of their responses
    encoding: str = "utf-8"  # of the task files
    skip_bad_rows: bool = False  # leave out (and count) bad rows instead of stopping at the first
    pooling: str = "last"  # classify: last (the last token's state) | mean (all tokens')
    max_len: int = 0  # tokens per example (classify, qa) or packed row (sft); 0: the model's block_size
    lora: LoraConfig | None = None  # train low-rank adapters (and the head) instead of every weight

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"fine-tuning task '{self.task}' is not one of {list(TASKS)}")
        if not self.train_file:
            raise ConfigError("pass the training examples with --train-file")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.pooling not in POOLING:
            raise ConfigError(f"--pooling '{self.pooling}' is not one of {list(POOLING)}")
        if self.max_len < 0:
            raise ConfigError(f"--max-len must be >= 0 (0: the model's block_size), got {self.max_len}")
        if self.lora is not None:
            self.lora.validate()


def finetune_defaults() -> Config:
    """`train.*` defaults for fine-tuning: a few epochs at a lower learning rate than pretraining."""
    cfg = Config()
    t = cfg.train
    t.sampler, t.epochs, t.max_steps = "epoch", 3, 0
    t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.weight_decay = 32, 3e-4, 3e-5, 50, 0.01
    t.eval_every, t.out_dir = 500, "runs/finetune"
    return cfg


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out indices of n examples."""
    if n == 0:
        raise DataError("the training file holds no usable examples; check its format and fields")
    order = np.random.default_rng((seed, 7)).permutation(n)
    held = max(1, round(n * fraction))
    if n - held < 1:
        raise DataError(f"{n} examples are too few to hold out {fraction:.0%} for evaluation; pass --eval-file")
    return np.sort(order[held:]), np.sort(order[:held])


class FineTuner(Trainer):
    """The common part of every task: the base checkpoint, LoRA, the example batches, saving."""

    kind = ""
    resumable = False

    def __init__(self, cfg: Config, ft: FinetuneConfig, base: str | Path, reporter: Reporter | None = None):
        ft.validate()
        if cfg.train.resume:
            raise ConfigError("a fine-tune does not resume (its checkpoints hold no optimizer state); start it again")
        if cfg.train.parallel == "fsdp":
            raise ConfigError("fine-tunes replicate the model over processes: use --train.parallel ddp (the default)")
        ckpt = load_checkpoint(base)
        if ckpt.meta.get("compression"):
            raise ConfigError(f"'{base}' is compressed; fine-tune the checkpoint it was compressed from")
        # a LoRA fine-tune as the base: its adapters folded in, a plain model again, all of whose weights train
        merge_lora(ckpt.model).requires_grad_(True)
        self.ft, self.base = ft, Path(base)
        self.skipped: list[str] = []  # "file:line: why" of the bad rows left out
        self.notes: list[str] = []  # what else was changed in the data (examples cut to max_len, ...)
        torch.manual_seed(cfg.train.seed)  # the head's and the adapters' initial weights
        base_vocab = ckpt.tokenizer.vocab_size  # tokens added from here on (the model's rows may be padded)
        self.tokenizer = self._tokenizer(ckpt)
        self.backbone = ckpt.model.train()
        block = self.backbone.cfg.block_size
        self.max_len = ft.max_len or block
        if self.max_len > block:
            raise ConfigError(f"--max-len {self.max_len} exceeds the model's block_size {block}")
        if ft.lora is not None:
            grown = self.tokenizer.vocab_size > base_vocab
            if grown and "lm_head" in ft.lora.targets:
                raise ConfigError("tokens were added (chat markers): their output rows train instead of lm_head's LoRA")
            apply_lora(self.backbone, ft.lora)  # before the head: the head stays trainable
            if grown:  # the added tokens' embeddings train too, and are saved with the adapters
                grow_rows(self.backbone, base_vocab)
        cfg = copy.deepcopy(cfg)
        cfg.data = copy.deepcopy(ckpt.data)
        self.train_set, self.eval_set = self._examples(cfg.train.seed)
        model = self._wrap(self.backbone)
        if model is not self.backbone and not self.backbone.cfg.tie_embeddings:
            # a task head never reads the output head: frozen, it takes no optimizer state, and DDP expects no
            # gradient for it
            self.backbone.lm_head.requires_grad_(False)
        super().__init__(cfg, reporter, start=Checkpoint(model, self.tokenizer, ckpt.data, ckpt.meta))

    # --- what each task defines
    def _tokenizer(self, ckpt: Checkpoint) -> Tokenizer:
        return ckpt.tokenizer

    def _examples(self, seed: int) -> tuple[tuple[list, np.ndarray], tuple[list, Any]]:
        """(train inputs, train targets), (eval inputs, eval targets) in the task's own form."""
        raise NotImplementedError

    def _wrap(self, backbone: nn.Module) -> nn.Module:
        return backbone

    def task_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_checkpoint": str(self.base.resolve())}

    # --- the trainer's hooks
    def _prepare_data(self, tokenizer: Tokenizer | None) -> PreparedData:
        return PreparedData(self.tokenizer, {}, f"{self.kind} on {self.ft.train_file}", "")

    def _data_info(self) -> dict[str, Any]:
        n_train, n_eval = len(self.train_set[0]), len(self.eval_set[0])
        return {"data": f"{self.ft.train_file}, {self.tokenizer!r}, {n_train:,} train / {n_eval:,} eval examples"}

    def _make_sampler(self) -> ExampleBatches:
        t = self.cfg.train
        inputs, targets = self.train_set
        return ExampleBatches(inputs, targets, t.batch_size, t.seed, self.world.rank, self.world.size, t.grad_accum)

    def _should_evaluate(self) -> bool:
        """Every eval_every steps and at the end of each epoch."""
        return self.step % self.cfg.train.eval_every == 0 or self.step % self.sampler.optimizer_steps_per_epoch == 0

    def save(self, name: str) -> None:
        if self.world.is_main:
            path = self.out_dir / name
            head = self.model.head.state_dict() if self.model is not self.backbone else None
            if self.ft.lora is not None:
                save_adapter(self.backbone, self.ft.lora, path, self.base, self.tokenizer, self.task_meta(), head)
            else:
                save_checkpoint(path, self.backbone, self.tokenizer, self.cfg.data, task=self.task_meta(), head=head)
        self.world.barrier()

    @torch.inference_mode()
    def _eval_outputs(self, inputs: list, reduce: Callable[[torch.Tensor, np.ndarray], list]) -> list:
        """`reduce(logits, indices)` of every batch of eval inputs (grouped by length), as one list in the order
        of `inputs`. The logits are float32 on the model's device: a reduction keeps them there when they are
        large (a language model's (B, T, V))."""
        was_training = self.model.training
        self.model.eval()
        out: list = [None] * len(inputs)
        for chosen, x in eval_batches(inputs, 2 * self.cfg.train.batch_size):
            with self.autocast:
                logits, _ = self.model(x.to(self.device))
            for i, value in zip(chosen, reduce(logits.float(), chosen), strict=True):
                out[i] = value
        self.model.train(was_training)
        return out


class ClassifyTuner(FineTuner):
    kind = "classify"

    def _examples(self, seed: int):
        ft = self.ft
        train = read_labelled(ft.train_file, ft.text_field, ft.label_field, None, ft.encoding, ft.skip_bad_rows)
        self.labels, self.skipped = train.names, list(train.skipped)
        ids = self._cut(self.tokenizer.encode_batch(train.texts), "training texts")
        labels = np.asarray(train.labels, dtype=np.int64)
        if ft.eval_file:
            held = read_labelled(
                ft.eval_file, ft.text_field, ft.label_field, self.labels, ft.encoding, ft.skip_bad_rows
            )
            self.skipped += held.skipped
            eval_ids = self._cut(self.tokenizer.encode_batch(held.texts), "eval texts")
            return (ids, labels), (eval_ids, np.asarray(held.labels, dtype=np.int64))
        keep, out = _split(len(ids), ft.eval_fraction, seed)
        return ([ids[i] for i in keep], labels[keep]), ([ids[i] for i in out], labels[out])

    def _cut(self, rows: list[list[int]], what: str) -> list[list[int]]:
        """Texts longer than max_len keep their first max_len tokens (noted)."""
        long = sum(len(r) > self.max_len for r in rows)
        if long:
            self.notes.append(f"{long} {what} longer than {self.max_len} tokens keep their first {self.max_len}")
        return [r[: self.max_len] for r in rows]

    def _wrap(self, backbone: nn.Module) -> nn.Module:
        return Classifier(backbone, len(self.labels), self.ft.pooling)

    def task_meta(self) -> dict[str, Any]:
        return super().task_meta() | {"labels": self.labels, "pooling": self.ft.pooling, "max_len": self.max_len}

    def validate(self) -> dict[str, Any]:
        inputs, labels = self.eval_set
        logits_t = torch.stack(self._eval_outputs(inputs, lambda logits, _: list(logits.cpu())))  # (N, K)
        truth = torch.from_numpy(labels)
        loss = F.cross_entropy(logits_t, truth).item()
        confusion = confusion_matrix(truth.numpy(), logits_t.argmax(-1).numpy(), len(self.labels))
        scores = classification_scores(confusion)
        return {"val_loss": loss, "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                "val_confusion": confusion.tolist()}  # fmt: skip


class SFTTuner(FineTuner):
    kind = "sft"

    def _tokenizer(self, ckpt: Checkpoint) -> Tokenizer:
        return add_chat_tokens(ckpt.model, ckpt.tokenizer)

    def _rows(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        ft = self.ft
        chats = read_conversations(path, ft.prompt_field, ft.response_field, ft.encoding, ft.skip_bad_rows)
        self.skipped += chats.skipped
        try:
            encoded = [encode_chat(self.tokenizer, c) for c in chats.conversations]
        except DataError as e:  # e.g. characters a char model cannot read
            raise DataError(f"{path}: {e}") from None
        x, y, cut, dropped = pack(encoded, self.max_len)
        if cut:
            self.notes.append(f"{cut} conversations of {path} longer than {self.max_len + 1} tokens were cut")
        if dropped:
            self.notes.append(f"{dropped} conversations of {path} left out: no reply within {self.max_len + 1} tokens")
        if len(x) == 0:
            raise DataError(f"no conversation of '{path}' has a reply within {self.max_len + 1} tokens")
        return x, y

    def _examples(self, seed: int):
        x, y = self._rows(self.ft.train_file)
        if self.ft.eval_file:
            ex, ey = self._rows(self.ft.eval_file)
        else:
            keep, out = _split(len(x), self.ft.eval_fraction, seed)
            x, y, ex, ey = x[keep], y[keep], x[out], y[out]
        return (list(x), y), (list(ex), ey)

    def validate(self) -> dict[str, Any]:
        inputs, targets = self.eval_set

        def row_nats(logits: torch.Tensor, chosen: np.ndarray) -> list[float]:  # logits (B, T, V)
            y = torch.from_numpy(targets[chosen]).to(logits.device)
            return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none").sum(1).tolist()

        nats = sum(self._eval_outputs(inputs, row_nats))
        loss = nats / max(int((targets >= 0).sum()), 1)
        return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 700.0)))}


class QATuner(FineTuner):
    kind = "qa"

    def _examples(self, seed: int):
        questions = qa.read_squad(self.ft.train_file, self.ft.encoding)
        if self.ft.eval_file:
            self.eval_questions = qa.read_squad(self.ft.eval_file, self.ft.encoding)
        else:
            keep, out = _split(len(questions), self.ft.eval_fraction, seed)
            questions, self.eval_questions = [questions[i] for i in keep], [questions[i] for i in out]
        inputs, spans, dropped = qa.encode_training(self.tokenizer, questions, self.max_len)
        if dropped:
            self.notes.append(f"{dropped} training questions whose answer ends past {self.max_len} tokens left out")
        eval_inputs = [qa.encode_question(self.tokenizer, q, self.max_len) for q in self.eval_questions]
        return (inputs, spans), (eval_inputs, None)

    def _wrap(self, backbone: nn.Module) -> nn.Module:
        return SpanExtractor(backbone)

    def task_meta(self) -> dict[str, Any]:
        return super().task_meta() | {"max_len": self.max_len}

    def validate(self) -> dict[str, Any]:
        inputs, _ = self.eval_set

        def spans(logits: torch.Tensor, chosen: np.ndarray) -> list[str]:  # logits (B, 2, T)
            return [qa.best_span(self.tokenizer, inputs[i], lg) for i, lg in zip(chosen, logits.cpu(), strict=True)]

        predictions = self._eval_outputs(inputs, spans)
        scores = qa.score(self.eval_questions, predictions)
        # the loss ckpt-best minimises: 1 - F1, so the best checkpoint is the best-scoring one
        return {"val_loss": 1.0 - scores["f1"] / 100, "val_exact_match": scores["exact_match"], "val_f1": scores["f1"]}


TUNERS = {"classify": ClassifyTuner, "sft": SFTTuner, "qa": QATuner}


def finetune(cfg: Config, ft: FinetuneConfig, base: str | Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """Fine-tune `base` on `ft.task`; the training result with the task's last evaluation and what was skipped."""
    ft.validate()
    tuner = TUNERS[ft.task](cfg, ft, base, reporter)
    result = tuner.run()
    return asdict(result) | {"skipped": tuner.skipped, "notes": tuner.notes, "out_dir": str(result.out_dir)}
