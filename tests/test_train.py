"""Training on real text: loss falls, resume is exact, the golden curve holds, budgets and Ctrl-C behave."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from llmmo.checkpoint import load_checkpoint
from llmmo.config import load_config
from llmmo.cpu import cpu_vendor, mkl_fast_path
from llmmo.errors import CheckpointError, ConfigError, DivergedError
from llmmo.evaluate import evaluate
from llmmo.train import Reporter, Trainer
from llmmo.train.optim import build_optimizer

GOLDEN = Path(__file__).parent / "golden" / "tinyshakespeare-50-steps.json"


def tiny(out_dir: Path, **overrides) -> dict:
    """A seconds-sized char model on tinyshakespeare."""
    return {
        "data.source": "tinyshakespeare",
        "data.block_size": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.min_lr": 3e-4,
        "train.warmup_steps": 10,
        "train.max_steps": 50,
        "train.log_every": 1,
        "train.eval_every": 25,
        "train.eval_batches": 4,
        "train.out_dir": str(out_dir),
        "train.device": "cpu",  # the numbers below are fp32 CPU numbers, also on a machine with a GPU
        "train.dtype": "fp32",
    } | overrides


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_char_shakespeare_learns_within_a_minute(data_dir: Path, tmp_path: Path) -> None:
    """The CPU recipe's shape (0.8M parameters): val loss from ~ln(65) = 4.17 to below 2.5 in under a minute.

    A fixed 400 steps (307k tokens) on one thread, so neither the result nor the CPU time it takes depends on how
    busy the machine is (with several threads, OpenMP's spin-waiting bills a loaded machine's waits as CPU time).
    On an idle 2-core machine this takes about 25 s; the assertion is on the CPU time, not the wall time.
    """
    cfg = load_config(
        "configs/shakespeare-char-cpu.yaml",
        {
            "train.max_steps": 400,
            "train.eval_every": 400,
            "train.out_dir": str(tmp_path / "run"),
            "train.device": "cpu",
        },
    )
    trainer = Trainer(cfg)
    val = trainer.data.splits["val"]
    before = evaluate(trainer.model, val, trainer.token_bytes, batch_size=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = trainer.run()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(threads)
    after = result.last_eval
    print(f"val loss {before.loss:.3f} -> {after['val_loss']:.3f} in {seconds:.1f} s ({cpu_seconds:.1f} s CPU)")
    assert abs(before.loss - math.log(65)) < 0.1
    assert after["val_loss"] < 2.5
    assert cpu_seconds < 60
    assert after["val_bpb"] == pytest.approx(after["val_loss"] / math.log(2), rel=1e-4)  # one byte per character
    assert result.best_val_loss == after["val_loss"]


class CtrlCAt(Reporter):
    """Presses Ctrl-C (a real SIGINT) when a given step has been logged."""

    def __init__(self, step: int):
        self.step = step

    def train_step(self, record: dict) -> None:
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)


RESUME = {"model.dropout": 0.1, "train.max_steps": 30, "train.eval_every": 10, "train.grad_accum": 2}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(
    data_dir: Path, tmp_path: Path, optimizer: str
) -> None:
    settings = RESUME | {"train.optimizer": optimizer}
    whole = Trainer(load_config(overrides=tiny(tmp_path / "whole", **settings))).run()
    cut = Trainer(load_config(overrides=tiny(tmp_path / "cut", **settings)), CtrlCAt(17)).run()
    assert cut.interrupted and cut.step == 17
    resumed = Trainer(load_config(overrides=tiny(tmp_path / "cut", **settings) | {"train.resume": True})).run()
    assert resumed.step == whole.step == 30 and not resumed.interrupted
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    for step in range(18, 31):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert resumed.best_val_loss == pytest.approx(whole.best_val_loss, abs=1e-6)


def test_ctrl_c_in_the_middle_of_a_step_finishes_the_step(data_dir: Path, tmp_path: Path) -> None:
    """SIGINT between the two micro-batches of step 12: the step completes, then the run saves and stops."""
    whole = tmp_path / "whole"
    Trainer(load_config(overrides=tiny(whole, **RESUME))).run()
    trainer = Trainer(load_config(overrides=tiny(tmp_path / "cut", **RESUME)))
    draw = trainer.sampler.batch

    def batch(step: int, micro: int = 0):
        if (step, micro) == (11, 1):  # step index 11 is the 12th step
            os.kill(os.getpid(), signal.SIGINT)
        return draw(step, micro)

    trainer.sampler.batch = batch
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    assert trainer.run().step == 12
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    Trainer(load_config(overrides=tiny(tmp_path / "cut", **RESUME) | {"train.resume": True})).run()
    a, b = losses(whole), losses(tmp_path / "cut")
    assert [b[s] for s in range(13, 31)] == pytest.approx([a[s] for s in range(13, 31)], abs=1e-6)


def test_time_to_target_recipe_reaches_1_886_within_its_budget(data_dir: Path, tmp_path: Path) -> None:
    """configs/shakespeare-char-fast.yaml (issue 3's time-to-target recipe) reaches val loss 1.886 on the whole
    validation split within its 350 steps, and so within 1.42e12 training FLOPs (measured: 1.8692 at step 325,
    1.31e12; the plain AdamW baseline needs 7.8e12). Guards the recipe against numerics that learn slower."""
    recipe = Path(__file__).parents[1] / "configs" / "shakespeare-char-fast.yaml"
    trainer = Trainer(load_config(recipe, {"train.out_dir": str(tmp_path / "run"), "train.device": "cpu"}))
    result = trainer.run()
    assert result.best_val_loss <= 1.886 and result.step <= 350  # stops at the target
    assert result.flops <= 1.42e12


def test_golden_curve(data_dir: Path, tmp_path: Path) -> None:
    """The first 50 losses of a tiny seeded model; any change to the numerics must update this file on purpose
    (regenerate with LLMMO_UPDATE_GOLDEN=1). One thread, fp32 on the CPU: matmul results then do not depend on
    how many cores the machine has."""
    if cpu_vendor() == "AuthenticAMD" and not mkl_fast_path():
        pytest.skip("recorded with MKL's own kernels on this AMD CPU (llmmo.cpu); MKL's fast path is off in this "
                    "process (LLMMO_MKL_ON_AMD=0, a product before llmmo was imported, or not available), and "
                    "training takes other products then, which round differently: 2e-4 apart by step 50")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(overrides=tiny(tmp_path / "run"))).run()
    finally:
        torch.set_num_threads(threads)
    got = [losses(tmp_path / "run")[s] for s in range(1, 51)]
    if os.environ.get("LLMMO_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"train_loss": got}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["train_loss"]
    assert got == pytest.approx(expected, abs=1e-4)
    assert sum(expected[-5:]) / 5 < sum(expected[:5]) / 5 - 0.5  # and it does learn


def test_wikitext2_valid_trains_with_the_word_tokenizer(data_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "configs/seed-wikitext2.yaml",
        {
            "data.train_split": "valid",
            "data.val_split": "test",
            "model.n_layer": 1,
            "model.n_embd": 64,
            "model.n_head": 2,
            "train.sampler": "random",
            "train.epochs": 0,
            "train.max_steps": 8,
            "train.batch_size": 8,
            "train.eval_batches": 2,
            "train.log_every": 1,
            "train.out_dir": str(tmp_path / "r"),
        },
    )
    trainer = Trainer(cfg)
    assert trainer.data.tokenizer.kind == "word" and trainer.data.tokenizer.vocab_size == 10000
    result = trainer.run()
    run = losses(tmp_path / "r")
    assert result.step == 8 and run[8] < run[1]
    assert 0 < result.last_eval["val_loss"] < math.log(10000) + 0.5


def test_epoch_runs_stop_at_the_tightest_budget(data_dir: Path, tmp_path: Path) -> None:
    epoch = {"train.sampler": "epoch", "train.epochs": 3, "train.batch_size": 64, "train.eval_every": 1000}
    trainer = Trainer(load_config(overrides=tiny(tmp_path / "e", **epoch)))
    per_epoch = trainer.sampler.optimizer_steps_per_epoch
    assert per_epoch == (1003854 - 1) // 32 // 64 and trainer.total_steps == min(50, 3 * per_epoch)
    capped = Trainer(load_config(overrides=tiny(tmp_path / "c", **epoch | {"train.max_tokens": 4096})))
    assert capped.total_steps == 2
    uncapped = Trainer(load_config(overrides=tiny(tmp_path / "u", **epoch | {"train.max_steps": 0})))
    assert uncapped.total_steps == 3 * per_epoch


def test_budgets_stop_the_run(data_dir: Path, tmp_path: Path) -> None:
    by_tokens = Trainer(load_config(overrides=tiny(tmp_path / "t", **{"train.max_tokens": 1000}))).run()
    assert by_tokens.step == math.ceil(1000 / (4 * 32)) and by_tokens.tokens == by_tokens.step * 128
    by_time = Trainer(load_config(overrides=tiny(tmp_path / "m", **{"train.max_minutes": 1e-9}))).run()
    assert by_time.step <= 1
    assert (tmp_path / "m" / "ckpt-latest" / "model.safetensors").is_file()


def test_run_folder_follows_the_conventions(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 10, "train.eval_every": 5}))).run()
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "ckpt-latest", "ckpt-best"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = next(r for r in records if "train_loss" in r)
    eval_rec = next(r for r in records if "val_loss" in r)
    assert {"step", "tokens", "flops", "train_loss", "lr", "tok_per_s", "grad_norm", "time_s"} <= set(train_rec)
    assert {"step", "tokens", "flops", "val_loss", "val_ppl", "val_bpb", "time_s"} <= set(eval_rec)
    assert eval_rec["flops"] == eval_rec["tokens"] * load_checkpoint(out / "ckpt-latest").model.flops_per_token()
    for ckpt in ("ckpt-latest", "ckpt-best"):
        names = {p.name for p in (out / ckpt).iterdir()}
        assert names == {
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "trainer_state.json",
            "trainer_state.safetensors",
        }
    resolved = (out / "config.yaml").read_text()
    assert "positions: learned" in resolved and "n_kv_head: 2" in resolved  # every default spelled out


def test_best_val_loss_in_every_checkpoint_is_the_best_so_far(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 30, "train.eval_every": 10}))).run()
    evals = [
        json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    latest = json.loads((out / "ckpt-latest" / "trainer_state.json").read_text())
    best = json.loads((out / "ckpt-best" / "trainer_state.json").read_text())
    assert latest["best_val_loss"] == pytest.approx(min(evals)) == best["best_val_loss"]


def test_a_cpu_trainer_keeps_freed_memory_for_its_next_step(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer's set-up applies llmmo.cpu.keep_freed_memory on a CPU. What the setting does (15x fewer page
    faults a step) is measured in tests/test_cpu.py, in a fresh process; glibc's defaults fault from 5 to 2,000
    pages a step depending on what the process allocated before, so faults alone cannot tell whether the Trainer
    applied it."""
    calls = []
    monkeypatch.setattr("llmmo.train.trainer.keep_freed_memory", lambda: calls.append("cpu") or True)
    Trainer(load_config(overrides=tiny(tmp_path / "run")))
    assert calls == ["cpu"]


def test_weight_decay_spares_norms_biases_and_embeddings(data_dir: Path, tmp_path: Path) -> None:
    for family in ("gpt2", "llama"):  # tied and untied output heads
        trainer = Trainer(load_config(overrides=tiny(tmp_path / family, **{"model.family": family})))
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        decay, no_decay = build_optimizer(trainer.model, trainer.cfg.train).param_groups
        decayed = sorted(names[id(p)] for p in decay["params"])
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(
            n.endswith(("qkv.weight", "proj.weight", "up.weight", "gate.weight", "lm_head.weight")) for n in decayed
        )
        assert ("lm_head.weight" in decayed) == (family == "llama")  # tied to the embedding in gpt2: no decay
        assert "tok_emb.weight" not in decayed


def test_resume_refuses_a_different_run(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 2}))).run()
    for key, value in [
        ("data.block_size", 64),
        ("model.n_layer", 3),
        ("train.batch_size", 8),
        ("data.tokenizer", "bpe"),
    ]:
        shown = "train.batch_size x processes" if key == "train.batch_size" else key
        with pytest.raises(ConfigError, match=f"--train.resume: {shown} is .* but the run in .* used"):
            Trainer(load_config(overrides=tiny(out, **{"train.resume": True, key: value})))
    with pytest.raises(ConfigError, match="--train.resume: train.optimizer is 'muon' but the run in .* used 'adamw'"):
        Trainer(load_config(overrides=tiny(out, **{"train.resume": True, "train.optimizer": "muon"})))
    faster = Trainer(load_config(overrides=tiny(out, **{"train.resume": True, "train.lr": 0.01})))
    assert [g["base_lr"] for g in faster.optimizer.param_groups] == [0.01, 0.01]  # the new peak lr applies
    assert faster.optimizer.state  # and the saved moments came back
    extended = Trainer(load_config(overrides=tiny(out, **{"train.resume": True, "train.max_steps": 4}))).run()
    assert extended.step == 4  # budgets may change
    with pytest.raises(ConfigError, match="is at step 4, past this budget's 3 steps; raise --train.max_steps"):
        Trainer(load_config(overrides=tiny(out, **{"train.resume": True, "train.max_steps": 3})))
    state = out / "ckpt-latest" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "tokens"}))
    with pytest.raises(CheckpointError, match="trainer state .* is damaged"):
        Trainer(load_config(overrides=tiny(out, **{"train.resume": True, "train.max_steps": 6})))


def test_existing_run_is_not_overwritten(data_dir: Path, tmp_path: Path) -> None:
    Trainer(load_config(overrides=tiny(tmp_path / "r", **{"train.max_steps": 2}))).run()
    with pytest.raises(ConfigError, match="already holds a run; pass --train.resume true"):
        Trainer(load_config(overrides=tiny(tmp_path / "r", **{"train.max_steps": 2})))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        Trainer(load_config(overrides=tiny(tmp_path / "new", **{"train.resume": True})))


def test_a_save_cut_between_its_renames_keeps_the_run(data_dir: Path, tmp_path: Path) -> None:
    """A crash between atomic_folder's two renames parks ckpt-latest at .ckpt-latest.previous: the run is still
    there. A fresh run must not start over it (emptying metrics.jsonl), and resume names the way back."""
    out = tmp_path / "r"
    Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 2}))).run()
    metrics = (out / "metrics.jsonl").read_text()
    (out / "ckpt-latest").rename(out / ".ckpt-latest.previous")
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 2})))
    with pytest.raises(CheckpointError, match="a save was cut short.*rename it to 'ckpt-latest'"):
        Trainer(load_config(overrides=tiny(out, **{"train.resume": True})))
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_finished_run_resumes_past_a_cut_metrics_line_without_evaluating_again(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    every = {"train.eval_every": 10}
    Trainer(load_config(overrides=tiny(out, **every, **{"train.max_steps": 20}))).run()
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 21, "train_lo')  # a crash while a record was being appended
    resumed = tiny(out, **every, **{"train.resume": True})
    result = Trainer(load_config(overrides=resumed | {"train.max_steps": 20})).run()
    assert result.step == 20 and metrics.read_text() == whole  # the cut line dropped, no second val record at 20
    Trainer(load_config(overrides=resumed | {"train.max_steps": 30})).run()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "val_loss" in line]
    assert steps == [10, 20, 30]


def test_validation_uses_the_training_windows(data_dir: Path, tmp_path: Path) -> None:
    """A model whose context (64) is longer than the windows it trains on (32) is validated, and its FLOPs
    counted, on 32-token windows: positions past 32 never trained."""
    trainer = Trainer(load_config(overrides=tiny(tmp_path / "r", **{"model.block_size": 64, "train.eval_batches": 2})))
    split = trainer.data.splits["val"]
    windows = {n: evaluate(trainer.model, split, trainer.token_bytes, 4, 2, block_size=n).loss for n in (32, 64)}
    assert trainer.validate()["val_loss"] == pytest.approx(windows[32], rel=1e-6)
    assert windows[32] != pytest.approx(windows[64], rel=1e-3)
    assert trainer.flops_per_token == trainer.model.flops_per_token(32) < trainer.model.flops_per_token()


def test_resume_refuses_a_changed_corpus(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    run = {"data.path": str(text), "train.max_steps": 2}
    Trainer(load_config(overrides=tiny(tmp_path / "r", **run))).run()
    text.write_text(text.read_text() + "and the dog sleeps on\n" * 50)
    with pytest.raises(ConfigError, match="the corpus changed"):
        Trainer(load_config(overrides=tiny(tmp_path / "r", **run, **{"train.resume": True})))


def test_a_diverging_run_stops_before_saving_non_finite_weights(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    Trainer(load_config(overrides=tiny(out, **{"train.max_steps": 10, "train.eval_every": 10}))).run()
    before = load_checkpoint(out / "ckpt-latest").model.state_dict()
    diverging = tiny(out, **{"train.max_steps": 20, "train.eval_every": 1, "train.resume": True, "train.lr": 1e30})
    with pytest.raises(DivergedError, match=r"training diverged (at|by) step 1\d: .* lower --train.lr"):
        Trainer(load_config(overrides=diverging | {"train.min_lr": 1e29})).run()
    after = load_checkpoint(out / "ckpt-latest").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(math.isfinite(json.loads(line).get("train_loss", 0)) for line in (out / "metrics.jsonl").open())

    class OverflowThenCtrlC(CtrlCAt):  # the step's update overflowed a weight, then Ctrl-C: nothing is saved
        def train_step(self, record: dict) -> None:
            if record["step"] == self.step:
                next(trainer.model.parameters()).data.fill_(math.inf)
            super().train_step(record)

    trainer = Trainer(
        load_config(overrides=tiny(out, **{"train.max_steps": 20, "train.resume": True})), OverflowThenCtrlC(12)
    )
    with pytest.raises(DivergedError, match="by step 12: weights not finite"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in load_checkpoint(out / "ckpt-latest").model.state_dict().items())
