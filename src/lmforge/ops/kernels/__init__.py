"""lmforge's own CPU kernels (C++), compiled on first use and cached, with torch's as fallback.

`ops()` returns the `torch.ops.lmforge` namespace (`self_attention`, `softmax_rows_`), or
None where they cannot be had: off Linux, without a C++ compiler or ninja, with a torch that
exports no BLAS for them, or with LMFORGE_CPU_KERNELS=0. Callers then use torch's ops, which
give the same numbers more slowly.

The build (about 15 s on 2 cores; `lmforge kernels` does it ahead of time) happens once per
machine, torch version and source, into $LMFORGE_CACHE/kernels (default
~/.cache/lmforge/kernels); later processes only load the library (~20 ms). A failed build
leaves its reason there, so later runs fall back at once instead of compiling again; deleting
the folder retries. Compiled with -march=native: the cache belongs to the machine that built it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from lmforge.base.runtime import autocast_dtype

SOURCES = ("library.cpp", "self_attention.cpp", "softmax_rows.cpp")
HEADERS = ("blas.h",)
# -fno-trapping-math lets the compiler vectorize the exponential's clamp and rounding; on x86,
# full-width AVX-512 where the processor has it (gcc otherwise stops at 256 bits).
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    CFLAGS.append("-mprefer-vector-width=512")
ENV_SWITCH = "LMFORGE_CPU_KERNELS"
FAILED = "build-failed.txt"  # in the build folder: why the last build failed

_state: dict[str, object] = {}


def ops():
    """torch.ops.lmforge with the kernels loaded, or None (see `unavailable_reason`)."""
    if "ops" not in _state:
        _state["ops"] = _load()
    return _state["ops"]


def applies_to(x: Tensor) -> bool:
    """Whether activations like x (float32 on a CPU, no autocast, not compiling) can use the kernels."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and autocast_dtype("cpu") is None
            and not torch.compiler.is_compiling() and ops() is not None)


def unavailable_reason() -> str | None:
    """Why `ops()` is None, or None when the kernels are loaded."""
    ops()
    return _state.get("reason")  # type: ignore[return-value]


def build_dir() -> Path:
    """The cache folder of the build that matches these sources, flags, torch and machine."""
    root = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"
    return root / _build_key(Path(__file__).parent)


def _load():
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return _unavailable(f"{ENV_SWITCH}=0")
    if sys.platform != "linux":
        return _unavailable(f"they are built and tested on Linux only, this is {sys.platform}")
    folder = build_dir()
    name = f"lmforge_kernels_{folder.name}"
    library = folder / f"{name}.so"
    if (folder / FAILED).exists():
        return _unavailable((folder / FAILED).read_text(encoding="utf-8").split("\n\n")[0].strip())
    try:
        with _exclusive(folder.parent / f"{folder.name}.lock"):  # one build for all processes
            if not _complete(library):  # never built, or left damaged by a build that was killed
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                _build(name, folder)
                _seal(library)
        torch.ops.load_library(str(library))
    except Exception as error:  # a missing compiler or ninja, a failed build or load
        summary = _summary(error)
        reason = f"the build in {folder} failed ({summary}); delete that folder to try again"
        with contextlib.suppress(OSError):
            (folder / FAILED).write_text(f"{reason}\n\n{error}\n", encoding="utf-8")
        print(f"lmforge: CPU kernels unavailable, using torch's: {reason}", file=sys.stderr, flush=True)
        return _unavailable(reason)
    if not torch.ops.lmforge.has_blas():
        return _unavailable("this torch exports no sgemm_ for them to call")
    return torch.ops.lmforge


def _build(name: str, folder: Path) -> None:
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    # ninja comes with the package; put it on PATH even when the environment is not activated.
    tools = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja
        tools.insert(0, ninja.BIN_DIR)
    os.environ["PATH"] = os.pathsep.join([*tools, os.environ.get("PATH", "")])
    print(f"lmforge: building the CPU kernels once (about 15 s) into {folder}", file=sys.stderr, flush=True)
    here = Path(__file__).parent
    load(name=name, sources=[str(here / s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
         build_directory=str(folder), is_python_module=False, verbose=False)


def _build_key(here: Path) -> str:
    """Changes with the sources, the flags, torch and the machine, so a stale build is never loaded."""
    digest = hashlib.sha256()
    for part in (*SOURCES, *HEADERS):
        digest.update((here / part).read_bytes())
    digest.update(" ".join([*CFLAGS, torch.__version__, platform.machine(), sys.version, _cpu_flags()]).encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The instruction sets -march=native compiled for (a home folder may be shared by machines)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return line
    return ""


def _unavailable(reason: str):
    _state["reason"] = reason
    return None


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive lock on lock_path (other processes' builds wait; released on exit or death)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _seal(library: Path) -> None:
    """Records the library's digest once it is whole: a half-written one would crash dlopen."""
    Path(f"{library}.sha256").write_text(_digest(library), encoding="utf-8")


def _complete(library: Path) -> bool:
    seal = Path(f"{library}.sha256")
    return library.exists() and seal.exists() and seal.read_text(encoding="utf-8") == _digest(library)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary(error: Exception) -> str:
    """The compiler's first error line, else the error's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line.lower() or ": not found" in line or "No such file" in line:
            return line
    return lines[-1] if lines else type(error).__name__
