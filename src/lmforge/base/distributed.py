"""Many processes: process group set-up, DDP / FSDP wrapping, gradient-sync control, reductions,
and world-size-independent state dicts.

Launched by torchrun (`torchrun --nproc-per-node N -m lmforge train cfg.yaml`); one process
runs the same code with every function here reduced to a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, slots=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int


def world_from_env() -> WorldInfo:
    """Rank and world size as torchrun sets them (a single process when unset)."""
    return WorldInfo(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on GPUs nccl for the model's tensors and gloo for the loop's host-side
    counters (target counts, metrics, stop flags), which nccl cannot reduce."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the torchrun job: nccl on GPUs, gloo on CPU, with a collective timeout.

    Each elastic restart gets its own store prefix: a restarted gloo group reusing the keys of
    the failed attempt cannot connect ("Gloo connectFullMesh failed").
    """
    if dist.is_initialized():
        return
    backend = process_group_backend(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # Under torchrun the agent hosts the store and every worker is a client.
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=not hosted and os.environ["RANK"] == "0",
                          timeout=timeout, wait_for_workers=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"lmforge-attempt-{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timeout)


def leave_job(step: int, exit_code: int) -> None:
    """End a torchrun worker: all ranks meet, tear the group down together, and exit at once.

    The DDP / FSDP state of the finished run still holds the gloo group; if its destructor
    runs during interpreter shutdown (or after a peer has gone) it can abort ("terminate
    called without an active exception") or hang. Everything is written by now, so the
    worker skips that shutdown. A single process returns and exits normally.
    """
    if not dist.is_initialized():
        return
    barrier(step, "finishing")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def wrap_model(model: nn.Module, strategy: str, device: torch.device, world_size: int) -> nn.Module:
    """DDP (a full replica per rank) or FSDP (parameters sharded per block); unchanged alone."""
    if world_size == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for module_list in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in module_list:
                fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: no wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation window."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor, step: int, what: str) -> torch.Tensor:
    """Sum a tensor over ranks; a rank that never arrives becomes an error naming the step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    try:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistError) as err:
        raise RuntimeError(f"step {step}: waiting for the other ranks ({what}) failed: {err}; "
                           "a rank is hung or died (train.collective_timeout bounds the wait)") from err
    return values


def barrier(step: int, what: str) -> None:
    all_reduce_sum(torch.zeros(1), step, what)


def full_model_state(model: nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; a collective under FSDP, so every rank calls it."""
    if world_size == 1 or not _is_fsdp(model):
        return {k: v.detach() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names, the same whatever the world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap_for_state(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap_for_state(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def unwrap_for_state(model: nn.Module) -> nn.Module:
    """DDP's inner module (names without `module.`); FSDP modules are used as they are."""
    return model if _is_fsdp(model) else unwrap(model)


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in [unwrap(model)])
