"""Training on several processes with PyTorch's own engine: torchrun launches, torch.distributed connects.

A run launched by `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) joins a process group:
gloo on CPUs, NCCL on CUDA GPUs. The model is then wrapped, not changed (torchtitan's parallelize):
- ddp: DistributedDataParallel; each rank holds the whole model and gradients are averaged (all-reduce);
- fsdp: FSDP2 (`fully_shard`), each block's parameters, gradients and optimizer state sharded over the ranks
  and gathered for its forward and backward; on GPUs with bf16 parameters and fp32 gradient reduction.
A single process is a world of size 1: nothing is wrapped and every collective is skipped.

Checkpoints hold full (unsharded) tensors keyed by parameter name, whatever the world size and wrapper, so
a run saved by N processes resumes in M.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from llmmo.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0  # rank on this machine: picks the GPU; 0 prepares the machine's data cache
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, progress and checkpoints."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64, so that token counts stay exact)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (of the same shape and dtype on every rank), in rank order, on the CPU."""
        if self.size == 1:
            return [t]
        device = _collective_device()
        parts = [torch.empty_like(t, device=device) for _ in range(self.size)]
        dist.all_gather(parts, t.to(device))
        return [p.cpu() for p in parts]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once per process), and this rank's device.

    `timeout_s` bounds every collective: a rank that died or hangs makes the others fail with an error
    instead of waiting forever (torchrun also stops the remaining workers when one exits with an error).
    """
    if not launched_by_torchrun():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                "start at most that many processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return World(rank=rank, local_rank=local_rank, size=size), device


def close_world(finished: bool = True) -> None:
    """Leave the process group; after a `finished` run, once every rank is done. Gloo's worker threads can
    outlive a group that a module (an FSDP mesh) still references, and die with SIGABRT at interpreter exit
    (pytorch/pytorch#179291): the barrier drains the last collectives and the collections drop those
    references while Python is alive. After a failure the other ranks may be gone: no barrier then."""
    if dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def parallelize(model: nn.Module, parallel: str, world: World, device: torch.device, bf16: bool) -> nn.Module:
    """The module the training step calls: `model` itself alone, else wrapped as `parallel` says.

    FSDP2 shards in place (the blocks, then the rest at the root), so `model` itself then runs sharded too;
    DDP returns a wrapper and leaves `model` whole.
    """
    if world.size == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh on the run's device: FSDP's default mesh takes the GPU whenever there is one, also for a CPU run
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(device.type, (world.size,))}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over the ranks in this backward only if `enabled` (the last micro-batch of a step):
    accumulating micro-batches skip the all-reduce (DDP) or reduce-scatter (FSDP)."""
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_weights(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The model's whole tensors on the CPU, by name, on rank 0 (the others get an empty dict). Under FSDP they
    are gathered from the shards: a collective, every rank calls it."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if world.is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (a tied tensor under its first name)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """{"state": {name: {moment: tensor}}, "param_groups": [{..., "params": [names]}]} with whole tensors on the
    CPU, on rank 0 (the others get an empty dict; a collective under FSDP)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if not world.is_main:
        return {}
    names = _names(model, optimizer)
    sd = optimizer.state_dict()
    state = {names[i]: {k: v.detach().cpu() for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [g | {"params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` returned (every rank passes the whole state; FSDP keeps its shards).

    Checkpoints of llmmo 0.1 keyed the state by position in the optimizer ("0", "1", ...): read as the names of
    the parameters in that order."""
    names = _names(model, optimizer)
    by_name = {n: names[int(n)] if n.isdigit() else n for n in full["state"]}
    full = {
        "state": {by_name[n]: s for n, s in full["state"].items()},
        "param_groups": [
            g | {"params": [names[p] if isinstance(p, int) else p for p in g["params"]]} for g in full["param_groups"]
        ],
    }
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
        return
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: s for name, s in full["state"].items()}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a number (under FSDP it is a DTensor holding the global norm)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def launch_local(nproc: int, train_args: list[str]) -> int:
    """Run `llmmo train TRAIN_ARGS` in `nproc` processes on this machine under torchrun; its exit code, 130
    after Ctrl-C (the processes finish their step and save, as one process does).

    The same as `torchrun --standalone --nproc-per-node NPROC -m llmmo train ...`. torchrun stops every
    process when one fails, and prints which one and why.
    """
    import subprocess
    import sys

    if launched_by_torchrun():
        raise ConfigError("--nproc starts torchrun itself; under torchrun already, drop --nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    job = subprocess.Popen([*command, "-m", "llmmo", "train", *train_args])
    interrupted = False
    while True:
        try:
            code = job.wait()
            return 130 if interrupted else code
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its processes: wait for them
            interrupted = True
