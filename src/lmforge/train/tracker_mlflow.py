"""The MLflow tracker (`train.loggers: [mlflow]`, `pip install 'lmforge[mlflow]'`): one MLflow
run per training session, through an `MlflowClient` (no process-wide active run).

MLFLOW_TRACKING_URI chooses the store (a server, a database); without it the run folder holds
a local one: <run>/mlflow.db, with the artifacts in <run>/mlruns
(`mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow.db`). The experiment is
MLFLOW_EXPERIMENT_NAME, default "lmforge". Parameters are the config flattened to section.key,
with config.yaml as an artifact; the report's plots are artifacts under plots/. A resumed run
is a new MLflow run named "<name> (resumed at step N)", tagged with the same lmforge.run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from lmforge.train.tracker_tensorboard import flat_hparams
from lmforge.train.trackers import TrackerRun

_MAX_PARAMS = 100  # MLflow's limit per log_batch call
_MAX_VALUE = 500  # longer values (a list of prompts) are cut: parameters are for comparing runs


class MLflowTracker:
    """Logs the run's metrics, parameters and plots to an MLflow run."""

    def __init__(self, run: TrackerRun) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = run.run_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:  # a local store inside the run folder
            run_dir.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{run_dir / 'mlflow.db'}", (run_dir / "mlruns").as_uri()
        for name in ("alembic", "mlflow.store.db.utils"):  # the database set-up's INFO lines
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmforge")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(experiment_name, artifact_location=artifacts))
        name = run.name if run.resumed_step is None else f"{run.name} (resumed at step {run.resumed_step})"
        self.run_id = self.client.create_run(experiment_id, run_name=name,
                                             tags={"lmforge.run": str(run_dir)}).info.run_id

    def log_hparams(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:_MAX_VALUE]) for key, value in flat_hparams(config).items()]
        for start in range(0, len(params), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[start:start + _MAX_PARAMS])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                             "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")
