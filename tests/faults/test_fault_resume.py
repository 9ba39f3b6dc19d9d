"""Nothing lost: kill -9 anywhere, resume, and end bitwise where an uninterrupted run ends.

Every scenario trains the same tiny GPT in a child process (see faultkit) and dies at a named
fault point (`LMFORGE_FAULT`, see lmforge.base.faults); the baseline run is trained once per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import faultkit as fk
from faultkit import data_fixture  # noqa: F401  (fixtures)
from lmforge.checkpoint import load_checkpoint
from lmforge.checkpoint.retention import find_latest
from lmforge.train.run import resolve_resume


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run = fk.baseline(tmp_path_factory)
    assert len(fk.losses(run)) == fk.BASE_STEPS
    assert [e["step"] for e in fk.events(run, "epoch")] == [fk.STEPS_PER_EPOCH, 2 * fk.STEPS_PER_EPOCH]
    return run


def _check_samples(killed_log: Path, resumed_log: Path, baseline_log: Path, resume_step: int) -> None:
    """The killed run saw a prefix of the baseline's batches; the resumed one exactly the rest,
    from the step after its checkpoint: no sample repeated, none skipped."""
    want = baseline_log.read_text().splitlines()
    killed, resumed = killed_log.read_text().splitlines(), resumed_log.read_text().splitlines()
    assert killed == want[: len(killed)] and len(killed) >= resume_step
    assert resumed == want[resume_step:]
    for epoch in {line.split()[0] for line in want}:
        ids = [i for line in want if line.split()[0] == epoch for i in line.split()[2:]]
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample was trained on twice"


# where it dies -> the step of the checkpoint the resume must start from (None: restart at 0)
KILLS = {
    "before_first_checkpoint": ("after_step_2", None),
    "just_after_a_checkpoint": ("after_step_3", 3),
    "mid_epoch": ("after_step_8", 6),
    # dies while writing the epoch-1 checkpoint at the end of epoch 0: the replay crosses the boundary
    "across_epoch_boundary": ("ckpt_mid_write:epoch-1", 3),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_kill_9_then_resume_equals_uninterrupted(where: str, data: Path, baseline: Path, tmp_path: Path):
    fault, resume_step = KILLS[where]
    cfg = fk.run_config(data, tmp_path, "killed")
    logs = {"killed": tmp_path / "killed.log", "resumed": tmp_path / "resumed.log"}
    killed = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path, fault=fault,
                        env={"FAULTS_SAMPLE_LOG": str(logs["killed"])})
    assert killed.returncode == 137, killed.stderr
    run = tmp_path / "killed"
    latest = find_latest(run / "checkpoints")
    assert (latest and fk.checkpoint_step(latest)) == resume_step
    resumed = fk.lmforge(["train", "--resume", str(run), "--quiet"], tmp_path,
                         env={"FAULTS_SAMPLE_LOG": str(logs["resumed"])})
    assert resumed.returncode == 0, resumed.stderr
    if resume_step is None:
        assert "starting it again from step 0" in resumed.stderr
    fk.assert_same_weights(baseline / "checkpoints" / "last", run / "checkpoints" / "last")
    assert fk.losses(run) == fk.losses(baseline)  # every step, bitwise
    _check_samples(logs["killed"], logs["resumed"], baseline.parent / "samples.log", resume_step or 0)
    assert fk.leftovers(run / "checkpoints") == []


# crash point during the 2nd save of `last` (step 4; the 1st was step 2) -> step that must load
WRITE_CRASHES = {
    "ckpt_before_write": 2,
    "ckpt_mid_write": 2,
    "ckpt_after_flush": 2,
    "ckpt_after_rename": 2,  # old renamed aside, new not yet in: the old one is put back
    "ckpt_during_cleanup": 4,  # the new one is in place; the old one was being deleted
}


@pytest.mark.parametrize("point", list(WRITE_CRASHES))
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(point: str, data: Path, tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "crashed", max_steps=4, eval_every=1000, save_every=2)
    nth = 1 if point == "ckpt_during_cleanup" else 2  # only a save that replaces one cleans up
    crashed = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path, fault=f"{point}:last@{nth}")
    assert crashed.returncode == 137, crashed.stderr
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert fk.leftovers(ckpts), "the crash should have left a temp/old folder behind"
    # a partial folder is never picked, even before cleanup
    picked = find_latest(ckpts)
    assert picked is None or fk.checkpoint_step(picked) in (2, 4)
    # the next start cleans up and resumes from a complete checkpoint
    _, checkpoint = resolve_resume(tmp_path / "crashed", None, [])
    assert fk.leftovers(ckpts) == []
    assert checkpoint == ckpts / "last" and fk.checkpoint_step(checkpoint) == WRITE_CRASHES[point]
    state = load_checkpoint(checkpoint, with_training_state=True).training_state
    assert state["loop"]["step"] == WRITE_CRASHES[point]


def test_auto_resume_takes_the_newest_complete_checkpoint(baseline: Path, tmp_path: Path):
    run = fk.copy_run(baseline, tmp_path / "run")
    ckpts = run / "checkpoints"
    (ckpts / "last" / "manifest.json").unlink()  # `last` (step 12) is now incomplete
    _, checkpoint = resolve_resume(run, None, [])
    assert checkpoint == ckpts / "epoch-2" and fk.checkpoint_step(checkpoint) == 10


def test_explicit_resume_of_a_wrong_or_incomplete_path_is_an_error(baseline: Path, tmp_path: Path):
    run = fk.copy_run(baseline, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "last", run / "checkpoints" / "partial")
    (run / "checkpoints" / "partial" / "manifest.json").unlink()
    before = sorted(p.name for p in run.rglob("*"))
    cases = {str(tmp_path / "nowhere"): "not a run folder",
             str(run / "checkpoints" / "partial"): "incomplete checkpoint",
             str(run / "metrics.jsonl"): "not a run folder"}
    for path, message in cases.items():
        result = _in_process(["train", "--resume", path, "--quiet"])
        assert result[0] == 2 and message in result[1] and "Traceback" not in result[1], (path, result)
    assert sorted(p.name for p in run.rglob("*")) == before  # no fresh start wrote anything


def _in_process(argv: list[str]) -> tuple[int, str]:
    """cli.main in this process, for error paths that stop before any training."""
    import contextlib
    import io

    from lmforge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()
