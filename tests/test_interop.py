"""Hugging Face interop: `llmmo export --format hf` and `llmmo import`, checked against transformers itself.

Exported models (trained here on tinyshakespeare) load with AutoModelForCausalLM + AutoTokenizer and give our
logits and our greedy tokens; randomly initialised transformers models import with their logits, train a step
and go back losslessly; exported tokenizers give our ids on WikiText-2's test split. Tests that need
transformers skip without it (the dev extra installs it).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmmo import cli
from llmmo.checkpoint import load_checkpoint, save_checkpoint
from llmmo.config import DataConfig, ModelConfig, load_config, resolve_model
from llmmo.errors import InteropError
from llmmo.finetune.chat import encode_chat
from llmmo.generate import GenerationConfig, generate, generate_ids
from llmmo.interop import export_hf, import_hf
from llmmo.interop.hf_export import check_exportable, save_hf_tokenizer
from llmmo.interop.hf_weights import load_hf_tensors, parse_size
from llmmo.model import Transformer
from llmmo.tokenizer import EOT, train_tokenizer
from llmmo.train import Trainer

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed: pip install 'llmmo[hf]' (the dev extra includes it)",
)
TOL = 1e-4  # max abs logit difference allowed (fp32); measured differences are 0 to 1e-7
PROMPT = "ROMEO:\nBut soft, what light"
NEW_TOKENS = 24
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and two OpenMP threads on a busy 2-core machine spin:
    a step took 0.65 s on two threads there and 5 ms on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------ the core stays light


def test_the_core_does_not_import_transformers() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import llmmo, llmmo.cli, llmmo.checkpoint, llmmo.interop\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    llmmo.cli.main(['--help'])\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- export: trained llmmo models

TINY = {
    "data.source": "tinyshakespeare",
    "data.block_size": 64,
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "train.batch_size": 8,
    "train.lr": 1e-2,
    "train.min_lr": 1e-3,
    "train.warmup_steps": 5,
    "train.max_steps": 30,
    "train.eval_every": 30,
    "train.eval_batches": 2,
    "train.log_every": 10,
    "train.device": "cpu",
    "train.dtype": "fp32",
}
CASES = {
    "gpt2-tied": {"model.family": "gpt2"},
    "gpt2-untied-nobias": {"model.family": "gpt2", "model.tie_embeddings": False, "model.bias": False},
    "llama-gqa-bpe": {
        "model.family": "llama",
        "model.n_head": 4,
        "model.n_kv_head": 2,
        "data.tokenizer": "bpe",
        "data.vocab_size": 320,
    },
    "qwen3-qknorm-tied": {"model.family": "llama", "model.qk_norm": True, "model.tie_embeddings": True},
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, data_dir: Path, tmp_path_factory) -> Path:
    """A tiny model trained 30 steps on tinyshakespeare: its checkpoint folder."""
    out = tmp_path_factory.mktemp(request.param)
    Trainer(load_config(None, TINY | CASES[request.param] | {"train.out_dir": str(out)})).run()
    return out / "ckpt-latest"


@needs_transformers
def test_exported_models_match_in_transformers(trained: Path, shakespeare: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = load_checkpoint(trained)
    cfg, tok = ckpt.model.cfg, ckpt.tokenizer
    out = tmp_path / "hf"
    sharded = cfg.family == "llama"  # one case also checks shards + index, with a tiny shard size
    args = ["export", str(trained), str(out), "--format", "hf"] + (["--max-shard-size", "40KB"] if sharded else [])
    assert cli.main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    if sharded:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        assert sum(f.startswith("model-0") for f in files) > 1
    else:
        assert "model.safetensors" in files

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == ARCH["qwen3" if cfg.qk_norm else cfg.family]
    assert model.config.tie_word_embeddings == cfg.tie_embeddings

    text = shakespeare.read_text(encoding="utf-8")[5000:5400]
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids == hf_tok(text)["input_ids"]
    x = torch.tensor([ids[: cfg.block_size]])
    with torch.no_grad():
        assert max_diff(ckpt.model(x)[0], model(x).logits) < TOL

    # greedy decoding, token for token, and the text `llmmo generate --temperature 0` prints
    prompt = tok.encode(PROMPT)
    eos = tok.eot_id if tok.kind == "bpe" else None
    assert model.generation_config.eos_token_id == eos
    gen = GenerationConfig(temperature=0, max_new_tokens=NEW_TOKENS)
    ours = [step[0] for step in generate_ids(ckpt.model, [prompt], gen, eos_id=eos) if step[0] is not None]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt) :]
    assert ours == theirs.tolist()
    assert generate(ckpt.model, tok, [PROMPT], gen)[0] == hf_tok.decode([t for t in ours if t != eos])

    # and back: llmmo -> transformers -> llmmo gives the same checkpoint
    back = import_hf(out, tmp_path / "back")
    assert back.model.cfg == cfg and back.data == ckpt.data and back.tokenizer.to_json() == tok.to_json()
    mine, again = ckpt.model.state_dict(), back.model.state_dict()
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)


def _saved(tmp_path: Path, **model) -> Path:
    tok = train_tokenizer("char", [PROMPT])
    net = Transformer(resolve_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_embd=32, **model)))
    save_checkpoint(tmp_path / "ckpt", net, tok, DataConfig(block_size=16))
    return tmp_path / "ckpt"


@pytest.mark.parametrize(
    "model, message",
    [
        ({"family": "gpt2", "n_kv_head": 2}, "GPT2LMHeadModel has no grouped-query attention.*--model.family llama"),
        ({"family": "gpt2", "positions": "rope"}, "GPT2LMHeadModel cannot compute model.positions rope"),
        ({"family": "gpt2", "norm": "rmsnorm"}, "cannot compute model.norm rmsnorm.*--model.family llama"),
        ({"family": "gpt2", "mlp": "swiglu"}, "cannot compute model.mlp swiglu"),
        ({"family": "llama", "positions": "learned"}, "LlamaForCausalLM cannot compute model.positions learned"),
        ({"family": "llama", "norm": "layernorm"}, "cannot compute model.norm layernorm.*--model.family gpt2"),
        ({"family": "llama", "mlp": "gelu"}, "cannot compute model.mlp gelu"),
        ({"family": "gpt2", "qk_norm": True}, "GPT2LMHeadModel has no QK-norm.*--model.family llama"),
        ({"family": "llama", "qk_norm": True, "bias": True}, "Qwen3ForCausalLM .* no MLP biases.*--model.bias false"),
        ({"family": "llama", "qk_norm": True, "mlp": "gelu"}, "Qwen3ForCausalLM cannot compute model.mlp gelu"),
    ],
)
def test_export_refuses_what_transformers_cannot_compute(model: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(InteropError, match=message):
        check_exportable(resolve_model(ModelConfig(vocab_size=8, block_size=16, **model)))
    if model["family"] == "gpt2" and "positions" in model:  # and through the command: one line, exit 2
        assert cli.main(["export", str(_saved(tmp_path, **model)), str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()


def test_export_keeps_a_folder_with_contents_and_reads_sizes(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, family="llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InteropError, match="exists and is not empty.*--overwrite"):
        export_hf(ckpt, tmp_path / "out")
    assert sorted(export_hf(ckpt, tmp_path / "out", overwrite=True))[0] == "config.json"
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "100KB", "1.5MB", 7)] == [
        5 * 10**9,
        500 * 10**6,
        2 * 2**30,
        100_000,
        1_500_000,
        7,
    ]
    with pytest.raises(InteropError, match="not a size"):
        parse_size("big")


# ------------------------------------------------------------------ import: random transformers models


def _vocab_and_merges(text: str, byte_level: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small BPE trained on `text`: GPT-2's byte-level scheme, or Llama's (Metaspace, byte fallback ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if byte_level:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials, alphabet = [EOT], pre_tokenizers.ByteLevel.alphabet()
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        specials, alphabet = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)], []
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator([text], trainer)
    spec = json.loads(tk.to_str())
    return spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]


def save_random_hf_model(family: str, text: str, folder: Path) -> Path:
    """A randomly initialised LlamaForCausalLM or Qwen3ForCausalLM (GQA, RoPE theta 500) or GPT2LMHeadModel (tied),
    saved with save_pretrained together with a tokenizer of the family's kind (Llama's for qwen3)."""
    import transformers as tf

    torch.manual_seed(0)
    if family in ("llama", "qwen3"):
        tok = tf.LlamaTokenizer(*_vocab_and_merges(text, byte_level=False))
        config = (tf.LlamaConfig if family == "llama" else tf.Qwen3Config)(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # not hidden_size / heads (16): heads of their own width, as some models have
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            rms_norm_eps=1e-6,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_range=0.1,
        )
        model = (tf.LlamaForCausalLM if family == "llama" else tf.Qwen3ForCausalLM)(config)
    else:
        tok = tf.GPT2Tokenizer(*_vocab_and_merges(text, byte_level=True))
        config = tf.GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_range=0.1,
        )
        model = tf.GPT2LMHeadModel(config)
    with torch.no_grad():  # norms and biases away from 1 and 0, so that a misplaced one shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hf_folder(family: str, shakespeare: Path, tmp_path_factory) -> Path:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: pip install 'llmmo[hf]' (the dev extra includes it)")
    text = shakespeare.read_text(encoding="utf-8")[:60000]
    return save_random_hf_model(family, text, tmp_path_factory.mktemp(f"hf-{family}") / "model")


@pytest.fixture(scope="module")
def llama_folder(shakespeare: Path, tmp_path_factory) -> Path:
    return _hf_folder("llama", shakespeare, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_folder(shakespeare: Path, tmp_path_factory) -> Path:
    return _hf_folder("gpt2", shakespeare, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_folder(shakespeare: Path, tmp_path_factory) -> Path:
    return _hf_folder("qwen3", shakespeare, tmp_path_factory)


@pytest.fixture(params=["llama", "qwen3", "gpt2"])
def hf_folder(request) -> Path:
    return request.getfixturevalue(f"{request.param}_folder")


@needs_transformers
def test_random_transformers_models_import_train_and_go_back_losslessly(
    hf_folder: Path, shakespeare: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_folder)
    assert cli.main(["import", str(hf_folder), str(tmp_path / "ckpt")]) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt")
    family = "gpt2" if theirs.config.model_type == "gpt2" else "llama"  # qwen3: llama with QK-norm
    assert ckpt.model.cfg.family == family and ckpt.tokenizer.kind == ("hf" if family == "llama" else "bpe")
    assert ckpt.model.cfg.qk_norm == (theirs.config.model_type == "qwen3")
    assert ckpt.data.source == f"hf:{hf_folder}" and ckpt.data.block_size == 64

    text = shakespeare.read_text(encoding="utf-8")[70000:70600]
    ids = ckpt.tokenizer.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ckpt.tokenizer.decode(ids) == hf_tok.decode(ids) == text
    assert ckpt.tokenizer.eot_id == hf_tok.eos_token_id
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert max_diff(ckpt.model(x)[0], theirs(x).logits) < TOL

    # untouched, the way back gives transformers the very tensors, config and tokenizer it saved
    export_hf(ckpt, tmp_path / "again")
    before, after = load_hf_tensors(hf_folder), load_hf_tensors(tmp_path / "again")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # n_inner None means 4 * n_embd; initializer_range only seeds transformers' own random init
    skip = {"llmmo", "transformers_version", "_name_or_path", "n_inner", "initializer_range"}
    config = {k: v for k, v in AutoConfig.from_pretrained(hf_folder).to_dict().items() if k not in skip}
    again = {k: v for k, v in AutoConfig.from_pretrained(tmp_path / "again").to_dict().items() if k not in skip}
    assert config == again
    again_tok = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again_tok(text)["input_ids"] == hf_tok(text)["input_ids"]  # Llama's BOS template included
    assert again_tok.decode(ids) == text

    # one training step in llmmo, then out again: transformers computes what we do
    model = ckpt.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    y = torch.tensor([ids[1:65]])
    model(x, y)[1].backward()
    optimizer.step()
    model.eval()
    export_hf(ckpt, tmp_path / "trained")
    stepped = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        ours = ckpt.model(x)[0]
        assert max_diff(ours, stepped(x).logits) < TOL
        assert max_diff(ours, theirs(x).logits) > 1e-3  # the step did change the model


@pytest.fixture
def edit_config(tmp_path: Path):
    """Copy a saved transformers folder and change its config.json."""

    def edit(folder: Path, change: dict, remove: tuple[str, ...] = ()) -> Path:
        copy = tmp_path / "edited"
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text()) | change
        for key in remove:
            config.pop(key, None)
        (copy / "config.json").write_text(json.dumps(config))
        return copy

    return edit


QWEN3_WINDOW = {"use_sliding_window": True, "sliding_window": 32}


@needs_transformers
@pytest.mark.parametrize(
    "family, change, remove, message",
    [
        ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, ("rope_parameters",), "rope scaling.*'linear'"),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}}, (), "'dynamic'"),
        ("llama", {"rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.5}}, (), "rope parameters"),
        ("llama", {"hidden_act": "gelu"}, (), "hidden_act 'gelu'"),
        ("llama", {"mlp_bias": True}, (), "attention_bias=False with mlp_bias=True"),
        ("llama", {"model_type": "mistral", "sliding_window": 32}, (), "model_type 'mistral'"),
        ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]} | QWEN3_WINDOW, (), "sliding-window"),
        ("qwen3", QWEN3_WINDOW, (), None),  # a window on no layer: full attention, imported
        ("qwen3", {"attention_bias": True}, (), "Qwen3 with attention_bias=True"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, (), "scale_attn_by_inverse_layer_idx=True"),
        ("gpt2", {"reorder_and_upcast_attn": True}, (), "reorder_and_upcast_attn=True"),
        ("gpt2", {"activation_function": "relu"}, (), "activation_function 'relu'"),
        ("gpt2", {"architectures": ["GPT2ForSequenceClassification"]}, (), "GPT2ForSequenceClassification"),
    ],
)
def test_import_refuses_what_llmmo_cannot_compute(
    family: str, change: dict, remove: tuple, message: str | None, request, edit_config, tmp_path: Path
) -> None:
    """Each option our model would compute differently is refused, named; a Qwen3 window that no layer uses
    (message None) is not one of them."""
    folder = request.getfixturevalue(f"{family}_folder")
    if message is None:
        assert import_hf(edit_config(folder, change, remove), tmp_path / "out").model.cfg.qk_norm
        return
    with pytest.raises(InteropError, match=message):
        import_hf(edit_config(folder, change, remove), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- tokenizers


@needs_transformers
@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_exported_tokenizers_give_our_ids_on_wikitext2_test(kind: str, data_dir: Path, tmp_path: Path) -> None:
    """Trained on WikiText-2 valid (word: vocab 10000; bpe: 4096), compared on the whole test split. The char
    tokenizer refuses characters it never saw (in both libraries), so it is compared on the test lines whose
    characters all occur in valid: 4314 of 4358 lines."""
    from transformers import AutoTokenizer

    valid = (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    test = (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    tok = train_tokenizer(kind, [valid], {"word": 10000, "bpe": 4096}.get(kind, 0))
    save_hf_tokenizer(tok, tmp_path, model_max_length=10**9)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_tok) == tok.vocab_size
    if kind == "char":
        alphabet, lines = set(valid), test.splitlines(keepends=True)
        known = [line for line in lines if set(line) <= alphabet]
        assert len(known) > 0.98 * len(lines)
        unseen = next(line for line in lines if not set(line) <= alphabet)
        with pytest.raises(Exception, match="not in this char tokenizer's vocabulary"):
            tok.encode(unseen)
        with pytest.raises(Exception):  # noqa: B017 - tokenizers raises a bare Exception
            hf_tok(unseen)
        test = "".join(known)
    ids = tok.encode(test)
    assert hf_tok(test, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok(test)["input_ids"] == ids  # no BOS/EOS added by a template
    decoded = hf_tok.decode(ids)
    assert decoded == tok.decode(ids)
    if kind != "word":  # word is lossy by design (spacing, <unk>)
        assert decoded == test


# ---------------------------------------------------------------------------------------------- the Hub


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None, reason="huggingface_hub is not installed")
@pytest.mark.parametrize(
    "env, message",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and 'openai-community/gpt2' is not in the Hugging Face cache"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "could not reach the Hugging Face Hub at http://127.0.0.1:9"),
    ],
    ids=["offline", "unreachable"],
)
def test_from_hub_without_the_network_says_what_to_do(env: dict, message: str, tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    environment["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache, never the user's
    proc = subprocess.run(
        [sys.executable, "-m", "llmmo", "import", "--from-hub", "openai-community/gpt2", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmmo: error: ")
    assert message in lines[0]
    for alternative in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "llmmo import HF_FOLDER OUT"):
        assert alternative in lines[0]
    assert not (tmp_path / "out").exists()


@needs_transformers
def test_an_imported_model_is_instruction_tuned_with_lora_and_exported(
    llama_folder: Path, tmp_path: Path, capsys
) -> None:
    """transformers -> llmmo import -> LoRA SFT (the chat markers added to its tokenizer) -> chat -> export with
    the chat template -> transformers gives our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli.main(["import", str(llama_folder), str(tmp_path / "base")]) == 0
    rows = [{"prompt": f"To be or not {i}?", "response": "That is the question."} for i in range(24)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli.main(["finetune", "sft", str(tmp_path / "base"), "--train-file", str(tmp_path / "chats.jsonl"),
                     "--lora.r", "4", "--train.batch_size", "2", "--train.epochs", "2",
                     "--train.out_dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 0
    adapter = tmp_path / "run" / "ckpt-latest"
    assert cli.main(["chat", str(adapter), "--prompt", "To be?", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert cli.main(["export", str(adapter), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    ours = load_checkpoint(adapter)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "To be or not?"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == encode_chat(ours.tokenizer, messages, add_generation_prompt=True)[0]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        assert max_diff(theirs(x).logits, ours.model(x)[0]) < 1e-4
