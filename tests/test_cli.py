"""The `llmmo` command end to end, as a user runs it: train, eval, generate, info, and its errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmmo.config import all_keys
from llmmo.cpu import fast_bf16

LLMMO = [sys.executable, "-m", "llmmo"]
TINY = [
    "--data.block_size",
    "32",
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--train.batch_size",
    "4",
    "--train.eval_batches",
    "4",
]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LLMMO, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def checkpoint(data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    run(
        "train",
        "--data.source",
        "tinyshakespeare",
        *TINY,
        "--train.max_steps",
        "40",
        "--train.eval_every",
        "20",
        "--train.out_dir",
        str(out),
    )
    return out / "ckpt-best"


def test_train_eval_generate_info(checkpoint: Path, tmp_path: Path) -> None:
    result = json.loads(run("eval", str(checkpoint), "--split", "val", "--max-batches", "5").stdout)
    assert {"loss", "ppl", "bpb", "tokens", "bytes"} <= set(result) and 0 < result["loss"] < 4.3
    text_file = tmp_path / "t.txt"
    text_file.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n")
    on_file = json.loads(run("eval", str(checkpoint), "--file", str(text_file)).stdout)
    assert on_file["tokens"] == len(text_file.read_text()) - 1

    greedy = run("generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0")
    no_cache = run(
        "generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0", "--no-cache"
    )
    assert greedy.stdout == no_cache.stdout and greedy.stdout.startswith("ROMEO:")
    streamed = run(
        "generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0", "--stream"
    )
    assert streamed.stdout == greedy.stdout
    packed = run(
        "generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0", "--pack"
    )
    assert packed.stdout == greedy.stdout  # oneDNN's products: the same greedy text
    if fast_bf16():  # bf16 weights: other roundings, a text of its own from the same prompt
        half = run("generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--dtype", "bf16")
        assert half.stdout.startswith("ROMEO:") and len(half.stdout) > len("ROMEO:\n")
    refused = run("generate", str(checkpoint), "--pack", "--dtype", "bf16", check=False)
    assert refused.returncode == 2 and "with --dtype bf16 use --compile" in refused.stderr
    batch = run(
        "generate",
        str(checkpoint),
        "--prompt",
        "A",
        "--prompt",
        "KING",
        "--max-new-tokens",
        "10",
        "--top-k",
        "5",
        "--seed",
        "1",
    )
    assert batch.stdout.count("--- sample") == 2

    full = run("generate", str(checkpoint), "--prompt", "ROMEO:\\n", "--max-new-tokens", "60", "--temperature", "0")
    stopped = run(
        "generate",
        str(checkpoint),
        "--prompt",
        "ROMEO:\\n",
        "--max-new-tokens",
        "60",
        "--temperature",
        "0",
        "--stop",
        "\\n",
        "--stop",
        "e",
    )  # typed as backslash-n, as in a shell
    completion = full.stdout.removeprefix("ROMEO:\n").removesuffix("\n")
    expected = re.split("\n|e", completion)[0]
    assert len(expected) < len(completion)  # a stop string did occur
    assert stopped.stdout == "ROMEO:\n" + expected + "\n"

    info = json.loads(run("info", str(checkpoint)).stdout)
    assert info["tokenizer"] == {"kind": "char", "vocab_size": 65}
    assert info["params"] > 0 and info["train_flops_per_token"] > 6 * info["params_non_embedding"]


def test_help_lists_every_option_with_its_default() -> None:
    flat = " ".join(run("train", "--help").stdout.split())  # argparse wraps lines at the terminal width
    entries = {entry.split(" ")[0]: entry for entry in flat.split(" --")}  # the help entry comes after the usage
    for key, (_, default) in all_keys().items():
        assert "(default: " in entries[key], key
        if default is not None:
            assert f"(default: {default})" in entries[key], key
    assert "--train.lr FLOAT the peak learning rate, reached after warm-up (default: 0.001)" in flat
    assert "--model.family gpt2|llama" in flat and "--model.positions learned|rope" in flat
    assert "(default: set by model.family)" in flat


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model.n_layr", "4"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["train", "--modle.n_layer", "4"], "did you mean"),
        (["train", "--model.n_layer", "x"], "'model.n_layer' expects int"),
        (["train", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["eval", "no/such/ckpt"], "checkpoint folder 'no/such/ckpt' does not exist"),
        (["generate", "no/such/ckpt", "--prompt", "x"], "does not exist"),
        (["train", "--data.path", "no/such/file.txt"], "no/such/file.txt"),
        (["train", "--train.lr"], "argument --train.lr: expected one argument"),
        (["eval"], "the following arguments are required: checkpoint"),
        (["eval", "ckpt", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["generate", "ckpt", "--prompt", "ROMEO\\"], "bad backslash escape"),
        (["train", "--train.device", "cuda:7"], "no CUDA GPU"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str) -> None:
    proc = run(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"llmmo( \w+)*: error: ", lines[0]) and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_checkpoint_is_one_clear_line(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run("generate", str(broken), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr


def test_resume_from_the_command_line_continues_the_saved_run(data_dir: Path, tmp_path: Path) -> None:
    """`llmmo train --train.out_dir X --train.resume true` needs no other option: the run's config.yaml is the base."""
    out = tmp_path / "run"
    run(
        "train",
        "--data.source",
        "wikitext-2",
        "--data.train_split",
        "test",
        "--data.val_split",
        "valid",
        "--data.tokenizer",
        "word",
        "--data.vocab_size",
        "500",
        *TINY,
        "--train.max_steps",
        "4",
        "--train.eval_every",
        "2",
        "--train.out_dir",
        str(out),
    )
    proc = run("train", "--train.out_dir", str(out), "--train.resume", "true", "--train.max_steps", "6")
    assert "wikitext-2" in proc.stderr and "step 6" in proc.stdout
    assert "tokenizer: word" in (out / "config.yaml").read_text()
    refused = run("train", "--train.out_dir", str(out), "--train.resume", "true", "--model.n_layer", "3", check=False)
    assert refused.returncode == 2 and "model.n_layer is 3 but the run" in refused.stderr


def test_epoch_runs_print_pytorch_example_lines(data_dir: Path, tmp_path: Path) -> None:
    proc = run(
        "train",
        "--config",
        "configs/seed-wikitext2.yaml",
        "--data.train_split",
        "test",
        "--data.val_split",
        "valid",
        "--model.n_layer",
        "1",
        "--model.n_embd",
        "32",
        "--model.n_head",
        "2",
        "--train.epochs",
        "1",
        "--train.batch_size",
        "64",
        "--train.log_every",
        "20",
        "--train.eval_batches",
        "4",
        "--train.out_dir",
        str(tmp_path / "w"),
    )
    lines = re.findall(r"Train Epoch: 1 \[(\d+)/(\d+) \((\d+)%\)\]  Loss: \d+\.\d{6}", proc.stdout)
    assert len(lines) >= 3
    done, total, pct = map(int, lines[-1])
    assert done == total and pct == 100
    assert re.search(r"Validation Epoch: 1  val loss \d+\.\d{4}  ppl", proc.stdout)
