"""The README's Library examples run as written, from a checkout (the paths they name)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _library_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_library_examples():
    assert len(_library_examples()) >= 2


@pytest.mark.parametrize("index", range(2))
def test_a_readme_library_example_runs(index: int, tmp_path: Path):
    for name in ("src", "datasets", "configs"):  # the checkout paths the examples use
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", _library_examples()[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("*/report.html"))
