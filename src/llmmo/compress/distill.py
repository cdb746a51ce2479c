"""Knowledge distillation (Hinton et al. 2015): train a student on a mix of the teacher's softened predictions
and the data's next tokens,

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross_entropy,

T the temperature (the T^2 keeps the soft term's gradients on the scale of the hard term's as T grows).
The teacher and student share the tokenizer, so their logits cover the same vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmmo.checkpoint import Checkpoint
from llmmo.config import Config
from llmmo.errors import ConfigError
from llmmo.train import Reporter, Trainer


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """(B, T, V) logits of both, (B, T) targets -> the mixed loss above (mean over tokens)."""
    s = student_logits.flatten(0, 1).float()
    t = teacher_logits.flatten(0, 1).float()
    # batchmean: the sum over the vocabulary, averaged over tokens (rows)
    log_p, log_q = F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1)
    soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, targets.flatten(), ignore_index=-1)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


class DistillTrainer(Trainer):
    """A training run of a fresh student (the config's model, on the teacher's tokenizer) whose objective is
    `distillation_loss`."""

    def __init__(
        self, cfg: Config, teacher: Checkpoint, alpha: float, temperature: float, reporter: Reporter | None = None
    ):
        if not 0 <= alpha <= 1 or temperature <= 0:
            raise ConfigError(f"need 0 <= --alpha <= 1 and --temperature > 0, got {alpha} and {temperature}")
        super().__init__(cfg, reporter, tokenizer=teacher.tokenizer)
        if teacher.model.cfg.vocab_size != self.model.cfg.vocab_size:
            raise ConfigError(
                f"the teacher's vocabulary ({teacher.model.cfg.vocab_size}) differs from the student's "
                f"({self.model.cfg.vocab_size}); leave --model.vocab_size to follow the teacher's tokenizer"
            )
        self.teacher = teacher.model.to(self.device).eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits, _ = self.teacher(x)
        student_logits, _ = self.forward(x)
        return distillation_loss(student_logits, teacher_logits, y, self.alpha, self.temperature)
