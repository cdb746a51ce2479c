"""What compression bought and cost: one row per checkpoint (bytes, parameters, quality, speed, memory) and a
plot of quality against bytes with the efficiency frontier (the checkpoints no other beats on both).

Each checkpoint is measured in a fresh child process, so that its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import queue as queue_module
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llmmo.errors import LlmmoError
from llmmo.fileio import atomic_path, write_text_atomic

NEW_TOKENS, PROMPT_TOKENS = 64, 16


@dataclass
class ReportConfig:
    split: str = "val"
    batch_size: int = 16
    max_batches: int = 50  # evaluation batches (0: the whole split)
    new_tokens: int = NEW_TOKENS  # generated per row for the speed columns
    threads: int = 0  # torch threads in each measurement (0: torch's default)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero ones) as the model computes with them: a quantized layer counts its in x out
    weights (zero where they dequantize to zero), a tied tensor once."""
    from llmmo.compress import dense
    from llmmo.compress.quantize import Int4Linear

    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = [module.weight_float()] if isinstance(module, Int4Linear) else []
        tensors += [t for t in module.parameters(recurse=False) if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        for t in tensors:
            total, nonzero = total + t.numel(), nonzero + int((dense(t) != 0).sum())
    return total, nonzero


def _tokens_per_s(model: nn.Module, prompt: list[int], batch: int, new_tokens: int) -> float:
    from llmmo.generate import GenerationConfig, generate_ids

    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=50, seed=0)
    for _ in generate_ids(model, [prompt] * batch, GenerationConfig(max_new_tokens=4)):  # warm-up
        pass
    start = time.perf_counter()
    for _ in generate_ids(model, [prompt] * batch, gen):
        pass
    return batch * new_tokens / (time.perf_counter() - start)


def measure(path: str, cfg: ReportConfig) -> dict:
    """One checkpoint's row (run in its own process by `report`)."""
    from llmmo.checkpoint import load_checkpoint
    from llmmo.compress import flatten_state
    from llmmo.data import prepare_data
    from llmmo.evaluate import evaluate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(path)
    data = prepare_data(ckpt.data, tokenizer=ckpt.tokenizer, splits=(cfg.split,))
    split = data.splits[cfg.split]
    result = evaluate(
        ckpt.model,
        split,
        ckpt.tokenizer.token_bytes(),
        cfg.batch_size,
        cfg.max_batches,
        block_size=ckpt.data.block_size,
    )
    params, nonzero = count_params(ckpt.model)
    prompt = [int(t) for t in split.tokens[:PROMPT_TOKENS]]
    methods = [
        r["method"] + (f":{r.get('scheme') or r.get('kind')}" if "scheme" in r or "kind" in r else "")
        for r in ckpt.meta.get("compression", [])
    ]
    folder = Path(path)
    weights = {t.data_ptr(): t for t in flatten_state(ckpt.model.state_dict())[0].values()}  # ties once
    return {
        "checkpoint": path,
        "name": folder.parent.name if folder.name.startswith("ckpt") else folder.name,
        "compression": " + ".join(methods) or "none",
        "bytes": (Path(path) / "model.safetensors").stat().st_size,
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 1 - nonzero / max(params, 1),
        "val_loss": result.loss,
        "val_ppl": result.ppl,
        "val_bpb": result.bpb,
        "tok_s_batch1": _tokens_per_s(ckpt.model, prompt, 1, cfg.new_tokens),
        "tok_s_batch8": _tokens_per_s(ckpt.model, prompt, 8, cfg.new_tokens),
        "weights_mib": sum(t.numel() * t.element_size() for t in weights.values()) / 2**20,  # in memory
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the whole process
    }


def _child(path: str, cfg: dict, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(measure(path, ReportConfig(**cfg)))
    except LlmmoError as e:
        queue.put({"error": str(e)})


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both bytes and val loss, by bytes."""
    return sorted(
        (r for r in rows if not any(o["bytes"] <= r["bytes"] and o["val_loss"] < r["val_loss"] for o in rows)),
        key=lambda r: r["bytes"],
    )


COLUMNS = [
    ("name", "s"),
    ("compression", "s"),
    ("bytes", ",d"),
    ("params", ",d"),
    ("nonzero_params", ",d"),
    ("val_loss", ".4f"),
    ("val_ppl", ".3f"),
    ("val_bpb", ".4f"),
    ("tok_s_batch1", ",.0f"),
    ("tok_s_batch8", ",.0f"),
    ("weights_mib", ".2f"),
    ("peak_rss_mib", ".0f"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def plot(rows: list[dict], file: Path) -> None:
    """Perplexity against bytes on disk (log scale), the frontier drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["bytes"], r["val_ppl"], s=30)
        ax.annotate(r["name"], (r["bytes"], r["val_ppl"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    best = frontier(rows)
    ax.plot([r["bytes"] for r in best], [r["val_ppl"] for r in best], "k--", lw=1, label="efficiency frontier")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (model.safetensors)")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    with atomic_path(file) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def report(paths: list[str], out: str | Path, cfg: ReportConfig | None = None) -> list[dict]:
    """Measure every checkpoint (each in a child process) and write report.json, report.md and frontier.png
    into `out`; returns the rows."""
    from llmmo.checkpoint import read_config

    cfg = cfg or ReportConfig()
    for p in paths:
        read_config(p)  # a missing or damaged checkpoint fails now, with its own message
    rows = [_measure_in_child(str(path), cfg) for path in paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "report.md", table(rows) + "\n")
    plot(rows, out / "frontier.png")
    return rows


def _measure_in_child(path: str, cfg: ReportConfig) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(path, asdict(cfg), queue))
    child.start()
    while True:
        try:
            row = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                raise LlmmoError(f"measuring '{path}' failed (its process exited with {child.exitcode})") from None
    child.join()
    if "error" in row:
        raise LlmmoError(f"{path}: {row['error']}")
    return row
