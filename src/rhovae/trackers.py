"""Experiment trackers at the edge of training: TensorBoard and MLflow, both optional.

A run folder stays the record of a run (config, metrics, checkpoints, pictures); a tracker mirrors it
where a user browses runs. ``rhovae train --tensorboard`` writes TensorBoard event files to
``RUN/tensorboard`` (per-epoch scalars, a grid of prior samples per epoch for image data, and the run's
settings as hyperparameters with its final metrics). ``--mlflow [URI]`` logs one MLflow run per rhovae
run: its settings as parameters, the per-epoch metrics, the evaluation, and config, metrics and pictures
as artifacts; ``rhovae compare --mlflow`` groups a grid's runs in one MLflow experiment named after it,
with the report in a run of its own. A resumed run continues its MLflow run (``RUN/mlflow.json`` keeps
its id). Neither package is needed by the core: a flag whose package is missing is one line naming the
install command.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from rhovae.errors import RhovaeError
from rhovae.files import is_regular_file

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MLFLOW_URI", "MLflowTracker", "TensorBoardTracker", "Tracker", "log_report", "mlflow_uri"]

#: where ``--mlflow`` without a URI logs: a local file store in the working folder
DEFAULT_MLFLOW_URI = "./mlruns"
#: the MLflow experiment of ``rhovae train`` runs (``compare`` names its experiment after the grid)
TRAIN_EXPERIMENT = "rhovae"
MLFLOW_RECORD = "mlflow.json"  # in the run folder: which MLflow run mirrors it


class Tracker:
    """What the trainer calls; each method a no-op here. ``epoch`` after every saved epoch (rank 0),
    ``finish`` when training ends, ``evaluation`` when ``compare`` has evaluated the run."""

    def epoch(self, epoch: int, row: dict[str, float], model: Any, data: Any, seed: int) -> None:
        """Log one epoch's metrics row (and, where the tracker shows pictures, the model's samples)."""

    def finish(self, run_dir: Path, config: dict[str, Any], history: list[dict[str, float]]) -> None:
        """Training ended (finished, stopped early or resumed with nothing left to do)."""

    def evaluation(self, run_dir: Path, record: dict[str, Any]) -> None:
        """The run's evaluation (``evaluation.json``)."""

    def close(self) -> None:
        """Release files and connections."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scalars(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str))}


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tensorboard``: every metric per epoch, a grid of 64 prior samples per epoch
    for image data, and at the end the settings as hyperparameters with the final metrics (the
    HParams tab)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RhovaeError(
                "--tensorboard needs the tensorboard package: pip install 'rhovae[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def epoch(self, epoch: int, row: dict[str, float], model: Any, data: Any, seed: int) -> None:
        for key, value in row.items():
            if key != "epoch" and _finite(value):
                self.writer.add_scalar(key, value, epoch)
        from rhovae.plots import image_grid, is_image_shape

        if is_image_shape(tuple(data.data_shape)) and "vocab" not in data.meta:
            import torch

            from rhovae.runs import eval_mode

            with torch.no_grad(), eval_mode(model):
                grid = image_grid(model.sample(64, seed=seed), nrow=8)
            self.writer.add_image("samples", grid, epoch, dataformats="HWC")
        self.writer.flush()

    def finish(self, run_dir: Path, config: dict[str, Any], history: list[dict[str, float]]) -> None:
        if not history:
            return
        best = min(history, key=lambda r: r["val_loss"])
        final = {
            "hparam/best_val_loss": best["val_loss"],
            "hparam/best_epoch": best["epoch"],
            "hparam/test_loss": history[-1]["test_loss"],
        }
        self.writer.add_hparams(
            _scalars(config), {k: v for k, v in final.items() if _finite(v)}, run_name="."
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def mlflow_uri(uri: str | None) -> str:
    """A tracking URI as every process of a command can use it: a local path (``--mlflow`` alone means
    ``./mlruns``) becomes an absolute ``file:`` URI; other URIs (``http://...``, ``sqlite:///...``,
    ``databricks``) pass as they are. Checks that MLflow is installed."""
    _import_mlflow()
    uri = uri or DEFAULT_MLFLOW_URI
    if "://" not in uri and not uri.startswith("file:") and uri != "databricks":
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def _import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise RhovaeError("--mlflow needs the mlflow package: pip install 'rhovae[mlflow]'") from None
    return mlflow


def _client(uri: str):
    _import_mlflow()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the offline default
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process of the same compare created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MLflowTracker(Tracker):
    """One MLflow run per rhovae run (``client`` calls only, no global MLflow state): parameters when it
    is created, metrics per epoch (step = epoch), artifacts at the end, the evaluation when there is
    one. A resumed rhovae run continues its MLflow run (the id is kept in ``RUN/mlflow.json``)."""

    def __init__(self, uri: str, run_dir: Path, config: dict[str, Any], experiment: str = TRAIN_EXPERIMENT):
        self.uri, self.failed = uri, False
        try:
            self._open(uri, Path(run_dir), config, experiment)
        except RhovaeError:
            raise
        except Exception as e:  # noqa: BLE001 - a server that is down, a URI MLflow refuses, ...
            raise RhovaeError(
                f"MLflow at {uri}: {_first_line(e)}; check the tracking URI or drop --mlflow"
            ) from None

    def _open(self, uri: str, run_dir: Path, config: dict[str, Any], experiment: str) -> None:
        self.client, self.run_dir = _client(uri), run_dir
        record = self.run_dir / MLFLOW_RECORD
        self.run_id = None
        if is_regular_file(record):
            try:
                saved = json.loads(record.read_text(encoding="utf-8"))
                if saved.get("tracking_uri") == uri:
                    self.run_id = self.client.get_run(saved["run_id"]).info.run_id
            except Exception:  # noqa: BLE001 - a record of a deleted run: start a new one
                self.run_id = None
        if self.run_id is None:
            run = self.client.create_run(
                _experiment_id(self.client, experiment),
                run_name=self.run_dir.name,
                tags={"rhovae.run_dir": str(self.run_dir.resolve())},
            )
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in _scalars(config).items()]
            self.client.log_batch(self.run_id, params=params)
            from rhovae.runs import write_text_atomic

            write_text_atomic(record, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _guarded(self, what: str, call) -> None:
        """MLflow going away in the middle of a run costs the mirror, never the run: one warning, then
        nothing more is sent (the run folder keeps everything)."""
        if self.failed:
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001
            self.failed = True
            log.warning(
                "MLflow at %s: %s failed (%s); the run goes on without it", self.uri, what, _first_line(e)
            )

    def _metrics(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(prefix + k, float(v), now, step) for k, v in values.items() if _finite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def epoch(self, epoch: int, row: dict[str, float], model: Any, data: Any, seed: int) -> None:
        self._guarded(
            "logging epoch metrics",
            lambda: self._metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch),
        )

    def finish(self, run_dir: Path, config: dict[str, Any], history: list[dict[str, float]]) -> None:
        self._guarded("logging artifacts", self._finish)

    def _finish(self) -> None:
        for name in ("config.toml", "metrics.csv", "samples.png", "reconstructions.png", "loss_curves.png",
                     "samples.txt", "reconstructions.txt"):  # fmt: skip
            if is_regular_file(self.run_dir / name):
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id)

    def evaluation(self, run_dir: Path, record: dict[str, Any]) -> None:
        self._guarded("logging the evaluation", lambda: self._evaluation(record))

    def _evaluation(self, record: dict[str, Any]) -> None:
        self._metrics(record, step=int(record.get("epoch", 0) or 0), prefix="eval_")
        if is_regular_file(self.run_dir / "evaluation.json"):
            self.client.log_artifact(self.run_id, str(self.run_dir / "evaluation.json"))
        self.client.set_terminated(self.run_id)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def log_report(uri: str, experiment: str, out: Path) -> str:
    """The report of a ``compare`` (report.md, report.json, runs.csv and its pictures) as the artifacts
    of an MLflow run named ``report`` in the grid's experiment; returns its run id ("" when MLflow
    failed: the report on disk is complete, so that is a warning, not an error)."""
    try:
        client = _client(uri)
        run = client.create_run(_experiment_id(client, experiment), run_name="report")
        for path in sorted(Path(out).iterdir()):
            if (
                path.name in ("report.md", "report.json", "runs.csv", "experiment.json")
                or path.suffix == ".png"
            ):
                if is_regular_file(path):
                    client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
    except RhovaeError:
        raise
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow at %s: logging the report failed (%s); it is in %s", uri, _first_line(e), out)
        return ""
    return run.info.run_id


def open_trackers(
    run_dir: Path, config: dict[str, Any], tensorboard: bool = False, mlflow: str | None = None,
    experiment: str = TRAIN_EXPERIMENT,
) -> list[Tracker]:  # fmt: skip
    """The trackers a run asked for (``mlflow``: a URI as :func:`mlflow_uri` gives it, or None)."""
    trackers: list[Tracker] = []
    if tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    if mlflow:
        trackers.append(MLflowTracker(mlflow, run_dir, config, experiment))
    return trackers
