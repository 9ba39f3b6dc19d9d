"""Model FLOPs utilisation: the device's measured matmul peak, cached once per machine.

MFU = model FLOPs per token x tokens/s / peak FLOP/s, where
- model FLOPs per token is `flops_per_token(config)` of the model (GPT: 6N + 12 L C T, the
  PaLM appendix B count at full context; recomputation, padding and the elementwise work
  are not counted), and
- the peak is *measured*, not a datasheet number: the best fp32 rate of a 2048 x 2048 x 2048
  matrix product (`torch.mm`) on this device with this thread count, over a few repetitions.
  2048^3 is big enough to reach the BLAS's steady rate on a CPU (1024^3 reads ~20% lower on
  a 2-core machine), and it is what the issue's peers were quoted against (~165 GFLOP/s on
  a 2-core AVX-512 machine). A GPU's bf16 runs are still measured against its fp32 peak
  (TF32 on where enabled), so bf16 MFU on a GPU reads high; the number is for comparing
  runs on one machine.

The peak is measured once (~1 s) and cached in ~/.cache/lmforge/peak_flops.json (or
$LMFORGE_CACHE), keyed by device, thread count and matrix size. A measurement taken while
other processes shared the cores reads low; when a run then goes faster than that peak, the observed
rate replaces it (MFU is capped at 100% for that log line). Delete the cache file to measure
again, or set LMFORGE_PEAK_FLOPS (FLOP/s) to use a known peak.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"
PEAK_SIZE = 2048


def _device_key(device: torch.device, size: int) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:mm{size}"
    return f"{device.type}:threads={torch.get_num_threads()}:mm{size}"


def time_matmul(size: int = PEAK_SIZE, seconds: float = 0.3, device: torch.device | str = "cpu",
                repeats: int = 3) -> float:
    """Best fp32 FLOP/s of `size`^3 matrix products over `repeats` timed spans of >= `seconds`/3."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm up (and fault the output in)
    _sync(device)
    best = 0.0
    for _ in range(repeats):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats or runs < 1:
            torch.mm(a, b, out=out)
            runs += 1
        _sync(device)
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def measured_peak_flops(device: torch.device, size: int = PEAK_SIZE, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of a square matmul on `device`; measured once, then read from the cache."""
    if os.environ.get("LMFORGE_PEAK_FLOPS"):
        return float(os.environ["LMFORGE_PEAK_FLOPS"])
    key = _device_key(device, size)
    cached = _read_cache()
    if key in cached:
        return cached[key]
    peak = time_matmul(size, seconds, device)
    _write_cache(key, peak)
    return peak


def raise_peak(device: torch.device, observed: float, size: int = PEAK_SIZE) -> None:
    """A run went faster than the cached peak (it was measured on busy cores): the observed
    rate is a better lower bound, so MFU never reads over 100% twice."""
    if not os.environ.get("LMFORGE_PEAK_FLOPS"):
        _write_cache(_device_key(device, size), observed)


def _write_cache(key: str, peak: float) -> None:
    cached = _read_cache()
    cached[key] = peak
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measure next time


def _read_cache() -> dict[str, float]:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
