"""Extractive question answering on SQuAD v1.1-format JSON (SQuAD, XQuAD): reading, encoding, span decoding.

An example's input is the question then the context (a causal model must read the question before the context
it answers about). Question tokens are stored as -2 - id, so that `SpanExtractor` knows them without another
tensor; the answer is the span of context tokens that overlap its characters. The context is encoded whole, in
training as in prediction, so the model learns on the tokens it will see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmmo.errors import DataError
from llmmo.finetune.metrics import squad_exact, squad_f1
from llmmo.tokenizer import Tokenizer

MAX_ANSWER_TOKENS = 30  # the longest span considered when decoding (the SQuAD baselines' limit)


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_start: int  # of the first answer, in characters of the context


def read_squad(path: str | Path, encoding: str = "utf-8") -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SQuAD file '{path}' does not exist; pass a SQuAD v1.1 JSON file")
    try:
        tree = json.loads(path.read_text(encoding=encoding))
        out = [
            Question(
                qa["id"],
                qa["question"],
                p["context"],
                [a["text"] for a in qa["answers"]],
                qa["answers"][0]["answer_start"],
            )  # fmt: skip
            for article in tree["data"]
            for p in article["paragraphs"]
            for qa in p["qas"]
        ]
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not valid {encoding} (byte {e.start}); pass its encoding with --encoding"
        ) from None
    except LookupError:
        raise DataError(f"unknown text encoding '{encoding}'; pass a Python codec name with --encoding") from None
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise DataError(
            f"'{path}' is not SQuAD v1.1 JSON ({type(e).__name__}: {e}); expected "
            '{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text", '
            '"answer_start"}]}]}]}]}'
        ) from None
    if not out:
        raise DataError(f"'{path}' holds no questions")
    return out


def _question_ids(tokenizer: Tokenizer, q: Question) -> list[int]:
    return [-2 - i for i in tokenizer.encode(q.question)]


def encode_question(tokenizer: Tokenizer, q: Question, max_len: int) -> list[int]:
    """The input of `q` for prediction, its context cut to fit max_len."""
    question = _question_ids(tokenizer, q)[: max_len // 2]
    return question + tokenizer.encode(q.context)[: max_len - len(question)]


def encode_training(
    tokenizer: Tokenizer, questions: list[Question], max_len: int
) -> tuple[list[list[int]], np.ndarray, int]:
    """Inputs and (start, end) token spans of the first answer of each question that fits in max_len tokens;
    the count of questions left out because their answer lies past max_len."""
    inputs, spans, dropped = [], [], 0
    for q in questions:
        start, answer = q.answer_start, q.answers[0]
        if q.context[start : start + len(answer)] != answer:
            raise DataError(f"question {q.id}: answer {answer!r} is not at answer_start {start} of its context")
        question = _question_ids(tokenizer, q)[: max_len // 2]
        context, offsets = tokenizer.encode_with_offsets(q.context)
        end = start + len(answer)
        inside = [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > start]  # tokens overlapping it
        if not inside or len(question) + inside[-1] >= max_len:
            dropped += 1
            continue
        inputs.append((question + context)[:max_len])
        spans.append((len(question) + inside[0], len(question) + inside[-1]))
    if not inputs:
        raise DataError(
            f"no answer of the {len(questions)} questions lies within the first {max_len} tokens of its question and "
            "context; raise --max-len if it is below the model's block_size, else use shorter contexts or a model "
            "with a longer context"
        )
    return inputs, np.asarray(spans, dtype=np.int64), dropped


def best_span(tokenizer: Tokenizer, ids: list[int], logits: torch.Tensor) -> str:
    """The text of the span (start <= end < start + MAX_ANSWER_TOKENS) with the highest start + end logit."""
    start, end = logits[0], logits[1]  # (T,) each; -inf outside the context
    scores = start[:, None] + end[None, :]  # (T, T)
    T = scores.size(0)
    band = torch.ones(T, T, dtype=torch.bool).triu().tril(MAX_ANSWER_TOKENS - 1)
    scores = scores.masked_fill(~band, float("-inf"))
    if torch.isinf(scores.max()):
        return ""
    s, e = divmod(int(scores.argmax()), T)
    return tokenizer.decode(ids[s : e + 1]).strip()


def score(questions: list[Question], predictions: list[str]) -> dict[str, float]:
    """SQuAD v1.1's exact match and F1, in percent, over all questions."""
    exact = [squad_exact(p, q.answers) for q, p in zip(questions, predictions, strict=True)]
    f1 = [squad_f1(p, q.answers) for q, p in zip(questions, predictions, strict=True)]
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1)), "questions": len(questions)}
