"""Text generation: sample from a trained model, with a KV cache, batches of prompts and streaming.

Three layers, each built on the one below:
- `generate_ids`: token ids in, one new token per row per step out;
- `stream`: text in, one new piece of text per row per step out (what a chat window or the CLI prints);
- `generate`: text in, the finished completions out.

Each step turns the logits of the last position into the next token through one pipeline (`sample_next`):
repetition penalty -> temperature -> top-k -> top-p -> softmax -> a draw (or argmax when temperature is 0).

Several prompts run as one batch: shorter ones are left-padded, and the KV cache masks the padding out and
counts positions from each row's first real token, so greedy decoding gives each row what it gives alone.

Context longer than the model's block_size:
- without the cache (`use_cache=False`) every step re-runs the model on the last block_size tokens (nanoGPT);
- with the cache, which holds at most block_size positions, a full cache is re-filled from the last
  block_size // 2 tokens (one prefill, positions restart at 0) and decoding goes on from there.
Both see exactly the same context while prompt + completion fit in block_size, so greedy decoding gives the
same tokens either way; past it the cache sees between block_size / 2 and block_size tokens, the cropped
forward always block_size. That is the price of not recomputing block_size tokens at every step. A batch
shares one cache, so its refills follow the longest row: a row equals its prompt run alone while the longest
row fits in block_size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from llmmo.compress.quantize import is_tensor_subclass
from llmmo.cpu import fast_bf16
from llmmo.errors import ConfigError
from llmmo.model import KVCache
from llmmo.tokenizer import Tokenizer

# Prompt tokens decoded in front of the new ones, so that the first piece of text gets the spacing that follows
# the prompt (the word tokenizer joins words with spaces); the same window as Hugging Face TGI's detokenizer.
DECODE_CONTEXT = 5


@dataclass
class GenerationConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # divides the logits; 0 means greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens only; 0: off
    top_p: float = 1.0  # nucleus (Holtzman et al. 2020): the fewest tokens whose probability reaches p; 1: off
    repetition_penalty: float = 1.0  # > 1 makes tokens of the prompt or output less likely (CTRL); 1: off
    seed: int | None = None  # seeds the draws, so that a seed gives the same text; None: torch's global RNG
    stop: tuple[str, ...] = ()  # a row ends when its text contains one of these; the text is cut before it
    use_cache: bool = True  # False: re-run the whole context at every step (slow; a reference)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # stop="\n" means one stop string, not one per character
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot work, saying which and why."""
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        # each written as `not (in range)`, so that NaN (false in every comparison) is refused too
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ConfigError(
                f"repetition_penalty must be > 0 and finite (1 turns it off), got {self.repetition_penalty}"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise ConfigError(f"seed must be a 64-bit integer, in [-2^63, 2^64), got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")


# ----------------------------------------------------------------------------------------------------------
# Logits -> next token


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make the tokens marked in `seen` (B, V) less likely when penalty > 1 (CTRL, Keskar et al. 2019).

    As in transformers, a positive logit is divided by the penalty and a negative one multiplied by it, so
    that the penalty always pushes away from the token (dividing a negative logit would raise it).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th stay too); the others become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities add up to at least p; the others become -inf."""
    if p >= 1:
        return logits
    # stable: equal logits keep their order, so the first kept token is the one argmax picks
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token goes when the more likely ones already reach p; the most likely (mass before it 0 < p) stays
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits of the next token -> the logits to sample from (float32; -inf marks a filtered token).

    Greedy (temperature 0) applies only the repetition penalty: the filters never change the argmax.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are too coarse to sample
    if seen is not None and gen.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits, seen, gen.repetition_penalty)
    if gen.temperature == 0:
        return logits
    logits = logits / gen.temperature
    logits = top_k_filter(logits, gen.top_k)
    return top_p_filter(logits, gen.top_p)


def sample_next(
    logits: torch.Tensor,
    gen: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when temperature is 0, else a draw from the processed logits."""
    logits = process_logits(logits, gen, seen)
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def hide_padding_ids(logits: torch.Tensor, vocab_size: int | None) -> None:
    """Ids at and above the tokenizer's size in (B, V) logits (a model whose vocabulary is padded, e.g. to a
    multiple of 64) stand for no text: they are never picked. In place."""
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits[:, vocab_size:] = float("-inf")


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A random stream of its own for a seeded config; None (torch's global stream) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample_rows(
    logits: torch.Tensor,
    gens: Sequence[GenerationConfig],
    seen: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens, row b picked by gens[b] (from generators[b] when it has a seed).

    Rows without a seed and with the same settings are sampled in one call (a server's requests mostly are), so
    the cost of a step does not grow with a Python call per row; a seeded row draws alone from its own stream.
    """
    groups: dict[object, list[int]] = {}
    for b, g in enumerate(gens):
        seeded = generators is not None and generators[b] is not None
        key = b if seeded else (g.temperature, g.top_k, g.top_p, g.repetition_penalty)
        groups.setdefault(key, []).append(b)
    if len(groups) == 1:
        b = next(iter(groups.values()))[0]
        return sample_next(logits, gens[b], seen, generators[b] if generators is not None else None)
    tokens = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        generator = generators[rows[0]] if generators is not None else None
        group_seen = None if seen is None else seen[index]
        tokens[index] = sample_next(logits[index], gens[rows[0]], group_seen, generator)
    return tokens


# ----------------------------------------------------------------------------------------------------------
# A compiled decoding step


def compile_decoder(model: nn.Module, rows: int = 1) -> nn.Module:
    """The model compiled for decoding (torch.compile with Inductor), to pass to any function of this module.

    One decoding step (a token per row through every layer) is dozens of small operations. Eager PyTorch pays
    a few microseconds of dispatch for each, which is most of the step for small models; and its matrix-vector
    products read the weights with one thread. Inductor fuses the step into a few kernels, and its
    `decompose_mm_pass` turns single-row products into multiply-and-sum reductions that it parallelises over the
    output rows, which reads the weights at about twice the bandwidth (docs/LOG.md). The prompt and the
    decoding step are compiled once each (the position becomes a symbolic size at the second step, see
    `KVCache`); compiling takes 10-60 s on a CPU, so it pays for long generations and for servers. The module
    is unchanged (same parameters).

    `rows` is the batch it will decode (the number of prompts). From two rows up on a CPU, and when every weight is a
    plain floating-point tensor, the weights are frozen: Inductor treats them as constants and packs them once for
    the CPU's library (MKL's packed sgemm in fp32, oneDNN in bf16), where a plain product re-packs them at every
    call (10.7M at batch 8: +25-35% tokens/s in fp32 and in bf16; docs/LOG.md). A frozen decoder does not see later
    changes to the model's weights (compile again after training them), each compiled graph (prompt, step, and the
    prefill of a cache refilled past block_size) holds its own packed copy of the weights, and a copy or pickle of
    the compiled module is not frozen. At one row freezing would bypass the decomposition (2x slower). Quantized
    layers are not frozen: constant folding would store their weights dequantized.
    """
    # single-row products only: from two rows up the library's matrix product reads each weight once for all
    options = {
        "size_asserts": False,  # 96 Python-level checks of input shapes per step of the 10.7M shape (cProfile)
        "post_grad_fusion_options": {
            "decompose_mm_pass": {
                "cpu_max_first_dimension_decomposition": 1,
                "cpu_max_other_dimension_decomposition": 1 << 16,
            }
        },
    }
    freeze = rows > 1 and next(model.parameters()).device.type == "cpu" and _plain_weights(model)
    if freeze:  # frozen products that read one input become one product (llama's gate and up: +5% at batch 8)
        options["cpp.enable_concat_linear"] = True
    compiled = torch.compile(model, options=options)
    if freeze:
        trace = compiled.forward

        def frozen(*args, **kwargs):
            # Dynamo reads the switch while it traces (to keep parameters out of the graph's inputs), so it is
            # set around each call, not only among Inductor's options (which did nothing); it applies without
            # gradients only. Set directly: config.patch costs 12 us a call. Process-wide while the call runs.
            config = torch._inductor.config
            before, config.freezing = config.freezing, True
            try:
                return trace(*args, **kwargs)
            finally:
                config.freezing = before

        compiled.forward = frozen
    return compiled


def _plain_weights(model: nn.Module) -> bool:
    """Every parameter and buffer a plain floating-point tensor: no quantized layer (int8 / int4 storage or a
    tensor subclass)."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(not is_tensor_subclass(t) and t.is_floating_point() for t in tensors)


def decoding_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """The model with its weights in `dtype` for decoding: "fp32" leaves it as it is (checkpoints are fp32), "bf16"
    converts it in place. bf16 halves the bytes a decoding step reads, which bounds the step at 10.7M parameters:
    compiled, 1.7-1.9x the tokens/s of fp32 at batch 1 and ~1.4x at batch 8; at 0.8M, where the step is bound by its
    operations rather than bytes, no faster at batch 1 and 30-40% slower at batch 8 (docs/LOG.md). Logits move by
    ~1% of their scale. Refused where bf16 is not computed in hardware, and for quantized checkpoints."""
    if dtype == "fp32":
        return model
    if dtype != "bf16":
        raise ConfigError(f"dtype '{dtype}' is not one of fp32, bf16")
    if not _plain_weights(model):
        raise ConfigError("this checkpoint has quantized layers, which keep their own format; decode it without "
                          "--dtype bf16 (fp32, the default)")  # fmt: skip
    device = next(model.parameters()).device
    if device.type == "cpu" and not fast_bf16():
        raise ConfigError("this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 would decode ~100x slower "
                          "than fp32 here; use --dtype fp32 (the default)")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError("this GPU computes bf16 only by emulation (slow); use --dtype fp32 (the default)")
    if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ConfigError("bf16 on MPS needs macOS 14 or newer; use --dtype fp32 (the default)")
    return model.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Token ids in, token ids out


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of token ids -> (B, L) ids left-padded with token 0, and the padding per row (None if none)."""
    width = max(len(r) for r in rows)
    pad = [width - len(r) for r in rows]
    ids = torch.tensor([[0] * p + r for p, r in zip(pad, rows, strict=True)], dtype=torch.long, device=device)
    return ids, (torch.tensor(pad, device=device) if any(pad) else None)


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    cfg = model.cfg
    if len(prompts) == 0:
        raise ConfigError("no prompts to generate from; pass a list with at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} has no tokens; start it with at least one (e.g. the tokenizer's eot_id)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ConfigError(f"prompt {i} has token ids outside the model's vocabulary [0, {cfg.vocab_size})")
        if len(p) > cfg.block_size and cfg.positions == "learned":
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens, more than the model's block_size {cfg.block_size}, and learned "
                f"positions cannot go further; shorten it to the last {cfg.block_size} tokens"
            )


class BatchDecoder:
    """One batch being decoded: every row's tokens so far, the KV cache, and which rows have finished.

    Each `step` computes the logits of the tokens added by the step before (so no forward pass is spent after
    the last step), picks one token per row and appends it. One GenerationConfig serves every row; a list of
    them (a server's requests decoded together) gives each row its own sampling, seed and token budget.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        gen: GenerationConfig | Sequence[GenerationConfig],
        eos_id: int | None,
        vocab_size: int | None = None,
    ):
        self.gens = [gen] * len(prompts) if isinstance(gen, GenerationConfig) else list(gen)
        if len(self.gens) != len(prompts):
            raise ConfigError(f"{len(self.gens)} generation configs for {len(prompts)} prompts; give one per prompt")
        for g in self.gens:
            g.validate()  # a config mutated after construction is checked again
        self.per_row = not isinstance(gen, GenerationConfig)
        gen = self.gens[0] if prompts else GenerationConfig()
        # ids at and above the tokenizer's size (a model whose vocabulary is padded, e.g. to a multiple of 64)
        # stand for no text: they are never picked
        self.vocab_size = vocab_size
        _check_prompts(model, prompts)
        param = next(model.parameters())
        self.model, self.gen, self.eos_id = model, gen, eos_id
        self.max_new_tokens = max(g.max_new_tokens for g in self.gens)
        self.device, self.dtype = param.device, param.dtype
        self.block_size = model.cfg.block_size
        self.rows = [list(p) for p in prompts]  # prompt + completion of every row
        self.done = [g.max_new_tokens == 0 for g in self.gens]  # a row with no budget yields nothing
        self.steps = 0
        self.cache: KVCache | None = None
        self.last: torch.Tensor | None = None  # (B, 1) tokens picked by the previous step, fed to the cache next
        self.new_tokens = [0] * len(self.rows)
        # one random stream for the batch from a shared config's seed; with a config per row, one per seeded row
        self.generators = [seeded_generator(g.seed, self.device) for g in self.gens] if self.per_row else []
        self.generator = None if self.per_row else seeded_generator(gen.seed, self.device)
        self.seen = None  # (B, V) tokens of the prompt and output, for the repetition penalty
        if any(g.repetition_penalty != 1 for g in self.gens):
            self.seen = torch.zeros(len(self.rows), model.cfg.vocab_size, dtype=torch.bool, device=self.device)
            for b, row in enumerate(self.rows):
                self.seen[b, torch.tensor(row, device=self.device)] = True

    @property
    def finished(self) -> bool:
        return self.steps >= self.max_new_tokens or all(self.done)

    def finish(self, row: int) -> None:
        """End a row early (a stop string was found in its text); it yields None from now on."""
        self.done[row] = True

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        """The next token of every row; None for rows that had already finished."""
        logits = self._logits_with_cache() if self.gen.use_cache else self._logits_without_cache()
        hide_padding_ids(logits, self.vocab_size)
        if self.per_row:
            tokens = sample_rows(logits, self.gens, self.seen, self.generators)
        else:
            tokens = sample_next(logits, self.gen, self.seen, self.generator)
        self.last = tokens[:, None]
        out: list[int | None] = []
        for b, t in enumerate(tokens.tolist()):
            if self.done[b]:
                out.append(None)
                continue
            self.rows[b].append(t)
            out.append(t)
            self.new_tokens[b] += 1
            if self.seen is not None:
                self.seen[b, t] = True
            if t == self.eos_id or self.new_tokens[b] >= self.gens[b].max_new_tokens:
                self.done[b] = True
        self.steps += 1
        return out

    def _prefill(self, window: int) -> torch.Tensor:
        """A fresh cache filled with the last `window` tokens of every row; the logits of their last position."""
        contexts = [row[-window:] for row in self.rows]
        ids, pad = _left_pad(contexts, self.device)
        # room for the tokens still to be fed (the last pick is never fed), at most block_size positions
        to_feed = self.max_new_tokens - self.steps - 1
        max_len = min(self.block_size, ids.size(1) + to_feed)
        self.cache = KVCache(self.model.cfg, len(self.rows), max_len, pad=pad, device=self.device, dtype=self.dtype)
        logits, _ = self.model(ids, kv_cache=self.cache)
        return logits[:, -1]

    def _logits_with_cache(self) -> torch.Tensor:
        if self.cache is None:
            return self._prefill(self.block_size)
        if self.cache.pos >= self.cache.max_len:
            # full: start over from the last half block rather than re-running block_size tokens every step
            return self._prefill(max(1, self.block_size // 2))
        # finished rows are fed too (their last pick, ignored): dropping them would mean re-packing the cache
        logits, _ = self.model(self.last, kv_cache=self.cache)
        return logits[:, -1]

    def _logits_without_cache(self) -> torch.Tensor:
        """nanoGPT: run the model on each row's last block_size tokens. The plain forward has no padding mask,
        so rows share a forward pass only when their contexts are equally long; finished rows are skipped."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        logits = torch.zeros(len(self.rows), self.model.cfg.vocab_size, device=self.device, dtype=dtype)
        groups: dict[int, list[int]] = {}
        for b, row in enumerate(self.rows):
            if not self.done[b]:
                groups.setdefault(min(len(row), self.block_size), []).append(b)
        for members in groups.values():
            ids = torch.tensor([self.rows[b][-self.block_size :] for b in members], device=self.device)
            out, _ = self.model(ids)
            logits[members] = out[:, -1].to(dtype)
        return logits


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while generating; the model's previous mode comes back when generation ends or is closed."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _run(model: nn.Module, decoder: BatchDecoder) -> Iterator[list[int | None]]:
    with eval_mode(model):
        while not decoder.finished:
            yield decoder.step()


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    gen: GenerationConfig | Sequence[GenerationConfig] | None = None,
    eos_id: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of each prompt's row (None once a row has finished).

    A row finishes after its max_new_tokens tokens, or when it generates `eos_id` (which is yielded). Stop
    strings are text and are handled by `stream`. With rotary positions a prompt longer than block_size is
    cropped to its last block_size tokens (learned positions refuse it). Inputs are checked now, before the
    first step; the model is in eval mode from the first step until the iterator is exhausted or closed. With
    one config and a seed, rows of one batch share one random stream: a prompt sampled in a batch does not give
    the text it gives alone (greedy decoding does, within block_size; see the module's docstring). With a config
    per prompt, each seeded row draws from its own stream.
    """
    gen = gen if gen is not None else GenerationConfig()
    decoder = BatchDecoder(model, prompts, gen, eos_id)
    return _run(model, decoder)


# ----------------------------------------------------------------------------------------------------------
# Text in, text out


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a stop string starts with (text that must wait)."""
    longest = max((len(s) for s in stops), default=1)
    for n in range(min(len(text), longest - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class RowText:
    """Turns one row's new tokens into pieces of text whose concatenation is the row's completion.

    Decoding is incremental (as in Hugging Face TGI): the tokens since `prefix` are decoded, and the part after
    the text of tokens[prefix:read] is new. A decoded tail ending in U+FFFD is a character whose UTF-8 bytes
    are split across tokens: it waits for the next token. Text that could be the start of a stop string waits
    until the next tokens show whether it is one.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids = prompt[-DECODE_CONTEXT:]
        self.prefix, self.read = 0, len(self.ids)
        self.prefix_text = tokenizer.decode(self.ids)
        self.held = ""  # decoded text not given out yet: it may be the start of a stop string
        self.done = False
        self.stopped = False  # ended by a stop string

    def push(self, token: int) -> str:
        """Add a token; return the text that is now certain ("" when nothing is)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(self.prefix_text) or text.endswith("\ufffd"):
            return ""
        piece = text[len(self.prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return self._release(piece)

    def take(self, token: int, eos_id: int | None, last: bool) -> str:
        """Add the row's next token and return its new text. The end-of-text token ends the text (it is none);
        `last` says the row ends with this token (its budget is spent): what was held back goes out too."""
        piece = self.finish() if token == eos_id else self.push(token)
        if last and not self.done:
            piece += self.finish()
        return piece

    def finish(self) -> str:
        """The row ended: everything still held back (an unfinished character decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self.prefix :])
        out = self._release(text[len(self.prefix_text) :])
        if not self.done:
            out, self.held = out + self.held, ""
        self.done = True
        return out

    def _release(self, piece: str) -> str:
        text = self.held + piece
        cut = _find_stop(text, self.stop)
        if cut is not None:
            self.done, self.stopped, self.held = True, True, ""
            return text[:cut]
        # Nothing given out so far ends with a stop string's start (else it would be held), so a stop string
        # can only begin within `text`: searching held + piece is enough.
        keep = _partial_stop(text, self.stop)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ConfigError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if len(prompts) == 0:
        raise ConfigError("no prompts to generate from; pass a list with at least one prompt")
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ConfigError(f"prompt {i} must be a string, got {type(text).__name__}")
        if text:
            out.append(tokenizer.encode(text))  # a char tokenizer raises DataError on an unknown character
        elif tokenizer.eot_id is not None:
            out.append([tokenizer.eot_id])  # nothing to continue: start as a new document does
        else:
            raise ConfigError(
                f"prompt {i} is empty and a {tokenizer.kind} tokenizer has no end-of-text token to start from; "
                "give a prompt of at least one character"
            )
    return out


def stream(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], gen: GenerationConfig | None = None
) -> Iterator[list[str]]:
    """Yield, step by step, the new text of each prompt's row ("" when nothing is certain yet).

    The pieces of a row add up to its completion (without the prompt), as `generate` returns it: a character
    split across tokens and text that may begin a stop string are held back until settled. A bpe row also ends
    at the tokenizer's end-of-text token (not part of the text); the word tokenizer's <eos> ends a line only.
    """
    ids = _encode_prompts(tokenizer, prompts)
    return stream_ids(model, tokenizer, ids, gen, tokenizer.text_end_id)


def stream_ids(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    gen: GenerationConfig | Sequence[GenerationConfig] | None = None,
    eos_id: int | None = None,
) -> Iterator[list[str]]:
    """`stream` for prompts already tokenized (a chat template's ids), ending each row at `eos_id`. `gen` may be
    one config for every row or one per row (sampling, seed, token budget and stop strings of its own)."""
    gen = gen if gen is not None else GenerationConfig()
    prompts = [list(p) for p in prompts]
    decoder = BatchDecoder(model, prompts, gen, eos_id, vocab_size=tokenizer.vocab_size)
    rows = [RowText(tokenizer, p, g.stop) for p, g in zip(prompts, decoder.gens, strict=True)]
    return _stream_text(model, decoder, rows, eos_id)


def _stream_text(
    model: nn.Module, decoder: BatchDecoder, rows: list[RowText], eos_id: int | None
) -> Iterator[list[str]]:
    with contextlib.closing(_run(model, decoder)) as steps:  # closing this stream closes the steps (eval mode)
        yield from _pieces(steps, decoder, rows, eos_id)


def _pieces(
    steps: Iterator[list[int | None]], decoder: BatchDecoder, rows: list[RowText], eos_id: int | None
) -> Iterator[list[str]]:
    for tokens in steps:
        pieces = []
        for b, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if token is None:
                pieces.append("")
                continue
            pieces.append(row.take(token, eos_id, decoder.done[b]))
            if row.done:
                decoder.finish(b)
        if decoder.finished:  # out of tokens: give out what was held back
            pieces = [piece + ("" if row.done else row.finish()) for piece, row in zip(pieces, rows, strict=True)]
        yield pieces


def generate(
    model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], gen: GenerationConfig | None = None
) -> list[str]:
    """The completion of each prompt (without the prompt): `stream`'s pieces put together."""
    parts: list[list[str]] = [[] for _ in prompts]
    for pieces in stream(model, tokenizer, prompts, gen):
        for part, piece in zip(parts, pieces, strict=True):
            part.append(piece)
    return ["".join(part) for part in parts]
