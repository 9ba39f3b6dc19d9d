"""Many processes: who this process is (rank, world size), joining and leaving the torchrun job,
and the host-side reductions and barriers every layer may use.

Launched by torchrun (`torchrun --nproc-per-node N -m lmforge train cfg.yaml`); one process
runs the same code with every function here reduced to a no-op. Wrapping a model for DDP or
FSDP and its world-size-independent state dicts belong to training (lmforge.train.parallel).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
