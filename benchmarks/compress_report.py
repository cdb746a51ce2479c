"""The compression report for a larger model: nanoGPT's 6-layer, 384-wide "baby GPT" shape on char-level
tinyshakespeare, trained here, then every method of `llmmo compress` applied to it, and `compress report`.

python -m benchmarks.compress_report [--steps 600] [--out benchmarks/results/compress]   (~20 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import llmmo

SHAPE = {
    "data.source": "tinyshakespeare",
    "data.block_size": 128,
    "model.n_layer": 6,
    "model.n_head": 6,
    "model.n_embd": 384,
    "model.dropout": 0.0,
    "train.batch_size": 16,
    "train.lr": 1e-3,
    "train.min_lr": 1e-4,
    "train.warmup_steps": 50,
    "train.eval_batches": 20,
    "train.log_every": 50,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/compress")
    args = parser.parse_args()
    out = Path(args.out)
    run = out / "baby-gpt"
    options = SHAPE | {"train.max_steps": args.steps, "train.eval_every": args.steps, "train.out_dir": str(run)}
    if not (run / "ckpt-latest").is_dir():
        llmmo("train", *[f"--{k}={v}" for k, v in options.items()])
    base = str(run / "ckpt-latest")
    recover = ["--recover-steps", str(args.recover_steps)]
    variants = {
        "int8": ["quantize", "--scheme", "int8"],
        "dynamic-int8": ["quantize", "--scheme", "dynamic-int8"],
        "int4-g64": ["quantize", "--scheme", "int4", "--group-size", "64"],
        "int4-g32": ["quantize", "--scheme", "int4", "--group-size", "32"],
        "pruned-50": ["prune", "--sparsity", "0.5", *recover],
        "heads-neurons-25": ["prune-structured", "--params", "0.25", *recover],
        "lowrank-50": ["lowrank", "--rank-ratio", "0.5", *recover],
    }
    paths = [base]
    for name, command in variants.items():
        path = out / name
        if not path.is_dir():
            llmmo("compress", command[0], base, str(path), *command[1:])
        paths.append(str(path))
    student = out / "student-3-layers"
    if not (student / "ckpt-latest").is_dir():
        llmmo(
            "compress",
            "distill",
            base,
            "--model.n_layer=3",
            f"--train.max_steps={args.steps}",
            f"--train.eval_every={args.steps}",
            "--train.eval_batches=20",
            f"--train.out_dir={student}",
        )
    paths.append(str(student / "ckpt-latest"))
    llmmo("compress", "report", *paths, "--out", str(out / "report"))
    rows = json.loads((out / "report" / "report.json").read_text())
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
