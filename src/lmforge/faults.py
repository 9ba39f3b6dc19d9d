"""Fault injection for crash tests: named points where a test can make the process die.

A test sets the environment variable ``LMFORGE_FAULT=<point>`` in a child process; when
that process reaches ``fault_point("<point>")`` it exits at once with ``os._exit(137)``:
no ``finally`` blocks, no ``atexit``, no buffer flushing, as if it had received ``kill -9``.
When the variable is unset (always, outside tests) a fault point costs one dict lookup.

Points used so far (train/checkpoint.py): ckpt_before_write, ckpt_mid_write,
ckpt_after_flush, ckpt_after_rename, ckpt_during_cleanup.
"""

from __future__ import annotations

import os

FAULT_ENV = "LMFORGE_FAULT"
"""Environment variable naming the fault point at which the process should die."""

KILLED_EXIT_CODE = 137
"""The exit status a shell reports for a process killed by SIGKILL (128 + 9)."""


def fault_point(name: str) -> None:
    """Die here, like ``kill -9``, when ``LMFORGE_FAULT`` equals ``name``; otherwise do nothing."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(KILLED_EXIT_CODE)
