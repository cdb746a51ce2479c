"""The run's metrics record: metrics.jsonl (one JSON object per line), mirrored to TensorBoard if installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmmo.fileio import write_text_atomic


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`. On resume from step k, records after k are dropped first,
    so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            write_text_atomic(self.path, "")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        try:  # TensorBoard is optional: `pip install tensorboard` turns it on
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "tokens", "flops") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
