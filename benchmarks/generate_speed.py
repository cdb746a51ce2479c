"""Generation speed, llmmo against transformers on the same shape, in one process (so one machine state).

Prompt 16 tokens, 200 new tokens, top-k 50 sampling, batch 1 and 8; both models randomly initialised (speed does
not depend on the weights). Context 256 for both shapes, so that 216 positions fit without a sliding window.
llmmo runs three ways in fp32: eager; with the decoding step compiled (`generate.compile_decoder` for `batch`
rows; its compile time is reported apart, not counted in tokens/s); and eager with its linear layers' weights
packed by oneDNN (`onednn.pack_linears`, for `batch` rows). transformers runs its default `generate()`. On a
CPU with bf16 instructions (llmmo.cpu.fast_bf16) both also run with bf16 weights: llmmo compiled
(`generate.decoding_dtype`), transformers with the model cast to bf16. Two ratios: fp32 against fp32 (llmmo's
best way over transformers), and the best of either toolkit over the ways measured here, bf16 included
(transformers is not compiled).

python -m benchmarks.generate_speed --shape 0.8M --family gpt2
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from collections.abc import Callable

import torch

from benchmarks.shapes import SHAPES
from llmmo.config import ModelConfig, resolve_model
from llmmo.cpu import fast_bf16
from llmmo.generate import GenerationConfig, compile_decoder, decoding_dtype, generate_ids
from llmmo.model import Transformer
from llmmo.onednn import pack_linears

VOCAB, CONTEXT, PROMPT, NEW, TOP_K = 65, 256, 16, 200, 50


def llmmo_model(shape: str, family: str) -> Transformer:
    s = SHAPES[shape]
    cfg = ModelConfig(
        family=family,
        n_layer=s["model.n_layer"],
        n_head=s["model.n_head"],
        n_embd=s["model.n_embd"],
        vocab_size=VOCAB,
        block_size=CONTEXT,
    )
    return Transformer(resolve_model(cfg)).eval()


def hf_model(model: Transformer) -> torch.nn.Module:
    """The transformers model of the same shape (random weights)."""
    import transformers

    c = model.cfg
    if c.family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.mlp_hidden,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def time_interleaved(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time of each case over `repeats` rounds in which the cases take turns (after a warm-up call
    each): a slow spell of the shared machine then falls on every case, not on one (runs one after the other
    moved ratios by 30% between runs; docs/LOG.md)."""
    for fn in cases.values():
        fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run_llmmo(model: Transformer, prompts: torch.Tensor, gen: GenerationConfig) -> None:
    for _ in generate_ids(model, prompts.tolist(), gen):
        pass


@torch.inference_mode()
def run_hf(model: torch.nn.Module, prompts: torch.Tensor) -> None:
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        top_k=TOP_K,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        pad_token_id=0,
    )
    assert out.shape == (prompts.size(0), PROMPT + NEW)


def measure(shape: str, family: str, repeats: int) -> list[dict]:
    # four compiled models share Transformer.forward's code object: past Dynamo's limit of graphs per code
    # object it would silently run eager and skew the figures; fail instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch.manual_seed(0)
    ours = llmmo_model(shape, family)
    theirs = hf_model(ours)
    bf16 = fast_bf16()
    if bf16:
        ours_bf16 = decoding_dtype(copy.deepcopy(ours), "bf16")
        theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)
    gen = GenerationConfig(max_new_tokens=NEW, temperature=1.0, top_k=TOP_K, seed=0)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(0, VOCAB, (batch, PROMPT))
        compiled = compile_decoder(ours, rows=batch)
        start = time.perf_counter()
        run_llmmo(compiled, prompts, gen)  # compiles the prompt's and the decoding step's graphs
        compile_s = time.perf_counter() - start
        cases = {
            "llmmo": functools.partial(run_llmmo, ours, prompts, gen),
            "llmmo_compiled": functools.partial(run_llmmo, compiled, prompts, gen),
            "llmmo_packed": functools.partial(run_llmmo, pack_linears(copy.deepcopy(ours), rows=batch), prompts, gen),
            "hf": functools.partial(run_hf, theirs, prompts),
        }
        row = {"shape": shape, "family": family, "batch": batch, "compile_s": compile_s}
        if bf16:
            compiled_bf16 = compile_decoder(ours_bf16, rows=batch)
            start = time.perf_counter()
            run_llmmo(compiled_bf16, prompts, gen)
            row["compile_bf16_s"] = time.perf_counter() - start
            cases["llmmo_compiled_bf16"] = functools.partial(run_llmmo, compiled_bf16, prompts, gen)
            cases["hf_bf16"] = functools.partial(run_hf, theirs_bf16, prompts)
        seconds = time_interleaved(cases, repeats)
        torch._dynamo.reset()  # the next batch size compiles afresh, as a new process would
        row |= {f"{name}_tok_s": batch * NEW / t for name, t in seconds.items()}
        fp32 = [row["llmmo_tok_s"], row["llmmo_compiled_tok_s"], row["llmmo_packed_tok_s"]]
        row["speedup_fp32"] = max(fp32) / row["hf_tok_s"]
        row["speedup_best"] = max(fp32 + [row.get("llmmo_compiled_bf16_tok_s", 0.0)]) / max(
            row["hf_tok_s"], row.get("hf_bf16_tok_s", 0.0)
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--family", default="gpt2", choices=("gpt2", "llama"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.shape, args.family, args.repeats)))


if __name__ == "__main__":
    main()
