"""`tongue-nb tune`: an Optuna search over a recipe's training parameters, each trial an ordinary run folder.

- The space: a YAML file over `TrainParams` fields (tongue_nb.pipeline.tune_space), checked before any trial runs.
- A trial: `trainer.train` with the recipe and the trial's values into ``<tune>/trials/trial-<number>``; its value
  is the run's validation combined score (the best epoch's weights at the fixed 0.5 thresholds), never test. With
  ``folds: K`` in the recipe a trial trains the K folds (``trial-<n>-fold<k>``) and its value is their mean.
- Pruning: `PruneOnValidation` reports each epoch's validation score (the first fold's, with folds) and ends the fit
  when the pruner says so; the trial is PRUNED, its run folder complete (summary of the epochs it ran) and its
  ``trial.json`` says ``"state": "pruned"``.
- Storage: SQLite ``<tune>/study.db`` by default, any SQLAlchemy URL (``--storage postgresql://...``), or Optuna's
  journal file (``--storage journal:PATH`` or a path ending .log / .journal) on a shared file system.
- A time budget (``minutes``): no trial starts after it (one under way finishes); the result says it stopped short.
- Resume and dead workers: the command run again goes on until `trials` trials are finished (complete or pruned),
  with the same space, recipe and data: a study records them at its first run (`base_record`) and a rerun with
  others is refused before anything is written (`_check_same_study`).
  A trial whose worker died stops its heartbeat (Optuna's for a database; for the journal, a file
  ``<tune>/heartbeats/<trial>`` touched by the worker): after the grace period it is marked FAIL and queued again
  with the same values; the retry resumes the dead trial's run folder from its last.pt.
- Workers: ``workers`` local processes share the study (one GPU each when there are GPUs; with ``--gpus`` even one
  worker is a process that sees only its GPU, and a GPU without a worker is refused); more machines run the
  same command against the same storage and tune folder. Count and ask happen under a lock file in the tune folder,
  so the workers together finish exactly `trials` trials.
- Output: ``best.yaml`` (the best trial's own values from its params.yaml, every training value pinned, for
  `sweep -f`) and ``report.html``
  (tongue_nb.pipeline.tune_report).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd

from tongue_nb.paths import check_output_folder
from tongue_nb.pipeline.tune_space import NOT_TUNABLE, Dimension, load_space, space_from_dicts
from tongue_nb.train.params import (RUN_CONTROL, ParamError, TrainParams, file_places, load_params, read_params_file,
                                    split_overrides)

log = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
RECORD = "tune.json"          # the tune folder's record of its options (what a later run and show_study read)
FAILURES_IN_A_ROW = 3          # a worker stops after this many failed trials in a row (a broken recipe or data)
MEDIAN_STARTUP = 3             # finished trials before the median pruner stops any (a median of fewer is noise)


@dataclass
class TuneOptions:
    """What `run_tune` needs; `check_options` refuses a bad one before anything is written."""

    space: str
    trials: int
    study: str
    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    data_dir: str | None = None
    backbone: str | None = None
    out_dir: str = ""
    storage: str = ""
    pruner: str = "median"
    workers: int = 1
    gpus: list[str] = field(default_factory=list)
    heartbeat: int = 60        # seconds between heartbeats; a trial silent for 3x this is taken for dead
    max_retry: int = 3         # times a dead worker's trial is queued again
    minutes: float = 0.0       # a time budget for this run of the command: no trial starts after it; 0: none
    deadline: float = 0.0      # that budget's end (epoch seconds), set by run_tune and recorded for the workers

    @property
    def folder(self) -> Path:
        return Path(self.out_dir or Path("tune") / self.study)

    @property
    def grace(self) -> int:
        return 3 * self.heartbeat


# --------------------------------------------------------------------------- checks (nothing written)


def recipe_folds(options: TuneOptions) -> int:
    """The recipe's number of folds (its files' `folds:`, then --set folds)."""
    folds: Any = 0
    for file in options.files:
        folds = read_params_file(file).get("folds", folds)
    for key, raw, _ in split_overrides(options.overrides):
        folds = raw if key == "folds" else folds
    try:
        return int(folds)
    except (TypeError, ValueError):
        raise ParamError(f"recipe folds: got {folds!r}, expected 0 or a number of folds >= 2") from None


def base_params(options: TuneOptions, **values: Any) -> TrainParams:
    """The recipe (files < --set) with `values`, the data and the backbone; with folds, fold 0."""
    given = {"progress": False}
    if options.data_dir is not None:
        given["data_dir"] = options.data_dir
    if options.backbone is not None:
        given["backbone"] = options.backbone
    if recipe_folds(options) >= 2:
        given["fold"] = 0
    return load_params(files=options.files, overrides=options.overrides, **{**given, **values})


# What every trial's run is given by the tune itself (tune_trial.run_trial): a recipe's or a --set value of one of
# these would be silently replaced.
TRIAL_OWNED = ("out_dir", "experiment_name", "resume", "resume_changed_data", "progress")

# What may differ between the runs of one study (`base_record`): the values the tune gives every trial, how a run is
# carried out (threads, device, the image cache, the OOM retry, the evaluation batch) and where its logs go. A retried
# trial resumes its run folder under the same rule (params.RUN_CONTROL). Everything else the recipe resolves to
# (its files, --set, --backbone) and the data (labels.csv and the task schema, by content) must be the same.
RERUN_FREE = frozenset(TRIAL_OWNED) | RUN_CONTROL
_DATA_KEYS = {"labels.csv": "data (labels.csv sha256)", "tasks": "data (task schema sha256)"}


def _check_trial_owned(options: TuneOptions) -> None:
    """Refuse a recipe key (at its top or in a per_backbone section) or --set that the tune sets for every trial;
    with folds, `fold` too (each trial trains every fold)."""
    owned = {key: NOT_TUNABLE[key] for key in TRIAL_OWNED}
    if recipe_folds(options) >= 2:
        owned["fold"] = "with folds every trial trains every fold 0 .. K-1"
    for file in options.files:
        for where, values in file_places(read_params_file(file)):
            for key in values:
                if key in owned:
                    raise ParamError(f"-f/--file {file}: {where}{key}: {owned[key]}; remove it from the recipe")
    for key, _, item in split_overrides(options.overrides):
        if key in owned:
            raise ParamError(f"--set {item}: {owned[key]}; it cannot be set for a tune")


def _check_not_another_folder(folder: Path) -> None:
    """The tune folder is new, empty or a tune's: not a run, fold ensemble or sweep (their records would mix)."""
    from tongue_nb.runio import held_by_another

    held = held_by_another(folder, RECORD)
    if held:
        raise ParamError(f"--out {folder}: holds {held}, not a tune; its records would mix with the study's: "
                         "choose another folder")


def check_options(options: TuneOptions) -> tuple[TrainParams, list[Dimension]]:
    """The recipe and the space, checked; ParamError (one line) on the first problem. Writes nothing."""
    for file in options.files:
        if not Path(file).is_file():
            raise ParamError(f"-f/--file {file}: recipe not found; expected a recipe YAML file")
    if options.trials < 1:
        raise ParamError(f"--trials: got {options.trials}, expected at least 1")
    if options.workers < 1:
        raise ParamError(f"--workers: got {options.workers}, expected at least 1")
    if options.heartbeat < 1:
        raise ParamError(f"--heartbeat: got {options.heartbeat}, expected at least 1 second")
    if not (isinstance(options.minutes, (int, float)) and 0 <= options.minutes < float("inf")):
        raise ParamError(f"--minutes: got {options.minutes}, expected a time budget in minutes >= 0 (0: none)")
    if options.pruner not in PRUNERS:
        raise ParamError(f"--pruner: got {options.pruner!r}, expected one of {', '.join(PRUNERS)}")
    if not options.study or "/" in options.study:
        raise ParamError(f"--study: got {options.study!r}, expected a plain name")
    if options.backbone is None and not any("backbone" in read_params_file(f) for f in options.files) \
            and not any(key == "backbone" for key, _, _ in split_overrides(options.overrides)):
        raise ParamError("tune: no backbone given: pass --backbone NAME or a recipe (-f) that names one")
    if options.data_dir is not None and not Path(options.data_dir).is_dir():
        raise ParamError(f"--data: folder {options.data_dir} not found")
    _check_trial_owned(options)
    check_output_folder(options.folder, "--out")  # not in a dataset: its trials could not write their runs there
    _check_not_another_folder(options.folder)
    base = base_params(options)
    from tongue_nb.train.trainer import check_split

    check_split(base)  # a split or fold cut the data cannot give fails here, not in every trial
    space = load_space(options.space, lambda values: base_params(options, **values))
    check_storage(options)
    return base, space


def storage_spec(options: TuneOptions) -> tuple[str, str]:
    """('journal', path) or ('rdb', SQLAlchemy URL) of the study's storage."""
    spec = options.storage.strip()
    if not spec:
        return "rdb", f"sqlite:///{(options.folder / 'study.db').resolve()}"
    if spec.startswith("journal:") or spec.endswith((".log", ".journal")):
        path = spec[len("journal:"):] if spec.startswith("journal:") else spec
        if not path or not Path(path).expanduser().resolve().parent.is_dir():
            raise ParamError(f"--storage {spec}: the journal file's folder does not exist; expected journal:PATH "
                             "in an existing folder (a shared file system for several machines)")
        return "journal", str(Path(path).expanduser().resolve())
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(spec)
    except ArgumentError:
        raise ParamError(f"--storage: got {spec!r}, expected a SQLAlchemy URL (sqlite:///PATH, "
                         "postgresql://USER@HOST/DB) or journal:PATH") from None
    return "rdb", spec


def check_storage(options: TuneOptions) -> None:
    """A --storage the study can be opened in, checked without connecting or writing: its database driver is
    installed, and an SQLite file's folder exists and is writable. ParamError (one line) if not."""
    kind, where = storage_spec(options)
    if kind == "journal" or not options.storage.strip():
        return  # the journal's folder is checked by storage_spec; the default study.db goes in the tune folder
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchModuleError

    url = make_url(where)
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ParamError(f"--storage {where}: unknown database kind {url.drivername!r}; expected a SQLAlchemy URL "
                         "(sqlite:///PATH, postgresql://USER@HOST/DB) or journal:PATH") from None
    except ImportError as exc:
        module = getattr(exc, "name", None) or str(exc)
        raise ParamError(f"--storage {where}: the driver of {url.drivername}:// is not installed (no Python module "
                         f"{module}); expected a URL whose driver is installed (pip install it, or name one: "
                         "postgresql+psycopg2://...), sqlite:///PATH or journal:PATH") from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        folder = Path(database).expanduser().parent
        if database in ("", ":memory:") or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ParamError(f"--storage {where}: cannot write an SQLite file there; expected sqlite:///PATH with "
                             "PATH a file in an existing folder you can write to")


# --------------------------------------------------------------------------- storage, study


def open_storage(kind: str, where: str, options: TuneOptions) -> Any:
    """The Optuna storage: an RDBStorage with heartbeats and retries, or a journal file."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(where))
    kwargs = {"connect_args": {"timeout": 60}} if where.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(where, engine_kwargs=kwargs, heartbeat_interval=options.heartbeat,
                          grace_period=options.grace,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=options.max_retry))


def median_warmup(base: TrainParams, space: Sequence[Dimension]) -> int:
    """The first epoch the median pruner may stop a trial at: the first that trains the whole network (after the
    frozen-backbone stage 1, the space's longest when it tunes stage1_epochs), and never epoch 1."""
    stage1 = base.stage1_epochs
    for d in space:
        if d.name == "stage1_epochs":
            stage1 = int(max(d.choices) if d.kind == "choice" else d.high)
    return max(2, stage1 + 1)


def make_pruner(name: str, base: TrainParams, space: Sequence[Dimension]) -> Any:
    """The --pruner of a worker's study: median (once MEDIAN_STARTUP trials completed, from median_warmup),
    halving, or none."""
    import optuna

    if name == "median":  # trials report their epoch numbers (1, 2, ...): pruning from epoch n_warmup_steps on
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP, n_warmup_steps=median_warmup(base, space))
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def load_study(options: TuneOptions, pruner: Any = None, seed: int = 0) -> Any:
    """The study in its storage (made when new), with the TPE sampler and `pruner` (a worker's: make_pruner;
    without one, none: reading a study needs no pruner)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(*storage_spec(options), options)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.create_study(study_name=options.study, storage=storage, direction="maximize", sampler=sampler,
                               pruner=pruner if pruner is not None else optuna.pruners.NopPruner(),
                               load_if_exists=True)


def base_record(base: TrainParams) -> dict[str, Any]:
    """What a study remembers of the recipe it was started with: every resolved value but RERUN_FREE, with the data
    as the sha256 of its labels.csv and task schema (the dataset reached by another path, e.g. on another machine,
    is the same data) and pretrained_path as a real path."""
    from tongue_nb.train.trainer import data_fingerprint, resolve_data

    record = {k: v for k, v in base.as_dict().items() if k not in RERUN_FREE and k not in ("data_dir", "tasks")}
    if record["pretrained_path"]:
        record["pretrained_path"] = os.path.realpath(os.path.expanduser(record["pretrained_path"]))
    fingerprint = data_fingerprint(resolve_data(base)[0], base.tasks)
    record.update({name: fingerprint[key] for key, name in _DATA_KEYS.items()})
    return record


def _base_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: <then> then, <now> now' for each value that differs (a field newer than the study: when not default)."""
    fields = TrainParams.__dataclass_fields__
    out = []
    for key, value in now.items():
        then = saved.get(key, fields[key].default if key in fields else None)
        if then != value:
            shown = [str(v)[:12] if key in _DATA_KEYS.values() else repr(v) for v in (then, value)]
            out.append(f"{key}: {shown[0]} then, {shown[1]} now")
    return out


def _check_same_study(study: Any, space: list[Dimension], base: TrainParams, record: dict[str, Any],
                      first_run: bool = True) -> None:
    """A study remembers its space and its base recipe (`base_record`): a rerun with others is refused, naming what
    differs (start another --study). With `first_run` (under the ask lock) a new study records them and gets the
    recipe's own values as its first trial (`_enqueue_recipe`); without, nothing is written.

    A study started before the base was recorded is checked on its space and backbone only.
    """
    saved = study.user_attrs.get("space")
    now = [d.as_dict() for d in space]
    if saved is None:
        if first_run:
            study.set_user_attr("space", now)
            study.set_user_attr("backbone", base.backbone)
            study.set_user_attr("base", record)
            if not study.get_trials(deepcopy=False):
                _enqueue_recipe(study, space, base)
        return
    if [d.reached() for d in space_from_dicts(saved)] != [d.reached() for d in space_from_dicts(now)] \
            or study.user_attrs.get("backbone") != base.backbone:
        raise ParamError(f"--study {study.study_name}: this study was started with another search space or "
                         "backbone; pass the same ones to go on, or name another --study")
    if "base" not in study.user_attrs:
        log.info("study %s records no base recipe (started by an older tongue-nb): the recipe is not compared",
                 study.study_name)
        return
    differences = _base_differences(study.user_attrs["base"], record)
    if differences:
        raise ParamError(f"--study {study.study_name}: this study was started with another recipe or data "
                         f"({'; '.join(differences)}); pass the same recipe (-f, --set, --backbone) and --data to go "
                         "on, or name another --study")


def _existing_study(options: TuneOptions) -> Any:
    """The study when its storage already holds it (a rerun), opened without making a file or a study; else None."""
    import optuna
    from sqlalchemy.engine import make_url

    kind, where = storage_spec(options)
    if kind == "journal":
        exists = Path(where).is_file()
    else:
        url = make_url(where)
        exists = url.get_backend_name() != "sqlite" or Path(url.database or "").is_file()
    if not exists:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=options.study, storage=open_storage(kind, where, options))
    except KeyError:
        return None


def _enqueue_recipe(study: Any, space: list[Dimension], base: TrainParams) -> None:
    """Queue the recipe as given as the study's first trial, so its table shows what the search gained over it.

    Only when every tuned field's recipe value lies in the space (on its grid); otherwise the search starts from
    the sampler alone and the log says which value is outside.
    """
    values = {d.name: getattr(base, d.name) for d in space}
    outside = [f"{d.name}={values[d.name]!r}" for d in space if not d.contains(values[d.name])]
    if outside:
        log.info("the recipe's own values are not queued as the first trial: %s outside the space", ", ".join(outside))
        return
    study.enqueue_trial(values, user_attrs={"recipe": True})


# --------------------------------------------------------------------------- workers


@contextlib.contextmanager
def _ask_lock(folder: Path):
    """Exclusive lock on <tune>/.ask.lock (flock: dropped when its holder dies); yields a release function."""
    fd = os.open(folder / ".ask.lock", os.O_RDWR | os.O_CREAT, 0o644)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield release
    finally:
        release()


class _FileHeartbeat:
    """The journal's heartbeat: a thread touching <tune>/heartbeats/<trial number> every `interval` seconds."""

    def __init__(self, folder: Path, number: int, interval: int) -> None:
        self.path = folder / "heartbeats" / str(number)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tongue_nb-tune-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.path.touch()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.path.unlink()


def fail_stale_trials(study: Any, options: TuneOptions) -> None:
    """RUNNING trials whose worker died (no heartbeat for the grace period) marked FAIL and queued again."""
    import optuna

    with warnings.catch_warnings():  # Optuna marks heartbeats and retries experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if storage_spec(options)[0] == "rdb":
            optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat; the storage's callback queues a retry
        else:
            _fail_silent_journal_trials(study, options)


def _fail_silent_journal_trials(study: Any, options: TuneOptions) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    now = time.time()
    retry = RetryHeartbeatStaleTrialCallback(max_retry=options.max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = options.folder / "heartbeats" / str(t.number)
        last = beat.stat().st_mtime if beat.exists() else (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last > options.grace:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("trial %d: no heartbeat for %.0f s (its worker died): failed, queued again", t.number, now - last)
            retry(study, study.get_trials(deepcopy=False)[t.number])
            with contextlib.suppress(OSError):
                beat.unlink()


def _room(study: Any, trials: int) -> bool:
    """Whether this worker should run one more trial: a queued retry, or fewer than `trials` finished or running."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    if done >= trials:
        return False
    return TrialState.WAITING in states or done + states.count(TrialState.RUNNING) < trials


def work(options: TuneOptions, worker: int = 0, pruner: Any = None) -> int:
    """One worker: trials until the study has `trials` finished ones (or another worker runs the last ones).

    Returns the number of trials this worker ran. Stops with RuntimeError after FAILURES_IN_A_ROW failed trials.
    """
    from tongue_nb.pipeline.tune_trial import run_trial

    base, space = check_options(options)
    seed = base.seed + 7919 * worker + len(load_study(options).trials)  # reruns and workers draw differently
    pruner = pruner if pruner is not None else make_pruner(options.pruner, base, space)
    study = load_study(options, pruner=pruner, seed=seed)
    journal = storage_spec(options)[0] == "journal"
    ran, failures, last_error = 0, 0, ""
    while True:
        outcome: dict[str, Any] = {}
        with _ask_lock(options.folder) as release:
            fail_stale_trials(study, options)
            if not _room(study, options.trials):
                break
            if options.deadline and time.time() >= options.deadline:
                log.info("worker %d: the --minutes budget is spent; no more trials start", worker)
                break

            def objective(trial: Any) -> float:
                release()  # the trial is asked: other workers may count and ask now
                outcome["number"] = trial.number
                beat = _FileHeartbeat(options.folder, trial.number, options.heartbeat) if journal else None
                try:
                    return run_trial(trial, options.study, options.folder, base, space)
                except Exception as exc:
                    if type(exc).__name__ != "TrialPruned":
                        outcome["error"] = f"{type(exc).__name__}: {exc}"
                    raise
                finally:
                    if beat is not None:
                        beat.stop()

            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        ran += 1
        if "error" in outcome:
            failures, last_error = failures + 1, outcome["error"]
            log.warning("trial %s failed: %s", outcome.get("number"), last_error)
            if failures >= FAILURES_IN_A_ROW:
                raise RuntimeError(f"{failures} trials in a row failed; the last: {last_error}")
        else:
            failures = 0
    return ran


def _spawn_workers(options: TuneOptions) -> list[int]:
    """`options.workers` worker processes (one GPU each, round robin, when GPUs are given); their exit codes."""
    from tongue_nb.pipeline.jobs import die_with_parent

    record = options.folder / RECORD
    procs = []
    for i in range(options.workers):
        env = dict(os.environ)
        if options.gpus:
            env["CUDA_VISIBLE_DEVICES"] = options.gpus[i % len(options.gpus)]
        procs.append(subprocess.Popen([sys.executable, "-m", "tongue_nb.pipeline.tune", "--worker", str(record),
                                       str(i)], env=env, preexec_fn=die_with_parent()))
        time.sleep(0.5)  # staggered: the first worker's image cache is built once
    return [p.wait() for p in procs]


# --------------------------------------------------------------------------- the whole tune


@dataclass
class TuneResult:
    """What a tune left: the counts of its trials, the best one, the files written."""

    folder: Path
    complete: int
    pruned: int
    failed: int
    best_number: int | None
    best_value: float | None
    best_yaml: Path | None
    report: Path
    worker_errors: list[str]
    out_of_time: bool = False  # stopped by --minutes before reaching --trials

    @property
    def ok(self) -> bool:
        return not self.worker_errors


def run_tune(options: TuneOptions, pruner: Any = None) -> TuneResult:
    """Check everything, make the tune folder and the study, run the workers, write best.yaml and report.html.

    `pruner`: an Optuna pruner used instead of options.pruner (the in-process worker only: one worker, no --gpus).
    With --gpus even a single worker is a process of its own that sees only its GPU (CUDA_VISIBLE_DEVICES).
    """
    from tongue_nb.pipeline.sweep import visible_gpus
    from tongue_nb.pipeline.tune_report import write_best, write_report
    from tongue_nb.runio import atomic_write_text

    base, space = check_options(options)
    _check_gpus(options, base)
    if pruner is not None and (options.workers > 1 or options.gpus):
        raise ParamError("run_tune: pruner is used by the in-process worker only (workers 1, no gpus)")
    folder = options.folder
    if folder.exists() and not folder.is_dir():
        raise ParamError(f"--out: {folder} exists and is not a folder")
    record = base_record(base)
    existing = _existing_study(options)
    if existing is not None:  # a rerun with another space, recipe or data is refused before anything is written
        _check_same_study(existing, space, base, record, first_run=False)
    folder.mkdir(parents=True, exist_ok=True)
    study = load_study(options)
    with _ask_lock(folder):  # a first run on several machines at once: one records the space and queues the recipe
        _check_same_study(study, space, base, record)
    if not options.gpus and options.workers > 1:
        options = dataclasses.replace(options, gpus=visible_gpus())
    options = dataclasses.replace(options, deadline=time.time() + 60 * options.minutes if options.minutes else 0.0)
    atomic_write_text(folder / RECORD, json.dumps(dataclasses.asdict(_recorded(options)), indent=2))
    errors: list[str] = []
    if options.workers == 1 and not options.gpus:
        try:
            work(options, 0, pruner)
        except RuntimeError as exc:
            errors.append(str(exc))
    else:
        errors += [f"worker {i} exited with {code}" for i, code in enumerate(_spawn_workers(options)) if code]
    return _finish(options, load_study(options), base, errors, write_best, write_report)


def _check_gpus(options: TuneOptions, base: TrainParams) -> None:
    """--gpus as given can be honoured: every GPU gets a worker, the recipe's device is one a worker that sees only
    its GPU trains on, and this machine has a GPU. ParamError (one line) if not; writes nothing."""
    if not options.gpus:
        return
    given = f"--gpus {','.join(options.gpus)}"
    if options.workers < len(options.gpus):
        raise ParamError(f"{given}: {len(options.gpus)} GPUs for --workers {options.workers}; each worker trains on "
                         f"one GPU, so GPU {', '.join(options.gpus[options.workers:])} would not be used; expected "
                         f"--workers {len(options.gpus)} (or more, shared round robin) or fewer GPUs")
    if base.device not in ("auto", "cuda", "cuda:0"):
        raise ParamError(f"{given}: the recipe's device is {base.device!r}, so the trials would not train on the given "
                         "GPU; expected device auto or cuda (each worker sees its GPU as cuda:0), or leave --gpus out")
    import torch

    if torch.cuda.device_count() < 1:
        raise ParamError(f"{given}: no CUDA GPU is visible on this machine (torch.cuda.device_count() is 0); expected "
                         "the ids of this machine's GPUs (nvidia-smi -L), or leave --gpus out to train on the CPU")


def _check_worker_gpu(options: TuneOptions, index: int) -> None:
    """A worker started for a GPU (--gpus) sees one: an id this machine does not have would train on the CPU."""
    if not options.gpus:
        return
    import torch

    if torch.cuda.device_count() < 1:
        raise RuntimeError(f"--gpus: GPU {options.gpus[index % len(options.gpus)]} is not visible to this worker "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}: torch sees no CUDA "
                           "device); expected the id of one of this machine's GPUs (nvidia-smi -L)")


def _recorded(options: TuneOptions) -> TuneOptions:
    """The options as tune.json keeps them: the folder and a journal file as absolute paths (read from anywhere)."""
    kind, where = storage_spec(options)
    return dataclasses.replace(options, out_dir=str(options.folder.resolve()),
                               storage=f"journal:{where}" if kind == "journal" else options.storage)


def _finish(options: TuneOptions, study: Any, base: TrainParams, errors: list[str], write_best: Any,
            write_report: Any) -> TuneResult:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    best_yaml = None
    if best is not None:
        try:  # from the best trial's own run folder (its params.yaml), not from this invocation's recipe
            best_yaml = write_best(options.folder / "best.yaml", best, options.folder, options.study, base.folds)
        except ValueError as exc:  # its params.yaml missing or damaged (RunFileError), or no valid recipe
            errors = errors + [f"best.yaml not written: {exc}"]
    report = write_report(study, options.folder, best_yaml=best_yaml)
    out_of_time = bool(options.deadline) and time.time() >= options.deadline \
        and count[TrialState.COMPLETE] + count[TrialState.PRUNED] < options.trials
    return TuneResult(options.folder, count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                      best.number if best else None, best.value if best else None, best_yaml, report, errors,
                      out_of_time)


def read_record(folder: str | Path) -> TuneOptions:
    """A tune folder's options (tune.json), for a worker process and for `show_study`."""
    from tongue_nb import runfiles

    file = Path(folder) / RECORD
    expected = "a tune folder's record of its options (JSON object)"
    data = runfiles.read_json(file, expected)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TuneOptions)})
    if unknown:
        raise runfiles.RunFileError(file, f"unknown keys {unknown}", f"{expected} with TuneOptions' keys")
    try:
        return TuneOptions(**data)
    except (TypeError, ValueError) as exc:
        raise runfiles.RunFileError(file, f"values it cannot hold ({exc})", expected) from None


def open_study(folder: str | Path, storage: str | None = None) -> Any:
    """A finished (or running) tune's study, read from its folder's record and storage; never makes one.

    A folder that is not a tune folder, or whose study is not in its storage, is a one-line ParamError. A study
    kept in a database server is opened only when `storage` names that server: a folder from someone else would
    otherwise have this machine connect wherever its tune.json says.
    """
    import optuna

    # The folder as given, not as recorded: it may have moved, or be read from another working folder.
    options = dataclasses.replace(read_record(folder), out_dir=str(folder))
    kind, where = storage_spec(options)
    file = None  # a database server: optuna says whether the study is there
    if kind == "journal":
        file = Path(where)
    elif not options.storage.strip():
        file = options.folder / "study.db"
    elif where.startswith("sqlite:///"):
        file = Path(where[len("sqlite:///"):])  # checked before Optuna would create it
    elif storage != options.storage:
        raise ParamError(f"tune folder {folder}: its study is kept in the database {where}; open it with "
                         f"open_study({str(folder)!r}, storage=<that URL>) if you trust it (a folder's record alone "
                         "does not make this machine connect to a server)")
    if file is not None and not file.is_file():
        raise ParamError(f"tune folder {folder}: no study file {file}; expected the folder of a tune that has run")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=options.study, storage=open_storage(kind, where, options))
    except KeyError:
        raise ParamError(f"tune folder {folder}: study {options.study!r} is not in its storage {where}") from None


def show_study(folder: str | Path, storage: str | None = None) -> pd.DataFrame:
    """In a notebook: a tune's summary, history and importance figures and best recipe shown; its trials returned
    (`storage`: the database server URL of a study kept in one, as `open_study`)."""
    from IPython.display import display

    from tongue_nb.pipeline.tune_report import history_figure, importance_figure, importances, trials_table

    study = open_study(folder, storage)
    table = trials_table(study)
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    print(f"study {study.study_name}: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no trials'}")
    display(history_figure(study))
    values, note = importances(study)
    print(f"parameter importances: {note}")
    if values:
        display(importance_figure(values))
    best = Path(folder) / "best.yaml"
    print(f"best recipe ({best}, for tongue-nb sweep -f):\n{best.read_text()}" if best.is_file()
          else "best recipe: none yet (no complete trial)")
    return table


def options_from_args(args: Any) -> TuneOptions:
    """The command line's TuneOptions (the `tune` subcommand's parsed arguments)."""
    options = TuneOptions(space=args.space, trials=args.trials, study=args.study, files=args.file or [],
                          overrides=args.set or [], data_dir=args.data, backbone=args.backbone, out_dir=args.out or "",
                          storage=args.storage or "", pruner=args.pruner, workers=args.workers,
                          gpus=[g for g in (args.gpus or "").split(",") if g], heartbeat=args.heartbeat,
                          minutes=args.minutes)
    if options.data_dir is not None and not options.data_dir.strip():
        raise ParamError(f"--data: got {options.data_dir!r}, expected a dataset folder (an unset shell variable?); "
                         "leave --data out to use the built-in synthetic set")
    return options


def _cmd_tune(args: Any) -> int:
    options = options_from_args(args)
    result = run_tune(options)
    best = f"best trial {result.best_number}: validation combined {result.best_value:.4f}; recipe " \
        f"{result.best_yaml or 'not written'}" if result.best_number is not None else "no complete trial"
    budget = f"; stopped by --minutes {options.minutes:g} before {options.trials} trials (run again to go on)" \
        if result.out_of_time else ""
    print(f"{result.folder}: {result.complete} complete, {result.pruned} pruned, {result.failed} failed; {best}; "
          f"report {result.report}{budget}")
    for error in result.worker_errors:
        print(f"tongue-nb tune: {error}", file=sys.stderr)
    return 0 if result.ok and (result.complete + result.pruned >= options.trials or result.out_of_time) else 1


def add_tune_command(sub: Any) -> None:
    """The `tune` subcommand (tongue_nb.pipeline.cli's parser)."""
    p = sub.add_parser(
        "tune", help="search a recipe's training parameters with Optuna (validation score, pruning)",
        description="Search a recipe's training parameters with Optuna (TPE): each trial an ordinary run folder, its "
                    "value the validation combined score (test is never read). Writes <tune>/best.yaml (the recipe "
                    "with the best values, for sweep -f) and report.html; notebooks/07_tune.ipynb shows the study. "
                    "Run the same command again to go on; bad input is one line, exit 2, nothing written.")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the built-in synthetic set)")
    p.add_argument("-f", "--file", action="append", metavar="RECIPE", help="recipe YAML (repeatable, later wins)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one recipe parameter (repeatable)")
    p.add_argument("--backbone", metavar="NAME", help="the backbone to tune (default: the recipe's)")
    p.add_argument("--space", required=True, metavar="FILE",
                   help="search space YAML, one field a line: {float: [low, high]} or {int: [low, high]} (optional "
                        "log: true, step: S), or {choice: [a, b, ...]}")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished trials (complete or pruned) to reach, over every run of the command")
    p.add_argument("--study", required=True, metavar="NAME", help="study name (several workers and reruns share it)")
    p.add_argument("--out", metavar="DIR",
                   help="tune folder (default tune/<study>): trials/, study.db, best.yaml, report.html")
    p.add_argument("--storage", metavar="URL", help="sqlite:///PATH (default <tune>/study.db), any SQLAlchemy URL "
                                                    "(postgresql://USER@HOST/DB, its driver installed), or journal:PATH "
                                                    "(a journal file on a shared file system)")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="stop bad trials early on their per-epoch validation score: median (default; once 3 trials have "
                        "completed, from the first epoch that trains the whole network, never epoch 1), halving "
                        "(successive halving), or none")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local worker processes sharing the study (one GPU each; default 1)")
    p.add_argument("--gpus", metavar="IDS", help="GPU ids for the workers, e.g. 0,1 (default: every visible GPU)")
    p.add_argument("--minutes", type=float, default=0.0, metavar="M",
                   help="time budget of this run: no trial starts after M minutes (one under way finishes); run "
                        "again to go on (default 0: none)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="a running trial's heartbeat; silent for 3x this, its worker is taken for dead and the trial "
                        "retried (default 60)")
    p.set_defaults(func=_cmd_tune)


def _worker_main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    record, index = Path(argv[1]), int(argv[2])
    try:
        options = read_record(record.parent)
        _check_worker_gpu(options, index)
        work(options, index)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"tongue-nb tune worker {index}: error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["TuneOptions", "TuneResult", "check_options", "run_tune", "work", "load_study",
           "read_record", "open_study", "fail_stale_trials", "show_study", "make_pruner", "median_warmup",
           "options_from_args", "PRUNERS"]

if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
