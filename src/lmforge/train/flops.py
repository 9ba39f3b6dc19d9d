"""Model FLOPs utilisation: the device's measured matmul peak, cached once per machine.

MFU = model FLOPs per token x tokens/s / peak FLOP/s, where
- model FLOPs per token is `flops_per_token(config)` of the model (GPT: 6N + 12 L C T, the
  PaLM appendix B count at full context; Llama-class: the same with grouped key / value heads,
  `lmforge.models.llama_config.flops_per_token`; recomputation, padding and the elementwise work
  are not counted), and
- the peak is *measured*, not a datasheet number: the best rate of a 2048 x 2048 x 2048
  matrix product (`torch.mm`) on this device with this thread count, over a few repetitions,
  in the dtype the run multiplies in (fp32, or bf16 / fp16 under autocast: a CPU with AMX
  or a GPU's tensor cores multiply bf16 several times faster than fp32, and MFU is against
  the peak of the units the run uses). 2048^3 is big enough to reach the BLAS's steady rate
  on a CPU (1024^3 reads ~20% lower on a 2-core machine). On a GPU, fp32 is measured with
  TF32 where enabled.

The peak is measured once per dtype (~1 s) and cached in ~/.cache/lmforge/peak_flops.json (or
$LMFORGE_CACHE), keyed by device, thread count, matrix size and dtype. A measurement taken
while other processes shared the cores reads low; when a run then goes faster than that peak,
the observed rate replaces it (MFU is capped at 100% for that log line). Delete the cache
file to measure again, or give a known peak: `train.peak_flops` in the config, or
LMFORGE_PEAK_FLOPS (FLOP/s) for every run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"
PEAK_SIZE = 2048


def _device_key(device: torch.device, size: int, dtype: torch.dtype) -> str:
    suffix = "" if dtype == torch.float32 else f":{str(dtype).removeprefix('torch.')}"  # fp32 keys as before
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:mm{size}{suffix}"
    return f"{device.type}:threads={torch.get_num_threads()}:mm{size}{suffix}"


def time_matmul(size: int = PEAK_SIZE, seconds: float = 0.3, device: torch.device | str = "cpu",
                repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of `size`^3 matrix products over `repeats` timed spans of >= `seconds`/3."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
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


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = PEAK_SIZE,
                        seconds: float = 0.3) -> float:
    """FLOP/s of a square `dtype` matmul on `device`; measured once, then read from the cache."""
    if os.environ.get("LMFORGE_PEAK_FLOPS"):
        return float(os.environ["LMFORGE_PEAK_FLOPS"])
    key = _device_key(device, size, dtype)
    cached = _read_cache()
    if key in cached:
        return cached[key]
    peak = time_matmul(size, seconds, device, dtype=dtype)
    _write_cache(key, peak)
    return peak


def raise_peak(device: torch.device, observed: float, dtype: torch.dtype = torch.float32,
               size: int = PEAK_SIZE) -> None:
    """A run went faster than the cached peak (it was measured on busy cores): the observed
    rate is a better lower bound, so MFU never reads over 100% twice."""
    if not os.environ.get("LMFORGE_PEAK_FLOPS"):
        _write_cache(_device_key(device, size, dtype), observed)


class MFUMeter:
    """A run's MFU from its tokens/s: against `configured` (train.peak_flops), else the measured
    peak of `dtype`, raised (and cached) when the run goes faster than a peak measured on busy cores."""

    def __init__(self, device: torch.device, dtype: torch.dtype, flops_per_token: int, world_size: int,
                 configured: float | None = None) -> None:
        self.device, self.dtype, self.flops_per_token, self.world = device, dtype, flops_per_token, world_size
        self.configured = configured
        self.peak = configured or measured_peak_flops(device, dtype)

    def __call__(self, tokens_per_s: float) -> float | None:
        if not self.peak:
            return None
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.world)
        if mfu > 1.0 and not self.configured:
            self.peak, mfu = self.flops_per_token * tokens_per_s / self.world, 1.0
            raise_peak(self.device, self.peak, self.dtype)
        return mfu


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
