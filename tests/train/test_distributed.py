"""torchrun with 2 CPU processes (gloo): DDP and FSDP equal one process, resume across world
sizes, elastic restarts, and a hung rank bounded by the collective timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import forked_cli
from conftest import tiny_run
from lmforge.checkpoint import load_checkpoint

pytestmark = pytest.mark.multiprocess

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# A small learning rate keeps Adam from amplifying float summation-order noise between world sizes.
SETTINGS = dict(max_steps=6, lr=1e-4, warmup_steps=0, schedule="constant", eval_every=3, save_every=2)


# `lmforge` without the HTML report (matplotlib: seconds per run, not under test here).
LMFORGE = str(Path(__file__).resolve().parents[1] / "faults" / "fault_runner.py")


def _env(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_FAULT")}
    environ.update(env, OMP_NUM_THREADS="1")
    return environ


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=240)


def _config(lm_data: Path, tmp_path: Path, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(lm_data, tmp_path, **{**SETTINGS, **train})))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last").state_dict


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def single(lm_data: Path, tmp_path_factory) -> Path:
    """One process, micro-batch 8: the reference for a 2 x 4 global batch."""
    tmp = tmp_path_factory.mktemp("single")
    result = forked_cli.run([LMFORGE, "train", str(_config(lm_data, tmp, batch_size=8)), "run.name=single", "--quiet"],
                            tmp, _env())
    assert result.returncode == 0, result.stderr
    return tmp / "single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(lm_data, tmp_path, single, strategy):
    config = _config(lm_data, tmp_path, batch_size=4, strategy=strategy)
    result = _run([*TORCHRUN, LMFORGE, "train", str(config), "run.name=two"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 (micro 4 x accum 1 x world 2)" in result.stdout
    assert result.stdout.count("done: max_steps at step 6") == 1  # only rank 0 prints
    _assert_close(_weights(tmp_path / "two"), _weights(single))


def test_stopped_on_two_processes_resumes_on_one_at_the_same_position(lm_data, tmp_path, single):
    config = _config(lm_data, tmp_path, batch_size=4, strategy="fsdp")
    killed = _run([*TORCHRUN, LMFORGE, "train", str(config), "run.name=moved"], tmp_path,
                  LMFORGE_FAULT="after_step_4")
    assert killed.returncode != 0
    state = load_checkpoint(tmp_path / "moved" / "checkpoints" / "last", with_training_state=True).training_state
    assert state["loop"]["step"] == 4 and state["loop"]["epoch_sample"] == 32 and state["world_size"] == 2
    resumed = forked_cli.run([LMFORGE, "train", "--resume", str(tmp_path / "moved"), "train.batch_size=8",
                              "train.strategy=ddp", "--quiet"], tmp_path, _env())
    assert resumed.returncode == 0, resumed.stderr
    assert "train.batch_size: 4 -> 8" in resumed.stderr  # the changed config is shown
    _assert_close(_weights(tmp_path / "moved"), _weights(single))


def test_a_killed_worker_restarts_from_the_last_checkpoint(lm_data, tmp_path):
    config = _config(lm_data, tmp_path, batch_size=4)
    result = _run([*TORCHRUN, "--max-restarts", "1", LMFORGE, "train", str(config), "run.name=el",
                   "--quiet"], tmp_path, LMFORGE_FAULT="after_step_3", LMFORGE_FAULT_RANK="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "elastic restart 1: resuming from" in result.stderr
    state = load_checkpoint(tmp_path / "el" / "checkpoints" / "last", with_training_state=True).training_state
    assert state["loop"]["step"] == 6


def test_a_hung_rank_fails_the_job_within_the_timeout_naming_the_step(lm_data, tmp_path):
    config = _config(lm_data, tmp_path, batch_size=4, collective_timeout=3)
    result = _run([*TORCHRUN, LMFORGE, "train", str(config), "run.name=hung", "--quiet"], tmp_path,
                  LMFORGE_FAULT="hang:after_step_2", LMFORGE_FAULT_RANK="1")
    assert result.returncode != 0
    assert "step 3: waiting for the other ranks" in result.stderr


def test_gpu_jobs_reduce_host_counters_over_gloo_and_tensors_over_nccl():
    from torch.distributed.distributed_c10d import BackendConfig

    from lmforge.base.distributed import process_group_backend
    assert process_group_backend(torch.device("cpu")) == "gloo"
    gpu = BackendConfig(process_group_backend(torch.device("cuda"))).get_device_backend_map()
    assert gpu == {"cpu": "gloo", "cuda": "nccl"}  # the loop all-reduces CPU tensors too
