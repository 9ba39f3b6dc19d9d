"""W&B (offline) and MLflow (a local store in the run folder) hold the metrics metrics.jsonl holds,
the config and the report's plots. `make test-slow` installs both (the `wandb` and `mlflow` extras)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_run
from lmforge.train.run import run_training

wandb = pytest.importorskip("wandb", reason="pip install 'lmforge[wandb]' (make test-slow does)")
mlflow = pytest.importorskip("mlflow", reason="pip install 'lmforge[mlflow]' (make test-slow does)")


def _wandb_records(run_dir: Path) -> list:
    """The records of the run's offline .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, position, records, pending = path.read_bytes(), 32768, 7, [], b""  # 7: the W&B header
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline_and_mlflow_local_runs_hold_the_metrics(lm_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loggers = ["wandb", "mlflow"]
    result = run_training(tiny_run(lm_data, tmp_path, max_steps=8, loggers=loggers, eval_at_start=True),
                          show_progress=False)
    run = result.run_dir
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {e["step"]: e for e in events if e["event"] == "train"}
    val = {e["step"]: e for e in events if e["event"] == "eval" and e["split"] == "val"}
    assert sorted(train) == [2, 4, 6, 8] and sorted(val) == [0, 4, 8]
    assert "warning" not in (run / "train.log").read_text()

    records = _wandb_records(run)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx({s: e["loss"] for s, e in train.items()}, rel=1e-9)
    assert {row["_step"]: row["val/loss"] for row in history if "val/loss" in row} == \
        pytest.approx({s: e["loss"] for s, e in val.items()}, rel=1e-9)
    assert any(row.get("plots/loss/_type") == "image-file" for row in history)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["train"]["lr"] == 3e-3 and config["train"]["loggers"] == loggers

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx({s: e["loss"] for s, e in train.items()})
    assert mlflow_run.data.params["train.lr"] == "0.003" and mlflow_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "plots")}
    assert "plots/loss.png" in artifacts and (run / "mlruns").is_dir()

