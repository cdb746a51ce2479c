"""The run's metrics record: metrics.jsonl (one JSON object per line), mirrored to TensorBoard if installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmmo.fileio import complete_json_lines, write_text_atomic


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`. On resume from step k, records after k are dropped first (and
    TensorBoard's events after k), so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            write_text_atomic(self.path, "")
        elif self.path.exists():
            kept = [r for r in _records(self.path) if r["step"] <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:  # TensorBoard is optional: `pip install tensorboard` turns it on
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
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


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (a line cut short by a crash left out, as the steps after the checkpoint are)."""
    return [r for _, r in complete_json_lines(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]
