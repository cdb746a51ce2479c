"""Training throughput on 1..N processes (`llmmo train --nproc N`), the same global batch for every N.

On a CPU machine: one process using every core, against N processes of cores/N threads each (gloo), DDP and
FSDP. On a GPU machine: 1..N GPUs (NCCL), one process per GPU. Tokens/s is the median of the training records
after the first fifth of the run (warm-up), read from the run's metrics.jsonl.

python -m benchmarks.distributed_speed [--shape 0.8M] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.shapes import SHAPES


def tokens_per_s(nproc: int, parallel: str, shape: str, steps: int, device: str, global_batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        options = SHAPES[shape] | {
            "train.batch_size": global_batch // nproc,
            "train.max_steps": steps,
            "train.eval_every": steps,
            "train.eval_batches": 1,
            "train.log_every": 10,
            "train.parallel": parallel,
            "train.device": device,
            "train.out_dir": f"{tmp}/run",
            "data.source": "tinyshakespeare",
        }
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        args = [f"--{k}={v}" for k, v in options.items()]
        proc = subprocess.run(
            [sys.executable, "-m", "llmmo", "train", "--nproc", str(nproc), *args],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{nproc} processes ({parallel}) failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        rates = [r["tok_per_s"] for r in records if "tok_per_s" in r and r["step"] > steps // 5]
        return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.8M", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if torch.cuda.is_available():
        device, counts = "cuda", range(1, torch.cuda.device_count() + 1)
    else:
        device, counts = "cpu", (1, 2)
    global_batch = 2 * SHAPES[args.shape]["train.batch_size"]
    rows = []
    for n in [n for n in counts if global_batch % n == 0]:  # the same global batch for every count measured
        for parallel in ("ddp",) if n == 1 else ("ddp", "fsdp"):
            rate = tokens_per_s(n, parallel, args.shape, args.steps, device, global_batch)
            rows.append({"device": device, "processes": n, "parallel": parallel if n > 1 else "-", "tok_s": rate})
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_one_process"] = r["tok_s"] / base
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
