"""Task metrics: classification (accuracy, macro-F1, confusion), SQuAD exact match and F1, answer extraction.

The SQuAD functions follow the official v1.1 evaluation script (Rajpurkar et al. 2016): lower-case, drop
punctuation and the articles a/an/the, collapse whitespace; F1 over the bag of normalised tokens; the best
score over the reference answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], n_labels: int) -> np.ndarray:
    """(K, K) counts: row = true label, column = predicted label."""
    out = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(predictions)), 1)
    return out


def classification_scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, and macro-F1: the unweighted mean over labels of each label's F1. A label that neither occurs
    nor is predicted has no F1 and is left out of the mean."""
    true_pos = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = 2 * true_pos[present] / (predicted[present] + actual[present])
    return {
        "accuracy": float(true_pos.sum() / max(confusion.sum(), 1)),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
    }


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff])")


def _tokens(text: str) -> list[str]:
    """Normalised tokens: whitespace-separated, as the official script has them, except that each CJK character
    is a token of its own (MLQA's mixed segmentation for Chinese): text without CJK is scored exactly as SQuAD's
    script scores it."""
    return CJK.sub(r" \1 ", normalize_answer(text)).split()


def squad_exact(prediction: str, answers: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    def f1(pred: list[str], gold: list[str]) -> float:
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    return max(f1(_tokens(prediction), _tokens(a)) for a in answers)


GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def extract_final_number(text: str) -> str | None:
    """GSM8K's answer: the number after the last `####` at the end of the text (commas dropped), or None when the
    text does not end in that format."""
    match = GSM8K_ANSWER.search(text.strip())
    return match[1].replace(",", "") if match else None


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b
