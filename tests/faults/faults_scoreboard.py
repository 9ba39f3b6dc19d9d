"""pytest plugin: the fault suite's scoreboard, one line per scenario and a final count.

Loaded with `-p faults_scoreboard` (the Makefile puts tests/faults on PYTHONPATH), so `make
test` and `make faults` print, for the tests under tests/faults only:

    faults: PASS resume/kill_9_then_resume_equals_uninterrupted[mid_epoch] (9.1s)
    ...
    faults: 41 passed, 0 failed

The final line is printed last (after pytest's own summary) so a CI log shows it at a glance.
"""

from __future__ import annotations

import os

_results: dict[str, dict] = {}


def _scenario(nodeid: str) -> str | None:
    path, _, name = nodeid.replace(os.sep, "/").partition("::")
    if "tests/faults/" not in f"/{path}":
        return None
    module = path.rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_fault_").removeprefix("test_")
    return f"{module}/{name.removeprefix('test_')}"


def pytest_runtest_logreport(report) -> None:
    name = _scenario(report.nodeid)
    if name is None:
        return
    entry = _results.setdefault(name, {"outcome": "passed", "seconds": 0.0})
    entry["seconds"] += report.duration
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _results:
        return
    terminalreporter.write_sep("-", "fault scenarios")
    label = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}
    for name, entry in _results.items():
        terminalreporter.write_line(f"faults: {label[entry['outcome']]} {name} ({entry['seconds']:.1f}s)")


def pytest_unconfigure(config) -> None:
    if not _results:
        return
    counts = {k: sum(e["outcome"] == k for e in _results.values()) for k in ("passed", "failed", "skipped")}
    line = f"faults: {counts['passed']} passed, {counts['failed']} failed"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    print(line, flush=True)
