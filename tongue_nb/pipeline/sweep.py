"""The papermill sweep: one training notebook per backbone, error analysis, final report, HTML and index.html."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

from tongue_nb.checks import check_int
from tongue_nb.pipeline.jobs import (RunOutcome, SweepError, execute_notebook, executed_ok, failure_record,
                                     project_kernel)
from tongue_nb.pipeline.render import render_html
from tongue_nb.resources import NOTEBOOKS, PARAMS_DIR, work_dir

PROJECT_ROOT = work_dir()  # the notebooks' working folder
BASELINE_RUN = "classical-baseline"  # run folder of the classical baseline inside a sweep
# The seed document's backbones, used when neither --backbones nor a recipe names one.
SEED_BACKBONES = ("convnext_base", "convnext_large", "swin_base", "swin_large", "vit_large")


@dataclass
class SweepResult:
    """Outcome of a sweep: its runs, stage errors (comparison, 04, 05, rendering) and the report paths."""

    sweep_dir: Path
    reports_dir: Path
    runs: list[RunOutcome] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    comparison: Path | None = None  # comparison.csv
    comparison_report: Path | None = None  # 02_model_comparison.html
    fold_analysis: dict[str, str | None] = field(default_factory=dict)  # fold ensemble -> its 04 page (--folds)
    report: Path | None = None
    index: Path | None = None

    @property
    def ok(self) -> bool:
        """True when every run and every report step succeeded."""
        return all(r.ok for r in self.runs) and not self.errors

    @property
    def failures(self) -> list[dict]:
        """Failure records of the training runs."""
        return [r.error for r in self.runs if r.error]

    def describe(self) -> str:
        """A few lines for the command line."""
        lines = [f"sweep {self.sweep_dir}: {sum(r.ok for r in self.runs)}/{len(self.runs)} runs ok"]
        for r in self.runs:
            extra = f" ({r.error['error_type']}: {r.error['message'].splitlines()[0][:150] if r.error['message'] else ''})" if r.error else ""
            lines.append(f"  {r.backbone}: {r.status}{extra}")
        for e in self.errors:
            lines.append(f"  {e['stage']} {e.get('backbone') or ''}: {e['error_type']}: {e['message'][:150]}")
        lines.append(f"index: {self.index}")
        return "\n".join(lines)


def visible_gpus(gpus: Sequence[str] | int | None = None) -> list[str]:
    """GPU ids to spread runs over: the given ones, else CUDA_VISIBLE_DEVICES, else torch's device count."""
    if isinstance(gpus, int):
        return [str(i) for i in range(gpus)]
    if gpus is not None:
        return [str(g) for g in gpus]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


# ----------------------------------------------------------------------------------------------
# the sweep


def default_backbones(params_file: str | Path | None = None) -> list[str]:
    """Backbones for a sweep without --backbones: the recipe's own `backbone` if it sets one, else the seed's list."""
    if params_file:
        from tongue_nb.train.params import read_params_file

        data = read_params_file(params_file)
        if data.get("backbone"):
            return [str(data["backbone"])]
    return list(SEED_BACKBONES)


def is_completed(run_dir: str | Path) -> bool:
    """True when the run folder holds a summary of a finished training run (runio.RunFolder decides)."""
    from tongue_nb.runio import RunFolder

    return RunFolder(run_dir).is_completed()


# Parameters the sweep itself gives each run: a --set of one of them would silently beat the sweep's own option.
SWEEP_OWNED = {"data_dir": "use --data", "out_dir": "runs go to <sweep>/runs/<backbone>; use --out for the sweep",
               "backbone": "use --backbones", "fold": "with --folds K the sweep trains every fold 0 .. K-1"}


# What cuts the split (and the folds): one value for all of a sweep's runs, never a per_backbone one.
SPLIT_KEYS = ("split_seed", "val_fraction", "test_fraction", "folds")


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """'key=value' strings into typed notebook parameters, checked by tongue_nb.train.params (errors name the override)."""
    from tongue_nb.train.params import ParamError, check_value, split_overrides

    values: dict[str, Any] = {}
    for key, raw, item in split_overrides(overrides):
        if key in SWEEP_OWNED:
            raise ParamError(f"override {item!r}: the sweep sets {key} for every run ({SWEEP_OWNED[key]}); "
                             "it cannot be overridden with --set")
        # Each override is typed alone, so that its error is about it only; checks across parameters need the
        # recipe as well (_check_runs_params).
        values[key] = check_value(key, raw, f"override {item!r}")
    return values


def _recipe_data_dir(params_file: str | Path | None) -> str | None:
    """The sweep recipe's data_dir (the dataset when --data is not given, as for `tongue-nb train -f`), after
    refusing the keys the sweep sets for every run: a recipe's out_dir or fold (at its top or in a per_backbone
    section), or a per_backbone data_dir, would otherwise be silently replaced."""
    if not params_file:
        return None
    from tongue_nb.train.params import ParamError, file_places, read_params_file

    data = read_params_file(params_file)
    for where, values in file_places(data):
        for key in values:
            if key in SWEEP_OWNED and (key in ("out_dir", "fold") or (where and key == "data_dir")):
                raise ParamError(f"recipe {params_file}: {where}{key}: the sweep sets {key} for every run "
                                 f"({SWEEP_OWNED[key]}); remove it from the recipe")
            if where and key in SPLIT_KEYS:
                raise ParamError(f"recipe {params_file}: {where}{key}: the sweep compares its backbones (and the "
                                 f"baseline) on one split, cut by the recipe's general values; set {key} there")
    value = data.get("data_dir")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ParamError(f"recipe {params_file}: data_dir: got {value!r}, expected a dataset folder; leave it out "
                         "to use --data or the built-in synthetic set")
    return value


def _check_runs_params(params_file: str | Path | None, extra: dict, folds: int, backbones: Sequence[str]) -> None:
    """The recipe with the overrides, as each backbone's runs will read it (fold 0 of a cross-validation): a
    combination no run could train with is refused before the sweep writes anything."""
    for backbone in backbones:
        _recipe_params(params_file, extra, folds, backbone=backbone)


def recipe_seeds(params_file: str | Path | None) -> list[int] | None:
    """The `seeds:` list of a recipe file (a sweep key: each backbone trained once per seed), or None."""
    if not params_file:
        return None
    from tongue_nb.train.params import read_params_file

    return read_params_file(params_file).get("seeds")


def _check_seeds(seeds: Sequence[int] | None, extra: dict, params_file: str | Path | None) -> list[int] | None:
    """Validated seeds (distinct integers >= 0), or None for one run per backbone."""
    from tongue_nb.train.params import ParamError

    if seeds is None:
        return None
    if isinstance(seeds, (str, bytes)) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                  for k in seeds) or not seeds:
        raise ParamError(f"seeds: got {seeds!r}, expected a list of integers >= 0 (e.g. --seeds 0 1 2)")
    if len(set(seeds)) != len(seeds):
        raise ParamError(f"seeds: got {list(seeds)!r}, each seed once")
    if "seed" in extra:
        raise ParamError("override 'seed': give the seeds with --seeds (or the recipe's seeds:), not --set seed")
    if params_file:
        from tongue_nb.train.params import file_places, read_params_file

        for where, values in file_places(read_params_file(params_file)):
            if "seed" in values and (where or ("split_seed" in values and values["split_seed"] != -1)
                                     or "split_seed" in extra):
                raise ParamError(f"recipe {params_file}: {where}seed {values['seed']!r}: the sweep's seeds ({list(seeds)}) "
                                 "set each run's seed, and the split's seed is split_seed, so this one would be used "
                                 "nowhere; remove it (a general seed: without split_seed is the shared split's seed)")
    return list(seeds)


def _check_sweep_options(data: Path, compare_options: dict | None, cell_timeout: Any, ensemble_k: Any) -> None:
    """The sweep's own options, checked before anything is written (a run's parameters are its notebook's)."""
    import math

    from tongue_nb.train.params import ParamError

    if isinstance(cell_timeout, bool) or not isinstance(cell_timeout, (int, float)) \
            or not math.isfinite(cell_timeout) or cell_timeout < 0:
        raise ParamError(f"cell_timeout (--cell-timeout): got {cell_timeout!r}, expected seconds >= 0 (0: no limit)")
    check_int("ensemble_k", ensemble_k, 0, error=ParamError, note=" (0 or 1: no ensemble row)")
    if compare_options is not None:
        from tongue_nb.pipeline.compare import CompareParams

        try:  # the 02 notebook builds the same CompareParams from these options
            CompareParams(data_dir=str(data), **compare_options)
        except TypeError as exc:
            raise ParamError(f"compare options {sorted(compare_options)}: {exc}") from None


def recipe_files(backbone: str, params_file: str | Path | None) -> list[Path]:
    """The parameter files of one sweep run, in the order they apply: params/<backbone>.yaml (the backbone's own
    settings) when there is one, then the sweep's recipe; the user's --set values apply after both."""
    own = PARAMS_DIR / f"{backbone}.yaml"
    return [p.resolve() for p in ([own] if own.is_file() else []) + ([Path(params_file)] if params_file else [])]


def train_notebook_parameters(backbone: str, data: Path, run_dir: Path, recipe: Sequence[Path] | str | Path,
                              extra: dict) -> dict:
    """Papermill parameters of one 03_train run: the notebook applies the recipe files in order, then every one
    of these (an override equal to a default included), so the run gets what
    `tongue-nb train -f own.yaml -f recipe --set ...` gets."""
    from tongue_nb.train.params import file_places, read_params_file

    files = [recipe] if isinstance(recipe, (str, Path)) else list(recipe)
    # No progress bars in an executed notebook, unless the recipe asks for them (its value is not replaced).
    asked = any("progress" in values for f in files if str(f) for _, values in file_places(read_params_file(f)))
    return {"backbone": backbone, "data_dir": str(data), "out_dir": str(run_dir),
            "params_file": ",".join(str(Path(f).resolve()) for f in files if str(f)),
            **({} if asked else {"progress": False}), **extra}


def _safe_name(backbone: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in backbone)


def _check_backbones(backbones: Sequence[str], baseline: bool) -> None:
    """Each backbone gets a run folder and notebook named after it: refuse a list where a name is empty (an unset
    variable), would name no folder ('.', '..'), or shares its folder with another backbone or the baseline."""
    if isinstance(backbones, str) or not backbones:
        raise SweepError(f"run_sweep: backbones: got {backbones!r}, expected a list of backbone names")
    folders: dict[str, str] = {BASELINE_RUN: "the classical baseline"} if baseline else {}
    for b in backbones:
        if not isinstance(b, str) or not b.strip():
            raise SweepError(f"run_sweep: backbones: got {b!r} in {list(backbones)}, expected a timm model name or "
                             "short alias (an unset shell variable?)")
        name = _safe_name(b)
        if not name.strip("."):
            raise SweepError(f"run_sweep: backbones: {b!r} names no run folder; expected a timm model name or alias")
        if name in folders:
            other = folders[name]
            what = "is listed twice" if other == repr(b) else f"would share its run folder runs/{name} with {other}"
            raise SweepError(f"run_sweep: backbones: {b!r} {what}: {list(backbones)}")
        folders[name] = repr(b)


def _write_json(path: Path, obj: Any) -> None:
    """Sweep records, written atomically; anything JSON cannot hold (an exception, say) is kept as text."""
    from tongue_nb.runio import atomic_write_text, to_jsonable

    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, default=str))


def run_sweep(data_dir: str | Path | None, backbones: Sequence[str], params_file: str | Path | None = None,
              overrides: Sequence[str] = (), out_dir: str | Path | None = None, reports_dir: str | Path = "reports",
              gpus: Sequence[str] | int | None = None, compare: bool = True, compare_steps: int = 10,
              kernel_name: str | None = None, ensemble_k: int = 3, compare_options: dict | None = None,
              baseline: bool = True, seeds: Sequence[int] | None = None, cell_timeout: float = 0,
              executor: str = "auto", slurm: dict | None = None, folds: int | None = None,
              workers: int | None = None) -> SweepResult:
    """Compare the backbones, train one 03 notebook per backbone, analyse errors, report, and write index.html.

    `data_dir` None trains on the recipe's data_dir, else the built-in synthetic set; an empty string is refused
    (an unset variable). A recipe that sets out_dir or fold (the sweep sets them for every run) is refused.
    `compare_options` go to compare.compare_backbones (e.g. image_size, batch_size) besides `steps=compare_steps`.
    `baseline` fits the classical colour/texture baseline on the same split as a reference row of the report.
    `executor` says where the training notebooks run (pipeline/executors.py): "auto" (one worker process per GPU
    when several are visible, else in this process), "local", "gpus" or "slurm" with `slurm` options
    (partition, gpus_per_job, cpus_per_job, mem_gb, time_min, sbatch, max_requeues, folder, cluster).
    `workers` N runs N training notebooks side by side (executors.make_executor): on a CPU machine each process
    gets cores/N threads, which trains small backbones faster than one job with all the cores.
    `folds` K >= 2 (or the recipe's `folds:`, or --set folds=K) cross-validates: the test split is set aside and
    each backbone and the baseline train K times (runs `<name>-fold<k>`, fold k validating), gathered into one
    fold ensemble per backbone under <sweep>/cv (analysis/cv.py) that the reports compare.
    """
    _check_backbones(backbones, baseline)
    if params_file and not Path(params_file).is_file():
        raise SweepError(f"run_sweep: recipe file {params_file} not found")
    for name in ("03_train", "04_error_analysis", "05_report"):
        if not (NOTEBOOKS / f"{name}.ipynb").exists():
            raise SweepError(f"run_sweep: notebook {NOTEBOOKS / name}.ipynb is missing from the project")
    extra = _parse_overrides(overrides)
    if folds is not None:
        from tongue_nb.train.params import ParamError, check_value

        value = check_value("folds", folds, "the folds argument (--folds)")
        if extra.get("folds", value) != value:
            raise ParamError(f"folds: --folds {folds} and --set folds={extra['folds']} (or the folds argument and an "
                             "override) disagree; give it once")
        extra["folds"] = value
    n_folds = _sweep_folds(extra, params_file)
    seeds_list = _check_seeds(seeds, extra, params_file)
    recipe_data = _recipe_data_dir(params_file)
    _check_runs_params(params_file, extra, n_folds, backbones)
    if data_dir is None and recipe_data is not None:
        data_dir = recipe_data
        log.info("sweep: dataset %s (the recipe's data_dir)", data_dir)
    if data_dir is not None and not str(data_dir).strip():
        raise SweepError(f"run_sweep: data_dir (--data) is {str(data_dir)!r}, expected a dataset folder (an unset "
                         "shell variable?); leave it out (None) to use the built-in synthetic set")
    if data_dir is None:
        from tongue_nb.data.synth import ensure_synthetic

        data_dir = ensure_synthetic()
    data = Path(data_dir).resolve()
    if not (data / "labels.csv").exists():
        raise SweepError(f"run_sweep: data_dir {data} has no labels.csv")
    if compare_options and "steps" in compare_options and compare_options["steps"] != compare_steps:
        raise SweepError(f"run_sweep: compare_options steps={compare_options['steps']!r} and compare_steps="
                         f"{compare_steps!r} disagree; give the screen's steps once, as compare_steps")
    if gpus is not None and executor not in ("auto", "gpus"):
        raise SweepError(f"run_sweep: gpus {gpus!r} with executor {executor!r}: only the 'auto' and 'gpus' executors "
                         "place runs on the GPUs given (Slurm's come from slurm={'gpus_per_job': ...})")
    compare_options = dict(compare_options or {}, steps=compare_steps) if compare else None
    _check_sweep_options(data, compare_options, cell_timeout, ensemble_k)
    _check_fold_cut(data, params_file, extra, n_folds, seeds_list)
    from tongue_nb.paths import check_folder, prepare_folder
    from tongue_nb.runio import RunLock, held_by_another

    sweep_dir = Path(out_dir or f"runs/sweep-{_dt.date.today():%Y%m%d}").resolve()
    reports = Path(reports_dir).resolve()
    for folder, parameter in ((sweep_dir, "out_dir (--out)"), (reports, "reports_dir (--reports)")):
        if folder == data or data in folder.parents:
            raise SweepError(f"run_sweep: {parameter} {folder} is inside the dataset {data}; a sweep never writes "
                             "into its dataset: choose a folder outside it")
        check_folder(folder, parameter)  # both checked before either is created
    held = held_by_another(sweep_dir, "sweep.json")
    if held:
        raise SweepError(f"run_sweep: out_dir (--out) {sweep_dir} holds {held}, not a sweep; its records would mix "
                         "with the sweep's: choose another folder")
    _check_finished_runs(data, backbones, params_file, extra, sweep_dir, seeds_list, n_folds, baseline)
    from tongue_nb.pipeline.executors import make_executor

    try:
        runner = make_executor(executor, visible_gpus(gpus) if executor in ("auto", "gpus") else None, slurm,
                               folder=sweep_dir, workers=workers)
    except (TypeError, ValueError) as exc:
        from tongue_nb.train.params import ParamError

        raise ParamError(f"sweep executor options: {exc}") from None
    prepare_folder(sweep_dir, "out_dir (--out)")
    prepare_folder(reports, "reports_dir (--reports)")

    lock = RunLock(sweep_dir).acquire()  # a second sweep into the same folder is refused, not interleaved
    try:
        with project_kernel(kernel_name) as kernel:
            return _sweep(data, list(backbones), params_file, extra, sweep_dir, reports,
                          compare_options, kernel, ensemble_k,
                          runner, baseline, seeds=seeds_list, cell_timeout=cell_timeout, folds=n_folds)
    finally:
        lock.release()


def _sweep(data: Path, backbones: list[str], params_file: str | Path | None, extra: dict, sweep_dir: Path,
           reports: Path, compare: dict | None, kernel: str, ensemble_k: int, executor: Any, baseline: bool = True, seeds: list[int] | None = None,
           cell_timeout: float = 0, folds: int = 0) -> SweepResult:
    result = SweepResult(sweep_dir, reports)
    (sweep_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / "sweep.json", {"data_dir": str(data), "backbones": backbones, "params_file": str(params_file or ""),
                                           "overrides": extra, "seeds": seeds, "folds": folds,
                                           "started": _dt.datetime.now().isoformat(timespec="seconds")})
    # The data review comes first: what the runs are trained on, in the same report folder.
    review_nb = sweep_dir / "notebooks" / "01_data_review.ipynb"
    if (NOTEBOOKS / "01_data_review.ipynb").exists() and _run_stage(
            "data_review", None, "01_data_review", review_nb, _review_parameters(data, params_file, extra, folds),
            kernel, result):
        _render(review_nb, reports / "01_data_review.html", None, result)
    if compare is not None:
        compare = dict(_screen_settings(params_file, extra, folds), **compare)
        result.comparison = _compare(data, backbones, sweep_dir, compare, kernel, result)
    split_seed = _recipe_params(params_file, extra, folds).effective_split_seed if seeds else None
    if baseline:
        for label, seed, fold in _plan([BASELINE_RUN], seeds, folds):
            _baseline(data, params_file, _baseline_values(extra, seed, fold, split_seed),
                      sweep_dir / "runs" / _safe_name(label), result)

    # One run per backbone, per backbone and seed (named <backbone>-seed<k>) on one shared split, and with folds
    # per fold too (<backbone>[-seed<k>]-fold<f>).
    plan = [(label, b, seed, fold) for b in backbones for label, seed, fold in _plan([b], seeds, folds)]
    jobs, outcomes = [], {}
    for label, backbone, seed, fold in plan:
        name = _safe_name(label)
        run_dir = sweep_dir / "runs" / name
        output_nb = sweep_dir / "notebooks" / f"03_train-{name}.ipynb"
        if is_completed(run_dir):
            log.info("skipping %s: %s already completed", label, run_dir)
            outcomes[label] = RunOutcome(label, str(run_dir), str(output_nb), status="skipped")
            continue
        parameters = _run_parameters(backbone, seed, fold, data, run_dir, params_file, extra, split_seed)
        parameters.update(_tracking_experiment(params_file, extra, folds, sweep_dir, backbone))
        if (run_dir / "checkpoints" / "last.pt").exists():
            parameters["resume"] = True  # an interrupted run continues from its last finished epoch
        (run_dir / "failure.json").unlink(missing_ok=True)
        jobs.append({"backbone": label, "run_dir": str(run_dir), "input_nb": str(NOTEBOOKS / "03_train.ipynb"),
                     "output_nb": str(output_nb), "parameters": parameters, "kernel_name": kernel, "cwd": str(PROJECT_ROOT),
                     "cell_timeout": cell_timeout})
    for res in executor.run(jobs):
        outcomes[res["backbone"]] = RunOutcome(**res)
    result.runs = [outcomes[label] for label, _, _, _ in plan]
    analysed = _gather_folds(sweep_dir, result) if folds else {}

    for run in result.runs:
        name = _safe_name(run.backbone)
        nb = Path(run.notebook)
        if nb.exists():  # failed runs too: the partial notebook shows where it stopped
            html = _render(nb, reports / f"03_train-{name}.html", run.backbone, result)
            run.report = str(html) if html else None
            if html and run.ok:
                from tongue_nb.train.tracking import attach_report

                attach_report(run.run_dir, html)  # an MLflow run keeps its page (nothing for other trackers)
        if run.error:
            run.error["report"] = run.report
            Path(run.run_dir).mkdir(parents=True, exist_ok=True)
            _write_json(Path(run.run_dir) / "failure.json", run.error)
    # The error analyses: of each run, or in a cross-validated sweep of each fold ensemble once.
    todo = {run.backbone: (_safe_name(run.backbone), Path(run.run_dir), run.status == "skipped")
            for run in result.runs if run.ok and not folds}
    todo.update({("cv", label): (_safe_name(label), folder, False) for label, folder in analysed.items()})
    pages = _error_analyses(todo, data, kernel, result, executor)
    for run in result.runs:
        run.error_analysis = pages.get(run.backbone, run.error_analysis)
    for label in analysed:
        result.fold_analysis[label] = pages.get(("cv", label))
    _write_json(sweep_dir / "failures.json", result.failures)

    out_nb = sweep_dir / "notebooks" / "05_report.ipynb"
    if _run_stage("report", None, "05_report", out_nb, {"sweep_dir": str(sweep_dir), "ensemble_k": ensemble_k}, kernel, result):
        result.report = _render(out_nb, reports / "05_report.html", None, result)
    result.index = _index(result, reports, ensemble_k)
    _write_json(sweep_dir / "sweep_result.json", {"ok": result.ok, "runs": [asdict(r) for r in result.runs],
                                                  "errors": result.errors, "index": str(result.index)})
    log.info("%s", result.describe())
    return result


def _run_parameters(backbone: str, seed: int | None, fold: int | None, data: Path, run_dir: Path,
                    params_file: str | Path | None, extra: dict, split_seed: int | None) -> dict:
    """The papermill parameters of one training run of the sweep."""
    parameters = train_notebook_parameters(backbone, data, run_dir, recipe_files(backbone, params_file), extra)
    if seed is not None:
        parameters.update(seed=seed, split_seed=split_seed)
    if fold is not None:
        parameters["fold"] = fold
    return parameters


def _baseline_values(extra: dict, seed: int | None, fold: int | None, split_seed: int | None) -> dict:
    """The values the baseline's run of one seed and fold gets on top of the recipe: the sweep's overrides, its
    seed and the shared split seed, its fold."""
    return dict(extra, **({"seed": seed, "split_seed": split_seed} if seed is not None else {}),
                **({"fold": fold} if fold is not None else {}))


def _auto_free(expected: dict) -> dict:
    """Expected values with those a run resolves itself left out: image_size 0 (the model's own) and an empty
    experiment_name (dated when the run starts)."""
    return {k: v for k, v in expected.items()
            if not ((k == "image_size" and v == 0) or (k == "experiment_name" and v == ""))}


def _check_finished_runs(data: Path, backbones: Sequence[str], params_file: str | Path | None, extra: dict,
                         sweep_dir: Path, seeds: list[int] | None, folds: int, baseline: bool) -> None:
    """A sweep started again keeps its finished runs: refuse, before anything is written, when one of them was
    trained with other parameters than the sweep now gives it (another recipe, --set, --data or seeds), which
    the reports would otherwise show as trained with the new ones."""
    from tongue_nb.runio import RunFolder
    from tongue_nb.train.params import load_params
    from tongue_nb.train.trainer import params_differences

    split_seed = _recipe_params(params_file, extra, folds).effective_split_seed if seeds else None
    runs = [(label, b, seed, fold) for b in backbones for label, seed, fold in _plan([b], seeds, folds)]
    runs += [(label, None, seed, fold) for label, seed, fold in (_plan([BASELINE_RUN], seeds, folds) if baseline else [])]
    for label, backbone, seed, fold in runs:
        run_dir = sweep_dir / "runs" / _safe_name(label)
        if not is_completed(run_dir):
            continue
        if backbone is None:  # the baseline: the recipe's split and seeds (its model settings are its own)
            recipe = _recipe_params(params_file, _baseline_values(extra, seed, fold, split_seed), 0, data_dir=str(data))
            now = {k: v for k, v in recipe.as_dict().items() if k not in ("backbone", "crop", "image_size")}
            now["split_seed"] = recipe.effective_split_seed  # as the baseline records it
        else:
            parameters = _run_parameters(backbone, seed, fold, data, run_dir, params_file, extra, split_seed)
            del parameters["params_file"]  # the notebook's: the same files as recipe_files gives
            now = load_params(recipe_files(backbone, params_file), **parameters).as_dict()
        saved = RunFolder(run_dir).read_yaml(RunFolder.PARAMS) if RunFolder(run_dir).file(RunFolder.PARAMS).is_file() else {}
        diff = params_differences(saved, _auto_free(now), then="run")
        if diff:
            raise SweepError(f"run_sweep: {run_dir} finished with other parameters than this sweep gives it "
                             f"({'; '.join(diff)}); a sweep started again keeps its finished runs, and its reports "
                             "would show them as trained with these: give the earlier recipe and options to go on, "
                             "choose another --out for the new ones, or remove that run folder to train it again")


def _plan(names: Sequence[str], seeds: list[int] | None, folds: int) -> list[tuple[str, int | None, int | None]]:
    """(run label, seed, fold) of each run of one backbone (or of the baseline): one run; one per seed
    (<name>-seed<k>); with folds >= 2, one per fold as well (<name>[-seed<k>]-fold<f>)."""
    out = []
    for name in names:
        for seed in (seeds or [None]):
            label = name if seed is None else f"{name}-seed{seed}"
            out += [(label, seed, None)] if not folds else [(f"{label}-fold{f}", seed, f) for f in range(folds)]
    return out


def _sweep_folds(extra: dict, params_file: str | Path | None) -> int:
    """The sweep's number of folds: --folds / --set folds, else the recipe's folds:, else 0 (one split)."""
    from tongue_nb.train.params import ParamError, read_params_file

    value = extra.get("folds", read_params_file(params_file).get("folds", 0) if params_file else 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
        source = "--folds / --set folds" if "folds" in extra else f"recipe {params_file}, key folds"
        raise ParamError(f"{source}: got {value!r}, expected 0 (one train/val split) or a number of folds >= 2")
    return value


def _check_fold_cut(data: Path, params_file: str | Path | None, extra: dict, folds: int,
                    seeds: list[int] | None) -> None:
    """With folds, cut the data as the runs will (its test split, then the K folds of each seed) before anything
    is written: data too small for K folds is refused once, not failed K times per backbone."""
    if not folds:
        return
    from tongue_nb.train.trainer import check_split

    params = _recipe_params(params_file, extra, folds, data_dir=str(data))
    labels = None
    for seed in seeds or [None]:
        run = params if seed is None else dataclasses.replace(params, seed=seed, split_seed=params.effective_split_seed)
        labels = check_split(run, labels, where=f"seed {seed}" if seed is not None else "")


def _recipe_params(params_file: str | Path | None, extra: dict, folds: int, **values: Any):
    """The sweep's recipe and overrides as TrainParams (for the split seed and the baseline); with folds, fold 0."""
    from tongue_nb.train.params import load_params

    values = {**extra, **values}
    if folds and "fold" not in values:
        values["fold"] = 0
    return load_params([params_file] if params_file else (), **values)


def _screen_settings(params_file: str | Path | None, extra: dict, folds: int) -> dict:
    """What the recipe decides of the cost screen (02): its image size (0, each model's own: 224) and batch, crop,
    device and threads, so that the screen measures the training the sweep runs, and its tasks, split seed and
    label handling, so that it screens the same task heads on the same split; compare options given to the sweep
    still win. Pretraining stays the screen's own (off): a cost screen needs no weights."""
    recipe = _recipe_params(params_file, extra, folds)
    return {"image_size": recipe.image_size or 224, "batch_size": recipe.batch_size, "crop": recipe.crop,
            "device": recipe.device, "num_threads": recipe.num_threads, "tasks": recipe.tasks,
            "seed": recipe.effective_split_seed, "on_problem": recipe.on_problem}


def _review_parameters(data: Path, params_file: str | Path | None, extra: dict, folds: int) -> dict:
    """The data review (01) of what the runs train on: the dataset, the recipe's task schema and split seed."""
    recipe = _recipe_params(params_file, extra, folds)
    return {"data_dir": str(data), "tasks": recipe.tasks, "seed": recipe.effective_split_seed}


def _tracking_experiment(params_file: str | Path | None, extra: dict, folds: int, sweep_dir: Path,
                         backbone: str) -> dict:
    """The sweep's runs are one MLflow experiment named after the sweep folder, unless --set or the recipe (its
    general values or the backbone's per_backbone section) names one."""
    if extra.get("tracking_experiment") or _recipe_params(params_file, extra, folds, backbone=backbone).tracking_experiment:
        return {}
    return {"tracking_experiment": sweep_dir.name}


def _gather_folds(sweep_dir: Path, result: SweepResult) -> dict[str, Path]:
    """The fold ensembles of the finished fold runs (analysis/cv.py); the networks' ones, to analyse."""
    from tongue_nb.analysis.cv import gather_fold_ensembles

    try:
        written = gather_fold_ensembles(sweep_dir)
    except Exception as exc:  # the fold runs stay; the report says what could not be gathered
        result.errors.append(failure_record("", exc, None, stage="cross-validation"))
        log.error("gathering the fold ensembles failed: %s", exc)
        return {}
    return {label: folder for label, folder in written.items() if not label.startswith(BASELINE_RUN)}


def _error_analyses(todo: dict, data: Path, kernel: str, result: SweepResult, executor: Any) -> dict:
    """The 04 notebooks of `todo` ({key: (name, run or fold-ensemble folder, unchanged)}), each rendered to
    reports/04_error_analysis-<name>.html; {key: page} of those written. With a worker pool or Slurm they run as
    the training notebooks did (side by side, or as jobs), else one after another here. An unchanged run keeps
    its page."""
    from tongue_nb.pipeline.executors import PoolExecutor, SlurmExecutor

    pages, jobs, waiting = {}, [], []
    for key, (name, folder, unchanged) in todo.items():
        out_nb = result.sweep_dir / "notebooks" / f"04_error_analysis-{name}.ipynb"
        html_path = result.reports_dir / f"04_error_analysis-{name}.html"
        parameters = {"run_dir": str(folder), "data_dir": str(data)}
        if unchanged and html_path.exists() and executed_ok(out_nb):
            pages[key] = str(html_path)  # the run did not change since its analysis
        elif isinstance(executor, (PoolExecutor, SlurmExecutor)):
            jobs.append({"backbone": name, "run_dir": str(folder), "output_nb": str(out_nb),
                         "input_nb": str(NOTEBOOKS / "04_error_analysis.ipynb"), "parameters": parameters, "kernel_name": kernel,
                         "cwd": str(PROJECT_ROOT), "task": "error analysis of"})
            waiting.append((key, name, out_nb, html_path))
        elif _run_stage("error_analysis", name, "04_error_analysis", out_nb, parameters, kernel, result):
            html = _render(out_nb, html_path, name, result)
            pages[key] = str(html) if html else None
    for (key, name, out_nb, html_path), outcome in zip(waiting, executor.run(jobs) if jobs else []):
        if outcome["status"] != "completed":
            result.errors.append(dict(outcome["error"], stage="error_analysis"))
        if out_nb.exists():  # a failed analysis's partial notebook is rendered too, as _run_stage does
            html = _render(out_nb, html_path, name, result)
            if outcome["status"] == "completed":
                pages[key] = str(html) if html else None
    return pages


def _baseline(data: Path, params_file: str | Path | None, extra: dict, run_dir: Path, result: SweepResult) -> None:
    """The classical colour/texture baseline on the runs' own split (same seed and fractions), as one more run row.

    A finished baseline is kept, unless it was written before baselines kept their model (a per-task selection
    that chose it could not be applied to new photos): then it is fitted again, which takes seconds."""
    from tongue_nb.model.baseline import fit_baseline_run
    from tongue_nb.runio import RunFolder

    if is_completed(run_dir) and RunFolder(run_dir).file(RunFolder.BASELINE_MODEL).is_file():
        return

    try:
        params = _recipe_params(params_file, extra, 0, data_dir=str(data), out_dir=str(run_dir))
        if params.crop != "crop_blank":  # the recipe's crop is the networks'
            log.info("classical baseline: crop_blank (its features are statistics of the tongue region), not the "
                     "recipe's crop %s", params.crop)
        fit_baseline_run(params)
    except Exception as exc:  # the baseline is a reference row; the trained runs go on without it
        result.errors.append(failure_record(BASELINE_RUN, exc, None, stage="baseline"))
        log.error("classical baseline failed: %s", exc)


def _compare(data: Path, backbones: list[str], sweep_dir: Path, options: dict, kernel: str,
             result: SweepResult) -> Path | None:
    """The model comparison of the sweep's backbones (02 notebook, rendered), its table under <sweep>/comparison."""
    out = sweep_dir / "comparison"
    if (NOTEBOOKS / "02_model_comparison.ipynb").exists():
        out_nb = sweep_dir / "notebooks" / "02_model_comparison.ipynb"
        parameters = {"data_dir": str(data), "backbones": ",".join(backbones), "out_dir": str(out), **options}
        if _run_stage("compare", None, "02_model_comparison", out_nb, parameters, kernel, result):
            result.comparison_report = _render(out_nb, result.reports_dir / "02_model_comparison.html", None, result)
    else:
        from tongue_nb.pipeline.compare import CompareParams, compare_backbones

        try:
            compare_backbones(CompareParams(data_dir=str(data), **options), backbones, out_dir=out)
        except Exception as exc:  # the comparison is informative; training still runs without it
            result.errors.append(failure_record("", exc, None, stage="compare"))
            log.error("model comparison failed: %s", exc)
    csv = out / "comparison.csv"
    return csv if csv.exists() else None


def _run_stage(stage: str, backbone: str | None, notebook: str, output_nb: Path, parameters: dict, kernel: str,
               result: SweepResult) -> bool:
    """Run a report notebook; a failure is recorded in the result's errors and False returned."""
    try:
        execute_notebook(NOTEBOOKS / f"{notebook}.ipynb", output_nb, parameters, kernel, PROJECT_ROOT)
        return True
    except Exception as exc:
        result.errors.append(failure_record(backbone or "", exc, output_nb, stage=stage))
        log.error("%s failed%s: %s", notebook, f" for {backbone}" if backbone else "", exc)
        if output_nb.exists():
            _render(output_nb, result.reports_dir / f"{output_nb.stem}.html", backbone, result)
        return False


def _render(notebook: Path, html_path: Path, backbone: str | None, result: SweepResult) -> Path | None:
    try:
        return render_html(notebook, html_path)
    except Exception as exc:
        result.errors.append(failure_record(backbone or "", exc, notebook, stage="render"))
        log.error("rendering %s failed: %s", notebook, exc)
        return None


def _index(result: SweepResult, reports: Path, ensemble_k: int = 3) -> Path:
    """reports/index.html from the sweep's outcomes: the final report's score rows, with links to each run's pages."""
    from tongue_nb.analysis.index_page import index_rows, sweep_provenance, write_index
    from tongue_nb.analysis.runs import load_sweep

    from tongue_nb.analysis.cv import cv_table, cv_verdict, fold_label

    links = {_safe_name(run.backbone): run for run in result.runs if run.ok}
    folds: dict[str, list[tuple[str, str | None]]] = {}  # fold ensemble -> its fold runs' 03 pages
    for run in result.runs:
        parsed = fold_label(_safe_name(run.backbone))
        if parsed:
            folds.setdefault(parsed[0], []).append((f"fold {parsed[1]}", run.report))
    rows, provenance, cv_rows, cv_text = [], "", None, ""
    try:
        sweep = load_sweep(result.sweep_dir)
        provenance = sweep_provenance(sweep)
        rows = index_rows(sweep, ensemble_k)
        if sweep.cv:
            cv_rows = cv_table(sweep)
            cv_text = cv_verdict(cv_rows)
    except Exception as exc:  # noqa: BLE001 - the index must still link what exists
        result.errors.append(failure_record("", exc, None, stage="index"))
        log.error("index scores failed: %s", exc)
    for row in rows:
        run = links.get(row["backbone"])
        if run is not None:
            row.update(report=run.report, error_analysis=run.error_analysis)
        elif row["backbone"] in folds:
            row.update(reports=folds[row["backbone"]], error_analysis=result.fold_analysis.get(row["backbone"]))
    failures = [dict(f) for f in result.failures]
    failures += [dict(e, backbone=f"{e['backbone'] or 'sweep'} ({e['stage']})") for e in result.errors]
    extra = [("Model comparison (a cost and speed screen)", result.comparison_report)] if result.comparison_report else []
    selection = result.sweep_dir / "selection.json"  # written by the final report (05) with two or more runs
    return write_index(reports, rows, failures, comparison=result.report, extra=extra,
                       title=f"tongue_nb sweep {result.sweep_dir.name}", provenance=provenance,
                       selection=selection if selection.is_file() else None, cv=cv_rows, cv_verdict=cv_text)
