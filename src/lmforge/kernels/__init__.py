"""lmforge's own CPU kernels (C++), compiled on first use and cached, with torch's as fallback.

`ops()` returns the `torch.ops.lmforge` namespace (`causal_attention`, `softmax_rows_`), or
None where they cannot be had: off x86/Linux-like toolchains, without a C++ compiler or ninja,
without a BLAS exported by torch, or with LMFORGE_CPU_KERNELS=0. Callers then use torch's ops,
which give the same numbers a little slower; the reason is logged once.

The build (about 15 s on 2 cores) happens once per machine, torch version and source, into
$LMFORGE_CACHE/kernels (default ~/.cache/lmforge/kernels); later processes only load the
library. Compiled with -march=native: the cache belongs to the machine that built it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = ("library.cpp", "causal_attention.cpp", "softmax_rows.cpp")
HEADERS = ("blas.h",)
# -fno-trapping-math lets the compiler vectorize the exponential's clamp and rounding.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
ENV_SWITCH = "LMFORGE_CPU_KERNELS"

_state: dict[str, object] = {}


def ops():
    """torch.ops.lmforge with the kernels loaded, or None (the reason logged once)."""
    if "ops" not in _state:
        _state["ops"] = _load()
    return _state["ops"]


def unavailable_reason() -> str | None:
    """Why `ops()` is None, or None when the kernels are loaded."""
    ops()
    return _state.get("reason")  # type: ignore[return-value]


def _load():
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return _unavailable(f"{ENV_SWITCH}=0")
    if sys.platform != "linux":
        return _unavailable(f"built and tested on Linux only (this is {sys.platform})")
    here = Path(__file__).parent
    key = _build_key(here)
    name = f"lmforge_kernels_{key}"
    build_dir = _cache_root() / key
    library = build_dir / f"{name}.so"
    try:
        if library.exists():
            try:
                torch.ops.load_library(str(library))
            except OSError:  # left damaged by a build that was killed: build it again
                shutil.rmtree(build_dir, ignore_errors=True)
        if not library.exists():
            _build(name, here, build_dir)
            torch.ops.load_library(str(library))
    except Exception as error:  # a missing compiler or ninja, a failed build or load
        return _unavailable(f"could not build or load them in {build_dir}: {_first_line(error)}")
    if not torch.ops.lmforge.has_blas():
        return _unavailable("torch exports no sgemm_ for them to call")
    return torch.ops.lmforge


def _build(name: str, here: Path, build_dir: Path) -> None:
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    build_dir.mkdir(parents=True, exist_ok=True)
    # ninja comes with the package; put it on PATH even when the environment is not activated.
    tools = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja
        tools.insert(0, ninja.BIN_DIR)
    os.environ["PATH"] = os.pathsep.join([*tools, os.environ.get("PATH", "")])
    log.info("building lmforge's CPU kernels once (about 15 s) into %s", build_dir)
    load(name=name, sources=[str(here / s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
         build_directory=str(build_dir), is_python_module=False, verbose=False)


def _build_key(here: Path) -> str:
    """Changes with the sources, the flags, torch and the machine, so a stale build is never loaded."""
    digest = hashlib.sha256()
    for part in (*SOURCES, *HEADERS):
        digest.update((here / part).read_bytes())
    digest.update(" ".join([*CFLAGS, torch.__version__, platform.machine(), sys.version]).encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"


def _unavailable(reason: str):
    _state["reason"] = reason
    log.info("lmforge's CPU kernels are off (%s): using torch's attention and softmax", reason)
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
