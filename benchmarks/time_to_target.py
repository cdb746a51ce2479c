"""Time to a target loss: train a recipe on tinyshakespeare (char level) until val loss <= the target, and report
the training FLOPs (the model's own count, attention included) and the wall time it took, with the curve of val
loss against FLOPs as CSV and PNG. `--baseline` also trains the plain AdamW baseline of issue 3 for the plot.

python -m benchmarks.time_to_target [--config configs/shakespeare-char-fast.yaml] [--baseline] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from llmmo.config import load_config
from llmmo.train import Trainer

TARGET = 1.886  # nanoGPT's CPU Shakespeare model after 2000 steps of AdamW
# issue 3's baseline: nanoGPT's CPU recipe (4 x 128 gpt2, AdamW 1e-3 cosine to 1e-4, 2000 steps)
BASELINE = "configs/shakespeare-char-cpu.yaml"


def run(config: str, overrides: dict, target: float, eval_every: int) -> dict:
    cfg = load_config(
        config,
        overrides
        | {
            "train.target_loss": target,
            "train.eval_every": eval_every,
            "train.device": "cpu",
            "train.out_dir": tempfile.mkdtemp(prefix="llmmo-ttt-"),
        },
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.run()
    seconds = time.perf_counter() - start
    lines = (trainer.out_dir / "metrics.jsonl").read_text().splitlines()
    curve = [json.loads(line) for line in lines if '"val_loss"' in line]
    hit = next((r for r in curve if r["val_loss"] <= target), None)
    return {
        "config": config,
        "overrides": overrides,
        "params": trainer.model.num_params(),
        "reached": hit is not None,
        "flops": hit and hit["flops"],
        "tokens": hit and hit["tokens"],
        "step": hit and hit["step"],
        "time_s": hit and hit["time_s"],
        "wall_s": seconds,
        "best_val_loss": min(r["val_loss"] for r in curve),
        "curve": [(r["flops"], r["val_loss"]) for r in curve],
    }


def write_curves(results: dict[str, dict], out: Path, target: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "time_to_target.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "flops", "val_loss"])
        for name, result in results.items():
            writer.writerows([name, flops, loss] for flops, loss in result["curve"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        flops, loss = zip(*result["curve"], strict=True)
        ax.plot(flops, loss, marker=".", label=name)
    ax.axhline(target, color="grey", linestyle="--", label=f"target {target}")
    ax.set(
        xscale="log",
        xlabel="training FLOPs (model count, attention included)",
        ylabel="val loss",
        title="tinyshakespeare, char level: val loss against compute",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_to_target.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/shakespeare-char-fast.yaml")
    parser.add_argument("--target", type=float, default=TARGET)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--baseline", action="store_true", help="also train issue 3's AdamW baseline")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {"llmmo": run(args.config, {}, args.target, args.eval_every)}
    if args.baseline:
        results["baseline"] = run(BASELINE, {}, args.target, args.eval_every)
    write_curves(results, Path(args.out), args.target)
    print(json.dumps({name: {k: v for k, v in r.items() if k != "curve"} for name, r in results.items()}))


if __name__ == "__main__":
    main()
