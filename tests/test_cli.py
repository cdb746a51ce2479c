"""The `llmmo` command end to end, as a user runs it: train, eval, generate, info, and its errors."""

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llmmo import cli
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


# ------------------------------------------------------------------------------------- bad input, in process


def _copy(checkpoint: Path, tmp: Path, edit: Callable[[Path], None] = lambda folder: None) -> str:
    """A copy of the checkpoint, edited."""
    shutil.copytree(checkpoint, tmp / "copy")
    edit(tmp / "copy")
    return str(tmp / "copy")


def _file(path: Path, content: bytes = b"x") -> str:
    path.write_bytes(content)
    return str(path)


def _shape(folder: Path) -> None:
    """config.json says another width than the weights have."""
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["n_embd"] *= 2
    (folder / "config.json").write_text(json.dumps(meta))


def _other_tokenizer(folder: Path) -> None:
    from llmmo.tokenizer import train_tokenizer

    train_tokenizer("bpe", ["some other text entirely"], 300).save(folder / "tokenizer.json")


BAD_INPUTS = {
    "an option of another command": (
        lambda c, t: ["eval", str(c), "--data.path", "x"],
        "llmmo eval does not take --data.path",
    ),
    "export into an unwritable place": (lambda c, t: ["export", str(c), "/proc/llmmo/hf"], "give a path whose folder"),
    "import of an llmmo checkpoint": (
        lambda c, t: ["import", str(c), str(t / "out")],
        "is an llmmo checkpoint already",
    ),
    "a tokenizer over an existing file": (
        lambda c, t: ["tokenizer", "train", "--out", _file(t / "tok.json")],
        "exists; choose another path, or pass --overwrite",
    ),
    "a tokenizer into a folder": (lambda c, t: ["tokenizer", "train", "--out", str(t)], "is a folder; give the file"),
    "a run folder that is a file": (
        lambda c, t: ["train", "--train.out_dir", _file(t / "f")],
        "--train.out_dir '.*' is a file",
    ),
    "a recipe that is a folder": (lambda c, t: ["train", "--config", str(t)], "is a folder; pass a YAML recipe"),
    "a recipe that is not UTF-8": (
        lambda c, t: ["train", "--config", _file(t / "r.yaml", b"model: \xff\xfe\n")],
        "is not UTF-8 text",
    ),
    "a checkpoint that is a file": (lambda c, t: ["info", str(c / "config.json")], "is a file; pass a checkpoint"),
    "a config.json that is a list": (
        lambda c, t: ["info", _copy(c, t, lambda f: (f / "config.json").write_text("[]"))],
        "is not a JSON object",
    ),
    "another model's tokenizer": (
        lambda c, t: ["eval", _copy(c, t, _other_tokenizer), "--max-batches", "1"],
        "is not this checkpoint's tokenizer",
    ),
    "weights of another shape": (
        lambda c, t: ["info", _copy(c, t, _shape)],
        r"do not fit its config.json \(size mismatch for .*; the folder mixes files",
    ),
    "a NaN temperature": (
        lambda c, t: ["generate", str(c), "--prompt", "x", "--temperature", "nan"],
        "temperature must be >= 0 and finite",
    ),
    "a seed past 64 bits": (
        lambda c, t: ["generate", str(c), "--prompt", "x", "--seed", str(2**80)],
        "seed must be a 64-bit integer",
    ),
    "an empty task file": (
        lambda c, t: ["eval", str(c), "--task", "exact", "--file", _file(t / "empty.jsonl", b"")],
        "holds no examples",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_fix(case: str, checkpoint: Path, tmp_path: Path, capsys) -> None:
    args, message = BAD_INPUTS[case]
    code = cli.main(args(checkpoint, tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmmo: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert (checkpoint / "model.safetensors").is_file()  # the good checkpoint is untouched


def test_debug_before_the_command_counts() -> None:
    assert cli.build_parser().parse_known_args(["--debug", "info", "x"])[0].debug is True
    assert cli.build_parser().parse_known_args(["info", "x"])[0].debug is False


def test_classify_names_standard_input_that_is_not_utf8(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good text\n\xff\xfe bad\n")))
    assert cli.main(["classify", "no/checkpoint/needed"]) == 2
    assert "standard input is not UTF-8 text (byte 10)" in capsys.readouterr().err


def test_export_and_import_never_replace_the_folder_they_convert(checkpoint: Path, tmp_path: Path, capsys) -> None:
    copy = _copy(checkpoint, tmp_path)
    assert cli.main(["export", copy, copy, "--overwrite"]) == 2
    assert cli.main(["export", copy, str(tmp_path), "--overwrite"]) == 2  # a folder that holds it
    assert "holds the folder being converted" in capsys.readouterr().err
    assert "llmmo_version" in json.loads((tmp_path / "copy" / "config.json").read_text())  # still llmmo's
    pytest.importorskip("transformers")
    assert cli.main(["export", copy, str(tmp_path / "hf")]) == 0
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "hf"), "--overwrite"]) == 2
    assert "holds the folder being converted" in capsys.readouterr().err
    assert "model_type" in json.loads((tmp_path / "hf" / "config.json").read_text())  # still transformers'


def test_eval_names_skipped_task_rows_and_reads_files_in_their_encoding(checkpoint: Path, tmp_path: Path, capsys):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "ROMEO:", "response": "JULIET"}\nnot json\n', encoding="utf-8")
    args = ["eval", str(checkpoint), "--task", "exact", "--file", str(rows), "--max-new-tokens", "4"]
    assert cli.main(args + ["--skip-bad-rows"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 1 and f"skipped {rows}:2: " in captured.err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ROMEO: caf\xe9 and more words to score.\n".encode("latin-1"))
    assert cli.main(["eval", str(checkpoint), "--file", str(latin)]) == 2  # not UTF-8: names --encoding
    assert "(llmmo eval: --encoding)" in capsys.readouterr().err
