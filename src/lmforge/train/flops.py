"""Model FLOPs utilisation: the device's measured matmul peak, cached once per machine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:threads={torch.get_num_threads()}"


def measured_peak_flops(device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of a square matmul on `device`; measured once, then read from the cache."""
    key = _device_key(device)
    cached = _read_cache()
    if key in cached:
        return cached[key]
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)  # warm up
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        torch.matmul(a, b)
        runs += 1
    _sync(device)
    peak = 2 * size**3 * runs / (time.perf_counter() - start)
    cached[key] = peak
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measure next time
    return peak


def _read_cache() -> dict[str, float]:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
