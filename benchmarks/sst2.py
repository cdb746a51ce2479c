"""SST-2 sentiment: fine-tune a classifier on GLUE SST-2 train, report dev accuracy, within a wall-clock budget.

    python -m benchmarks.sst2 [--pretrain-minutes 10] [--epochs 2] [--out benchmarks/results/sst2]   (~17 min)

Steps, all through the llmmo CLI:
1. a tokenizer (byte-level BPE, or words) trained on the train sentences;
2. the base model: fresh weights (--pretrain-minutes 0), or a language model pretrained by `llmmo train` on the
   train sentences for that long (no labels; dev is never seen);
3. `llmmo finetune classify` on train.tsv, 5% of it held out (seeded) and evaluated every --eval-every steps;
   ckpt-best is the checkpoint of lowest held-out loss (early stopping on train data; dev is never used to choose);
4. `llmmo eval --task classify` of ckpt-best and of the last checkpoint on dev.tsv: accuracy, macro-F1 and the
   confusion matrix, written to result.json and result.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import llmmo, options

MODEL = {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=14.0, help="the fine-tuning's time limit")
    parser.add_argument("--pretrain-minutes", type=float, default=10.0, help="0: start from fresh weights")
    parser.add_argument("--base", help="fine-tune this checkpoint (pretrained by an earlier run) instead")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "word"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=2, help="the learning rate decays to --min-lr over these")
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--out", default="benchmarks/results/sst2")
    args = parser.parse_args()
    data = Path(os.environ.get("LLMMO_DATA_DIR", "../shared/data")) / "sst2"
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # the train sentences as a plain text corpus (one per line): the tokenizer's and the pretraining's text
    rows = (data / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    corpus = out / "train-sentences.txt"
    corpus.write_text("\n".join(r.split("\t")[0].strip() for r in rows) + "\n", encoding="utf-8")
    common = {"data.path": corpus, "data.tokenizer": args.tokenizer, "data.vocab_size": args.vocab_size,
              "data.block_size": args.block_size, "model.dropout": args.dropout} | MODEL  # fmt: skip
    start = time.perf_counter()
    steps = 1 if args.pretrain_minutes == 0 else 1_000_000  # fresh weights: one step only builds the folder
    base = Path(args.base) if args.base else out / "base" / "ckpt-latest"
    if not args.base:
        llmmo("train", *options(common | {"train.max_steps": steps, "train.max_minutes": args.pretrain_minutes or 0,
                                          "train.lr": 1e-3, "train.batch_size": 32, "train.eval_every": 500,
                                          "train.eval_batches": 20, "train.out_dir": out / "base"}))  # fmt: skip
    pretrain_s = time.perf_counter() - start
    start = time.perf_counter()
    llmmo(
        "finetune", "classify", base, "--train-file", data / "train.tsv", "--eval-fraction", 0.05,
        "--text-field", "sentence", "--pooling", args.pooling,
        *options({"train.max_minutes": args.minutes, "train.epochs": args.epochs, "train.lr": args.lr,
                  "train.min_lr": args.min_lr, "train.weight_decay": args.weight_decay,
                  "train.batch_size": args.batch_size, "train.eval_every": args.eval_every,
                  "train.warmup_steps": 200, "train.out_dir": out / "finetune"}),
    )  # fmt: skip
    finetune_s = time.perf_counter() - start
    dev = {}
    for name in ("ckpt-best", "ckpt-latest"):
        output = llmmo("eval", out / "finetune" / name, "--task", "classify", "--file", data / "dev.tsv",
                       "--prompt-field", "sentence", capture=True)  # fmt: skip
        dev[name] = json.loads(output)
    records = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    result = {
        "base": args.base
        or ("fresh weights" if args.pretrain_minutes == 0 else f"pretrained {args.pretrain_minutes} min"),
        "pretrain_s": round(pretrain_s, 1),
        "finetune_s": round(finetune_s, 1),
        "best_step": best["step"],
        "steps": evals[-1]["step"],
        "dev_accuracy": dev["ckpt-best"]["accuracy"],
        "dev_macro_f1": dev["ckpt-best"]["macro_f1"],
        "dev_confusion": dev["ckpt-best"]["confusion"],
        "dev_accuracy_last": dev["ckpt-latest"]["accuracy"],
        "curve": [
            {
                "step": r["step"],
                "time_s": r["time_s"],
                "heldout_accuracy": r["val_accuracy"],
                "heldout_loss": r["val_loss"],
            }
            for r in evals
        ],  # fmt: skip
        "settings": vars(args) | {k: v for k, v in MODEL.items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| step | time (s) | held-out loss | held-out accuracy |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['time_s']:.0f} | {c['heldout_loss']:.4f} | {c['heldout_accuracy']:.4f} |"
              for c in result["curve"]]  # fmt: skip
    lines += ["", f"dev accuracy: ckpt-best (step {best['step']}) {result['dev_accuracy']:.4f}, "
              f"last {result['dev_accuracy_last']:.4f}"]  # fmt: skip
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
