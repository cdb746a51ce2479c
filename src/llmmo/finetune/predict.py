"""Using a fine-tuned checkpoint: its task head rebuilt from the checkpoint, and predictions from text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmmo.checkpoint import Checkpoint, load_checkpoint
from llmmo.errors import CheckpointError, ConfigError
from llmmo.finetune import qa
from llmmo.finetune.batches import eval_batches
from llmmo.finetune.heads import Classifier, SpanExtractor


def _task_of(ckpt: Checkpoint, kind: str) -> dict:
    task, path = ckpt.task or {}, ckpt.path or "the checkpoint"
    if task.get("kind") == kind and not ckpt.head:
        raise CheckpointError(f"'{path}' is a {kind} fine-tune whose head.safetensors is missing; put it back")
    if task.get("kind") != kind:
        have = f"a {task['kind']} fine-tune" if task.get("kind") else "no task head"
        raise CheckpointError(f"'{path}' holds {have}, not a {kind} model; fine-tune one with `llmmo finetune {kind}`")
    return task


@dataclass
class LabelledPrediction:
    label: str
    probabilities: dict[str, float]  # by label name, in the checkpoint's label order


class TextClassifier:
    """A classification checkpoint, ready to label text."""

    def __init__(self, ckpt: Checkpoint):
        task = _task_of(ckpt, "classify")
        self.labels, self.max_len, self.tokenizer = task["labels"], task["max_len"], ckpt.tokenizer
        self.device = next(ckpt.model.parameters()).device
        self.model = Classifier(ckpt.model, len(self.labels), task["pooling"]).to(self.device).eval()
        self.model.head.load_state_dict(ckpt.head)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TextClassifier:
        return cls(load_checkpoint(path, device=device))

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[LabelledPrediction]:
        if any(not t.strip() for t in texts):
            raise ConfigError("a text to classify is empty; give each text at least one character")
        ids = [row[: self.max_len] for row in self.tokenizer.encode_batch(list(texts))]
        out: list[LabelledPrediction | None] = [None] * len(ids)
        for chosen, x in eval_batches(ids, batch_size):
            probs = self.model(x.to(self.device))[0].float().softmax(-1).cpu()
            for i, p in zip(chosen, probs, strict=True):
                scores = dict(zip(self.labels, p.tolist(), strict=True))
                out[i] = LabelledPrediction(self.labels[int(p.argmax())], scores)
        return out  # type: ignore[return-value]


class QuestionAnswerer:
    """An extractive QA checkpoint: the answer span of a question in a context."""

    def __init__(self, ckpt: Checkpoint):
        task = _task_of(ckpt, "qa")
        self.max_len, self.tokenizer = task["max_len"], ckpt.tokenizer
        self.device = next(ckpt.model.parameters()).device
        self.model = SpanExtractor(ckpt.model).to(self.device).eval()
        self.model.head.load_state_dict(ckpt.head)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> QuestionAnswerer:
        return cls(load_checkpoint(path, device=device))

    @torch.inference_mode()
    def answer(self, questions: Sequence[qa.Question], batch_size: int = 32) -> list[str]:
        ids = [qa.encode_question(self.tokenizer, q, self.max_len) for q in questions]
        out = [""] * len(ids)
        for chosen, x in eval_batches(ids, batch_size):
            logits = self.model(x.to(self.device))[0].float().cpu()
            for i, lg in zip(chosen, logits, strict=True):
                out[i] = qa.best_span(self.tokenizer, ids[i], lg)
        return out
