"""`tongue-nb tune`: the space file's refusals, a tiny real search (best.yaml, report, run folders), pruning,
resume, notebook 07 on the finished study, two workers on one SQLite study, the journal storage, and a dead
worker's trial retried."""
import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import yaml

from tongue_nb.data.synth import make_synthetic
from tongue_nb.pipeline import cli
from tongue_nb.pipeline.tune import TuneOptions, check_options, load_study, run_tune
from tongue_nb.train.params import ParamError, load_params

RECIPE = {"backbone": "test_convnext", "pretrained": False, "image_size": 32, "batch_size": 8, "stage1_epochs": 1,
          "stage2_epochs": 1, "max_steps_per_epoch": 2, "device": "cpu", "num_threads": 1,
          "stage2_lr_backbone": 3e-4}  # inside SPACE: the first trial is this recipe as given
SPACE = {"stage2_lr_backbone": {"float": ["1e-4", "2e-3"], "log": True}, "crop": {"choice": ["crop", "crop_blank"]}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = make_synthetic(root / "syn", n=40, size=48, seed=1)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return root, data


def _options(inputs, tmp_path, **kw):
    root, data = inputs
    return TuneOptions(space=str(root / "space.yaml"), study="s", files=[str(root / "recipe.yaml")],
                       data_dir=str(data), out_dir=str(tmp_path / "tune"), **{"trials": 2, **kw})


def _states(options):
    return sorted((t.number, t.state.name) for t in load_study(options).get_trials())


@pytest.mark.parametrize("space, words", [
    ({"stage2_lr_bakbone": {"float": [1e-4, 1e-3]}}, ["stage2_lr_bakbone", "did you mean stage2_lr_backbone"]),
    ({"drop_rate": {"float": [0.0, 1.5]}}, ["drop_rate", "< 1.0"]),
    ({"crop": {"float": [0.0, 1.0]}}, ["crop", "a str field, got a float range"]),
    ({"batch_size": {"int": [8, "many"]}}, ["batch_size", "an integer"]),
    ({"seed": {"int": [0, 3]}}, ["seed", "not tunable"]),
    ({"crop": {"choice": ["crop", "zoom"]}}, ["crop", "expected one of"]),
], ids=["unknown", "out-of-bounds", "wrong-kind", "bad-type", "not-tunable", "bad-choice"])
def test_space_refusals_are_one_line_exit_2_and_write_nothing(inputs, tmp_path, capsys, space, words):
    root, data = inputs
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = tmp_path / "tune"
    code = cli.main(["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space", str(tmp_path / "space.yaml"),
                     "--trials", "2", "--study", "s", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("tongue-nb tune: error: search space ") and str(tmp_path / "space.yaml") in err
    assert all(w in err for w in words), err
    assert not out.exists()


def _recipe_with(folder: Path, text: str) -> Path:
    """A second recipe r.yaml (applied after the test's own) holding `text`."""
    folder.mkdir(exist_ok=True)
    (folder / "r.yaml").write_text(text + "\n")
    return folder / "r.yaml"


@pytest.mark.parametrize("case, words", [
    ("space-missing", ["search space", "nope.yaml (--space): not found; expected a YAML file"]),
    ("recipe-missing", ["-f/--file", "nope.yaml: recipe not found; expected a recipe YAML file"]),
    ("no-driver", ["--storage postgresql://", "the driver of postgresql:// is not installed", "expected"]),
    ("unknown-db", ["--storage nosuchdb://", "unknown database kind 'nosuchdb'; expected"]),
    ("sqlite-no-folder", ["--storage sqlite:///", "cannot write an SQLite file there; expected"]),
    ("sqlite-under-a-file", ["--storage sqlite:///", "cannot write an SQLite file there; expected"]),
    ("sqlite-in-memory", ["--storage sqlite://", "expected sqlite:///PATH"]),
    ("out-under-a-file", ["--out", "is a file, expected a folder"]),
    ("negative-minutes", ["--minutes: got -1.0, expected a time budget in minutes >= 0"]),
    ("more-folds-than-patients", ["folds: 500 folds need at least 500 groups (patients)", "(data "]),
    ("recipe-out-dir", ["-f/--file", "r.yaml: out_dir: the tune sets it for every trial", "remove it from the recipe"]),
    ("per-backbone-experiment-name", ["r.yaml: per_backbone.test_convnext.experiment_name: the tune sets it"]),
    ("set-resume", ["--set resume=true: the tune sets it for every trial"]),
    ("fold-with-folds", ["--set fold=1: with folds every trial trains every fold"]),
    ("out-in-the-dataset", ["parameter --out", "is inside the dataset", "nothing is written inside a dataset"]),
    ("out-holds-a-run", ["--out", "a-run: holds a run, not a tune; its records would mix"]),
], ids=lambda value: value if isinstance(value, str) else "")
def test_bad_options_are_one_line_naming_the_option_exit_2_and_write_nothing(inputs, tmp_path, capsys, case,
                                                                               words):
    import importlib.util

    if case == "no-driver" and importlib.util.find_spec("psycopg"):
        pytest.skip("a PostgreSQL driver is installed here")
    root, data = inputs
    (tmp_path / "a-file").write_text("")
    if case == "out-holds-a-run":
        (tmp_path / "a-run").mkdir()
        (tmp_path / "a-run" / "params.yaml").write_text("seed: 0\n")
    recipe, space, out = str(root / "recipe.yaml"), str(root / "space.yaml"), str(tmp_path / "tune")
    extra = {"space-missing": ["--space", str(tmp_path / "nope.yaml")],
             "recipe-missing": ["-f", str(tmp_path / "nope.yaml")],
             "no-driver": ["--storage", "postgresql://user@localhost/db"],
             "unknown-db": ["--storage", "nosuchdb://h/db"],
             "sqlite-no-folder": ["--storage", f"sqlite:///{tmp_path}/missing/study.db"],
             "sqlite-under-a-file": ["--storage", f"sqlite:///{tmp_path}/a-file/study.db"],
             "sqlite-in-memory": ["--storage", "sqlite://"],
             "out-under-a-file": ["--out", str(tmp_path / "a-file" / "t")],
             "negative-minutes": ["--minutes", "-1"],
             "more-folds-than-patients": ["--set", "folds=500"],
             "recipe-out-dir": ["-f", str(_recipe_with(root / "out-dir", "out_dir: elsewhere"))],
             "per-backbone-experiment-name": ["-f", str(_recipe_with(
                 root / "per-backbone", "per_backbone:\n  test_convnext:\n    experiment_name: mine"))],
             "set-resume": ["--set", "resume=true"],
             "fold-with-folds": ["--set", "folds=2", "--set", "fold=1"],
             "out-in-the-dataset": ["--out", str(data / "tune")],
             "out-holds-a-run": ["--out", str(tmp_path / "a-run")]}
    argv = ["tune", "--data", str(data), "-f", recipe, "--space", space, "--trials", "2", "--study", "s", "--out", out]
    code = cli.main(argv + extra[case])  # argparse: the last --space / --out wins; -f adds a missing recipe
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("tongue-nb tune: error: "), err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "a-run") == ["a-file"]  # no tune folder, no study
    assert not (tmp_path / "a-run").exists() or [p.name for p in (tmp_path / "a-run").iterdir()] == ["params.yaml"]


def test_the_command_lines_median_pruner_waits_for_3_trials_and_the_whole_network(inputs, tmp_path):
    import dataclasses

    import optuna

    from tongue_nb.pipeline.tune import make_pruner, median_warmup, options_from_args
    from tongue_nb.pipeline.tune_space import Dimension

    root, data = inputs
    args = cli.build_parser().parse_args(["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space",
                                          str(root / "space.yaml"), "--trials", "9", "--study", "s"])
    options = options_from_args(args)
    base, space = check_options(options)
    pruner = make_pruner(options.pruner, base, space)
    assert options.pruner == "median" and isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (3, 2)  # the recipe's stage 1: epoch 1
    assert median_warmup(dataclasses.replace(base, stage1_epochs=5), []) == 6  # the default 5 frozen epochs
    assert median_warmup(base, [Dimension("stage1_epochs", "int", 0, 4)]) == 5  # the space's longest stage 1
    assert median_warmup(dataclasses.replace(base, stage1_epochs=0), []) == 2  # never epoch 1
    # Optuna's reading of it, on the epoch numbers the trials report: a bad 4th trial is pruned at epoch 2, not 1.
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.8, intermediate_values={1: 0.5, 2: 0.8}))
    trial = study.ask()
    trial.report(0.1, 1)
    assert not trial.should_prune()
    trial.report(0.1, 2)
    assert trial.should_prune()


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """A tiny finished tune through the command line (2 trials): the resume test goes on to 3, 07 shows it."""
    root, data = inputs
    folder = tmp_path_factory.mktemp("finished") / "tune"
    argv = ["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space", str(root / "space.yaml"),
            "--trials", "2", "--study", "s", "--out", str(folder)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return {"folder": folder, "argv": argv, "code": code, "out": out.getvalue()}


def test_tune_writes_runs_best_recipe_and_report_then_resumes(finished):
    folder, argv = finished["folder"], finished["argv"]
    assert finished["code"] == 0 and "2 complete" in finished["out"]
    assert (folder / "study.db").is_file()
    best = load_params(files=[folder / "best.yaml"])  # a recipe, ready for sweep -f
    raw = yaml.safe_load((folder / "best.yaml").read_text())
    assert "data_dir" not in raw and "out_dir" not in raw and best.backbone == "test_convnext"
    assert 1e-4 <= best.stage2_lr_backbone <= 2e-3 and best.crop in ("crop", "crop_blank")
    for n in (0, 1):
        run = folder / "trials" / f"trial-{n}"
        marker = json.loads((run / "trial.json").read_text())
        assert marker["state"] == "complete" and (run / "summary.json").is_file()
    # The first trial is the recipe as given (its values lie in the space); the next is the search's.
    recipe = load_params(files=[argv[4]])
    first = json.loads((folder / "trials" / "trial-0" / "trial.json").read_text())["values"]
    assert first == {"stage2_lr_backbone": recipe.stage2_lr_backbone, "crop": recipe.crop}
    page = (folder / "report.html").read_text()
    assert "trials/trial-0" in page and "optimisation history" in page.lower() and "importances" in page
    # Run again with more trials: it goes on from the finished ones.
    assert cli.main(argv[:-6] + ["--trials", "3", "--study", "s", "--out", str(folder)]) == 0
    assert _states(TuneOptions(space="", trials=3, study="s", out_dir=str(folder))) == \
        [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]


def test_notebook_07_shows_the_study_and_changes_nothing(finished, tmp_path):
    from tongue_nb.pipeline import jobs, sweep

    folder = finished["folder"]
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    out_nb = tmp_path / "07.ipynb"
    with jobs.project_kernel() as kernel:  # run from another folder: the tune folder is read as given
        jobs.execute_notebook(sweep.NOTEBOOKS / "07_tune.ipynb", out_nb, {"tune_dir": str(folder)}, kernel, tmp_path)
    page = sweep.render_html(out_nb, tmp_path / "07_tune.html").read_text()
    assert "tuning study" in page and "complete" in page and "trials/trial-1" in page  # the trials table
    assert page.count("data:image/png;base64") >= 2  # history, importances
    assert "best recipe" in page and "stage2_lr_backbone:" in page and "tongue-nb sweep -f" in page
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before


def test_open_study_refuses_a_folder_that_is_not_a_tunes(finished, tmp_path):
    from tongue_nb.pipeline.tune import open_study
    from tongue_nb.runfiles import RunFileError

    with pytest.raises(RunFileError, match="tune.json"):
        open_study(tmp_path)
    (tmp_path / "tune.json").write_text((finished["folder"] / "tune.json").read_text())
    with pytest.raises(ParamError, match="no study file .*study.db; expected the folder of a tune"):
        open_study(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.json"]


def test_a_received_tune_record_never_makes_this_machine_write_or_connect_elsewhere(finished, tmp_path):
    """tune.json names the study's storage; a folder from someone else could name an SQLite file anywhere (Optuna
    would create it) or a database server. Neither is opened from the record alone, and a record with unknown keys
    is named, not a traceback."""
    from tongue_nb.pipeline.tune import open_study
    from tongue_nb.runfiles import RunFileError

    record = json.loads((finished["folder"] / "tune.json").read_text())
    planted = tmp_path / "elsewhere" / "planted.db"
    planted.parent.mkdir()
    (tmp_path / "tune.json").write_text(json.dumps(dict(record, storage=f"sqlite:///{planted}")))
    with pytest.raises(ParamError, match=r"no study file .*planted\.db"):
        open_study(tmp_path)
    assert not planted.exists()
    (tmp_path / "tune.json").write_text(json.dumps(dict(record, storage="postgresql://someone@far.example/db")))
    with pytest.raises(ParamError, match=r"kept in the database postgresql://.*open it with open_study\("):
        open_study(tmp_path)
    (tmp_path / "tune.json").write_text(json.dumps(dict(record, evil=1)))
    with pytest.raises(RunFileError, match=r"tune\.json: unknown keys \['evil'\]"):
        open_study(tmp_path)


def test_a_spent_time_budget_starts_no_trial_and_says_so(inputs, tmp_path, capsys):
    root, data = inputs
    argv = ["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space", str(root / "space.yaml"),
            "--trials", "2", "--study", "s", "--out", str(tmp_path / "tune"), "--minutes", "0.0001"]
    assert cli.main(argv) == 0  # the budget (6 ms) is spent before the first trial is asked
    out = capsys.readouterr().out
    assert "0 complete" in out and "stopped by --minutes 0.0001 before 2 trials (run again to go on)" in out
    assert not (tmp_path / "tune" / "trials").exists() and (tmp_path / "tune" / "report.html").is_file()
    assert [t.state.name for t in load_study(_options(inputs, tmp_path)).get_trials()] == ["WAITING"]  # the recipe


def test_pruned_trial_stops_its_fit_and_says_so(inputs, tmp_path):
    import optuna

    options = _options(inputs, tmp_path, trials=1, overrides=["stage2_epochs=2"])
    result = run_tune(options, pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # no score reaches 2: pruned at once
    assert (result.complete, result.pruned, result.best_yaml) == (0, 1, None)
    run = tmp_path / "tune" / "trials" / "trial-0"
    assert json.loads((run / "trial.json").read_text())["pruned_after_epoch"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 1  # of 3: the fit ended at the pruned epoch, and the folder is a readable run
    assert "No complete trial" in (tmp_path / "tune" / "report.html").read_text()


def test_two_local_workers_share_one_sqlite_study(inputs, tmp_path):
    options = _options(inputs, tmp_path, trials=2, workers=2)
    result = run_tune(options)
    assert result.ok and result.complete == 2
    assert _states(options) == [(0, "COMPLETE"), (1, "COMPLETE")]  # exactly 2, distinct numbers
    assert sorted(p.name for p in (tmp_path / "tune" / "trials").iterdir()) == ["trial-0", "trial-1"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the dead trial is asked by hand
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_dead_workers_trial_is_failed_and_retried_with_its_values(inputs, tmp_path, storage):
    journal = str(tmp_path / "study.journal")
    options = _options(inputs, tmp_path, trials=1, heartbeat=1, storage=journal if storage == "journal" else "")
    (tmp_path / "tune").mkdir()
    _, space = check_options(options)
    study = load_study(options)
    dead = study.ask()  # a worker asked a trial and died before its first heartbeat was renewed
    values = {d.name: d.suggest(dead) for d in space}
    if storage == "sqlite":
        study._storage.record_heartbeat(dead._trial_id)
    time.sleep(options.grace + 1.5)  # SQLite keeps whole seconds: 3.5 s can read as 3
    result = run_tune(options)
    assert result.complete == 1
    trials = load_study(options).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == values and trials[1].system_attrs["failed_trial"] == 0
    assert trials[1].user_attrs["run_dir"] == "trials/trial-0"  # the dead trial's run folder, resumed
    assert json.loads((tmp_path / "tune" / "trials" / "trial-0" / "trial.json").read_text())["retry_of"] == 0


def test_bench_tune_check_reads_the_trials_and_compares_runs(finished, tmp_path, capsys):
    """bench/tune_check.py: the trials best validation first, the recipe's trial marked, test only as a record."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("tune_check", ROOT / "bench" / "tune_check.py")
    tune_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_check)
    folder = finished["folder"]
    out = tmp_path / "trials.json"
    assert tune_check.main(["trials", "--tune", str(folder), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and {r["origin"] for r in rows if r["number"] == 0} == {"recipe"}
    assert all(0.0 <= r["test_combined"] <= 1.0 for r in rows)
    assert "| trial | origin | state |" in capsys.readouterr().out
    runs = [f"t{n}={folder / 'trials' / f'trial-{n}'}" for n in (0, 1)]
    assert tune_check.main(["compare", "--run", runs[0], "--run", runs[1], "--out", str(tmp_path / "c.json")]) == 0
    table = capsys.readouterr().out
    assert "| t0 |" in table and "test combined" in table
    with pytest.raises(SystemExit):
        tune_check.main(["compare", "--run", f"x={tmp_path}"])  # not a run folder: refused, naming it


def test_a_trial_is_never_pruned_after_its_last_epoch():
    """Pruning saves the epochs after it: after the last one there are none, and the trial completes."""
    from types import SimpleNamespace

    from tongue_nb.pipeline.tune_trial import PruneOnValidation
    from tongue_nb.train.fit_state import Stage

    class AlwaysPrune:
        number, reported = 0, []

        def report(self, value, step):
            self.reported.append(step)

        def should_prune(self):
            return True

    stages = [Stage(1, 1, 0.0, 1e-3, True), Stage(2, 2, 1e-4, 1e-3, False)]
    for epoch, pruned in ((2, True), (3, False)):
        callback, fit = PruneOnValidation(AlwaysPrune()), SimpleNamespace(score=0.5, epoch=epoch, stages=stages,
                                                                           stop_fit=False)
        callback.on_epoch_end(fit, {})
        assert fit.stop_fit is pruned and (callback.pruned_epoch == epoch) is pruned
    assert AlwaysPrune.reported == [2, 3]  # both epochs reported to the study


# --------------------------------------------------------------------------- a study's recipe, best.yaml, GPUs, steps


def _tree(folder):
    """Every file under `folder` with its bytes and modification time (a refused command changes none)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_trial(inputs, tmp_path_factory):
    """A finished one-trial tune whose command sets a default-equal value (drop_rate 0.0) and a non-default seed."""
    root, data = inputs
    folder = tmp_path_factory.mktemp("one") / "tune"
    argv = ["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space", str(root / "space.yaml"),
            "--trials", "1", "--study", "s2", "--out", str(folder), "--pruner", "none", "--set", "drop_rate=0.0",
            "--set", "seed=3"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    return folder, argv


@pytest.mark.parametrize("change, words", [
    (["--set", "stage2_epochs=2", "--set", "batch_size=4"],
     ["batch_size: 8 then, 4 now", "stage2_epochs: 1 then, 2 now"]),
    (["--backbone", "test_vit"], ["another search space or backbone"]),
    (["--data", "OTHER"], ["data (labels.csv sha256): "]),
    (["--space", "WIDER"], ["another search space or backbone"]),
], ids=["recipe-values", "backbone", "data", "space"])
def test_a_rerun_with_another_recipe_or_data_is_refused_naming_what_differs_and_changes_nothing(
        one_trial, inputs, tmp_path, capsys, change, words):
    folder, argv = one_trial
    if "OTHER" in change:
        change = ["--data", str(make_synthetic(tmp_path / "other", n=40, size=48, seed=2))]
    if "WIDER" in change:
        (tmp_path / "wider.yaml").write_text(yaml.safe_dump({**SPACE, "weight_decay": {"float": [0.0, 0.1]}}))
        change = ["--space", str(tmp_path / "wider.yaml")]
    before = _tree(folder)
    code = cli.main(argv[:argv.index("--trials")] + ["--trials", "2"] + argv[argv.index("--trials") + 2:] + change)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("tongue-nb tune: error: --study s2: "), err
    assert all(w in err for w in words) and "or name another --study" in err, err
    assert _tree(folder) == before  # nothing written: no trial, no best.yaml, no tune.json, the study as it was


def test_best_yaml_is_the_best_trials_own_values_and_a_sweep_layering_its_backbone_file_trains_them(
        one_trial, inputs, tmp_path, monkeypatch):
    """best.yaml pins every training value of the trial (drop_rate 0.0 too), so params/<backbone>.yaml layered under
    it, as a sweep layers it (sweep.recipe_files), changes none; `tongue-nb train -f best.yaml` trains the same."""
    from tongue_nb.pipeline import sweep
    from tongue_nb.pipeline.tune_report import NOT_IN_RECIPE

    folder, _ = one_trial
    _, data = inputs
    used = yaml.safe_load((folder / "trials" / "trial-0" / "params.yaml").read_text())
    text = (folder / "best.yaml").read_text()
    best = yaml.safe_load(text)
    assert "seed" not in best and "the trial's seed was 3" in text and "--seeds 3" in text
    assert best["split_seed"] == 3 and best["drop_rate"] == 0.0  # the trial's split; a default-equal value pinned
    pinned = {k: v for k, v in used.items() if k not in NOT_IN_RECIPE and k not in ("seed", "split_seed")}
    assert {k: best[k] for k in pinned} == pinned
    own = tmp_path / "params"
    own.mkdir()
    (own / "test_convnext.yaml").write_text("backbone: test_convnext\ndrop_rate: 0.1\nbatch_size: 16\ncrop: none\n"
                                            "weight_decay: 0.3\nimage_size: 48\n")
    monkeypatch.setattr(sweep, "PARAMS_DIR", own)
    layered = load_params(files=sweep.recipe_files("test_convnext", folder / "best.yaml"), seed=3).as_dict()
    assert {k: layered[k] for k in pinned} == pinned and layered["split_seed"] == 3
    out = tmp_path / "again"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", "-f", str(folder / "best.yaml"), "--data", str(data), "--out", str(out),
                         "--set", "seed=3"]) == 0
    again = yaml.safe_load((out / "params.yaml").read_text())
    assert {k: again[k] for k in pinned} == pinned and (again["seed"], again["split_seed"]) == (3, 3)


def test_best_yaml_comes_from_the_trials_run_folder_not_from_the_rerun(inputs, tmp_path):
    """A study started before its recipe was recorded (only its space and backbone) still runs; best.yaml then
    reads the best trial's params.yaml, whatever recipe the latest command gave."""
    options = _options(inputs, tmp_path, trials=1, pruner="none")
    base, space = check_options(options)
    (tmp_path / "tune").mkdir()
    old = load_study(options)  # what an older tongue-nb recorded: no base
    old.set_user_attr("space", [d.as_dict() for d in space])
    old.set_user_attr("backbone", base.backbone)
    assert run_tune(options).complete == 1
    rerun = run_tune(_options(inputs, tmp_path, trials=1, pruner="none", overrides=["batch_size=4"]))
    assert rerun.ok and rerun.best_number == 0  # nothing to run: the study has its trial
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())
    assert best["batch_size"] == 8 == yaml.safe_load((tmp_path / "tune" / "trials" / "trial-0" / "params.yaml")
                                                     .read_text())["batch_size"]


def test_a_rerun_may_change_how_trials_run_and_goes_on(one_trial, tmp_path):
    """Threads, device and tracking are not the recipe: a rerun with others goes on with the study."""
    import shutil

    folder, argv = one_trial
    copy = tmp_path / "tune"
    shutil.copytree(folder, copy)
    argv = [copy.as_posix() if a == str(folder) else a for a in argv]
    argv[argv.index("--trials") + 1] = "2"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv + ["--set", "num_threads=2", "--set", "tracking=none", "--set", "device=auto"]) == 0
    assert _states(TuneOptions(space="", trials=2, study="s2", out_dir=str(copy))) == [(0, "COMPLETE"), (1, "COMPLETE")]


def test_tune_gpus_with_one_worker_runs_the_trials_on_that_gpu(inputs, tmp_path, monkeypatch):
    """--gpus 1 with the default single worker: the worker is a process that sees only GPU 1 (not trials in this
    process on GPU 0); a worker whose GPU is not there stops instead of training on the CPU."""
    import torch

    from tongue_nb.pipeline import tune

    started = []

    class Worker:
        def __init__(self, argv, env, **kw):
            started.append((argv, env["CUDA_VISIBLE_DEVICES"]))

        def wait(self):
            return 0

    def in_process(*a, **kw):
        raise AssertionError("a trial ran in this process, which sees every GPU")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(tune.subprocess, "Popen", Worker)
    monkeypatch.setattr(tune, "work", in_process)
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    result = run_tune(_options(inputs, tmp_path, trials=1, gpus=["1"], overrides=["device=auto"]))
    assert result.ok and [(argv[-3:], gpu) for argv, gpu in started] == \
        [(["--worker", str((tmp_path / "tune" / "tune.json").resolve()), "0"], "1")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # in the worker: CUDA_VISIBLE_DEVICES=7, no such GPU
    with pytest.raises(RuntimeError, match="--gpus: GPU 7 is not visible to this worker .*expected the id"):
        tune._check_worker_gpu(_options(inputs, tmp_path, gpus=["7"]), 0)


@pytest.mark.parametrize("gpus, extra, words", [
    ("0,1", [], ["--gpus 0,1: 2 GPUs for --workers 1", "GPU 1 would not be used", "expected --workers 2"]),
    ("1", ["--set", "device=cpu"], ["--gpus 1: the recipe's device is 'cpu'", "expected device auto or cuda"]),
    ("1", ["--set", "device=cuda:1"], ["device is 'cuda:1'", "each worker sees its GPU as cuda:0"]),
    ("1", ["--set", "device=auto"], ["--gpus 1: no CUDA GPU is visible on this machine", "leave --gpus out"]),
], ids=["more-gpus-than-workers", "cpu-device", "other-cuda-device", "no-gpu"])
def test_gpus_that_cannot_be_honoured_are_refused_and_nothing_is_written(inputs, tmp_path, capsys, monkeypatch,
                                                                          gpus, extra, words):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if words[0].endswith("machine") else 2)
    root, data = inputs
    argv = ["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space", str(root / "space.yaml"),
            "--trials", "1", "--study", "s", "--out", str(tmp_path / "tune"), "--gpus", gpus]
    code = cli.main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("tongue-nb tune: error: --gpus "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("spec, words", [
    ({"image_size": {"int": [64, 100], "step": 32}},
     ["image_size: got [64, 100] with step 32, which does not reach 100", "draws would stop at 96",
      "expected a top the step reaches: 96 or 128"]),
    ({"weight_decay": {"float": [0.0, 0.25], "step": 0.1}}, ["weight_decay", "does not reach 0.25", ": 0.2 or 0.3"]),
    ({"drop_rate": {"float": [0.0, 0.95], "step": 0.1}}, ["drop_rate", "reaches: 0.9"]),  # 1.0 is no drop_rate
], ids=["int", "float", "float-at-the-fields-bound"])
def test_a_step_that_does_not_reach_the_top_is_refused_naming_the_tops_it_reaches(inputs, tmp_path, capsys, spec,
                                                                                   words):
    root, data = inputs
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    code = cli.main(["tune", "--data", str(data), "-f", str(root / "recipe.yaml"), "--space",
                     str(tmp_path / "space.yaml"), "--trials", "2", "--study", "s", "--out", str(tmp_path / "tune")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("tongue-nb tune: error: search space "), err
    assert all(w in err for w in words) and "1.0" not in err.split("reaches:")[-1], err
    assert not (tmp_path / "tune").exists()


def test_steps_that_reach_the_top_load_and_a_saved_space_with_an_unreached_top_is_the_same_space(inputs, tmp_path):
    from tongue_nb.pipeline.tune_space import Dimension, load_space

    spec = {"weight_decay": {"float": [0.0, 0.1], "step": 0.02}, "layer_decay": {"float": [0.7, 1.0], "step": 0.1},
            "image_size": {"int": [96, 192], "step": 32}}  # README's example; 0.3 / 0.1 is 2.9999999999999996
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    space = load_space(tmp_path / "space.yaml", lambda values: load_params(**values))
    assert sorted((d.name, d.low, d.high, d.step) for d in space) == [
        ("image_size", 96, 192, 32), ("layer_decay", 0.7, 1.0, 0.1), ("weight_decay", 0.0, 0.1, 0.02)]
    # A study saved by an older tongue-nb with image_size [64, 100] step 32 goes on with the top corrected to 96.
    assert Dimension("image_size", "int", 64, 100, step=32).reached() == Dimension("image_size", "int", 64, 96, step=32)
