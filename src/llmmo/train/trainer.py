"""The training loop: batches -> model -> loss -> optimizer, with evaluation, checkpoints and a budget.

The loop is deterministic given the config: batches are a pure function of (seed, step, micro-step), and
the RNG state (dropout) travels in the checkpoint, so a resumed run repeats the uninterrupted run's losses.
Under torchrun the same loop runs in every process (llmmo.distributed): each takes its share of the step's
batch, gradients are reduced once per step, and rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from llmmo.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from llmmo.config import Config, TrainConfig, config_to_dict, resolve_config, resolve_model
from llmmo.cpu import cpu_vendor, keep_freed_memory, mkl_fast_path
from llmmo.data import EpochWindows, PreparedData, RandomWindows, prepare_data
from llmmo.distributed import (
    World,
    full_optimizer_state,
    full_weights,
    gradient_sync,
    init_world,
    load_full_optimizer_state,
    parallelize,
    total_norm,
)
from llmmo.errors import CheckpointError, ConfigError, DivergedError
from llmmo.evaluate import evaluate
from llmmo.fileio import absolute_path, previous_folder, write_text_atomic
from llmmo.model import Transformer
from llmmo.onednn import onednn_linears
from llmmo.tokenizer import Tokenizer
from llmmo.train.metrics import MetricsLog
from llmmo.train.optim import build_optimizer, lr_at

# What defines the run's trajectory beyond shape and data: a resumed run must keep these. The batch size is
# compared as the step's global batch (batch_size x processes): a run may resume on another number of processes.
RUN_KEYS = ("sampler", "seed", "global_batch_size", "grad_accum", "optimizer")


class Reporter:
    """Receives what the trainer measures, for display; the CLI's progress bar is one. This base ignores all."""

    def start(self, info: dict[str, Any]) -> None: ...

    def train_step(self, record: dict[str, Any]) -> None: ...

    def evaluation(self, record: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens: int
    flops: int
    best_val_loss: float
    last_eval: dict[str, Any]
    interrupted: bool  # stopped by Ctrl-C after a complete step, saved to ckpt-latest


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but this torch sees no CUDA GPU; use cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' asked for, but MPS is not available here; use cpu (or auto)")
    return device


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """bf16 on GPUs that run it fast ('auto'), or when asked ('bf16'); fp32 otherwise. CPUs without bf16 matrix
    units run it ~100x slower than fp32, hence fp32 there by default."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where `uses_bf16`, else nothing (fp32)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_onednn(t: TrainConfig, device: torch.device, bf16: bool) -> bool:
    """Whether linear layers take oneDNN's products (`train.matmul`; CPU only). auto: where that was measured
    faster, an AMD CPU whose MKL runs its generic path, in fp32 without compile; with MKL's own kernels
    (llmmo.cpu) torch's products are the faster (docs/LOG.md)."""
    if device.type != "cpu":
        return False
    if t.matmul != "auto":
        return t.matmul == "onednn"
    return cpu_vendor() == "AuthenticAMD" and not mkl_fast_path() and not bf16 and not t.compile


def _optimizer_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, world: World
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Split the optimizer state into JSON (hyper-parameters) and tensors (moments by parameter name), for
    safetensors; empty on ranks other than 0. A collective under FSDP (the moments are gathered whole)."""
    full = full_optimizer_state(model, opt, world)
    state = full.get("state", {})  # empty on ranks other than 0 under FSDP
    tensors = {f"optim.{name}.{key}": value for name, moments in state.items() for key, value in moments.items()}
    return full.get("param_groups", []), tensors


def _restore_optimizer(
    model: torch.nn.Module, opt: torch.optim.Optimizer, groups: list[dict], tensors: dict[str, torch.Tensor]
) -> None:
    """Load the saved moments; the hyper-parameters stay those of this run's config (a resumed run may change
    its learning rates or weight decay; unchanged, they are the saved ones)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, moment = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(name, {})[moment] = value
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    load_full_optimizer_state(model, opt, {"state": state, "param_groups": groups})
    for group, hyper in zip(opt.param_groups, fresh, strict=True):
        group.update(hyper)


class Trainer:
    """One training run. `run()` trains until the budget is spent (or Ctrl-C) and returns a TrainResult.

    `start` trains a given model (with its tokenizer) instead of fresh weights: recovery after compression, a
    fine-tune; `tokenizer` gives fresh weights a given tokenizer (a distilled student shares its teacher's).
    Subclasses change the objective through `compute_loss` (distillation).
    """

    resumable = True  # whether --train.resume can continue a run of this kind (fine-tunes save no optimizer state)

    def __init__(
        self,
        cfg: Config,
        reporter: Reporter | None = None,
        start: Checkpoint | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        self.cfg = resolve_config(cfg)
        self.reporter = reporter or Reporter()
        t = self.cfg.train
        self.out_dir = Path(t.out_dir)
        self.world, self.device = init_world(pick_device(t.device), t.dist_timeout_s)
        if self.world.size > 1 and t.parallel == "fsdp" and t.optimizer == "muon":
            raise ConfigError(
                "train.optimizer=muon orthogonalizes whole matrices, which FSDP shards over the processes; "
                "use --train.parallel ddp with muon, or --train.optimizer adamw with fsdp"
            )
        self.autocast = autocast_for(self.device, t.dtype)
        if self.device.type == "cpu":  # each step's tensors reuse the last step's memory (llmmo.cpu)
            keep_freed_memory()
        resumed = self._load_resume_checkpoint()
        if start is not None and resumed is not None:
            raise ConfigError("a run either resumes (train.resume) or starts from a given model, not both")
        source = resumed or start
        torch.manual_seed(t.seed)  # the same on every rank: the initial weights must agree

        self.data: PreparedData = self._prepare_data(source.tokenizer if source else tokenizer)
        if start is not None:
            self.cfg.model = start.model.cfg
        self.cfg.model = resolve_model(dataclasses.replace(self.cfg.model, vocab_size=self._vocab_size()))
        self.model = source.model.train() if source else Transformer(self.cfg.model)
        self.model.to(self.device)
        if self.world.rank > 0:  # dropout draws its own masks on each rank; rank 0 keeps the one-process stream
            torch.manual_seed(t.seed + 1_000_003 * self.world.rank)
        bf16 = uses_bf16(self.device, t.dtype)
        if uses_onednn(t, self.device, bf16):  # a CPU fp32 model only (onednn_linears leaves others as they are)
            onednn_linears(self.model)
        self.forward = parallelize(self.model, t.parallel, self.world, self.device, bf16)
        self.forward = torch.compile(self.forward) if t.compile else self.forward
        self.optimizer = build_optimizer(self.model, t)
        self.token_bytes = self.data.tokenizer.token_bytes()

        self.sampler = self._make_sampler()
        # a step's tokens when every row is a full window (fine-tunes count each batch's own length instead)
        self.tokens_per_step = t.batch_size * t.grad_accum * self.world.size * self.cfg.data.block_size
        self.total_steps = self._total_steps()
        self.flops_per_token = self.model.flops_per_token(self.cfg.data.block_size)

        self.step, self.tokens, self.best_val_loss, self.elapsed_before = 0, 0, math.inf, 0.0
        self.evaluated_at = -1  # the step of the last evaluation
        self.stop_requested, self.time_up = False, False  # train_step reads them (benchmarks call it alone)
        self.resumed = resumed is not None
        if resumed:
            self._restore(resumed)
            if self.step > self.total_steps:
                raise ConfigError(
                    f"--train.resume: the run in '{self.out_dir}' is at step {self.step}, past this budget's "
                    f"{self.total_steps} steps; raise --train.max_steps (or max_tokens / epochs) to continue it"
                )

    def _weights_finite(self) -> bool:
        """Whether every weight is finite, on every rank (under FSDP each checks its own shards)."""
        params = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters())
        local = all(bool(torch.isfinite(p).all()) for p in params)
        return self.world.sum([float(not local)])[0] == 0

    def _calmer(self) -> str:
        """What to do when the run diverged (before it saved anything non-finite)."""
        fix = "lower --train.lr (or raise --train.warmup_steps)"
        again = "then resume with --train.resume true, or start again" if self.resumable else "then start again"
        return f"the checkpoints hold the last finite evaluation's state (if any): {fix}, {again}"

    def _make_sampler(self) -> EpochWindows | RandomWindows:
        """What `train_step` draws its batches from: `batch(step, micro)` -> (x, y)."""
        t = self.cfg.train
        sampler_cls = EpochWindows if t.sampler == "epoch" else RandomWindows
        return sampler_cls(
            self.data.splits[self.cfg.data.train_split].tokens,
            self.cfg.data.block_size,
            t.batch_size,
            t.seed,
            rank=self.world.rank,
            world_size=self.world.size,
            grad_accum=t.grad_accum,
        )

    def _prepare_data(self, tokenizer: Tokenizer | None) -> PreparedData:
        """Tokenize (or read the cache): the first process of each machine first, then the others read the cache
        it wrote (the cache is per machine)."""
        first = self.world.local_rank == 0
        if not first:
            self.world.barrier()
        data = prepare_data(self.cfg.data, tokenizer=tokenizer)
        if first:
            self.world.barrier()
        return data

    def _vocab_size(self) -> int:
        """The tokenizer's size, or a larger model.vocab_size (padding the vocabulary to a multiple of 64 makes
        the output matmul faster on GPUs, as nanoGPT's 50304 does)."""
        needed = self.data.tokenizer.vocab_size
        if self.cfg.model.vocab_size and self.cfg.model.vocab_size < needed:
            raise ConfigError(
                f"model.vocab_size {self.cfg.model.vocab_size} is smaller than the tokenizer's {needed}; "
                "leave it 0 to follow the tokenizer"
            )
        return self.cfg.model.vocab_size or needed

    def _load_resume_checkpoint(self) -> Checkpoint | None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--train.out_dir '{self.out_dir}' is a file; give the folder to write the run in")
        latest = self.out_dir / "ckpt-latest"
        # a save cut short between its two renames left the run's last checkpoint parked beside it
        saved = latest.exists() or previous_folder(latest).exists()
        if not self.cfg.train.resume:
            if saved:
                resume = "pass --train.resume true to continue it, or " if self.resumable else ""
                raise ConfigError(f"'{self.out_dir}' already holds a run; {resume}choose another --train.out_dir")
            return None
        if not saved:
            raise ConfigError(f"--train.resume: no checkpoint at '{latest}'; train without resume first")
        ckpt = load_checkpoint(latest, trainer_state=True)  # a parked one: says how to put it back
        self._check_same_run(ckpt)
        self.cfg.model = ckpt.model.cfg
        return ckpt

    def _check_same_run(self, ckpt: Checkpoint) -> None:
        """A resumed run must be the run that was saved: same shape, data and batches. Budgets, schedule and
        logging may change (e.g. a larger max_steps extends a run)."""
        model = resolve_model(dataclasses.replace(self.cfg.model, vocab_size=ckpt.model.cfg.vocab_size))
        saved = ckpt.trainer_state["json"].get("run", {})
        # data first: a changed data.block_size should be named as such, not as the model.block_size it implies
        # (data.path: absolute now, relative in runs saved by earlier versions)
        saved_data = dataclasses.replace(ckpt.data, path=ckpt.data.path and absolute_path(ckpt.data.path))
        pairs = [(f"data.{k}", v, getattr(saved_data, k)) for k, v in dataclasses.asdict(self.cfg.data).items()]
        if "global_batch_size" not in saved and "batch_size" in saved:  # saved by one process before this key
            saved = saved | {"global_batch_size": saved["batch_size"]}
        label = {"global_batch_size": "batch_size x processes"}
        pairs += [(f"train.{label.get(k, k)}", self._run_keys()[k], saved.get(k)) for k in RUN_KEYS]
        pairs += [(f"model.{k}", v, getattr(ckpt.model.cfg, k)) for k, v in dataclasses.asdict(model).items()]
        for key, now, before in pairs:
            if now != before and key not in ("model.depth", "data.val_split"):
                raise ConfigError(
                    f"--train.resume: {key} is {now!r} but the run in '{self.out_dir}' used {before!r}; continue "
                    "it with the values it used (its config.yaml holds them), or start a new run with another "
                    "--train.out_dir"
                )

    def _restore(self, ckpt: Checkpoint) -> None:
        state, tensors = ckpt.trainer_state["json"], ckpt.trainer_state["tensors"]
        saved, now = state.get("train_tokens"), self._train_tokens()  # absent from checkpoints of older versions
        if saved is not None and saved != now:
            raise ConfigError(
                f"--train.resume: the training text now has {now:,} tokens, but the run in '{self.out_dir}' trained "
                f"on {saved:,}: the corpus changed. Put back the text it was trained on to continue the run, or "
                "start a new one with another --train.out_dir"
            )
        try:
            self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
            self.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
            self.evaluated_at = state.get("evaluated_at", -1)  # absent from checkpoints of older versions
            _restore_optimizer(self.model, self.optimizer, state["optimizer"], tensors)
            # each rank's own random stream (dropout); a rank the run did not have (more processes now, or a
            # checkpoint that kept rank 0's alone) draws from a seed of its own
            rank = "" if self.world.rank == 0 else f".{self.world.rank}"
            if f"rng.cpu{rank}" in tensors:
                torch.set_rng_state(tensors[f"rng.cpu{rank}"])
            else:
                torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.world.rank + self.step)
            if self.device.type == "cuda" and f"rng.cuda{rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda{rank}"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"the trainer state in '{self.out_dir / 'ckpt-latest'}' is damaged ({type(e).__name__}: {e}); "
                "resume from a copy of ckpt-best instead, or start a new run"
            ) from None

    def _total_steps(self) -> int:
        """The tightest of the budgets that are set (0 means unset); max_minutes may end the run sooner."""
        t = self.cfg.train
        limits = [t.max_steps] if t.max_steps > 0 else []
        if t.epochs > 0:
            limits.append(t.epochs * self.sampler.optimizer_steps_per_epoch)
        if t.max_tokens > 0:
            limits.append(math.ceil(t.max_tokens / self.tokens_per_step))
        return min(limits)

    def _train_tokens(self) -> int | None:
        """The length of the training split in tokens (None for a fine-tune's examples): a resumed run checks that
        its text did not change."""
        split = self.data.splits.get(self.cfg.data.train_split)
        return None if split is None else len(split)

    def _run_keys(self) -> dict[str, Any]:
        t = self.cfg.train
        keys = {k: getattr(t, k) for k in RUN_KEYS if hasattr(t, k)}
        return keys | {"global_batch_size": t.batch_size * self.world.size}

    def _trainer_state(self) -> dict[str, Any]:
        groups, tensors = _optimizer_state(self.model, self.optimizer, self.world)
        streams = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            streams["cuda"] = torch.cuda.get_rng_state()
        for device, stream in streams.items():  # every rank's (a collective): rank 0's as rng.cpu, rank r's rng.cpu.r
            for rank, state in enumerate(self.world.gather(stream)):
                tensors[f"rng.{device}" + (f".{rank}" if rank else "")] = state
        json_state = {
            "step": self.step,
            "tokens": self.tokens,
            "flops": self.tokens * self.flops_per_token,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "evaluated_at": self.evaluated_at,
            "train_tokens": self._train_tokens(),
            "elapsed_s": self.elapsed(),
            "run": self._run_keys() | {"processes": self.world.size},
            "optimizer": groups,
        }
        return {"json": json_state, "tensors": tensors}

    def save(self, name: str) -> None:
        """Write a checkpoint of whole tensors: every rank gathers (under FSDP), rank 0 writes, all wait for it."""
        weights, state = full_weights(self.model, self.world), self._trainer_state()
        if self.world.is_main:
            save_checkpoint(self.out_dir / name, self.model, self.data.tokenizer, self.cfg.data, state, weights)
        self.world.barrier()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _counters(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "flops": self.tokens * self.flops_per_token,
            "time_s": round(self.elapsed(), 3),
        }

    def validate(self) -> dict[str, Any]:
        """The evaluation record of the val split: val_loss (what ckpt-best minimises) and other val_ fields."""
        t = self.cfg.train
        val = evaluate(
            self.model,
            self.data.splits[self.cfg.data.val_split],
            self.token_bytes,
            batch_size=t.batch_size * self.world.size,  # the global batch: the same windows on any number of ranks
            max_batches=t.eval_batches,
            device=self.device,
            autocast=self.autocast,
            world=self.world,
            block_size=self.cfg.data.block_size,  # the windows it trains on (the model's context may be longer)
        )
        record = val.as_dict(prefix="val_")
        del record["val_tokens"], record["val_bytes"]
        return record

    def _data_info(self) -> dict[str, Any]:
        """What the reporter shows of the data when the run starts."""
        train, val = (len(self.data.splits[getattr(self.cfg.data, k)]) for k in ("train_split", "val_split"))
        return {"data": f"{self.data.source}, {self.data.tokenizer!r}, {train:,} train / {val:,} val tokens"}

    def evaluate_and_save(self) -> dict[str, Any]:
        """Evaluate on the val split, record it, and write ckpt-latest (and ckpt-best when it improved)."""
        record = self._counters() | self.validate()
        if not math.isfinite(record["val_loss"]):
            raise DivergedError(f"training diverged by step {self.step}: val loss {record['val_loss']}", self._calmer())
        self.evaluated_at = self.step
        self.metrics.write(record)
        improved = record["val_loss"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, record["val_loss"])
        self.save("ckpt-latest")
        if improved:
            self.save("ckpt-best")
        self.reporter.evaluation(record | {"best_val_loss": self.best_val_loss} | self._epoch_fields())
        return record

    def _epoch_fields(self) -> dict[str, Any]:
        if self.cfg.train.sampler != "epoch":
            return {}
        per_epoch = self.sampler.optimizer_steps_per_epoch
        epoch, done = divmod(self.step, per_epoch)
        if done == 0 and self.step > 0:  # the last step of an epoch belongs to it
            epoch, done = epoch - 1, per_epoch
        samples = self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world.size
        return {"epoch": epoch + 1, "epoch_samples": done * samples, "epoch_total": per_epoch * samples}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the training record."""
        t = self.cfg.train
        lr = lr_at(self.step, t, self.total_steps)
        for group in self.optimizer.param_groups:  # the schedule scales each group's own peak lr
            group["lr"] = group["base_lr"] * lr / t.lr
        loss_sum, tokens = 0.0, 0
        time_up = t.max_minutes > 0 and self.elapsed() >= 60 * t.max_minutes
        batches = [self.sampler.batch(self.step, micro) for micro in range(t.grad_accum)]
        # Each micro-batch's loss is the mean over its targets (-1: none). Weighted by its share of all the
        # step's targets on every rank, the step's loss and gradient are the mean over those targets whatever
        # grad_accum and the number of processes (DDP averages gradients over ranks, hence x world size): a
        # fine-tune's rows have different numbers of targets. For full windows the weights are 1 / grad_accum.
        targets = [int((y >= 0).sum()) for _, y in batches]
        (all_targets,) = self.world.sum([sum(targets)])
        for micro, ((x, y), n) in enumerate(zip(batches, targets, strict=True)):
            tokens += x.numel()  # block_size per row for windows; a task batch's own (padded) length
            weight = n * self.world.size / max(all_targets, 1)
            x, y = x.to(self.device), y.to(self.device)
            with gradient_sync(self.forward, enabled=micro == t.grad_accum - 1):
                with self.autocast:
                    loss = self.compute_loss(x, y)
                (loss * weight).backward()
            if n:  # a micro-batch without targets has a NaN mean (0 / 0); its gradient is zero
                loss_sum += loss.item() * weight
        # the mean loss over the step's whole batch, and whether any rank must stop (Ctrl-C, its clock): every
        # rank then leaves the loop after the same step, and no rank waits in a collective the others skip
        loss_sum, interrupted, times_up = self.world.sum([loss_sum / self.world.size, self.stop_requested, time_up])
        self.stop_requested, self.time_up = interrupted > 0, times_up > 0
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # the same on every rank (all-reduced)
            detail = (
                f"training diverged at step {self.step + 1}: loss {loss_sum}, gradient norm {grad_norm} (lr {lr:.3g})"
            )
            raise DivergedError(detail, self._calmer())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens * self.world.size
        return {"train_loss": loss_sum, "lr": lr, "grad_norm": grad_norm}

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective of one micro-batch: next-token cross-entropy."""
        return self.forward(x, y)[1]

    def _budget_left(self) -> bool:
        t = self.cfg.train
        if t.target_loss > 0 and self.best_val_loss <= t.target_loss:
            return False
        return self.step < self.total_steps and not self.time_up

    def _should_evaluate(self) -> bool:
        if self.cfg.train.sampler == "epoch":  # once per epoch
            return self.step % self.sampler.optimizer_steps_per_epoch == 0
        return self.step % self.cfg.train.eval_every == 0

    def run(self) -> TrainResult:
        t = self.cfg.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = self.world.is_main
        self.metrics = MetricsLog(self.out_dir, resume_step=self.step if self.resumed else None, enabled=main)
        if main:
            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        else:
            self.reporter = Reporter()  # progress shows once, from rank 0
        self.t0 = time.perf_counter()
        self.reporter.start(
            {
                "out_dir": str(self.out_dir),
                "device": str(self.device),
                "params": self.model.num_params(),
                "flops_per_token": self.flops_per_token,
                "tokens_per_step": self.tokens_per_step,
                "processes": self.world.size,
                "start_step": self.step,
                "total_steps": self.total_steps,
            }
            | self._data_info()
        )
        last_eval: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        with self._ctrl_c_stops_after_the_step(), contextlib.closing(self.metrics):
            while self._budget_left() and not self.stop_requested:
                tokens_before = self.tokens
                record = self.train_step()
                window_tokens += self.tokens - tokens_before
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    record |= {"tok_per_s": window_tokens / max(now - window_start, 1e-9)}
                    record = self._counters() | record
                    self.metrics.write(record)
                    self.reporter.train_step(record | self._epoch_fields())
                    window_start, window_tokens = now, 0
                if self._should_evaluate():
                    last_eval = self.evaluate_and_save()
                    window_start = time.perf_counter()  # evaluation time is not training throughput
            if self.stop_requested:
                if not self._weights_finite():  # the last step's update overflowed: not worth keeping
                    raise DivergedError(f"training diverged by step {self.step}: weights not finite", self._calmer())
                self.save("ckpt-latest")
            elif self.evaluated_at != self.step:  # (a resumed run that had finished is not evaluated again)
                last_eval = self.evaluate_and_save()
        return TrainResult(
            out_dir=self.out_dir,
            step=self.step,
            tokens=self.tokens,
            flops=self.tokens * self.flops_per_token,
            best_val_loss=self.best_val_loss,
            last_eval=last_eval,
            interrupted=self.stop_requested,
        )

    @contextlib.contextmanager
    def _ctrl_c_stops_after_the_step(self) -> Iterator[None]:
        """The first Ctrl-C (SIGINT) lets the step in progress finish, so that the checkpoint saved then is a
        state the uninterrupted run also passed through; a second one interrupts at once (KeyboardInterrupt,
        no save: the last complete checkpoint stays)."""
        self.stop_requested, self.time_up = False, False
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(cfg: Config, reporter: Reporter | None = None) -> TrainResult:
    """Train a model as `cfg` says; see `Trainer`."""
    return Trainer(cfg, reporter).run()
