"""Experiment tracking: each run's parameters, epoch scalars, test metrics and test figures in TensorBoard or MLflow.

`tracking` (a training parameter) chooses the callback: ``tensorboard`` (the default, event files under
``<run folder>/tensorboard``, no server), ``mlflow`` (a tracking URI: by default a SQLite store shared by the runs
beside this one, ``<parent of the run folder>/mlruns/mlflow.db``; a sweep's runs are one experiment) or ``none``.

What is written: the parameters once (TensorBoard: hparams and a text summary; MLflow: params), after every epoch
the scalars of its history row (losses, per-task validation metrics, learning rates, epoch time, samples/s) with
the epoch as step, and once after the final evaluation the test metrics and test figures (confusion matrices,
ROC / precision-recall curves); MLflow also keeps summary.json, params.yaml, history.csv and the best weights as
artifacts (and the run's 03 page, which a sweep attaches once it is rendered: `attach_report`).

Writes happen per epoch only, on rank 0 (no host reads in the step). A store that cannot be reached at the start
stops the run before its first epoch (one line, `TrainingError`); a write that fails later is logged once and
tracking stops for that run: training goes on, the run folder keeps everything. Resuming appends to the same
TensorBoard folder (epochs after the checkpoint replace those written before it) and continues the same MLflow
run (its id is in the run folder's mlflow_run.json).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import yaml

from tongue_nb import runfiles
from tongue_nb.analysis.metrics import REPORTED
from tongue_nb.runio import RunFolder
from tongue_nb.train.fit_state import Callback, FitState
from tongue_nb.train.params import TrainParams
from tongue_nb.train.runtime import TrainingError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"
STORE_DIR = "mlruns"

__all__ = ["TENSORBOARD_DIR", "MLFLOW_RUN_FILE", "epoch_scalars", "test_scalars", "test_figures", "tracking_uri",
           "experiment_name", "check_tracking", "make_trackers", "TensorBoardTracker", "MLflowTracker",
           "attach_report"]


# --------------------------------------------------------------------------- what is logged


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers and finite (a task without labelled rows has no score: left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def epoch_scalars(row: Mapping[str, Any], tasks: list[str]) -> dict[str, float]:
    """An epoch's history row (tongue_nb.train.fit) as tracking scalars, by tag."""
    out: dict[str, Any] = {"loss/train": row.get("train_loss"), "loss/val": row.get("val_loss"),
                           "val/combined": row.get("val_combined"), "time/epoch_seconds": row.get("seconds"),
                           "time/train_samples_per_s": row.get("train_samples_per_s"), "stage": row.get("stage")}
    for task in tasks:
        out[f"loss/train_{task}"] = row.get(f"train_loss_{task}")
        out.update({f"val/{task}/{key}": row.get(f"val_{task}_{key}") for key, _ in REPORTED})
    out.update({f"lr/{key[3:]}": value for key, value in row.items() if key.startswith("lr_")})
    return _finite(out)


def test_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The final test metrics of a run's summary, both views (fixed: 0.5 / argmax; thresholded: tuned on val)."""
    out: dict[str, Any] = {"test/loss": summary["final_metrics_fixed"].get("loss"),
                           "time/total_seconds": summary.get("timings", {}).get("total_seconds")}
    for view in ("fixed", "thresholded"):
        metrics = summary[f"final_metrics_{view}"]
        out[f"test/{view}/combined"] = metrics.get("combined_score")
        for task, values in metrics.get("tasks", {}).items():
            out.update({f"test/{view}/{task}/{key}": values.get(key) for key, _ in REPORTED})
    return _finite(out)


def test_figures(run_dir: Path) -> dict[str, bytes]:
    """The test split's figures of notebook 03 (confusion matrices at tuned thresholds, ROC / PR curves) as PNG."""
    from tongue_nb.analysis import figures, plots, runs

    run = runs.load_run(run_dir)
    return {"test/confusion_matrices": plots.figure_png(plots.plot_confusion_matrices(run.predictions, run.schema)),
            "test/roc_pr_curves": plots.figure_png(figures.roc_pr_curves(run, "test"))}


def _params_text(params: Mapping[str, Any]) -> str:
    body = yaml.safe_dump(dict(params), sort_keys=False, allow_unicode=True)
    return "    " + body.rstrip("\n").replace("\n", "\n    ")  # markdown code block: one parameter a line


# --------------------------------------------------------------------------- where


def tracking_uri(params: TrainParams, run_dir: Path) -> str:
    """The MLflow store: tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file shared by the run folders
    beside this one (a sweep's runs: <sweep>/runs/mlruns/mlflow.db)."""
    uri = params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{(Path(run_dir).resolve().parent / STORE_DIR / 'mlflow.db').as_posix()}"


def experiment_name(params: TrainParams, run_dir: Path) -> str:
    """The MLflow experiment: tracking_experiment (a sweep sets its folder's name), else the parent folder's name."""
    return params.tracking_experiment or Path(run_dir).resolve().parent.name


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store lie beside its file (MLflow's default would be ./mlruns of the working folder)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def check_tracking(params: TrainParams) -> None:
    """Before anything is trained: an MLflow server that does not answer stops the run (one line)."""
    uri = params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if params.tracking != "mlflow" or not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # it answers (a server behind a login may refuse /health): MLflow's own calls tell the rest
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrainingError(f"parameter tracking_uri: no MLflow server answers at {uri} ({reason}); start it, "
                            "correct tracking_uri, or train with tracking=none") from None


# --------------------------------------------------------------------------- the callbacks


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class Tracker(Callback):
    """What both trackers share: rank 0 only, and a failed write logged once, after which tracking stops."""

    what = ""

    def __init__(self, params: TrainParams, folder: RunFolder, tasks: list[str]) -> None:
        self.params, self.folder, self.tasks = params, folder, tasks
        self.active = False

    def _guard(self, action: str, fn: Any, *args: Any) -> None:
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking never costs a run: warned once, then off
            self.active = False
            self.close()
            log.warning("%s tracking failed while %s (%s); training goes on without it (the run folder keeps "
                        "everything)", self.what, action, _first_line(exc))

    def on_fit_start(self, fit: FitState) -> None:
        if not fit.rt.dist.is_main:
            return
        try:
            self.start(fit.position.epoch)
        except Exception as exc:  # noqa: BLE001 - one line, before the first epoch
            raise TrainingError(f"tracking={self.params.tracking}: cannot start ({_first_line(exc)}); fix "
                                "tracking_uri or train with tracking=none") from None
        self.active = True

    def after_epoch(self, fit: FitState, row: dict[str, Any]) -> None:
        self._guard("writing epoch %d" % fit.epoch, self.epoch, fit.epoch, epoch_scalars(row, self.tasks))

    def on_run_end(self, fit: FitState, summary: Mapping[str, Any]) -> None:
        self._guard("writing the test results", self.finish, fit.epoch, summary)
        self.active = False

    def start(self, resumed_after: int) -> None: ...

    def epoch(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def finish(self, step: int, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None:
        """Release what `start` opened after a failed write (quietly: it may be what failed)."""


class TensorBoardTracker(Tracker):
    """Event files under <run folder>/tensorboard: `tensorboard --logdir <run folder>` (or a sweep's runs/)."""

    what = "TensorBoard"

    def __init__(self, params: TrainParams, folder: RunFolder, tasks: list[str]) -> None:
        super().__init__(params, folder, tasks)
        self.writer: Any = None

    def start(self, resumed_after: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Epochs after the checkpoint resumed from replace those an interrupted run wrote after it.
        self.writer = SummaryWriter(str(self.folder.file(TENSORBOARD_DIR)), purge_step=resumed_after + 1)
        if resumed_after:
            return  # parameters were written when the run started
        values = self.params.as_dict()
        self.writer.add_text("params", _params_text(values), 0)
        metrics = {"val/combined": 0.0, "test/fixed/combined": 0.0, "test/thresholded/combined": 0.0}
        for summary in hparams(values, metrics):  # the HPARAMS tab: every run's parameters beside its scores
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def epoch(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        import io

        import numpy as np
        from PIL import Image

        try:
            for tag, value in test_scalars(summary).items():
                self.writer.add_scalar(tag, value, step)
            for tag, png in test_figures(self.folder.path).items():
                image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                self.writer.add_image(tag, image, step, dataformats="HWC")
        finally:
            self.writer.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per run folder, in the experiment of its sweep (or of its parent folder)."""

    what = "MLflow"

    def __init__(self, params: TrainParams, folder: RunFolder, tasks: list[str]) -> None:
        super().__init__(params, folder, tasks)
        self.uri = tracking_uri(params, folder.path)
        self.client: Any = None
        self.run_id = ""

    def _experiment_id(self) -> str:
        name = experiment_name(self.params, self.folder.path)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri))
        except Exception:  # noqa: BLE001 - another run of the sweep created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _resumed_run(self) -> str:
        """The MLflow run this folder's interrupted run was logging to (same store), or ''."""
        path = self.folder.file(MLFLOW_RUN_FILE)
        if not path.is_file():
            return ""
        saved = runfiles.read_json(path, "the run's MLflow record (JSON: tracking_uri, run_id)",
                                   keys=("tracking_uri", "run_id"))
        return str(saved["run_id"]) if saved["tracking_uri"] == self.uri else ""

    def start(self, resumed_after: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id()
        self.run_id = self._resumed_run() if resumed_after else ""
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=self.folder.path.name,
                                     tags={"tongue_nb.run_dir": str(self.folder.path.resolve()),
                                           "tongue_nb.backbone": self.params.backbone})
        self.run_id = run.info.run_id
        self.folder.write_json(MLFLOW_RUN_FILE, {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                                 "run_id": self.run_id})
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in self.params.as_dict().items()])

    def _log(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def epoch(self, step: int, scalars: Mapping[str, float]) -> None:
        self._log(step, scalars)

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        self._log(step, test_scalars(summary))
        for name in (RunFolder.SUMMARY, RunFolder.PARAMS, RunFolder.HISTORY):
            if self.folder.file(name).is_file():
                self.client.log_artifact(self.run_id, str(self.folder.file(name)))
        if self.folder.best.is_file():
            self.client.log_artifact(self.run_id, str(self.folder.best), "checkpoints")
        with tempfile.TemporaryDirectory() as tmp:
            for tag, png in test_figures(self.folder.path).items():
                (Path(tmp) / f"{tag.split('/')[-1]}.png").write_bytes(png)
            self.client.log_artifacts(self.run_id, tmp, "figures")
        self.client.set_terminated(self.run_id, "FINISHED")


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def make_trackers(params: TrainParams, folder: RunFolder, tasks: list[str]) -> list[Callback]:
    """The tracking callback the recipe's `tracking` asks for (none for 'none')."""
    kind = TRACKERS.get(params.tracking)
    return [kind(params, folder, tasks)] if kind is not None else []


def attach_report(run_dir: str | Path, html: str | Path) -> None:
    """Add a run's rendered 03 page to its MLflow run (a sweep renders it after the run ended); a run that did
    not track to MLflow is left alone, and a failure is a warning."""
    path = Path(run_dir) / MLFLOW_RUN_FILE
    if not path.is_file() or not Path(html).is_file():
        return
    try:
        saved = runfiles.read_json(path, "the run's MLflow record (JSON: tracking_uri, run_id)",
                                   keys=("tracking_uri", "run_id"))
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=saved["tracking_uri"]).log_artifact(saved["run_id"], str(html), "report")
    except Exception as exc:  # noqa: BLE001 - the page is in the reports folder either way
        log.warning("%s: the report %s was not added to the MLflow run (%s)", run_dir, html, exc)
