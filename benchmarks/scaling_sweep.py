"""A real scaling sweep on 2 CPU cores (~5 min): char level, 3 budgets x 3 sizes of the depth dial (aspect 32),
the sizes nearest each budget's Chinchilla point (`--sizes auto`); on pystdlib no run repeats data. Fitted on
the two smaller budgets, the law predicts every run of the largest one; the JSON printed last holds the fit,
the prediction errors, the figures' paths and a plan for 1e15 FLOPs.

python -m benchmarks.scaling_sweep [--source pystdlib|tinyshakespeare] [--out benchmarks/results/scaling]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BASE = {
    "data.source": "pystdlib",
    "data.tokenizer": "char",
    "data.block_size": 64,
    "model.aspect": 32,
    "train.batch_size": 12,
    "train.lr": 2e-3,  # at the base width 128; the sweep scales it with 1 / width
    "train.warmup_steps": 100,
    "train.eval_batches": 100,
}


def llmmo(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "llmmo", *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--source", default="pystdlib")
    # on pystdlib no run of these budgets reads more than the 7.57M training tokens (depth 1 at 0.88e12: 7.54M;
    # depth 2 at 5.4e12: 7.45M)
    parser.add_argument("--budgets", default="0.88e12,2.2e12,5.4e12")
    parser.add_argument("--sizes", default="auto")
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    start = time.perf_counter()
    options = [f"--{k}={v}" for k, v in (BASE | {"data.source": args.source}).items()]
    llmmo("scale", "sweep", "--budgets", args.budgets, "--sizes", args.sizes, "--out", args.out, *options)
    sweep_s = time.perf_counter() - start
    fit = json.loads(llmmo("scale", "fit", args.out, "--fit-budgets", ",".join(budgets[:-1])))
    figures = llmmo("scale", "plot", args.out, "--fit-budgets", ",".join(budgets[:-1])).split()
    plan = json.loads(llmmo("scale", "plan", args.out, "--flops", "1e15"))
    print(json.dumps({"sweep_s": sweep_s, "fit": fit, "figures": figures, "plan_1e15": plan}))


if __name__ == "__main__":
    main()
