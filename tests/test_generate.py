"""Generation: greedy decoding with and without the KV cache agree, a batch equals its prompts run alone,
sampling is seeded, the logits filters do what they say, and streaming gives back exactly the final text."""

from __future__ import annotations

import contextlib
import copy
import math
import unittest.mock
from collections.abc import Iterable, Iterator

import pytest
import torch
import torch._inductor.freezing
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmo.compress.quantize import quantize
from llmmo.config import ModelConfig, resolve_model
from llmmo.cpu import fast_bf16
from llmmo.errors import ConfigError, DataError
from llmmo.generate import (
    GenerationConfig,
    RowText,
    apply_repetition_penalty,
    compile_decoder,
    decoding_dtype,
    generate,
    generate_ids,
    process_logits,
    sample_next,
    stream,
    stream_ids,
    top_k_filter,
    top_p_filter,
)
from llmmo.model import KVCache, Transformer
from llmmo.onednn import PackedLinear, available, pack_linears
from llmmo.tokenizer import bpe_tokenizer, char_tokenizer, word_tokenizer

TEXT = "hello world! the quick brown fox jumps over the lazy dog. 0123456789\n"
CHAR = char_tokenizer([TEXT])
FAMILIES = [pytest.param("gpt2", None, id="gpt2"), pytest.param("llama", 2, id="llama-gqa")]  # n_kv_head 2 < 4


def tiny(family: str = "gpt2", n_kv_head: int | None = None, block_size: int = 32, vocab_size: int = 0):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=block_size)
    cfg.vocab_size = vocab_size or CHAR.vocab_size
    return Transformer(resolve_model(cfg))


def train(model: Transformer, ids: list[int], steps: int = 250) -> Transformer:
    """Fit the model to a repeated text, so that what it generates is known."""
    data, block = torch.tensor(ids), model.cfg.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(len(data) - block - 1, (16,), generator=rng).tolist()
        x = torch.stack([data[i : i + block] for i in starts])
        y = torch.stack([data[i + 1 : i + block + 1] for i in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def collect(steps: Iterable[list[int | None]]) -> list[list[int]]:
    """The new tokens of each row, from generate_ids' steps."""
    rows: list[list[int]] | None = None
    for tokens in steps:
        rows = rows if rows is not None else [[] for _ in tokens]
        for row, t in zip(rows, tokens, strict=True):
            if t is not None:
                row.append(t)
    return rows or []


def greedy(**kwargs) -> GenerationConfig:
    return GenerationConfig(temperature=0, **kwargs)


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int, refill: int | None = None) -> list[int]:
    """Greedy decoding written out with full forward passes. refill=None: nanoGPT's crop to the last block_size
    tokens; refill=K: the cache's schedule (the context grows to block_size, then starts over from the last K)."""
    model.eval()
    seq, start, block = list(prompt), 0, model.cfg.block_size
    for _ in range(n):
        if refill is None:
            start = max(0, len(seq) - block)
        elif len(seq) - start > block:
            start = len(seq) - refill
        logits, _ = model(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def hello_model() -> Transformer:
    return train(tiny(), CHAR.encode("hello world! " * 40))


BTEXT = "你好，世界！🙂 hello 🎉 数据 "


@pytest.fixture(scope="module")
def bpe_setup():
    # a tiny vocabulary keeps most of these characters split into several byte tokens
    tok = bpe_tokenizer([BTEXT * 20], 262)
    model = train(tiny(block_size=48, vocab_size=tok.vocab_size), tok.encode(BTEXT * 40))
    return model, tok


# ----------------------------------------------------------------------------------------------------------
# The cache, batches and the context window


@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_greedy_with_cache_equals_without_token_for_token(family, n_kv_head):
    model = tiny(family, n_kv_head)
    prompt = CHAR.encode("the fox")
    n = model.cfg.block_size - len(prompt)  # up to a full block
    with_cache = collect(generate_ids(model, [prompt], greedy(max_new_tokens=n)))
    without = collect(generate_ids(model, [prompt], greedy(max_new_tokens=n, use_cache=False)))
    assert with_cache == without == [reference_greedy(model, prompt, n)]
    assert len(with_cache[0]) == n


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_batch_of_different_lengths_equals_each_prompt_alone(family, n_kv_head, use_cache):
    model = tiny(family, n_kv_head)
    prompts = [CHAR.encode(p) for p in ("hello", "the quick brown", "h")]  # 5, 15 and 1 tokens: left-padded
    gen = greedy(max_new_tokens=model.cfg.block_size - 15, use_cache=use_cache)
    batch = collect(generate_ids(model, prompts, gen))
    alone = [collect(generate_ids(model, [p], gen))[0] for p in prompts]
    assert batch == alone
    assert alone == [reference_greedy(model, p, gen.max_new_tokens) for p in prompts]


@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_compiled_decoder_computes_the_eager_logits_and_tokens(family, n_kv_head):
    model = train(tiny(family, n_kv_head), CHAR.encode(TEXT * 10), steps=60).eval()
    compiled = compile_decoder(model)
    assert dict(compiled.named_parameters()).keys() == {f"_orig_mod.{k}" for k in dict(model.named_parameters())}
    torch.manual_seed(1)
    for batch, pad in ((1, None), (2, torch.tensor([0, 3]))):  # one row (decomposed products), padded rows
        caches = [KVCache(model.cfg, batch, model.cfg.block_size, pad=pad) for _ in range(2)]
        ids = torch.randint(0, CHAR.vocab_size, (batch, 6))
        with torch.inference_mode():
            for _ in range(4):  # the prompt, then three decoding steps
                eager, _ = model(ids, kv_cache=caches[0])
                fast, _ = compiled(ids, kv_cache=caches[1])
                torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
                ids = eager[:, -1:].argmax(-1)
        assert caches[0].pos == caches[1].pos == 9
    prompts = [CHAR.encode(p) for p in ("the quick", "lazy")]
    gen = greedy(max_new_tokens=12)
    want = collect(generate_ids(model, prompts, gen))
    with frozen_graphs() as frozen:
        assert collect(generate_ids(compiled, prompts, gen)) == want
    assert frozen == []  # one row: products decomposed, nothing frozen
    # compiled for two rows: weights frozen into the graph (constants, not inputs) and packed for the CPU's library
    with frozen_graphs() as frozen:
        assert collect(generate_ids(compile_decoder(model, rows=2), prompts, gen)) == want
    assert len(frozen) >= 2 and all(constants > 0 for constants in frozen)  # the prompt's graph, the step's


@contextlib.contextmanager
def frozen_graphs() -> Iterator[list[int]]:
    """The graphs Inductor freezes meanwhile, each as its count of weights read as constants (get_attr nodes):
    0 would mean the weights were still the graph's inputs, i.e. freezing did not apply."""
    freeze, counts = torch._inductor.freezing.freeze, []  # imported by Inductor when it freezes a graph

    def spy(dynamo_gm, aot_gm, example_inputs):
        counts.append(sum(node.op == "get_attr" for node in dynamo_gm.graph.nodes))
        return freeze(dynamo_gm, aot_gm, example_inputs)

    torch._dynamo.reset()  # compile afresh: earlier tests' graphs are not this test's
    with unittest.mock.patch("torch._inductor.freezing.freeze", spy):
        yield counts


@pytest.mark.skipif(not fast_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_bf16_decoding_follows_fp32(family, n_kv_head):
    model = train(tiny(family, n_kv_head), CHAR.encode(TEXT * 10), steps=60).eval()
    half = decoding_dtype(copy.deepcopy(model), "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, CHAR.vocab_size, (3, 20))
    with torch.inference_mode():
        want, got = model(ids)[0], half(ids)[0].float()
    # bf16 keeps 8 bits of mantissa (0.4% per rounding); a few roundings deep, logits stay within 3% of their scale
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    prompts = [CHAR.encode(p) for p in ("the quick", "lazy")]
    rows = collect(generate_ids(half, prompts, greedy(max_new_tokens=12)))
    assert [len(r) for r in rows] == [12, 12] and all(0 <= t < CHAR.vocab_size for r in rows for t in r)
    # compiled for several rows (frozen: oneDNN's bf16 products with packed weights), the same bound
    compiled, cache = compile_decoder(half, rows=2), KVCache(half.cfg, 3, 20, dtype=torch.bfloat16)
    with torch.inference_mode():
        fast = compiled(ids, kv_cache=cache)[0].float()
    assert (fast - want).abs().max() <= 0.03 * want.abs().max()


def test_bf16_decoding_is_refused_without_bf16_instructions(monkeypatch):
    model = tiny()
    with pytest.raises(ConfigError, match="dtype 'fp16' is not one of fp32, bf16"):
        decoding_dtype(model, "fp16")
    for scheme in ("int4", "int8"):  # our packed nibbles, torchao's tensor subclass: both keep their own format
        quantized = copy.deepcopy(model)
        quantize(quantized, scheme, group_size=16)
        with pytest.raises(ConfigError, match="quantized layers"):
            decoding_dtype(quantized, "bf16")
    monkeypatch.setattr("llmmo.generate.fast_bf16", lambda: False)  # the CPU's answer, as on an AVX2-only CPU
    with pytest.raises(ConfigError, match="no bf16 instructions"):
        decoding_dtype(model, "bf16")
    assert next(model.parameters()).dtype == torch.float32  # refused before converting anything


@pytest.mark.skipif(not available(), reason="oneDNN is used on x86-64 CPUs with oneDNN only")
@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_packed_linears_compute_the_same_logits_and_tokens(family, n_kv_head):
    model = train(tiny(family, n_kv_head), CHAR.encode(TEXT * 10), steps=60).eval()
    packed = pack_linears(copy.deepcopy(model))
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())  # the output head too
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == linears > 2 * model.cfg.n_layer
    assert packed.state_dict().keys() == model.state_dict().keys()  # the same parameters, saved the same way
    ids = torch.randint(0, CHAR.vocab_size, (3, 20))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)
    prompts = [CHAR.encode(p) for p in ("the quick", "lazy")]
    gen = greedy(max_new_tokens=12)
    assert collect(generate_ids(packed, prompts, gen)) == collect(generate_ids(model, prompts, gen))
    half = tiny().to(torch.bfloat16)  # bf16 layers stay as they are
    assert pack_linears(half) is half and not any(isinstance(m, PackedLinear) for m in half.modules())


@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_past_block_size_no_cache_crops_and_cache_refills_from_half_a_block(family, n_kv_head):
    model = tiny(family, n_kv_head)
    prompt, n, block = CHAR.encode("lazy dog"), 70, model.cfg.block_size  # 78 tokens: two refills of the cache
    without = collect(generate_ids(model, [prompt], greedy(max_new_tokens=n, use_cache=False)))[0]
    with_cache = collect(generate_ids(model, [prompt], greedy(max_new_tokens=n)))[0]
    assert without == reference_greedy(model, prompt, n)
    assert with_cache == reference_greedy(model, prompt, n, refill=block // 2)
    fits = block - len(prompt)
    assert with_cache[:fits] == without[:fits]  # the same context while it fits
    if family == "gpt2":  # a frozen compiled decoder refills too (new graphs for the refill's prefill)
        prompts, gen = [prompt, CHAR.encode("the")], greedy(max_new_tokens=n)
        frozen = compile_decoder(model, rows=2)
        assert collect(generate_ids(frozen, prompts, gen)) == collect(generate_ids(model, prompts, gen))


def test_rope_prompt_longer_than_block_size_is_cropped_to_its_last_block():
    model = tiny("llama", 2, block_size=16)
    prompt = CHAR.encode("the quick brown fox jumps over")  # 30 tokens
    for use_cache in (True, False):
        gen = greedy(max_new_tokens=5, use_cache=use_cache)
        assert collect(generate_ids(model, [prompt], gen)) == collect(generate_ids(model, [prompt[-16:]], gen))


# ----------------------------------------------------------------------------------------------------------
# Sampling


def test_same_seed_same_text_and_different_seeds_differ():
    model = tiny()
    prompts = ["hello", "the"]
    first = generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=30, seed=1))
    assert generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=30, seed=1)) == first
    assert generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=30, seed=2)) != first
    no_cache = GenerationConfig(max_new_tokens=30, seed=1, use_cache=False)
    assert generate(model, CHAR, prompts, no_cache) == generate(model, CHAR, prompts, no_cache)


def test_a_config_per_row_gives_each_row_what_it_gives_alone():
    """A server's batch: each row its own sampling, seed, budget and stop strings."""
    model = tiny()
    prompts = [CHAR.encode(p) for p in ("hello", "the", "hel")]
    gens = [
        GenerationConfig(max_new_tokens=0),  # nothing at all
        GenerationConfig(max_new_tokens=7, seed=3, top_k=5),
        greedy(max_new_tokens=12, stop=("l",)),
    ]
    rows = [[] for _ in prompts]
    for pieces in stream_ids(model, CHAR, prompts, gens):
        for row, piece in zip(rows, pieces, strict=True):
            row.append(piece)
    texts = ["".join(r) for r in rows]
    assert texts[0] == ""
    alone = [generate(model, CHAR, [p], g)[0] for p, g in zip(["the", "hel"], gens[1:], strict=True)]
    assert texts[1:] == alone  # seeded row: its own stream; greedy row: cut at its own stop string
    ids = collect(generate_ids(model, prompts, gens))
    assert [len(r) for r in ids][:2] == [0, 7]  # each row's own budget


def test_top_k_1_and_a_tiny_top_p_equal_greedy():
    model = tiny()  # untrained: a flat distribution, so plain sampling is far from greedy
    prompts = ["hello", "the quick"]
    expected = generate(model, CHAR, prompts, greedy(max_new_tokens=20))
    assert generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=20, seed=0)) != expected
    for seed in (0, 1):
        assert generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=20, seed=seed, top_k=1)) == expected
        assert generate(model, CHAR, prompts, GenerationConfig(max_new_tokens=20, seed=seed, top_p=1e-6)) == expected


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert top_k_filter(logits, 2).tolist() == [[-math.inf, 3.0, 2.0, -math.inf]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)  # more than the vocabulary: nothing to drop


def test_top_p_filter_keeps_the_fewest_tokens_that_reach_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = {p: top_p_filter(logits, p).isfinite()[0].tolist() for p in (0.4, 0.5, 0.7, 0.81, 1.0)}
    assert kept[0.4] == kept[0.5] == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept[0.7] == [False, True, False, True]  # 0.5 + 0.3
    assert kept[0.81] == [True, True, False, True]
    assert kept[1.0] == [True, True, True, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # penalty, then temperature: 4 / 2 / 2
    gen = GenerationConfig(temperature=2.0, repetition_penalty=2.0)
    assert process_logits(torch.tensor([[4.0, 0.0]]), gen, torch.tensor([[True, False]])).tolist() == [[1.0, 0.0]]
    # greedy picks the unseen token once the seen one is penalised below it
    logits, seen = torch.tensor([[3.0, 2.0]]), torch.tensor([[True, False]])
    assert sample_next(logits, greedy(), seen).tolist() == [0]
    assert sample_next(logits, greedy(repetition_penalty=2.0), seen).tolist() == [1]


@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_repetition_penalty_makes_the_output_repeat_less(family, n_kv_head):
    model = tiny(family, n_kv_head)  # untrained models fall into loops when greedy
    prompt = [CHAR.encode("hello")]
    distinct = {
        penalty: len(
            set(collect(generate_ids(model, prompt, greedy(max_new_tokens=30, repetition_penalty=penalty)))[0])
        )
        for penalty in (1.0, 2.0, 5.0)
    }
    assert distinct[1.0] < distinct[2.0] <= distinct[5.0]


# ----------------------------------------------------------------------------------------------------------
# Ends of rows: eos, stop strings


def test_a_row_ends_at_eos_and_yields_none_after(hello_model):
    bang = CHAR.encode("!")[0]
    prompts = [CHAR.encode("hello"), CHAR.encode("hello wor")]
    steps = list(generate_ids(hello_model, prompts, greedy(max_new_tokens=20), eos_id=bang))
    assert [CHAR.decode(row) for row in collect(steps)] == [" world!", "ld!"]  # the eos token is yielded
    assert len(steps) == 7  # everything ended: no more steps
    assert steps[3][1] is None and steps[2][1] == bang


def test_stop_strings_cut_the_text_and_end_the_row(hello_model):
    gen = greedy(max_new_tokens=40, stop=("d! h",))  # spans several tokens
    assert generate(hello_model, CHAR, ["hello", "hello wor"], gen) == [" worl", "l"]
    steps = list(stream(hello_model, CHAR, ["hello", "hello wor"], gen))
    assert len(steps) == 9  # " world! h" is 9 tokens: ended there rather than after 40
    # the earliest stop string wins; the prompt itself is not searched
    assert generate(hello_model, CHAR, ["hello"], greedy(max_new_tokens=40, stop=("hello", "!"))) == [" world"]
    assert generate(hello_model, CHAR, ["hello"], greedy(max_new_tokens=40, stop="hello")) == [" world! "]
    # a row whose stop string never comes runs to max_new_tokens
    assert generate(hello_model, CHAR, ["hello"], greedy(max_new_tokens=12, stop=("zz",))) == [" world! hell"]


def test_stream_never_gives_out_text_that_turns_out_to_start_a_stop_string(hello_model):
    gen = greedy(max_new_tokens=30, stop=("! hello w", "!!"))
    steps = list(stream(hello_model, CHAR, ["hello"], gen))
    assert "".join(s[0] for s in steps) == " world"
    assert all("!" not in s[0] for s in steps)


# ----------------------------------------------------------------------------------------------------------
# Streaming text


def test_stream_pieces_add_up_to_generate_for_a_batch(hello_model):
    prompts, gen = ["hello", "wor", "h"], GenerationConfig(max_new_tokens=25, seed=3, temperature=0.8)
    steps = list(stream(hello_model, CHAR, prompts, gen))
    assert len(steps) == 25 and all(len(s) == 3 for s in steps)
    texts = ["".join(s[i] for s in steps) for i in range(3)]
    assert texts == generate(hello_model, CHAR, prompts, gen)
    ids = collect(generate_ids(hello_model, [CHAR.encode(p) for p in prompts], gen))
    assert texts == [CHAR.decode(row) for row in ids]


def test_stream_holds_back_split_utf8_with_bpe(bpe_setup):
    model, tok = bpe_setup
    prompts, gen = ["你好", "🙂"], greedy(max_new_tokens=40)
    steps = list(stream(model, tok, prompts, gen))
    texts = ["".join(s[i] for s in steps) for i in range(2)]
    assert texts == generate(model, tok, prompts, gen)
    ids = collect(generate_ids(model, [tok.encode(p) for p in prompts], gen, eos_id=tok.eot_id))
    assert texts == [tok.decode(row) for row in ids]
    assert [p + t for p, t in zip(prompts, texts, strict=True)] == [
        tok.decode(tok.encode(p) + row) for p, row in zip(prompts, ids, strict=True)
    ]
    assert texts[0].startswith("，世界！🙂 hello 🎉")  # learned, multi-byte characters included
    assert any(s[0] == "" for s in steps)  # a token that ended inside a character gave out nothing yet
    assert not any("\ufffd" in s[0] for s in steps[:-1])  # never half a character


BPE_FOR_PROPERTY = bpe_tokenizer([BTEXT * 20], 262)


def decode_until_stop(ids: list[int], stops: list[str]) -> str:
    """What a row's text must be, from whole decodes: decode(ids[:k]) for the first k whose text is complete
    (no split character at its end) and contains a stop string, cut before the earliest one; else everything."""
    tok = BPE_FOR_PROPERTY
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        if k < len(ids) and text.endswith("\ufffd"):
            continue
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)]
    return tok.decode(ids)


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, BPE_FOR_PROPERTY.vocab_size - 1), max_size=30),
    stops=st.lists(st.text(alphabet="ab你好🙂\ufffd hel", min_size=1, max_size=4), max_size=3),
)
def test_incremental_text_equals_whole_decodes_for_any_tokens(ids, stops):
    # any byte tokens, invalid UTF-8 included, fed one by one as stream does (the private class stream uses)
    row = RowText(BPE_FOR_PROPERTY, BPE_FOR_PROPERTY.encode("ab你"), tuple(stops))
    pieces = []
    for t in ids:
        pieces.append(row.push(t))
        if row.done:
            break
    if not row.done:
        pieces.append(row.finish())
    assert "".join(pieces) == decode_until_stop(ids, stops)


def test_empty_prompt_starts_from_eot_with_bpe_and_is_refused_by_char(bpe_setup, hello_model):
    model, tok = bpe_setup
    (text,) = generate(model, tok, [""], greedy(max_new_tokens=10))
    assert text and "<|endoftext|>" not in text
    with pytest.raises(ConfigError, match="prompt 1 is empty and a char tokenizer has no end-of-text token"):
        generate(hello_model, CHAR, ["hello", ""], greedy(max_new_tokens=10))


def test_word_tokenizer_completion_continues_the_prompt_with_its_spacing():
    tok = word_tokenizer([TEXT], 100)
    model = tiny(vocab_size=tok.vocab_size)
    gen = greedy(max_new_tokens=6)
    (text,) = generate(model, tok, ["the quick brown"], gen)
    (ids,) = collect(generate_ids(model, [tok.encode("the quick brown")], gen))
    assert "the quick brown" + text == tok.decode(tok.encode("the quick brown") + ids)
    assert text.startswith(" ")


def test_model_mode_is_restored_and_inference_mode_does_not_leak(hello_model):
    hello_model.train()
    steps = stream(hello_model, CHAR, ["hello"], greedy(max_new_tokens=5))
    next(steps)
    assert not hello_model.training  # dropout off while generating
    assert not torch.is_inference_mode_enabled()  # the caller's code between steps runs normally
    steps.close()
    assert hello_model.training
    assert generate(hello_model, CHAR, ["hello", "h"], greedy(max_new_tokens=0)) == ["", ""]
    assert hello_model.training


# ----------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
        (dict(temperature=-0.5), r"temperature must be >= 0 and finite \(0 is greedy\), got -0.5"),
        (dict(temperature=float("nan")), r"temperature must be >= 0 and finite \(0 is greedy\), got nan"),
        (dict(repetition_penalty=float("nan")), r"repetition_penalty must be > 0 and finite"),
        (dict(seed=2**64), r"seed must be a 64-bit integer"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(stop=("",)), "stop strings must be non-empty strings"),
    ],
)
def test_bad_generation_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**kwargs)


def test_bad_prompts_are_refused_before_the_first_step(hello_model):
    with pytest.raises(ConfigError, match="no prompts to generate from"):
        stream(hello_model, CHAR, [], greedy())  # not iterated: the check is immediate
    with pytest.raises(ConfigError, match=r"wrap a single prompt as \[prompt\]"):
        generate(hello_model, CHAR, "hello", greedy())
    with pytest.raises(ConfigError, match="prompt 0 has no tokens"):
        generate_ids(hello_model, [[]], greedy())
    with pytest.raises(
        ConfigError, match=rf"prompt 1 has token ids outside the model's vocabulary \[0, {CHAR.vocab_size}\)"
    ):
        generate_ids(hello_model, [[1], [CHAR.vocab_size]], greedy())
    with pytest.raises(ConfigError, match="prompt 0 has 34 tokens, more than the model's block_size 32.*shorten it"):
        generate(hello_model, CHAR, ["hello world! " * 2 + "the lazy"], greedy())
    with pytest.raises(DataError, match="not in this char tokenizer's vocabulary"):
        generate(hello_model, CHAR, ["HELLO"], greedy())
    gen = greedy()
    gen.top_p = 2.0  # changed after construction: checked again when generation starts
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        generate(hello_model, CHAR, ["hello"], gen)


def test_padding_ids_of_a_larger_vocabulary_are_never_sampled():
    """A model whose vocabulary is padded past the tokenizer's (model.vocab_size) must not pick ids with no text."""
    tok = char_tokenizer(["abcdefgh"])
    torch.manual_seed(0)
    model = Transformer(
        resolve_model(ModelConfig(vocab_size=tok.vocab_size + 56, block_size=64, n_layer=1, n_embd=32, n_head=2))
    )
    with torch.no_grad():
        model.lm_head.bias = None
        model.tok_emb.weight[tok.vocab_size :] *= 50  # make the padding ids the most likely by far (tied head)
    text = generate(model, tok, ["abc"], GenerationConfig(max_new_tokens=40, temperature=2.0, seed=0))[0]
    assert len(text) == 40  # every id picked is a character (a padding id would decode to nothing)
