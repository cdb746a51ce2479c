"""Load test of `llmmo serve` on loopback: throughput and latency with 1, 8 and 32 concurrent clients.

    python -m benchmarks.serve_load [--checkpoint CKPT] [--seconds 20] [--long-seconds 60] [--max-tokens 64]

Each client sends chat completions one after another (max_tokens each, sampling at temperature 1, so replies run
to their budget), for the given time. Reported per level: requests, errors, completion tokens/s over all
clients, and latency p50/p99. Batching shows as the ratio of aggregate tokens/s at 8 clients to 1 client's.
Without --checkpoint the model is random weights of nanoGPT's 0.8M CPU shape with the chat template (the
server's work, not the answers, is measured). Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import table


def tiny_chat_checkpoint(folder: Path) -> Path:
    import torch

    from llmmo.checkpoint import save_checkpoint
    from llmmo.config import DataConfig, ModelConfig, resolve_model
    from llmmo.finetune.chat import add_chat_tokens
    from llmmo.model import Transformer
    from llmmo.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer("bpe", ["How many apples does Tom have? He has five apples. " * 50], 512)
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=tokenizer.vocab_size, block_size=256)
    model = Transformer(resolve_model(cfg))
    tokenizer = add_chat_tokens(model, tokenizer)
    path = folder / "load-test" / "ckpt-best"
    save_checkpoint(path, model, tokenizer, DataConfig(tokenizer="bpe", block_size=256))
    return path


def client(url: str, model: str, max_tokens: int, until: float, out: list, lock: threading.Lock) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "How many apples?"}], "max_tokens": max_tokens,
            "temperature": 1.0}  # fmt: skip
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                response = http.post(f"{url}/v1/chat/completions", json=body)
                ok = response.status_code == 200
                tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok, tokens = False, 0
            with lock:
                out.append({"ok": ok, "tokens": tokens, "latency": time.monotonic() - start, "end": time.monotonic()})


def level(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, model, max_tokens, start + seconds, results, lock))
               for _ in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(r["end"] for r in results) - start
    latencies = sorted(r["latency"] for r in results if r["ok"])
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "clients": clients,
        "requests": len(results),
        "errors": sum(not r["ok"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": q[98],
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", help="an instruction-tuned checkpoint (default: random 0.8M weights)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level of 1 and 8 clients")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="for 32 clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_chat_checkpoint(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "llmmo", "serve", str(checkpoint), "--port", str(port), "--model-name", "m"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            level(url, "m", 1, 3, args.max_tokens)  # warm-up
            rows = [level(url, "m", n, args.seconds, args.max_tokens) for n in (1, 8)]
            rows.append(level(url, "m", 32, args.long_seconds, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {"levels": rows, "batching_gain_8_vs_1": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
              "settings": vars(args)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = [("clients", "d"), ("requests", "d"), ("errors", "d"), ("tokens_per_s", ",.0f"), ("p50_s", ".3f"),
               ("p99_s", ".3f"), ("seconds", ".1f")]  # fmt: skip
    md = table(rows, columns) + f"\n\nbatching gain (8 clients / 1): {result['batching_gain_8_vs_1']:.2f}x\n"
    (out / "serve_load.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
