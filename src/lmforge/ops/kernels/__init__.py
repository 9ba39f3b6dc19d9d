"""lmforge's own CPU kernels (C++), built once per machine and cached, with torch's ops as fallback.

`ops()` returns the `torch.ops.lmforge` namespace (`self_attention`, `softmax_rows_`, and the
Llama block's `rotary`, `rms_norm`, `swiglu` with their backwards, and the decode step's
`decode_attention_masked` (rotary and a mask where given), `decode_gpt_block` and
`decode_gpt_rows` (a GPT's whole step for a few rows), `transposed` (a matrix's transpose),
`sum_of_squares` (of many tensors at once: the gradient norm) and `pack_right_operand` /
`packed_product_out` (a weight packed once by MKL for several products)), or
None where they cannot be had: off Linux, without a C++ compiler or ninja, without file
locking (fcntl), with a torch that exports no BLAS for them, or with LMFORGE_CPU_KERNELS=0.
Callers then use torch's ops, which give the same numbers more slowly.

Only training builds them: `ops()` builds when no build is cached (`lmforge kernels`, and the
fast paths on the first forward that autograd will differentiate: `applies_to`), while
`ops(build=False)` only loads a finished build. Inference (generation, chat, embeddings,
classification, evaluation) runs without gradients, so a short command never waits for a
compiler: it takes the cached kernels or torch's ops. Importing this module builds, locks and
imports nothing of the kind.

The build (about 15 s on 2 cores) goes into $LMFORGE_CACHE/kernels (default
~/.cache/lmforge/kernels), one folder per source, flags, torch and machine; later processes
only load the library. The compiler's output is captured: the user sees one line, and the
whole text is kept only in a failed build's record. A failed build leaves its reason and the
toolchain it used (compiler path and version, ninja) there, so later runs fall back at once;
a run that may build tries again when the toolchain has changed, or when the folder is
deleted. Compiled with -march=native: the cache belongs to the machine that built it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lmforge.base.runtime import autocast_dtype

SOURCES = ("library.cpp", "self_attention.cpp", "softmax_rows.cpp", "llama_block.cpp", "decode_attention.cpp",
           "decode_gpt_rows.cpp", "transpose.cpp", "squares.cpp", "packed_product.cpp")
HEADERS = ("blas.h", "decode.h", "self_attention.h")
# -fno-trapping-math lets the compiler vectorize the exponential's clamp and rounding; on x86,
# full-width AVX-512 where the processor has it (gcc otherwise stops at 256 bits).
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    CFLAGS.append("-mprefer-vector-width=512")
ENV_SWITCH = "LMFORGE_CPU_KERNELS"
FAILED = "build-failed.txt"  # in the build folder: why the last build failed, and with which toolchain
_TOOLCHAIN = "toolchain: "

_state: dict[str, object] = {}


class _NoLock(RuntimeError):
    """No way to keep two processes from building into the same folder at once."""


def ops(*, build: bool = True):
    """torch.ops.lmforge with the kernels loaded, or None (see `unavailable_reason`).

    build=True compiles them first when no finished build is cached (training, `lmforge
    kernels`); build=False only loads one (everything else).
    """
    if "ops" not in _state and (build or "not_built" not in _state):
        _state.pop("not_built", None)
        library = _load(build)
        if "not_built" not in _state:  # final: loaded, or unavailable for a reason a build won't fix
            _state["ops"] = library
    return _state.get("ops")


def applies_to(x: Tensor) -> bool:
    """Whether activations like x (float32 on a CPU, no autocast, not compiling) can use the kernels.
    Training use (x needs a gradient) may build them; any other use only loads a finished build."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and autocast_dtype("cpu") is None
            and not torch.compiler.is_compiling()):
        return False
    return ops(build=x.requires_grad and torch.is_grad_enabled()) is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use, and how to get them, or None when they are loaded; never builds."""
    return None if ops(build=False) is not None else _state.get("reason")  # type: ignore[return-value]


def status_line() -> str:
    """One line for a run's header: where the kernels load from, or why they are off."""
    if ops(build=False) is not None:
        return f"CPU kernels: on (cached in {build_dir()})"
    return f"CPU kernels: off: {unavailable_reason()}"


def prepare_for_training(device: torch.device) -> str:
    """Build (or load) the kernels before a training run on a CPU; returns `status_line()`."""
    if device.type != "cpu":
        return f"CPU kernels: not used on {device.type}"
    ops()
    return status_line()


def build_dir() -> Path:
    """The cache folder of the build that matches these sources, flags, torch and machine."""
    root = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"
    return root / _build_key(Path(__file__).parent)


def _load(build: bool):
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return _unavailable(f"{ENV_SWITCH}=0")
    if sys.platform != "linux":
        return _unavailable(f"they are built and tested on Linux only, this is {sys.platform}")
    folder = build_dir()
    name = f"lmforge_kernels_{folder.name}"
    library = folder / f"{name}.so"
    if not _complete(library):  # never built, or left damaged by a build that was killed
        failed = _recorded_failure(folder, retry=build)
        if failed is not None:
            return _unavailable(failed)
        if not build:
            _state["not_built"] = True
            return _unavailable("not built yet; `lmforge kernels` or a training run on a CPU builds them")
        try:
            _build_locked(name, folder, library)
        except _NoLock as error:
            return _unavailable(f"{error}; torch's ops are used")
        except Exception as error:  # a missing compiler or ninja, a failed build
            return _failed(folder, error)
    try:
        torch.ops.load_library(str(library))
    except Exception as error:  # a library this machine cannot load
        return _failed(folder, error)
    if not torch.ops.lmforge.has_blas():
        return _unavailable("this torch exports no sgemm_ for them to call")
    return torch.ops.lmforge


def _build_locked(name: str, folder: Path, library: Path) -> None:
    """Build into folder unless another process has meanwhile; one build at a time for all processes."""
    with _exclusive(folder.parent / f"{folder.name}.lock"):
        if _complete(library):
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _build(name, folder)
        _seal(library)


def _build(name: str, folder: Path) -> None:
    """Compile the library into folder; torch's and the compiler's output go to the error, if any."""
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    path = _tool_path()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler, path=path) is None:
        raise RuntimeError(f"no C++ compiler: {compiler} is not on PATH (install g++ or clang, or set CXX)")
    print(f"lmforge: building the CPU kernels once (about 15 s) into {folder}", file=sys.stderr, flush=True)
    here = Path(__file__).parent
    output: list[str] = []
    try:
        with _environ("PATH", path), _captured(output):  # torch finds ninja on PATH
            load(name=name, sources=[str(here / s) for s in SOURCES], extra_cflags=CFLAGS,
                 extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as error:
        error.build_output = "".join(output)  # type: ignore[attr-defined]
        raise


def _failed(folder: Path, error: Exception):
    """Record a failed build (reason, toolchain, the compiler's output) and fall back to torch's ops."""
    reason = (f"the build in {folder} failed ({_summary(error)}); it is tried again when the C++ compiler "
              "changes, or now: delete that folder and run `lmforge kernels`")
    output = getattr(error, "build_output", "")
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED).write_text(f"{reason}\n\n{_TOOLCHAIN}{_toolchain()}\n\n{error}\n\n{output}",
                                     encoding="utf-8")
    print(f"lmforge: CPU kernels unavailable, using torch's: {reason}", file=sys.stderr, flush=True)
    return _unavailable(reason)


def _recorded_failure(folder: Path, retry: bool) -> str | None:
    """The reason of a failed build recorded in folder, or None. With retry, a record made with
    another toolchain is removed (None: build again)."""
    record = folder / FAILED
    if not record.exists():
        return None
    text = record.read_text(encoding="utf-8")
    if retry:
        used = next((line[len(_TOOLCHAIN):] for line in text.splitlines() if line.startswith(_TOOLCHAIN)), None)
        if used != _toolchain():
            shutil.rmtree(folder, ignore_errors=True)
            return None
    return text.split("\n\n")[0].strip()


def _tool_path() -> str:
    """PATH as the build sees it: ninja (a dependency on Linux) and this Python's scripts first,
    even when the environment is not activated."""
    tools = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja
        tools.insert(0, ninja.BIN_DIR)
    return os.pathsep.join([*tools, os.environ.get("PATH", "")])


def _toolchain() -> str:
    """Which compiler (path and a digest of its --version) and ninja a build would use."""
    path = _tool_path()
    compiler = os.environ.get("CXX", "c++")
    found = shutil.which(compiler, path=path)
    version = ""
    if found is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(version.encode()).hexdigest()[:16]
    return f"{compiler}={found} ({digest}), ninja={shutil.which('ninja', path=path)}"


@functools.lru_cache(maxsize=None)
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
    try:
        import fcntl  # POSIX only: imported here so that the package imports everywhere
    except ImportError:
        raise _NoLock("no fcntl on this platform to lock a build between processes") from None
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _captured(output: list[str]):
    """Everything written meanwhile to stdout and stderr (Python's, the compiler's, torch's
    warnings) goes into `output` instead of the terminal."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    python = io.StringIO()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(python), contextlib.redirect_stderr(python):
                yield
        finally:
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)
            sink.seek(0)
            output.append(python.getvalue() + sink.read().decode("utf-8", errors="replace"))
            output.extend(f"warning: {w.message}\n" for w in caught)


@contextlib.contextmanager
def _environ(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


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
