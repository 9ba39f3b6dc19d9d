"""Signals during a run, handled only when the caller asks (the CLI does) and only in the main
thread: a library user's process keeps its own handlers, and `train()` runs from any thread.

- SIGTERM / SIGINT: the current step finishes, `last` is saved, the run stops (the CLI then
  exits with 128 + the signal); a second signal changes nothing.
- SIGXFSZ: ignored, so a write past the file-size limit fails as a full disk would (an error
  the checkpoint code reports) instead of killing the process.

The previous handlers are restored when the run ends.
"""

from __future__ import annotations

import signal
import threading

from lmforge.checkpoint import ignore_sigxfsz


class StopSignal:
    """A context for the loop: `received` is the first stop signal's number, or None."""

    def __init__(self, install: bool) -> None:
        self.install = install and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignal":
        if not self.install:
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if hasattr(signal, "SIGXFSZ"):
            self._previous[signal.SIGXFSZ] = signal.getsignal(signal.SIGXFSZ)
            ignore_sigxfsz()
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: set outside Python, nothing we can put back
                signal.signal(sig, handler)
        self._previous.clear()
