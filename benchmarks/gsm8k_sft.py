"""GSM8K instruction tuning: does a small model learn to answer in GSM8K's format, and how often is it right?

    python -m benchmarks.gsm8k_sft [--pretrain-minutes 8] [--sft-minutes 10] [--questions 200]

Steps, all through the llmmo CLI, on ../shared/data/gsm8k:
1. `llmmo train`: a byte-level BPE and a language model pretrained on the train split's questions and answers as
   plain text (no chat template);
2. `llmmo finetune sft`: the chat template, loss on the answers only, packed rows, on the same train split;
3. `llmmo eval --task gsm8k` on the first --questions of the held-out test split, greedy with a repetition
   penalty of 1.2 (plain greedy decoding of so small a model loops on a line until its token budget runs out):
   the share of replies that end in `#### <number>` (format_rate) and the share whose number is right (accuracy).
Writes result.json, and examples.jsonl with every reply.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import llmmo, options

MODEL = {"model.family": "llama", "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-minutes", type=float, default=8.0)
    parser.add_argument("--sft-minutes", type=float, default=10.0)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="of the greedy replies scored")
    parser.add_argument("--eval-only", action="store_true", help="score the model an earlier run left in --out")
    parser.add_argument("--out", default="benchmarks/results/gsm8k-sft")
    args = parser.parse_args()
    data = Path(os.environ.get("LLMMO_DATA_DIR", "../shared/data")) / "gsm8k"
    out = Path(args.out)
    previous = json.loads((out / "result.json").read_text()) if args.eval_only else {}
    pretrain_s, sft_s = previous.get("pretrain_s"), previous.get("sft_s")
    if not args.eval_only:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pretrain_s, sft_s = train(data, out, args)
    test = out / "test.jsonl"
    lines = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()[: args.questions]
    test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    start = time.perf_counter()
    scores = json.loads(llmmo("eval", out / "sft" / "ckpt-latest", "--task", "gsm8k", "--file", test,
                              "--max-new-tokens", 300, "--batch-size", 16, "--examples", out / "examples.jsonl",
                              "--repetition-penalty", args.repetition_penalty, capture=True))  # fmt: skip
    eval_s = time.perf_counter() - start
    sft_evals = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    result = {
        "format_rate": scores["format_rate"],
        "accuracy": scores["accuracy"],
        "questions": scores["n"],
        "pretrain_s": pretrain_s,
        "sft_s": sft_s,
        "eval_s": round(eval_s, 1),
        "sft_val_loss": [round(r["val_loss"], 4) for r in sft_evals],
        "settings": vars(args) | MODEL,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def train(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Pretrain, then instruction-tune; the seconds each took."""
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    corpus = out / "train.jsonl"  # one document per problem: question and worked answer
    corpus.write_text("".join(json.dumps({"text": f"{r['question']}\n{r['answer']}"}) + "\n" for r in rows))
    start = time.perf_counter()
    llmmo("train", *options({"data.path": corpus, "data.tokenizer": "bpe", "data.vocab_size": 4096,
                             "data.block_size": args.block_size, "data.val_fraction": 0.02, "train.max_steps": 100000,
                             "train.max_minutes": args.pretrain_minutes, "train.batch_size": 8, "train.lr": 2e-3,
                             "train.min_lr": 2e-4, "train.warmup_steps": 100, "train.eval_every": 500,
                             "train.eval_batches": 10, "train.out_dir": out / "base"} | MODEL))  # fmt: skip
    pretrain_s = time.perf_counter() - start
    start = time.perf_counter()
    llmmo("finetune", "sft", out / "base" / "ckpt-latest", "--train-file", data / "train.jsonl",
          "--prompt-field", "question", "--response-field", "answer", "--eval-fraction", "0.02",
          *options({"train.max_minutes": args.sft_minutes, "train.epochs": 100, "train.batch_size": 8,
                    "train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 50, "train.eval_every": 200,
                    "train.out_dir": out / "sft"}))  # fmt: skip
    sft_s = time.perf_counter() - start
    return round(pretrain_s, 1), round(sft_s, 1)


if __name__ == "__main__":
    main()
