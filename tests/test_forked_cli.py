"""The tests' forked children (tests/forked_cli.py) report what `subprocess.run` would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import forked_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_output_status_directory_and_environment_are_the_childs(tmp_path: Path):
    code = ("import os, sys; print(os.getcwd(), os.environ['PROBE'], sys.argv[1:]); "
            "print('oops', file=sys.stderr); sys.exit(3)")
    done = forked_cli.run(["-c", code, "a", "b"], tmp_path, {**ENV, "PROBE": "here"})
    assert done.returncode == 3
    assert done.stdout == f"{tmp_path} here ['a', 'b']\n" and done.stderr == "oops\n"
    assert "PROBE" not in os.environ and Path.cwd() != tmp_path  # the test process is untouched


def test_a_quick_exit_a_kill_and_an_exception_give_the_statuses_a_fresh_process_would(tmp_path: Path):
    assert forked_cli.run(["-c", "pass"], tmp_path, ENV).returncode == 0
    assert forked_cli.run(["-c", "import os; os._exit(137)"], tmp_path, ENV).returncode == 137
    assert forked_cli.run(["-c", "import os; os.kill(os.getpid(), 9)"], tmp_path, ENV).returncode == -9
    failed = forked_cli.run(["-c", "raise KeyError('x')"], tmp_path, ENV)
    assert failed.returncode == 1 and "KeyError: 'x'" in failed.stderr


def test_a_module_and_a_script_run_as_main(tmp_path: Path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nif __name__ == '__main__':\n    print('script', sys.argv[1:])\n")
    assert forked_cli.run([str(script), "x"], tmp_path, ENV).stdout == "script ['x']\n"
    shown = forked_cli.run(["-m", "lmforge", "--help"], tmp_path, ENV)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: lmforge")


def test_a_child_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path: Path):
    with pytest.raises(subprocess.TimeoutExpired):
        forked_cli.run(["-c", "import time; time.sleep(60)"], tmp_path, ENV, timeout=1)
    assert forked_cli.run(["-c", "print('next')"], tmp_path, ENV).stdout == "next\n"


def test_more_threads_than_one_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS=1"):
        forked_cli.run(["-c", "pass"], tmp_path, {**ENV, "OMP_NUM_THREADS": "2"})
