"""One trial of `tongue-nb tune`: the trial's values trained into run folder(s), pruned through a fit callback.

The value is the validation combined score of the run (the best epoch's weights at the fixed 0.5 thresholds;
with folds the mean over the K fold runs); test scores are never read. `PruneOnValidation` reports each epoch's
validation score (the first fold's, with folds: pruning decides on that curve) and, when the pruner prunes,
sets `fit.stop_fit`: the fit ends after that epoch, the trainer still writes the run's summary, and the run
folder's trial.json says ``"state": "pruned"``. A retried trial (its worker died) trains in the first trial's run
folder with resume=True: it goes on from that folder's last.pt, or starts it afresh when there is none.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tongue_nb.pipeline.tune_space import Dimension
from tongue_nb.train.fit_state import Callback, FitState
from tongue_nb.train.params import TrainParams

log = logging.getLogger(__name__)


class PruneOnValidation(Callback):
    """Reports each epoch's validation combined score to the trial; ends the fit when the pruner prunes it (never
    after the last epoch: a trial that has run every epoch completes)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_epoch: int | None = None

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None:
        if not math.isfinite(fit.score):
            return
        self.trial.report(fit.score, fit.epoch)
        if fit.epoch >= sum(stage.epochs for stage in fit.stages):
            return  # the last epoch: the trial has paid for every epoch, so it completes with its score
        if self.trial.should_prune():
            fit.stop_fit = True
            self.pruned_epoch = fit.epoch
            log.info("trial %d pruned after epoch %d (val combined %.4f)", self.trial.number, fit.epoch, fit.score)


def _retried_number(trial: Any) -> int | None:
    """The first trial of a retried trial's chain (its run folder), None for a fresh trial."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs.get("failed_trial")


def _write_marker(run_dir: Path, record: dict[str, Any]) -> None:
    from tongue_nb.runio import atomic_write_text

    atomic_write_text(run_dir / "trial.json", json.dumps(record, indent=2, default=str))


def run_trial(trial: Any, study: str, folder: Path, base: TrainParams, space: list[Dimension]) -> float:
    """Train the trial's run(s); its value: the mean validation combined score. Raises TrialPruned when pruned."""
    import optuna

    from tongue_nb.analysis.scores import summary_score
    from tongue_nb.train.trainer import train

    values = {d.name: d.suggest(trial) for d in space}
    origin = _retried_number(trial)
    name = f"trial-{trial.number if origin is None else origin}"
    folds = list(range(base.folds)) if base.folds >= 2 else [None]
    trials_dir = folder.resolve() / "trials"
    runs = [trials_dir / (name if k is None else f"{name}-fold{k}") for k in folds]
    trial.set_user_attr("run_dir", os.path.relpath(runs[0], folder.resolve()))
    scores: list[float] = []
    for k, run_dir in zip(folds, runs):
        fold = {} if k is None else {"fold": k}
        params = dataclasses.replace(base, **values, **fold, out_dir=str(run_dir), resume=origin is not None,
                                     experiment_name=f"{study}-{run_dir.name}")
        pruning = PruneOnValidation(trial) if k in (None, 0) else None
        summary = train(params, callbacks=[pruning] if pruning else [])
        score = summary_score(summary.get("val_metrics_fixed"))
        scores.append(score)
        record = {"study": study, "trial": trial.number, "retry_of": origin, "values": values,
                  "fold": k, "val_combined": score, "state": "complete"}
        if pruning is not None and pruning.pruned_epoch is not None:
            _write_marker(run_dir, {**record, "state": "pruned", "pruned_after_epoch": pruning.pruned_epoch})
            trial.set_user_attr("val_score", score)
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_epoch}")
        _write_marker(run_dir, record)
    value = sum(scores) / len(scores)
    trial.set_user_attr("val_score", value)
    if len(scores) > 1:
        trial.set_user_attr("fold_scores", scores)
    return value


__all__ = ["PruneOnValidation", "run_trial"]
