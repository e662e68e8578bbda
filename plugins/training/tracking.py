"""Experiment tracking: MLflow with a local store by default, or nothing.

A run records the hyperparameters at start, loss and learning rate every
`log_every` steps, eval loss, each checkpoint as an artifact, and the final
metrics, so `mlflow ui --backend-store-uri <store>` shows the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, folder: Path, artifact_path: str) -> None: ...

    def log_files(self, files: list[Path], artifact_path: str) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_files(self, files: list[Path], artifact_path: str) -> None:
        for file in files:
            self.client.log_artifact(self.run_id, str(file), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def make_tracker(kind: str, tracking_uri: str | None, run_name: str) -> NullTracker:
    if kind == "none":
        return NullTracker()
    return MlflowTracker(tracking_uri or default_tracking_uri(), "jarvis-train", run_name)
