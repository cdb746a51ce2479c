"""`llmmo eval --task`: run a task file through a fine-tuned checkpoint and score it.

- gsm8k: JSONL question/answer; the model answers each question (greedy, in the chat template when it has one);
  the answer counts when it ends in GSM8K's `#### <number>` format (format_rate) and that number is the
  reference's (accuracy).
- squad: SQuAD v1.1 JSON; an extractive QA checkpoint predicts spans, an instruction-tuned one answers in words;
  exact match and F1 with the official normalisation.
- chrf / bleu: JSONL prompt/reference pairs (translation-style); sacrebleu's corpus chrF or BLEU of the replies.
- exact: JSONL prompt/reference pairs; exact match of the stripped reply.
- classify: a labelled TSV/CSV/JSONL file through a classification checkpoint; accuracy, macro-F1, confusion.

The fields holding the prompt and the reference are named by option (for classify: the text and the label).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmmo.checkpoint import Checkpoint
from llmmo.errors import ConfigError, DataError
from llmmo.finetune import qa
from llmmo.finetune.chat import END, encode_chat, has_chat_tokens
from llmmo.finetune.metrics import extract_final_number, same_number
from llmmo.finetune.taskdata import read_conversations, read_labelled
from llmmo.generate import GenerationConfig, stream_ids

TASKS = ("gsm8k", "squad", "chrf", "bleu", "exact", "classify")


@dataclass
class TaskResult:
    task: str
    scores: dict[str, float]
    examples: list[dict[str, Any]]  # each prompt, reference and reply (and its score), for reading
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of the rows left out (--skip-bad-rows)


Prompt = str | list[dict[str, str]]  # a user message, or a conversation up to the reply to generate


@dataclass(frozen=True)
class TaskFile:
    """Where a task's examples are and how to read them; empty field names take each task's defaults."""

    path: Path
    prompt_field: str = ""  # classify: the text's
    reference_field: str = ""  # classify: the label's
    limit: int = 0  # > 0: the first `limit` examples only
    encoding: str = "utf-8"
    skip_bad_rows: bool = False  # leave out rows that cannot be read (each is named) instead of stopping


def _prompt_ids(ckpt: Checkpoint, prompt: Prompt) -> list[int]:
    """The prompt in the chat template when the tokenizer has one, else its last message as plain text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if has_chat_tokens(ckpt.tokenizer):
        return encode_chat(ckpt.tokenizer, messages, add_generation_prompt=True)[0]
    return ckpt.tokenizer.encode(messages[-1]["content"] if messages else "")


def generate_replies(ckpt: Checkpoint, prompts: list[Prompt], gen: GenerationConfig, batch_size: int = 16) -> list[str]:
    """Each prompt's reply, in batches; a chat model's reply ends at its `<|end|>`."""
    end = ckpt.tokenizer.hf.token_to_id(END) if has_chat_tokens(ckpt.tokenizer) else ckpt.tokenizer.eot_id
    block = ckpt.model.cfg.block_size
    replies = []
    for first in range(0, len(prompts), batch_size):
        ids = [_prompt_ids(ckpt, p)[-(block - 1) :] for p in prompts[first : first + batch_size]]
        parts: list[list[str]] = [[] for _ in ids]
        for pieces in stream_ids(ckpt.model, ckpt.tokenizer, ids, gen, end):
            for part, piece in zip(parts, pieces, strict=True):
                part.append(piece)
        replies += ["".join(p) for p in parts]
    return replies


def _some(examples: list, f: TaskFile, skipped: Sequence[str] = ()) -> list:
    """The file's first `limit` examples; none is an error (scores of nothing would read as zeros)."""
    if not examples and skipped:
        raise DataError(f"every row of task file '{f.path}' is bad ({len(skipped)}; the first: {skipped[0]})")
    if not examples:
        raise DataError(f"task file '{f.path}' holds no examples; give a file with at least one")
    return examples[: f.limit or None]


def _pairs(f: TaskFile, prompt_field: str, reference_field: str) -> tuple[list[Prompt], list[str], list[str]]:
    """Each row's conversation up to its last (assistant) message, that message (the reference), and the rows
    left out."""
    fields = (f.prompt_field or prompt_field, f.reference_field or reference_field)
    read = read_conversations(f.path, *fields, f.encoding, f.skip_bad_rows)
    chats = _some(read.conversations, f, read.skipped)
    return [c[:-1] for c in chats], [c[-1]["content"] for c in chats], read.skipped


def _shown(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _gsm8k(ckpt, f, gen, batch) -> TaskResult:
    prompts, references, skipped = _pairs(f, "question", "answer")
    replies = generate_replies(ckpt, prompts, gen, batch)
    examples, formatted, correct = [], 0, 0
    for p, ref, reply in zip(prompts, references, replies, strict=True):
        got, want = extract_final_number(reply), extract_final_number(ref)
        formatted += got is not None
        correct += same_number(got, want)
        examples.append({"prompt": _shown(p), "reference": want, "reply": reply, "extracted": got})
    n = max(len(prompts), 1)
    scores = {"format_rate": formatted / n, "accuracy": correct / n, "n": len(prompts)}
    return TaskResult("gsm8k", scores, examples, skipped)


def _sacrebleu(metric: str) -> Callable[..., TaskResult]:
    def run(ckpt, f, gen, batch) -> TaskResult:
        try:
            import sacrebleu
        except ImportError:
            raise ConfigError("chrF and BLEU need sacrebleu: pip install 'llmmo[tasks]'") from None
        prompts, references, skipped = _pairs(f, "prompt", "response")
        replies = [r.strip() for r in generate_replies(ckpt, prompts, gen, batch)]
        scorer = sacrebleu.corpus_chrf if metric == "chrf" else sacrebleu.corpus_bleu
        score = scorer(replies, [references]).score
        examples = [
            {"prompt": _shown(p), "reference": r, "reply": y}
            for p, r, y in zip(prompts, references, replies, strict=True)
        ]
        return TaskResult(metric, {metric: score, "n": len(prompts)}, examples, skipped)

    return run


def _exact(ckpt, f, gen, batch) -> TaskResult:
    prompts, references, skipped = _pairs(f, "prompt", "response")
    replies = [r.strip() for r in generate_replies(ckpt, prompts, gen, batch)]
    hits = [r == ref.strip() for r, ref in zip(replies, references, strict=True)]
    examples = [
        {"prompt": _shown(p), "reference": r, "reply": y} for p, r, y in zip(prompts, references, replies, strict=True)
    ]
    return TaskResult("exact", {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits)}, examples, skipped)


def _squad(ckpt, f, gen, batch) -> TaskResult:
    from llmmo.finetune.predict import QuestionAnswerer

    if f.skip_bad_rows:
        raise ConfigError("--skip-bad-rows is for JSONL task files; a SQuAD file is read whole (fix it instead)")
    questions = _some(qa.read_squad(f.path, f.encoding), f)
    if (ckpt.task or {}).get("kind") == "qa":
        predictions = QuestionAnswerer(ckpt).answer(questions, batch)
    elif has_chat_tokens(ckpt.tokenizer):
        prompts = [f"{q.context}\n\nQuestion: {q.question}\nAnswer:" for q in questions]
        predictions = [r.strip() for r in generate_replies(ckpt, prompts, gen, batch)]
    else:
        raise ConfigError(
            "squad needs a QA checkpoint (`llmmo finetune qa`) or an instruction-tuned one (`finetune sft`)"
        )
    scores = qa.score(questions, predictions)
    examples = [
        {"question": q.question, "answers": q.answers, "prediction": p}
        for q, p in zip(questions, predictions, strict=True)
    ]
    return TaskResult("squad", scores, examples)


def _classify(ckpt, f, gen, batch) -> TaskResult:
    from llmmo.finetune.metrics import classification_scores, confusion_matrix
    from llmmo.finetune.predict import TextClassifier

    classifier = TextClassifier(ckpt)
    fields = (f.prompt_field or "text", f.reference_field or "label")
    data = read_labelled(f.path, *fields, classifier.labels, f.encoding, f.skip_bad_rows)
    texts, labels = _some(data.texts, f, data.skipped), data.labels[: f.limit or None]
    predictions = classifier.predict(texts, batch_size=max(batch, 64))
    predicted = [classifier.labels.index(p.label) for p in predictions]
    confusion = confusion_matrix(labels, predicted, len(classifier.labels))
    scores = classification_scores(confusion) | {"confusion": confusion.tolist(), "n": len(texts)}
    examples = [{"text": t, "label": classifier.labels[y], "predicted": p.label, "probabilities": p.probabilities}
                for t, y, p in zip(texts, labels, predictions, strict=True)]  # fmt: skip
    return TaskResult("classify", scores, examples, data.skipped)


RUNNERS: dict[str, Callable[..., TaskResult]] = {
    "classify": _classify,
    "gsm8k": _gsm8k,
    "squad": _squad,
    "chrf": _sacrebleu("chrf"),
    "bleu": _sacrebleu("bleu"),
    "exact": _exact,
}


@torch.inference_mode()
def run_task(
    ckpt: Checkpoint, task: str, file: TaskFile, gen: GenerationConfig | None = None, batch_size: int = 16
) -> TaskResult:
    """Score `ckpt` on the task file; greedy decoding by default."""
    if task not in RUNNERS:
        raise ConfigError(f"unknown task '{task}'; choose one of {list(TASKS)}")
    if not Path(file.path).is_file():
        raise DataError(f"task file '{file.path}' does not exist")
    gen = gen or GenerationConfig(max_new_tokens=256, temperature=0.0)
    return RUNNERS[task](ckpt, file, gen, batch_size)


def write_examples(result: TaskResult, path: str | Path) -> None:
    """The scored examples, one JSON object per line."""
    lines = [json.dumps(e, ensure_ascii=False) for e in result.examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
