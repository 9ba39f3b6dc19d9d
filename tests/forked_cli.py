"""Commands in child processes forked from a warm parent: `subprocess.run` without the startup.

A fresh interpreter spends seconds importing torch and lmforge before a command does anything;
the tests that need a command in a process of its own (to be killed with a fault point,
signalled, capped by a file size limit, compared bitwise with another run) get one forked from
a server that has imported them once per pytest session. The child is a real process: it has
its own pid, memory, signal handlers, working directory and environment, and it exits (or dies)
with the status a fresh one would, as `subprocess.run` reports it.

    forked_cli.run(["-m", "lmforge", "train", "cfg.yaml"], cwd, env)      # like python -m lmforge
    forked_cli.run(["path/to/script.py", "train", "cfg.yaml"], cwd, env)  # like python script.py
    forked_cli.run(["-c", "import sys; ...", "arg"], cwd, env)               # like python -c

Children run with one intra-op thread (the server is started with OMP_NUM_THREADS=1, which the
OpenMP runtime reads when torch is imported), so a request must ask for that too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the server imports before it forks anything: the costly part of every command's startup.
WARM_MODULES = ("torch", "torch.distributed.checkpoint.state_dict", "safetensors.torch", "lmforge.cli",
                "lmforge.train.run", "lmforge.train.loop", "lmforge.checkpoint", "lmforge.data.prepare",
                "lmforge.inference.generate", "lmforge.report")
_server: dict[str, object] = {}


def run(args: list[str], cwd: Path | str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` (ARGS: `-m module ...`, `-c code ...` or `script.py ...`) in a forked child; stdout and
    stderr as text. On timeout the child is killed and subprocess.TimeoutExpired raised."""
    if env.get("OMP_NUM_THREADS") != "1":
        raise ValueError("forked children run with one thread: pass OMP_NUM_THREADS=1 in env")
    proc = _running_server()
    with tempfile.TemporaryDirectory(prefix="forked-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"args": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(out), "stderr": str(err)}
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.flush()
        pid = _reply(proc, 60)["pid"]
        try:
            code = _reply(proc, timeout)["returncode"]
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            _reply(proc, 60)
            raise subprocess.TimeoutExpired(["python", *args], timeout) from None
        text = lambda path: path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return subprocess.CompletedProcess(["python", *args], code, text(out), text(err))


def _running_server() -> subprocess.Popen:
    proc = _server.get("proc")
    if proc is None or proc.poll() is not None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_FAULT")}
        env["OMP_NUM_THREADS"] = "1"
        log = tempfile.NamedTemporaryFile(prefix="forked-cli-server-", suffix=".log", delete=False)
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, env=env, bufsize=0)
        _server.update(proc=proc, log=log.name, pending=b"")
        if not _server.get("stopped_at_exit"):
            atexit.register(_stop_server)
            _server["stopped_at_exit"] = True
        assert _reply(proc, 300) == {"ready": True}
    return proc


def _reply(proc: subprocess.Popen, timeout: float) -> dict:
    """The server's next line. Read from the pipe unbuffered, so that a line already received
    (the pid and the exit status of a quick child come together) is never waited for again."""
    deadline = time.monotonic() + timeout
    while b"\n" not in _server["pending"]:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise subprocess.TimeoutExpired("forked_cli", timeout)
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            log = Path(str(_server["log"])).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the forked_cli server stopped:\n{log}")
        _server["pending"] += chunk
    line, _, _server["pending"] = _server["pending"].partition(b"\n")
    return json.loads(line)


def _stop_server() -> None:
    proc = _server.get("proc")
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)
    Path(str(_server.get("log", ""))).unlink(missing_ok=True)


# -- the server (this file run as a script) ----------------------------------------------------


def _serve() -> None:
    import importlib
    import matplotlib

    matplotlib.use("Agg")
    for name in WARM_MODULES:
        importlib.import_module(name)
    _send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send({"returncode": os.waitstatus_to_exitcode(status)})  # -N: killed by signal N, as subprocess says


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _child(request: dict) -> None:
    """Become the requested command; never returns."""
    import runpy
    import signal
    import traceback

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            os.dup2(os.open(path, flags, 0o600), fd)
        args = request["args"]
        sys.path.insert(0, os.getcwd() if args[0] in ("-m", "-c") else str(Path(args[0]).resolve().parent))
        try:
            if args[0] == "-m":
                sys.argv = [args[1], *args[2:]]
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            elif args[0] == "-c":
                sys.argv = ["-c", *args[2:]]
                exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = list(args)
                runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = _exit_status(stop.code)
        except KeyboardInterrupt:  # as the interpreter does: die of SIGINT after the traceback
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: the children set their own
    _serve()
