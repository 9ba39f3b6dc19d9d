"""Run the `lmforge` CLI in a child process with test-only instruments switched on by env vars.

The crash points themselves are lmforge's own (`LMFORGE_FAULT`, see lmforge.base.faults); this
wrapper only adds what a test needs to observe or provoke from inside the process:

- FAULTS_SAMPLE_LOG=path      append "epoch sample_start id id ..." for every optimizer step
                              the loop fetches (the sample ids it trains on), flushed at once;
- FAULTS_SIGNAL_AT=N:SIGTERM  send that signal to ourselves while step N is fetched;
- FAULTS_SIGNAL_IN_SAVE=SIGINT  after the first signal, send this one in the middle of the
                              next checkpoint save (between the weights and training_state.pt);
- FAULTS_FSIZE_AFTER_SAVES=K:BYTES  once K checkpoints are saved, cap file sizes at BYTES
                              (RLIMIT_FSIZE: the next large write fails as a full disk would).

The HTML report is never written (it is not under test and matplotlib costs seconds).

Usage: python fault_runner.py train cfg.yaml ...   (the arguments of `lmforge`).
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def _install() -> None:
    from lmforge.checkpoint import save as checkpoint
    from lmforge.train import loop

    log_path = os.environ.get("FAULTS_SAMPLE_LOG")
    signal_at = os.environ.get("FAULTS_SIGNAL_AT")
    signal_in_save = os.environ.get("FAULTS_SIGNAL_IN_SAVE")
    fsize = os.environ.get("FAULTS_FSIZE_AFTER_SAVES")
    state = {"epoch": 0, "signalled": False, "saves": 0}

    real_permutation, real_window = loop.epoch_permutation, loop.window_indices

    def epoch_permutation(num_samples, seed, epoch):
        state["epoch"] = epoch
        return real_permutation(num_samples, seed, epoch)

    def window_indices(permutation, sample_start, batch_size, grad_accum, *rest):
        windows = real_window(permutation, sample_start, batch_size, grad_accum, *rest)
        if log_path:
            ids = " ".join(str(i) for w in windows for i in w)
            with open(log_path, "a") as f:
                f.write(f"{state['epoch']} {sample_start} {ids}\n")
        if signal_at and not state["signalled"]:
            step, _, name = signal_at.partition(":")
            window = batch_size * grad_accum
            global_step = state["epoch"] * (len(permutation) // window) + sample_start // window + 1
            if global_step == int(step):
                state["signalled"] = True
                os.kill(os.getpid(), getattr(signal, name))
        return windows

    real_torch_save = checkpoint._torch_save

    def torch_save(training_state, path):
        if signal_in_save and state["signalled"]:
            os.kill(os.getpid(), getattr(signal, signal_in_save))
        return real_torch_save(training_state, path)

    real_save = loop.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        result = real_save(*args, **kwargs)
        state["saves"] += 1
        if fsize:
            after, _, limit = fsize.partition(":")
            if state["saves"] == int(after):
                resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
        return result

    loop.epoch_permutation, loop.window_indices = epoch_permutation, window_indices
    loop.save_checkpoint = save_checkpoint
    checkpoint._torch_save = torch_save


def _skip_report() -> None:
    """The HTML report (matplotlib) is not under test here and costs seconds per process."""
    import types
    from pathlib import Path

    stub = types.ModuleType("lmforge.report")
    stub.write_report = lambda run_dir, *a, **k: Path(run_dir) / "report.html"
    sys.modules["lmforge.report"] = stub


if __name__ == "__main__":
    _install()
    _skip_report()
    from lmforge.cli import main

    sys.exit(main(sys.argv[1:]))
