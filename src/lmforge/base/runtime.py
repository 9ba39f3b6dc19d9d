"""Where and how a run executes: device, precision, threads, seeds, rank, allocator; chosen once, logged once.

`collector_paused` turns Python's automatic garbage collection off while a run trains.
`keep_freed_memory` tunes glibc malloc for a training process on a CPU. It changes the whole
process, so `setup_runtime` never calls it: the command line does before `train` and
`quickstart`, and a library user may. glibc serves blocks of 32 MiB and more with mmap and
unmaps them on free, so every training step re-faults and re-zeroes its largest tensors (a
2048 x 8192 fp32 logits tensor, its gradient, ...): ~70k page faults and ~15% of a step on the
issue's workload. Turning mmap off for allocations and raising the trim threshold keeps freed
memory in the heap for the next step (the process keeps its peak memory until it exits).
Set LMFORGE_MALLOC_TUNING=0 to leave malloc alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Runtime:
    device: torch.device
    precision: str
    """fp32, bf16 or fp16 (autocast dtype)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    notes: tuple[str, ...] = ()
    """Why each choice was made, for the log."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        parts = [f"device {self.device}", f"precision {self.precision}",
                 f"threads {torch.get_num_threads()}", f"world size {self.world_size}"]
        return " | ".join(parts) + "".join(f"\n  {n}" for n in self.notes)


def pick_device(preference: str) -> tuple[torch.device, str]:
    """The device for `preference` (auto|cpu|cuda|mps) and why it was chosen."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), "auto: CUDA is available"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no GPU found, using the CPU"
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device; use train.device=auto or cpu")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return torch.device(preference), f"{preference}: as configured"


def cpu_bf16_units() -> str | None:
    """"AMX" or "AVX512-BF16" when this CPU multiplies bf16 natively, else None."""
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        with contextlib.suppress(Exception):  # private probes: absent on some torch builds
            if getattr(cpu, probe)():
                return name
    return None


def setup_runtime(device: str = "auto", precision: str = "fp32", seed: int = 1337,
                  collective_timeout: float = 600.0) -> Runtime:
    """Choose device and precision, join the torchrun job if there is one, set threads and seeds."""
    from lmforge.base.distributed import init_process_group, world_from_env

    world = world_from_env()
    dev, why = pick_device(device)
    notes = [why]
    if dev.type == "cuda" and world.world_size > 1:
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
        notes.append(f"rank {world.rank} uses cuda:{world.local_rank}")
    if dev.type == "cpu":
        # Interop threads only add contention for one model on a small machine.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        if world.world_size > 1:
            per_rank = max(1, (os.cpu_count() or 1) // world.world_size)
            torch.set_num_threads(per_rank)  # ranks on one machine share its cores
        units = cpu_bf16_units()
        if precision == "fp32" and units == "AMX":
            notes.append("this CPU has AMX bf16 units: train.precision=bf16 trains about 2x faster "
                         "(measured on the benchmark GPT)")
        elif precision == "fp16" or (precision == "bf16" and units is None):
            notes.append(f"{precision} autocast on CPU is usually slower than fp32 without native units")
        if _malloc_tuned:  # asked for by the caller (keep_freed_memory), reported here
            notes.append("glibc malloc keeps freed memory (no mmap, no trim): no page faults on re-allocation")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 but this GPU has no bf16 support; use fp16 or fp32")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        notes.append("TF32 matmuls enabled")
    if world.world_size > 1:
        init_process_group(dev, collective_timeout)
        notes.append(f"process group: {'nccl (gloo for host-side counters)' if dev.type == 'cuda' else 'gloo'}, "
                     f"collective timeout {collective_timeout:g}s")
    seed_everything(seed)
    return Runtime(device=dev, precision=precision, rank=world.rank, world_size=world.world_size,
                   local_rank=world.local_rank, notes=tuple(notes))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap and never trim it (see the module doc).

    Returns whether the setting is in effect; False (and nothing changed) on other C
    libraries, other systems, or with LMFORGE_MALLOC_TUNING=0.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get("LMFORGE_MALLOC_TUNING", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mallopt returns 1 on success; the trim threshold first, so a failure leaves mmap on
        _malloc_tuned = bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        _malloc_tuned = False
    return _malloc_tuned


YOUNG_GARBAGE_EVERY = 50  # steps between the training loop's own collections of young objects


@contextlib.contextmanager
def collector_paused():
    """Python's automatic garbage collection off while a run trains (restored on exit).

    A step makes thousands of short-lived Python objects (autograd's records, tensors' wrappers)
    and no reference cycles, so the collector's automatic passes (several a step, and now and
    then a full one over the run's few hundred thousand objects, in the middle of a step) free
    nothing. The loop collects the young generations every YOUNG_GARBAGE_EVERY steps instead,
    so a cycle made each step by a hook or a callback is still freed."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect on `device_type`, or None (torch 2.3 has no device argument)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
