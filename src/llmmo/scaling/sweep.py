"""A compute-budget sweep: for each FLOP budget C and each model size of the depth dial, one training run of
D = C / (training FLOPs per token) tokens, and its final validation loss, in a ledger.

Sizes: `model.depth` k gives n_layer = k, n_embd = aspect * k (the base config's `model.aspect`). `auto` picks,
per budget, the `points` depths whose parameter count is nearest to the budget's Chinchilla point (20 tokens
per parameter by default; small char-level models want far more), so that each IsoFLOP curve brackets its
minimum. Learning rates scale with width as muP
prescribes for Adam's hidden matrices (Yang et al. 2022): lr = base lr * base width / width.

The ledger (ledger.jsonl, one run per line, and ledger.csv) is written as runs finish; a sweep started again
skips the runs already in it, and starts a run that was cut short afresh.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmmo.config import Config, resolve_config, resolve_model
from llmmo.errors import ConfigError, DivergedError
from llmmo.fileio import complete_json_lines, write_text_atomic
from llmmo.model import Transformer

TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: where the sizes of a budget are centred


@dataclass
class SweepConfig:
    budgets: list[float]  # training FLOPs per run (the model's own count, attention included)
    depths: list[int] = field(default_factory=list)  # sizes by the depth dial; empty: auto
    points: int = 3  # auto: sizes per budget
    max_depth: int = 16  # auto: the largest depth considered
    min_steps: int = 20  # a run shorter than this many optimizer steps is left out (too short to mean much)
    tokens_per_param: float = TOKENS_PER_PARAM  # auto: sizes are centred where D / N is this

    def __post_init__(self) -> None:
        # said here: plan_runs would read an empty or negative list as "no run reaches min_steps"
        if not self.budgets:
            raise ConfigError("--budgets is empty; give training FLOPs per run, comma-separated (e.g. 1e12,3e12)")
        bad = [b for b in self.budgets if not (math.isfinite(b) and b > 0)]
        if bad:
            raise ConfigError(f"--budgets must be positive numbers of training FLOPs (e.g. 1e12), got {bad[0]}")
        if any(d < 1 for d in self.depths):
            raise ConfigError(f"--sizes: a depth must be positive (1 layer or more), got {min(self.depths)}")
        if not (math.isfinite(self.tokens_per_param) and self.tokens_per_param > 0):
            raise ConfigError(f"--tokens-per-param must be a positive number (e.g. 20), got {self.tokens_per_param}")


def parse_sizes(text: str) -> list[int]:
    """--sizes: 'auto' (an empty list) or comma-separated depths of the depth dial."""
    if text.strip() == "auto":
        return []
    try:
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes takes auto or comma-separated depths like 1,2,3; got {text!r}") from None
    if not depths:
        raise ConfigError("--sizes is empty; give depths like 1,2,3, or auto")
    return depths


def _model_at(base: Config, depth: int) -> Any:
    return resolve_model(dataclasses.replace(base.model, depth=depth, n_kv_head=None, mlp_hidden=0, head_dim=0))


def shape_of(base: Config, depth: int) -> dict[str, int]:
    """Parameters (all, non-embedding) and training FLOPs per token of the dial at `depth` (on the meta device)."""
    with torch.device("meta"):
        model = Transformer(_model_at(base, depth))
    return {
        "params": model.num_params(),
        "params_nonembedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(base.data.block_size),
        "n_layer": model.cfg.n_layer,
        "n_embd": model.cfg.n_embd,
    }


def plan_runs(base: Config, sweep: SweepConfig) -> list[dict[str, Any]]:
    """The grid: one entry per (budget, depth) with its steps, learning rate, and whether its tokens exceed
    the training split (the run then reads some data again)."""
    from llmmo.data import prepare_data

    base = resolve_config(base)
    data = prepare_data(base.data, splits=(base.data.train_split,))
    train_tokens = len(data.splits[base.data.train_split])
    base.model.vocab_size = base.model.vocab_size or data.tokenizer.vocab_size  # as training will find it
    tokens_per_step = base.train.batch_size * base.train.grad_accum * base.data.block_size
    shapes = {k: shape_of(base, k) for k in (sweep.depths or range(1, sweep.max_depth + 1))}
    runs = []
    for budget in sweep.budgets:
        depths = sweep.depths
        if not depths:  # the sizes nearest (in log N) to N = sqrt(C / (6 * tokens per parameter))
            center = math.sqrt(budget / (6 * sweep.tokens_per_param))
            by_distance = sorted(shapes, key=lambda k: abs(math.log(shapes[k]["params_nonembedding"] / center)))
            depths = sorted(by_distance[: sweep.points])
        for depth in depths:
            shape = shapes[depth]
            steps = int(budget / shape["flops_per_token"] / tokens_per_step)
            if steps < sweep.min_steps:
                continue
            runs.append(
                {
                    "run": f"c{budget:.4g}-d{depth}".replace("+", ""),
                    "budget": budget,
                    "depth": depth,
                    "steps": steps,
                    "lr": base.train.lr * base.model.n_embd / shape["n_embd"],
                    "repeats_data": steps * tokens_per_step > train_tokens,
                }
                | shape
            )
    if not runs:
        raise ConfigError(
            f"no run of the sweep reaches {sweep.min_steps} steps: raise --budgets or lower train.batch_size"
        )
    return runs


LEDGER_FIELDS = ("budget", "params_nonembedding", "tokens", "flops", "val_loss", "tok_per_s")  # what a fit reads


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """The runs recorded in a ledger.jsonl (or its sweep folder); a line cut short by a crash is skipped. A row
    without the fields of a sweep's runs is refused, naming its line."""
    path = Path(path)
    path = path / "ledger.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no ledger at '{path}'; run `llmmo scale sweep` first, or pass its folder")
    return [_checked(row, number, path) for number, row in complete_json_lines(path)]


def _checked(row: Any, number: int, path: Path) -> dict[str, Any]:
    """The row on line `number`, if it has what a fit reads (the run's name and its numbers)."""
    where = f"row {number} of {path}"
    fix = "it is not a sweep ledger; pass the ledger.jsonl that `llmmo scale sweep` wrote"
    if not isinstance(row, dict):
        raise ConfigError(f"{where} is not a JSON object: {fix}")
    missing = [k for k in ("run", *LEDGER_FIELDS) if k not in row]
    if missing:
        raise ConfigError(f"{where} lacks field '{missing[0]}': {fix}")
    numbers = [k for k in LEDGER_FIELDS if not (k == "val_loss" and "diverged" in row)]  # a diverged run has none
    bad = [k for k in numbers if isinstance(row[k], bool) or not isinstance(row[k], int | float)]
    if bad:
        raise ConfigError(f"{where}: field '{bad[0]}' is {row[bad[0]]!r}, not a number; correct the row")
    return row


def finished_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of runs that did not diverge: what fits, plots and plans read."""
    return [r for r in rows if "diverged" not in r]


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))  # a diverged run's row has one more
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def sweep(
    base: Config,
    config: SweepConfig,
    out: str | Path,
    progress: Callable[[dict, int, int], None] | None = None,
    runs: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run the grid into `out` (runs/NAME/ per run, ledger.jsonl and ledger.csv); returns the ledger's rows.

    `runs` is `plan_runs(base, config)`, planned here unless the caller has it already; `progress(row, done,
    total)` is called after each run (the CLI's bar)."""
    from llmmo.train import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = out / "ledger.jsonl"
    done = {r["run"]: r for r in read_ledger(ledger)} if ledger.is_file() else {}
    runs = runs if runs is not None else plan_runs(base, config)
    for i, run in enumerate(runs):
        if run["run"] in done:
            continue
        folder = out / "runs" / run["run"]
        shutil.rmtree(folder, ignore_errors=True)  # a run cut short starts over
        cfg = dataclasses.replace(
            base,
            model=_model_at(base, run["depth"]),
            train=dataclasses.replace(
                base.train,
                lr=run["lr"],
                min_lr=run["lr"] / 10,
                warmup_steps=max(1, min(base.train.warmup_steps, run["steps"] // 10)),
                max_steps=run["steps"],
                max_tokens=0,
                epochs=0,
                max_minutes=0.0,
                target_loss=0.0,
                eval_every=run["steps"],
                log_every=max(1, run["steps"] // 10),
                out_dir=str(folder),
                resume=False,
            ),
        )
        trainer = Trainer(cfg)
        diverged = {}
        try:
            val_loss = trainer.run().last_eval["val_loss"]
        except DivergedError as e:  # recorded, so that a resumed sweep does not run it again; fits leave it out
            val_loss, diverged = None, {"diverged": e.detail}
        row = (
            run
            | {
                "tokens": trainer.tokens,
                "flops": trainer.tokens * trainer.flops_per_token,
                "val_loss": val_loss,
                "time_s": trainer.elapsed(),
                "tok_per_s": trainer.tokens / max(trainer.elapsed(), 1e-9),
            }
            | diverged
        )
        with ledger.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[row["run"]] = row
        _write_csv(list(done.values()), out / "ledger.csv")
        if progress is not None:
            progress(row, i + 1, len(runs))
    return [done[r["run"]] for r in runs if r["run"] in done]
