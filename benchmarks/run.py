"""Every benchmark in one run, so that all ratios come from one machine state: `make bench`.

Writes benchmarks/results/bench.json and bench.md (the tables), plus the time-to-target curve (CSV, PNG).
python -m benchmarks.run [--only help,train,generate,target,distributed] [--baseline] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import run_child, table

PARTS = ("help", "train", "generate", "target", "distributed")


def help_latency(repeats: int = 5) -> dict:
    """`llmmo --help` wall time, best of `repeats` (it must not import torch)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmmo", "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return {"llmmo_help_s": best}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--baseline", action="store_true", help="time-to-target: also train the AdamW baseline")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    parts = args.only.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    report = []
    if "help" in parts:
        results["help"] = help_latency()
        report.append(f"`llmmo --help`: {results['help']['llmmo_help_s']:.3f} s")
    if "train" in parts:
        results["train"] = [run_child("benchmarks.train_speed", "--shape", shape) for shape in ("0.8M", "10.7M")]
        report.append(
            "### Training (fp32, CPU)\n"
            + table(
                results["train"],
                [
                    ("shape", "s"),
                    ("params", ",d"),
                    ("tokens_per_s", ",.0f"),
                    ("model_gflops", ".1f"),
                    ("matmul_gflops", ".1f"),
                    ("torch_mm_gflops", ".1f"),
                    ("mfu", ".1%"),
                    ("mfu_vs_torch_mm", ".1%"),
                    ("mfu_6n", ".1%"),
                    ("peak_rss_mib", ".0f"),
                ],
            )
        )
    if "generate" in parts:
        rows = []
        for family in ("gpt2", "llama"):
            for shape in ("0.8M", "10.7M"):
                rows += run_child("benchmarks.generate_speed", "--shape", shape, "--family", family)
        results["generate"] = rows
        report.append(
            "### Generation (prompt 16, 200 new tokens, top-k 50), against transformers\n"
            "speedup_fp32: llmmo's best fp32 way over transformers in fp32; speedup_best: the best of the ways "
            "measured for each, bf16 weights included\n\n"
            + table(
                rows,
                [
                    ("family", "s"),
                    ("shape", "s"),
                    ("batch", "d"),
                    ("llmmo_tok_s", ",.0f"),
                    ("llmmo_compiled_tok_s", ",.0f"),
                    ("llmmo_packed_tok_s", ",.0f"),
                    ("llmmo_compiled_bf16_tok_s", ",.0f"),
                    ("hf_tok_s", ",.0f"),
                    ("hf_bf16_tok_s", ",.0f"),
                    ("speedup_fp32", ".2f"),
                    ("speedup_best", ".2f"),
                    ("compile_s", ".0f"),
                    ("compile_bf16_s", ".0f"),
                ],
            )
        )
    if "target" in parts:
        extra = ["--baseline"] if args.baseline else []
        results["target"] = run_child("benchmarks.time_to_target", "--out", str(out), *extra, timeout=3600)
        rows = [{"run": name} | r for name, r in results["target"].items()]
        report.append(
            "### Time to val loss 1.886 (tinyshakespeare, char level)\n"
            + table(
                rows,
                [
                    ("run", "s"),
                    ("params", ",d"),
                    ("reached", ""),
                    ("flops", ".3e"),
                    ("tokens", ",d"),
                    ("step", "d"),
                    ("time_s", ".1f"),
                ],
            )
            + f"\n\nCurves: {out}/time_to_target.csv, {out}/time_to_target.png"
        )
    if "distributed" in parts:
        results["distributed"] = run_child("benchmarks.distributed_speed")
        report.append(
            "### Training on 1 and N processes (0.8M shape, the same global batch; torchrun)\n"
            + table(
                results["distributed"],
                [
                    ("device", "s"),
                    ("processes", "d"),
                    ("parallel", "s"),
                    ("tok_s", ",.0f"),
                    ("vs_one_process", ".2f"),
                ],
            )
        )
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "\n\n".join(report) + "\n"
    (out / "bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
