"""Checkpoint folders: exact save/load, atomic replacement, and clear errors for damaged folders."""

import json
from pathlib import Path

import pytest
import torch

from llmmo.checkpoint import load_checkpoint, save_checkpoint
from llmmo.config import DataConfig, ModelConfig, resolve_model
from llmmo.errors import CheckpointError
from llmmo.model import Transformer
from llmmo.tokenizer import train_tokenizer

TEXT = "To be, or not to be, that is the question.\n"


@pytest.fixture(params=[("gpt2", None), ("llama", 2)], ids=["gpt2-tied", "llama-gqa"])
def saved(request, tmp_path: Path) -> tuple[Path, Transformer]:
    family, kv = request.param
    tok = train_tokenizer("char", [TEXT])
    torch.manual_seed(0)
    model = Transformer(
        resolve_model(
            ModelConfig(
                family=family, n_kv_head=kv, vocab_size=tok.vocab_size, block_size=16, n_embd=32, n_head=4, n_layer=2
            )
        )
    )
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, tok, DataConfig(block_size=16))
    return path, model.eval()


def test_save_load_gives_identical_logits(saved) -> None:
    path, model = saved
    ckpt = load_checkpoint(path)
    idx = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 16))
    assert torch.equal(ckpt.model(idx)[0], model(idx)[0])
    assert ckpt.tokenizer.encode(TEXT) == train_tokenizer("char", [TEXT]).encode(TEXT)
    assert ckpt.data.block_size == 16
    meta = json.loads((path / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["model"]["family"] == model.cfg.family
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_resaving_replaces_the_folder_atomically(saved) -> None:
    path, model = saved
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    save_checkpoint(path, model, load_checkpoint(path).tokenizer, DataConfig(block_size=16))
    assert torch.equal(load_checkpoint(path).model.tok_emb.weight, model.tok_emb.weight)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary or old folders left


def test_a_failed_save_keeps_the_old_checkpoint(saved, monkeypatch) -> None:
    path, model = saved
    before = (path / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, load_checkpoint(path).tokenizer, DataConfig(block_size=16))
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_a_swap_cut_between_its_renames_is_recovered(saved) -> None:
    """A crash after the old folder was parked and before the new one came in leaves only the parked one."""
    path, model = saved
    parked = path.with_name(".ckpt.previous")
    path.rename(parked)
    with pytest.raises(CheckpointError, match="a save was cut short; the checkpoint before it is complete at"):
        load_checkpoint(path)
    save_checkpoint(path, model, load_checkpoint(parked).tokenizer, DataConfig(block_size=16))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_truncated_weights_are_reported(saved) -> None:
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors' is corrupt or truncated.*ckpt-best"):
        load_checkpoint(path)


def test_garbage_weights_are_reported(saved) -> None:
    path, _ = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_missing_and_damaged_parts_are_reported(saved, tmp_path: Path) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match="does not exist; pass a folder with model.safetensors"):
        load_checkpoint(tmp_path / "nope")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99, this llmmo .* reads 1"):
        load_checkpoint(path)
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json' is corrupt"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(meta | {"model": meta["model"] | {"n_embd": 64}}))
    with pytest.raises(CheckpointError, match="do not fit its config.json"):
        load_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: tokenizer.json missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no trainer state"):
        (path / "config.json").write_text(json.dumps(meta))
        train_tokenizer("char", [TEXT]).save(path / "tokenizer.json")
        load_checkpoint(path, trainer_state=True)
