"""What every benchmark needs: the machine's measured matmul rate, peak memory, a child process per case."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from llmmo.cpu import mkl_fast_path


def matmul_rates(dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 4.0) -> dict[str, float]:
    """The best rate (FLOP/s) of square matrix products of a few sizes, measured now, by library; the
    denominator of MFU is the best of them. Never a hard-coded peak: what this machine's libraries do today,
    under today's load. The libraries: "torch" (`a @ b`: MKL's sgemm on a CPU) and, for fp32 on a CPU, "onednn"
    (llmmo.onednn's product). On an AMD CPU whose MKL runs its generic path (LLMMO_MKL_ON_AMD=0, llmmo.cpu) oneDNN
    is ~2.3x MKL, so a peak measured with MKL alone is not the machine's (docs/LOG.md)."""
    mkl_fast_path()  # as llmmo's own code runs (a no-op if a product already ran: MKL keeps its first path)
    products = {"torch": lambda a, b: a @ b}
    if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        products["onednn"] = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    sizes = (1024, 2048, 4096) if device == "cpu" else (4096, 8192)  # large products, as "peak" means
    rates = {}
    for name, product in products.items():
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            product(a, b)  # warm-up
            deadline = time.perf_counter() + seconds / len(sizes) / len(products)
            while time.perf_counter() < deadline:
                sync(device)
                start = time.perf_counter()
                product(a, b)
                sync(device)
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
        rates[name] = best
    return rates


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(module: str, *args: str, timeout: float = 1800) -> dict:
    """Run `python -m module args` and return the JSON object it prints last: each case gets a fresh process,
    so peak memory and warm caches belong to that case alone."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, format) columns."""
    head = "| " + " | ".join(k for k, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, f in columns) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def llmmo(*args: object, capture: bool = False) -> str:
    """Run `python -m llmmo args` (failing loudly); its stdout when `capture`, else it goes to the terminal."""
    proc = subprocess.run([sys.executable, "-m", "llmmo", *map(str, args)], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)  # fmt: skip
    return proc.stdout or ""


def options(values: dict) -> list[str]:
    """{"train.lr": 1e-3} -> ["--train.lr", "0.001"]."""
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]
