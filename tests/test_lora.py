"""LoRA: only the adapters learn, the merged model computes the adapted logits, the adapter file is small."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmmo import cli
from llmmo.checkpoint import load_checkpoint, save_checkpoint
from llmmo.config import ModelConfig, resolve_model
from llmmo.errors import CheckpointError, ConfigError
from llmmo.finetune.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapted,
    load_adapter,
    merge_lora,
    save_adapter,
)
from llmmo.model import Transformer
from llmmo.tokenizer import char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def base_model(family: str = "gpt2") -> Transformer:
    torch.manual_seed(0)
    vocab = char_tokenizer([TEXT]).vocab_size
    cfg = ModelConfig(family=family, n_layer=4, n_head=4, n_embd=128, vocab_size=vocab, block_size=64)
    return Transformer(resolve_model(cfg))


def tune(model: torch.nn.Module, steps: int = 20) -> None:
    ids = torch.tensor(char_tokenizer([TEXT]).encode(TEXT))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = torch.stack([ids[i : i + 64] for i in range(step, step + 8)])
        y = torch.stack([ids[i + 1 : i + 65] for i in range(step, step + 8)])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "family, targets", [("gpt2", ["attn.qkv", "attn.proj"]), ("llama", ["mlp.gate", "mlp.up", "mlp.proj", "lm_head"])]
)
def test_only_adapters_learn_and_the_merged_model_computes_the_same_logits(family, targets, tmp_path) -> None:
    model = base_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, model.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        plain = model(x)[0]
    names = apply_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
    assert len(names) == 4 * (len(targets) - ("lm_head" in targets)) + ("lm_head" in targets)
    with torch.no_grad():  # B = 0: the adapted model starts as the base model
        torch.testing.assert_close(model(x)[0], plain)
    _, loss = model(x, x)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    tune(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x)[0]
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters changed the model
    base_now = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(base_now[k], before[k]) for k in before)  # the base weights did not move
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], adapted, atol=1e-5, rtol=1e-5)


def test_the_adapter_file_is_small_and_merges_through_the_cli(tmp_path: Path) -> None:
    model = base_model()
    tok = char_tokenizer([TEXT])
    from llmmo.config import DataConfig

    save_checkpoint(tmp_path / "base", model, tok, DataConfig())
    cfg = LoraConfig(r=8, alpha=16)
    apply_lora(model, cfg)
    tune(model)
    save_adapter(model, cfg, tmp_path / "adapter", base=str(tmp_path / "base"))
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert size < 0.05 * (tmp_path / "base" / "model.safetensors").stat().st_size
    assert cli.main(["lora", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    x = torch.randint(0, tok.vocab_size, (1, 64))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged").model(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
    other = Transformer(resolve_model(ModelConfig(n_layer=2, n_embd=64, vocab_size=tok.vocab_size, block_size=64)))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(other, tmp_path / "adapter")
    # a base of the same shape with other weights fits the adapter's tensors, but is not its base
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "stranger", Transformer(model.cfg), tok, DataConfig())
    merge = ["lora", "merge", str(tmp_path / "stranger"), str(tmp_path / "adapter"), str(tmp_path / "wrong")]
    assert cli.main(merge) == 2 and not (tmp_path / "wrong").exists()
    with pytest.raises(CheckpointError, match="is not the checkpoint the adapter in .* was trained on"):
        load_adapted(tmp_path / "adapter", base=tmp_path / "stranger")
    shutil.copytree(tmp_path / "base", tmp_path / "moved")  # the same weights elsewhere: fine
    assert load_adapted(tmp_path / "adapter", base=tmp_path / "moved").path == tmp_path / "adapter"
    shutil.rmtree(tmp_path / "base")  # the recorded base, rewritten (by more training): refused too
    shutil.copytree(tmp_path / "stranger", tmp_path / "base")
    with pytest.raises(CheckpointError, match="or that one rewritten since"):
        load_adapted(tmp_path / "adapter")


def test_bad_lora_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="choose among"):
        apply_lora(base_model(), LoraConfig(targets=["attn.q"]))
    with pytest.raises(ConfigError, match="tied to the token embedding"):
        apply_lora(base_model("gpt2"), LoraConfig(targets=["lm_head"]))
    with pytest.raises(ConfigError, match="r > 0"):
        apply_lora(base_model(), LoraConfig(r=0))
