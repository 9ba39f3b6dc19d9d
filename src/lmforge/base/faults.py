"""Fault injection for crash tests: named points where a test can make the process die.

A test sets the environment variable ``LMFORGE_FAULT`` in a child process; when that process
reaches a matching ``fault_point(...)`` it exits at once with ``os._exit(137)``: no
``finally`` blocks, no ``atexit``, no buffer flushing, as if it had received ``kill -9``.
When the variable is unset (always, outside tests) a fault point costs one dict lookup.

``LMFORGE_FAULT`` is ``point``, ``point:detail`` or either with ``@N``:

- ``ckpt_mid_write``            the first time any checkpoint save reaches that point;
- ``ckpt_mid_write:epoch-1``    only while saving the checkpoint named ``epoch-1``;
- ``ckpt_after_rename:last@2``  the second time the save of ``last`` gets there.

Points used so far: train/checkpoint.py (detail: the checkpoint's folder name)
ckpt_before_write, ckpt_mid_write, ckpt_after_flush, ckpt_after_rename, ckpt_during_cleanup;
train/loop.py: after_step_<N> (after step N and its checkpoint saves).

``hang:point`` makes the process stop answering there instead of dying (a hung rank).
Under torchrun, ``LMFORGE_FAULT_RANK=R`` makes only rank R die, and a fault fires only in the
first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a job restarted by
``--max-restarts`` can finish.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "LMFORGE_FAULT"
"""Environment variable naming the fault point at which the process should die."""

KILLED_EXIT_CODE = 137
"""The exit status a shell reports for a process killed by SIGKILL (128 + 9)."""

_hits: dict[str, int] = {}


def fault_point(name: str, detail: str | None = None) -> None:
    """Die here, like ``kill -9``, when ``LMFORGE_FAULT`` names this point; otherwise do nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    only_rank = os.environ.get("LMFORGE_FAULT_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    hang = spec.startswith("hang:")  # hang:<point>: stop answering instead of dying (a hung rank)
    target, _, nth = spec.removeprefix("hang:").partition("@")
    if target != name and (detail is None or target != f"{name}:{detail}"):
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] >= int(nth or 1):
        if hang:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, but the launcher can still stop it
            while True:
                time.sleep(3600)
        os._exit(KILLED_EXIT_CODE)
