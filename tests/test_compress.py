"""Compression on a char-level tinyshakespeare model trained here: quantized files shrink and keep perplexity,
pruning zeroes what it says and recovers, low-rank factors approximate better as the rank grows, a distilled
student beats the same student trained alone, and every result loads like any checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from llmmo import cli
from llmmo.checkpoint import load_checkpoint
from llmmo.compress import recover, save_compressed
from llmmo.compress.lowrank import factorize, lowrank
from llmmo.compress.prune import bake, magnitude_prune
from llmmo.compress.quantize import Int4Linear, block_linears, quantize
from llmmo.config import load_config
from llmmo.data import prepare_data
from llmmo.errors import ConfigError
from llmmo.evaluate import evaluate
from llmmo.generate import GenerationConfig, generate
from llmmo.train import Trainer

VAL_BATCHES = 40  # 40 x 32 windows of 64: 82k of the 112k val tokens


def options(out: Path, **overrides) -> dict:
    return {
        "data.source": "tinyshakespeare",
        "data.block_size": 64,
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 128,  # nanoGPT's 0.8M CPU shape: the blocks hold 97% of the weights
        "train.batch_size": 12,
        "train.lr": 3e-3,
        "train.min_lr": 3e-4,
        "train.warmup_steps": 20,
        "train.max_steps": 400,
        "train.eval_every": 400,
        "train.eval_batches": 10,
        "train.log_every": 50,
        "train.out_dir": str(out),
        "train.device": "cpu",
        "train.dtype": "fp32",
    } | overrides


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compress") / "run"
    Trainer(load_config(overrides=options(out))).run()
    return out / "ckpt-latest"


def val_loss(ckpt_path: Path) -> float:
    ckpt = load_checkpoint(ckpt_path)
    split = prepare_data(ckpt.data, tokenizer=ckpt.tokenizer, splits=("val",)).splits["val"]
    return evaluate(ckpt.model, split, ckpt.tokenizer.token_bytes(), batch_size=32, max_batches=VAL_BATCHES).loss


def size(ckpt_path: Path) -> int:
    return (ckpt_path / "model.safetensors").stat().st_size


@pytest.fixture(scope="module")
def fp32_loss(trained: Path) -> float:
    return val_loss(trained)


@pytest.mark.parametrize(
    "scheme, group_size, max_size, max_ppl_rise",
    # group 32 spends 4 more bits of scales per 32 weights than group 64: ~18.2% of fp32 on this small model
    [("int8", 0, 0.30, 0.01), ("int4", 64, 0.18, 0.05), ("int4", 32, 0.19, 0.05), ("dynamic-int8", 0, 0.30, 0.03)],
)
def test_quantized_files_shrink_and_keep_perplexity(
    scheme, group_size, max_size, max_ppl_rise, trained, fp32_loss, tmp_path
) -> None:
    ckpt = load_checkpoint(trained)
    record = quantize(ckpt.model, scheme, group_size=group_size or 64)
    save_compressed(ckpt, tmp_path / "q", record)
    assert size(tmp_path / "q") <= max_size * size(trained)
    assert math.exp(val_loss(tmp_path / "q")) <= (1 + max_ppl_rise) * math.exp(fp32_loss)
    loaded = load_checkpoint(tmp_path / "q")  # stored quantized: the integers come back as they were saved
    for name, module in block_linears(ckpt.model).items() if scheme != "int4" else []:
        assert torch.equal(loaded.model.get_submodule(name).weight.qdata, module.weight.qdata)
    if scheme == "int4":
        q = loaded.model.blocks[0].attn.qkv
        assert isinstance(q, Int4Linear) and torch.equal(q.qweight, ckpt.model.blocks[0].attn.qkv.qweight)
    text = generate(loaded.model, loaded.tokenizer, ["ROMEO:"], GenerationConfig(max_new_tokens=20, temperature=0))
    assert len(text[0]) == 20


def test_int4_needs_groups_that_divide_the_layers(trained) -> None:
    with pytest.raises(ConfigError, match="int4 groups of 48 do not divide"):
        quantize(load_checkpoint(trained).model, "int4", group_size=48)


def test_half_the_weights_pruned_with_a_short_recovery_keep_perplexity(trained, fp32_loss, tmp_path) -> None:
    ckpt = load_checkpoint(trained)
    record = magnitude_prune(ckpt.model, 0.5)
    before_recovery = math.exp(
        evaluate(
            ckpt.model,
            prepare_data(ckpt.data, tokenizer=ckpt.tokenizer, splits=("val",)).splits["val"],
            ckpt.tokenizer.token_bytes(),
            batch_size=32,
            max_batches=VAL_BATCHES,
        ).loss
    )
    recover(ckpt, steps=100, lr=1e-3)
    zeros = bake(ckpt.model)
    save_compressed(ckpt, tmp_path / "p", record | {"zeros": zeros})
    weights = sum(m.weight.numel() for m in block_linears(ckpt.model).values())
    assert zeros >= 0.5 * weights - 1  # still pruned after the recovery
    loaded = load_checkpoint(tmp_path / "p")
    assert sum(int((m.weight == 0).sum()) for m in block_linears(loaded.model).values()) == zeros
    after = math.exp(val_loss(tmp_path / "p"))
    assert after <= 1.03 * math.exp(fp32_loss) and after < before_recovery


def test_low_rank_error_falls_as_the_rank_rises_and_the_factors_load(trained, tmp_path) -> None:
    ckpt = load_checkpoint(trained)
    layer = ckpt.model.blocks[0].mlp.up  # 128 -> 512
    x = torch.randn(100, 128)
    errors = []
    for rank in (8, 32, 64, 128):
        low = factorize(layer, rank)
        errors.append(float((low.up.weight @ low.down.weight - layer.weight).norm().detach()))
        torch.testing.assert_close(low(x), low.up(low.down(x)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * float(layer.weight.detach().norm())
    record = lowrank(ckpt.model, rank_ratio=0.5)
    assert set(record["ranks"].values()) == {64}  # half of min(in, out) = 128
    before = ckpt.model.num_params()
    save_compressed(ckpt, tmp_path / "lr", record)
    loaded = load_checkpoint(tmp_path / "lr")
    assert loaded.model.num_params() == before < load_checkpoint(trained).model.num_params()
    assert loaded.model.flops_per_token() < load_checkpoint(trained).model.flops_per_token()
    text = generate(loaded.model, loaded.tokenizer, ["KING:"], GenerationConfig(max_new_tokens=10, temperature=0))
    assert len(text[0]) == 10
    with pytest.raises(ConfigError, match="exactly one of --rank-ratio"):
        lowrank(ckpt.model)


def test_a_distilled_half_depth_student_beats_the_same_student_trained_alone(trained, tmp_path) -> None:
    from llmmo.compress.distill import DistillTrainer

    teacher = load_checkpoint(trained)
    student = options(tmp_path / "x", **{"model.n_layer": 2, "train.max_steps": 150, "train.eval_every": 150})
    distilled = DistillTrainer(
        load_config(overrides=student | {"train.out_dir": str(tmp_path / "d")}), teacher, alpha=0.5, temperature=2.0
    ).run()
    alone = Trainer(load_config(overrides=student | {"train.out_dir": str(tmp_path / "s")})).run()
    assert distilled.best_val_loss < alone.best_val_loss


def test_compress_commands_and_the_report(trained, tmp_path, capsys) -> None:
    q, p = str(tmp_path / "q"), str(tmp_path / "p")
    assert cli.main(["compress", "quantize", str(trained), q, "--scheme", "int4"]) == 0
    assert cli.main(["compress", "prune", str(trained), p, "--sparsity", "0.6", "--scope", "layer"]) == 0
    assert cli.main(["eval", q, "--max-batches", "2"]) == 0
    assert cli.main(["generate", p, "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert cli.main(["compress", "quantize", str(trained), q, "--scheme", "int8"]) == 2  # OUT exists
    assert "already exists" in capsys.readouterr().err
    # transformers has no int4 layers: export writes the weights they stand for, and computes our logits
    assert cli.main(["export", q, str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 65, (1, 32))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(x).logits
        torch.testing.assert_close(theirs, load_checkpoint(q).model(x)[0], atol=1e-4, rtol=1e-4)
    assert cli.main(["info", q]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compression"][0]["scheme"] == "int4"
    assert info["params"] == load_checkpoint(trained).model.num_params()  # the int4 weights are counted
    out = tmp_path / "report"
    args = ["compress", "report", str(trained), q, p, "--max-batches", "3", "--new-tokens", "8", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "report.json").read_text())
    assert [r["compression"] for r in rows] == ["none", "quantize:int4", "prune:magnitude"]
    assert rows[1]["bytes"] < 0.2 * rows[0]["bytes"] and rows[1]["params"] == rows[0]["params"]
    blocks = sum(m.weight.numel() for m in block_linears(load_checkpoint(trained).model).values())
    assert rows[2]["params"] - rows[2]["nonzero_params"] >= 0.6 * blocks - 4  # the zeros, counted
    assert all(r["tok_s_batch8"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").is_file()
    assert rows[1]["weights_mib"] < 0.2 * rows[0]["weights_mib"]  # int4 weights stay packed in memory


def test_compress_commands_for_pruning_factorizing_and_distilling(trained, tmp_path, capsys) -> None:
    s, lr, d = str(tmp_path / "s"), str(tmp_path / "lr"), tmp_path / "student"
    assert cli.main(["compress", "prune-structured", str(trained), s, "--heads", "1", "--recover-steps", "3"]) == 0
    assert load_checkpoint(s).model.cfg.n_head == 3
    assert cli.main(["compress", "prune-structured", str(trained), str(tmp_path / "x")]) == 2  # how much?
    assert "needs --params F, or --heads" in capsys.readouterr().err
    assert cli.main(["compress", "lowrank", str(trained), lr, "--energy", "0.9", "--recover-steps", "2"]) == 0
    assert cli.main(["compress", "lowrank", str(trained), str(tmp_path / "y"), "--rank-ratio", "1.0"]) == 2
    assert "no layer gets smaller" in capsys.readouterr().err
    student = ["--model.n_layer", "2", "--model.n_embd", "64", "--train.max_steps", "3", "--train.eval_batches", "1"]
    assert cli.main(["compress", "distill", str(trained), *student, "--train.out_dir", str(d)]) == 0
    cfg = load_checkpoint(d / "ckpt-latest").model.cfg  # the teacher's shape with what follows from n_embd 64
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.mlp_hidden) == (2, 64, 4, 16, 256)
    q = str(tmp_path / "q")
    assert cli.main(["compress", "quantize", s, q, "--scheme", "int4", "--group-size", "32"]) == 0  # 96 inputs
    assert cli.main(["compress", "prune", q, str(tmp_path / "z")]) == 2  # not the other way round
    assert "quantize last" in capsys.readouterr().err


@pytest.mark.parametrize("family, kv, qk_norm", [("gpt2", None, False), ("llama", 2, False), ("llama", None, True)])
def test_structured_pruning_keeps_exactly_what_the_kept_units_computed(family, kv, qk_norm) -> None:
    """The pruned model equals the original with the removed heads' and neurons' outputs zeroed."""
    from llmmo.compress.structured import importance, prune_structured
    from llmmo.config import ModelConfig, resolve_model
    from llmmo.model import Transformer

    torch.manual_seed(0)
    cfg = resolve_model(ModelConfig(family=family, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, vocab_size=20,
                                    block_size=16, qk_norm=qk_norm))  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # gains away from 1, so that one left behind shows
        for norm in (p for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n):
            norm.uniform_(0.5, 1.5)
    batches = [(torch.randint(0, 20, (3, 16)), torch.randint(0, 20, (3, 16))) for _ in range(2)]
    heads_removed = 1 if kv is None else 0  # grouped key/value heads: neurons only
    small, _ = prune_structured(model, heads_removed, 8, batches)
    head_scores, neuron_scores = importance(model, batches)
    with torch.no_grad():
        for block, hs, ns in zip(model.blocks, head_scores, neuron_scores, strict=True):
            for h in hs.argsort()[:heads_removed].tolist():
                block.attn.proj.weight[:, h * cfg.head_dim : (h + 1) * cfg.head_dim] = 0
            block.mlp.proj.weight[:, ns.argsort()[:8]] = 0
    x = torch.randint(0, 20, (2, 16))
    torch.testing.assert_close(small(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
    assert small.cfg.n_kv_head == (3 if kv is None else 2) and small.cfg.mlp_hidden == cfg.mlp_hidden - 8


def test_energy_keeps_the_fewest_singular_values_that_hold_it() -> None:
    from llmmo.compress.lowrank import rank_for

    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))  # energies 9, 4, 1, 0.25 of 14.25
    assert rank_for(w, None, 0.6) == 1 and rank_for(w, None, 0.9) == 2 and rank_for(w, None, 0.99) == 4
    assert rank_for(w, 0.5, None) == 2


def test_distillation_loss_is_cross_entropy_at_alpha_0_and_zero_kl_against_itself() -> None:
    from llmmo.compress.distill import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(s.flatten(0, 1), y.flatten())
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0, temperature=3.0), ce)
    torch.testing.assert_close(distillation_loss(s, s, y, alpha=1.0, temperature=3.0), torch.tensor(0.0))
    p, log_q = (t / 2).softmax(-1), (s / 2).log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()  # per token, averaged
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=1.0, temperature=2.0), 4 * kl)


def test_structured_pruning_removes_a_quarter_of_parameters_and_flops(trained, fp32_loss, tmp_path) -> None:
    from llmmo.compress.structured import prune_structured, removal_for, training_batches

    ckpt = load_checkpoint(trained)
    before_params, before_flops = ckpt.model.num_params(), ckpt.model.flops_per_token()
    heads, neurons = removal_for(ckpt.model.cfg, 0.25)
    assert heads == 1  # of 4
    small, record = prune_structured(ckpt.model, heads, neurons, training_batches(ckpt, n=4))
    assert small.cfg.n_head == 3 and small.cfg.head_dim == 32 and small.cfg.mlp_hidden == 512 - neurons
    assert 0.70 * before_params < small.num_params() <= 0.75 * before_params  # at least a quarter, not much more
    assert small.flops_per_token() <= 0.76 * before_flops  # the forward (a third of these) falls alike
    pruned = dataclasses.replace(ckpt, model=small)
    recover(pruned, steps=100, lr=1e-3)
    save_compressed(pruned, tmp_path / "s", record)
    loaded = load_checkpoint(tmp_path / "s")
    assert loaded.model.num_params() == small.num_params()
    assert math.exp(val_loss(tmp_path / "s")) < 1.5 * math.exp(fp32_loss)  # a quarter smaller, still a model
    with pytest.raises(ConfigError, match="keep at least one"):
        prune_structured(ckpt.model, 4, 0, [])
