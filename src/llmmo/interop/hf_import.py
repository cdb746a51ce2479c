"""`llmmo import`: a transformers folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, local or from
the Hub) -> an llmmo inference checkpoint that eval, generate and train's tools load like any other.

The folder's config is read with transformers (its defaults and its legacy spellings, e.g. `rope_scaling`
in 4.x folders, are transformers' to resolve), the weights with safetensors. Whatever our model would compute
differently is refused with the option's name: rope scaling of any type, partial rotary, sliding windows,
other activations, GPT-2's per-layer attention scaling, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmmo.checkpoint import Checkpoint, read_config, save_checkpoint
from llmmo.config import DataConfig, ModelConfig, config_from_dict, resolve_model
from llmmo.errors import ConfigError, InteropError
from llmmo.interop.hf_export import check_out_folder
from llmmo.interop.hf_weights import from_hf_tensors, load_hf_tensors
from llmmo.model import Transformer
from llmmo.tokenizer import Tokenizer

CLASSES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Model"),  # our llama family with QK-norm
}
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation that our gelu MLP computes
# What `--from-hub` downloads: the config, the safetensors weights and the fast tokenizer, nothing else.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",  # not other copies some repos hold (e.g. consolidated.safetensors)
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
HF_EXTRA = "pip install 'llmmo[hf]'"


def _refuse(folder: Path, what: str, fix: str) -> InteropError:
    return InteropError(f"'{folder}': {what}; llmmo cannot represent it exactly, so it does not import it ({fix})")


def read_hf_config(folder: Path) -> Any:
    """The folder's transformers config (GPT2Config, LlamaConfig or Qwen3Config), after checking its type."""
    path = folder / "config.json"
    if not path.is_file():
        raise InteropError(f"'{folder}' has no config.json; pass a folder written by transformers' save_pretrained()")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InteropError(f"'{path}' is not a JSON object; pass a folder written by transformers' save_pretrained()")
    if "llmmo_version" in raw:
        raise InteropError(
            f"'{folder}' is an llmmo checkpoint already: use it as it is (`llmmo export` writes it for transformers)"
        )
    model_type = raw.get("model_type")
    if model_type not in CLASSES:
        fix = "llmmo imports gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM) and qwen3 (Qwen3ForCausalLM)"
        raise _refuse(folder, f"model_type {model_type!r}", fix)
    archs = raw.get("architectures") or []
    if archs and not set(archs) & set(CLASSES[model_type]):
        raise _refuse(folder, f"a {', '.join(archs)}", f"llmmo imports the language model {CLASSES[model_type][0]}")
    if raw.get("quantization_config"):
        raise _refuse(folder, "quantized weights (quantization_config)", "import the float model")
    try:
        from transformers import GPT2Config, LlamaConfig, Qwen3Config
    except ImportError:
        raise InteropError(f"llmmo import reads configs with transformers, not installed here: {HF_EXTRA}") from None
    cls = {"gpt2": GPT2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}[model_type]
    try:
        return cls.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError) as e:
        raise InteropError(f"'{path}' is not a valid {cls.__name__} ({e})") from None


def _gpt2_model_config(c: Any, folder: Path) -> ModelConfig:
    if c.activation_function not in GPT2_GELUS:
        raise _refuse(folder, f"activation_function {c.activation_function!r}", f"llmmo's gpt2 MLP is {GPT2_GELUS}")
    for option, wanted in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ):
        if bool(getattr(c, option, wanted)) != wanted:
            raise _refuse(folder, f"{option}={getattr(c, option)}", f"llmmo's attention is {option}={wanted}")
    rates = {c.resid_pdrop, c.embd_pdrop, c.attn_pdrop}
    return ModelConfig(
        family="gpt2",
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_kv_head=c.n_head,
        n_embd=c.n_embd,
        vocab_size=c.vocab_size,
        block_size=c.n_positions,
        dropout=float(max(rates)),  # training only; llmmo has one rate for the three places
        positions="learned",
        norm="layernorm",
        mlp="gelu",
        mlp_hidden=c.n_inner or 4 * c.n_embd,
        bias=True,
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=float(c.layer_norm_epsilon),
    )


def _llama_model_config(c: Any, folder: Path) -> ModelConfig:
    if c.hidden_act != "silu":
        raise _refuse(folder, f"hidden_act {c.hidden_act!r}", "llmmo's llama MLP is SwiGLU (silu)")
    qwen3 = c.model_type == "qwen3"
    if qwen3 and c.attention_bias:
        raise _refuse(
            folder,
            "a Qwen3 with attention_bias=True (biases in attention, none in its MLP)",
            "llmmo's model.bias puts them in attention and MLP together",
        )
    if not qwen3 and c.attention_bias != c.mlp_bias:
        raise _refuse(
            folder,
            f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias}",
            "llmmo's model.bias sets both together",
        )
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise _refuse(
            folder, f"rope scaling of type {rope['rope_type']!r}", "llmmo has plain RoPE only; no rope scaling"
        )
    extra = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta", "type")}
    if extra.pop("partial_rotary_factor", 1.0) != 1.0 or extra:
        raise _refuse(folder, f"rope parameters {sorted(rope)}", "llmmo rotates whole heads with rope_theta only")
    # Qwen3 lists each layer's attention: its window (None unless use_sliding_window) applies to the layers of type
    # "sliding_attention" only; a config without the list (Llama) has one window for all layers, or none
    layers = set(getattr(c, "layer_types", None) or [])
    windowed = bool(getattr(c, "sliding_window", None)) and (not layers or "sliding_attention" in layers)
    if windowed or layers - {"full_attention", "sliding_attention"}:
        raise _refuse(folder, "sliding-window or per-layer attention", "llmmo's attention is full causal")
    return ModelConfig(
        family="llama",
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads,
        n_embd=c.hidden_size,
        head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
        vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings,
        dropout=float(c.attention_dropout or 0.0),  # training only
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        mlp_hidden=c.intermediate_size,
        bias=bool(c.attention_bias),
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=float(c.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        qk_norm=qwen3,
    )


def model_config_from_hf(hf_config: Any, folder: Path) -> ModelConfig:
    """Our ModelConfig for a GPT2Config, LlamaConfig or Qwen3Config; refuses every option our model lacks."""
    make = _gpt2_model_config if hf_config.model_type == "gpt2" else _llama_model_config
    try:
        return resolve_model(make(hf_config, folder))
    except ConfigError as e:
        raise InteropError(f"'{folder}': llmmo cannot build this shape: {e}") from None


def _read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InteropError(
            f"'{folder}' has no tokenizer.json; llmmo takes the tokenizer from it. Save the tokenizer there "
            "with AutoTokenizer.from_pretrained(...).save_pretrained(folder) (fast tokenizers write tokenizer.json)"
        )
    tokenizer = Tokenizer.load(path)
    top = max(tokenizer.hf.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise InteropError(
            f"'{path}' has token id {top}, outside the model's vocab_size {vocab_size}: it is not the model's tokenizer"
        )
    return tokenizer


def _data_config(provenance: dict[str, Any], tokenizer: Tokenizer, block_size: int, origin: str) -> DataConfig:
    """A model exported by llmmo brings its data config back; any other gets one that names its origin."""
    saved = provenance.get("data")
    if isinstance(saved, dict) and saved.get("tokenizer") == tokenizer.kind:
        try:
            data = config_from_dict({"data": saved}).data
            if data.block_size <= block_size:
                return data
        except ConfigError:
            pass
    vocab = 0 if tokenizer.kind == "char" else tokenizer.vocab_size
    return DataConfig(source=origin, tokenizer=tokenizer.kind, vocab_size=vocab, block_size=block_size)


def import_hf(folder: str | Path, out: str | Path, overwrite: bool = False, origin: str | None = None) -> Checkpoint:
    """Convert the transformers folder `folder` into an llmmo checkpoint at `out` (weights as float32, exact
    for float16/bfloat16 sources too); returns it loaded. `origin` names the source in the saved data config."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise InteropError(f"'{folder}' is not a folder; pass a transformers model folder, or --from-hub NAME")
    check_out_folder(out, overwrite, folder)
    hf_config = read_hf_config(folder)
    cfg = model_config_from_hf(hf_config, folder)
    tokenizer = _read_tokenizer(folder, cfg.vocab_size)
    tensors = load_hf_tensors(folder)
    bad = sorted({str(t.dtype) for t in tensors.values() if not t.is_floating_point()})
    if bad:
        raise _refuse(folder, f"weights of dtype {', '.join(bad)}", "import a float16, bfloat16 or float32 model")
    state = from_hf_tensors(tensors, cfg)
    provenance = getattr(hf_config, "llmmo", None) or {}
    if (
        cfg.family == "gpt2"
        and provenance.get("model", {}).get("bias") is False
        and all(not v.any() for k, v in state.items() if k.endswith(".bias"))
    ):  # exported by llmmo from a model without biases: the zeros written for GPT2LMHeadModel go again
        cfg.bias = False
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    model = Transformer(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InteropError(f"weights in '{folder}' do not fit its config.json: {str(e).splitlines()[-1]}") from None
    model.eval()
    data = _data_config(provenance, tokenizer, cfg.block_size, origin or f"hf:{folder}")
    save_checkpoint(out, model, tokenizer, data)
    return Checkpoint(model=model, tokenizer=tokenizer, data=data, meta=read_config(out))


def download_from_hub(name: str, revision: str | None = None) -> Path:
    """Download (or find in the Hugging Face cache) the files `import_hf` reads; returns the snapshot folder.

    Network and access failures become one `InteropError` that says what to do instead.
    """
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InteropError(f"--from-hub downloads with huggingface_hub, which is not installed: {HF_EXTRA}") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except hub_errors.GatedRepoError:
        raise InteropError(
            f"'{name}' is gated on the Hugging Face Hub: accept its terms on huggingface.co, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise InteropError(
            f"no model '{name}' on the Hugging Face Hub (or it is private: log in with `hf auth login` or set "
            "HF_TOKEN); check the name (owner/model)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise InteropError(f"'{name}' has no revision '{revision}' on the Hugging Face Hub") from None
    except hub_errors.HFValidationError as e:
        raise InteropError(f"'{name}' is not a Hub model name (owner/model): {e}") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError, OSError) as e:
        from huggingface_hub import constants

        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if constants.HF_HUB_OFFLINE:
            what = (
                f"did not reach the Hugging Face Hub: HF_HUB_OFFLINE is set and '{name}' is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE})"
            )
            fix = "unset HF_HUB_OFFLINE to download it (with HF_ENDPOINT set to a mirror if the Hub is out of reach)"
        else:
            what = f"could not reach the Hugging Face Hub at {constants.ENDPOINT} to download '{name}' ({reason})"
            fix = (
                "check the network, or set HF_ENDPOINT to a reachable mirror, or HF_HUB_OFFLINE=1 to use a copy "
                "already in the Hugging Face cache"
            )
        raise InteropError(
            f"{what}; {fix}, or download the folder elsewhere and run `llmmo import HF_FOLDER OUT`"
        ) from None
