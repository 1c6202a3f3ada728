"""The papermill sweep: kernels, failure records, one process per GPU, and a real sweep of two tiny backbones."""
import json
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tongue_nb.analysis.runs import load_sweep
from tongue_nb.analysis.stats import seed_table
from tongue_nb.analysis.tables import run_table
from tongue_nb.pipeline import sweep
from tongue_nb.pipeline import jobs
from tongue_nb.pipeline.executors import PoolExecutor, SlurmExecutor, _SlurmJob, make_executor
from tongue_nb.runio import RunFolder
from tongue_nb.train.params import ParamError


def _notebook(path: Path, *sources: str) -> Path:
    cells = [new_code_cell(sources[0], metadata={"tags": ["parameters"]})] + [new_code_cell(s) for s in sources[1:]]
    nbformat.write(new_notebook(cells=cells), str(path))
    return path


def _job(tmp_path: Path, name: str, input_nb: Path, kernel: str, **parameters) -> dict:
    return {"backbone": name, "run_dir": str(tmp_path / "runs" / name), "input_nb": str(input_nb),
            "output_nb": str(tmp_path / "out" / f"{name}.ipynb"), "parameters": parameters, "kernel_name": kernel,
            "cwd": str(tmp_path)}


def test_failures_are_recorded_with_their_cell(tmp_path):
    raising = _notebook(tmp_path / "raise.ipynb", "x = 1", "y = x + 1", "raise ValueError(f'unknown backbone {x}')")
    dying = _notebook(tmp_path / "die.ipynb", "x = 1", "import os\nos._exit(3)", "z = 2")
    with jobs.project_kernel() as kernel:
        failed = jobs.run_job(_job(tmp_path, "bad", raising, kernel, x=7))
        dead = jobs.run_job(_job(tmp_path, "dead", dying, kernel))
    assert failed["status"] == "failed" and failed["error"]["error_type"] == "ValueError"
    assert failed["error"]["message"] == "unknown backbone 7"  # the injected parameter reached the kernel
    # papermill injects a parameters cell after ours: the raising cell is the 4th
    assert failed["error"]["cell_index"] == 3 and "raise ValueError" in failed["error"]["cell_source"]
    assert Path(failed["notebook"]).exists()  # the partial notebook is kept for rendering
    assert dead["status"] == "failed" and dead["error"]["error_type"] == "DeadKernelError"
    assert "os._exit" in dead["error"]["cell_source"]
    hanging = _notebook(tmp_path / "hang.ipynb", "x = 1", "import time\ntime.sleep(60)", "z = 2")
    with jobs.project_kernel() as kernel:
        hung = jobs.run_job(dict(_job(tmp_path, "hung", hanging, kernel), cell_timeout=2))
    assert hung["status"] == "failed" and "time.sleep(60)" in hung["error"]["cell_source"]
    assert hung["seconds"] < 45  # the timeout stopped it, the sweep goes on
    html = sweep.render_html(failed["notebook"], tmp_path / "bad.html").read_text()
    assert "unknown backbone 7" in html and "y = x + 1" not in html  # partial output shown, code hidden


@pytest.mark.slow  # two worker processes, each importing papermill and starting a kernel: ~15 s on 2 busy cores
def test_one_process_per_gpu_sees_only_its_device(tmp_path):
    probe = _notebook(tmp_path / "probe.ipynb", "target = ''",
                      "import os, pathlib\npathlib.Path(target).write_text(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))")
    with jobs.project_kernel() as kernel:
        batch = [_job(tmp_path, f"j{i}", probe, kernel, target=str(tmp_path / f"j{i}.txt")) for i in range(2)]
        results = PoolExecutor(["5", "7"]).run(batch)
    assert [r["status"] for r in results] == ["completed"] * 2
    seen = [(tmp_path / f"j{i}.txt").read_text() for i in range(2)]
    assert sorted(seen) == ["5", "7"]  # two runs at the same time, each in a process that sees one GPU


def test_cpu_workers_run_side_by_side_with_their_share_of_the_cores(tmp_path, monkeypatch):
    """--workers 2 on a machine without GPUs: two jobs at once, each seeing no GPU and cores/2 threads."""
    monkeypatch.setattr("tongue_nb.pipeline.executors._cores", lambda: 4)
    pool = make_executor("auto", [], workers=2)
    assert isinstance(pool, PoolExecutor) and list(pool.devices) == ["", ""] and pool.threads == 2
    probe = _notebook(tmp_path / "probe.ipynb", "target = ''",
                      "import json, os, pathlib, time\nstart = time.time()\ntime.sleep(4)\n"
                      "pathlib.Path(target).write_text(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), "
                      "os.environ.get('OMP_NUM_THREADS'), start, time.time()]))")
    with jobs.project_kernel() as kernel:
        batch = [_job(tmp_path, f"j{i}", probe, kernel, target=str(tmp_path / f"j{i}.txt")) for i in range(2)]
        results = pool.run(batch)
    assert [r["status"] for r in results] == ["completed"] * 2
    seen = [json.loads((tmp_path / f"j{i}.txt").read_text()) for i in range(2)]
    assert [s[:2] for s in seen] == [["", "2"], ["", "2"]]
    (_, _, a0, a1), (_, _, b0, b1) = seen
    assert a0 < b1 and b0 < a1  # the two jobs' sleeps overlapped: side by side, not one after the other


def test_workers_option_is_checked_against_the_executor():
    assert [list(make_executor("auto", ["0"], workers=2).devices), list(make_executor("gpus", ["0", "1", "2"],
                                                                                      workers=2).devices)] \
        == [["0", "0"], ["0", "1"]]  # two jobs share one GPU; two workers take two of three GPUs
    assert list(make_executor("auto", ["0", "1"]).devices) == ["0", "1"]  # default: one per GPU
    assert type(make_executor("auto", [])).__name__ == "LocalExecutor"  # default without GPUs: in-process
    assert type(make_executor("auto", [], workers=1)).__name__ == "LocalExecutor"
    for kind, workers, words in (("auto", 0, "workers (--workers): got 0"), ("local", 2, "executor 'local'"),
                                 ("slurm", 2, "executor 'slurm'"), ("auto", True, "workers (--workers): got True")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            make_executor(kind, [], workers=workers)


def test_slurm_executor_runs_jobs_through_submitit_and_requeues_to_resume(tmp_path):
    ok = _notebook(tmp_path / "ok.ipynb", "target = ''", "import pathlib\npathlib.Path(target).write_text('ran')")
    bad = _notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('broken recipe')")
    with jobs.project_kernel() as kernel:
        batch = [_job(tmp_path, "ok", ok, kernel, target=str(tmp_path / "ok.txt")), _job(tmp_path, "bad", bad, kernel)]
        ex = SlurmExecutor(tmp_path / "slurm", gpus_per_job=0, cpus_per_job=1, time_min=5, cluster="local")
        results = ex.run(batch)
    assert [r["status"] for r in results] == ["completed", "failed"]
    assert (tmp_path / "ok.txt").read_text() == "ran"
    assert results[1]["error"]["error_type"] == "ValueError" and "broken recipe" in results[1]["error"]["message"]
    assert len([d for d in (tmp_path / "slurm").iterdir() if d.name.isdigit()]) == 2  # logs and result per job
    # Pre-emption or time-out: the requeued job resumes from the run's last checkpoint.
    job = batch[0]
    assert "resume" not in _SlurmJob(job).checkpoint().function.job["parameters"]
    (Path(job["run_dir"]) / "checkpoints").mkdir(parents=True)
    (Path(job["run_dir"]) / "checkpoints" / "last.pt").write_bytes(b"x")
    assert _SlurmJob(job).checkpoint().function.job["parameters"]["resume"] is True
    analysis = dict(job, task="error analysis of")  # reads that run folder: requeued as it was, no resume
    assert "resume" not in _SlurmJob(analysis).checkpoint().function.job["parameters"]
    # Options are checked before anything is submitted.
    with pytest.raises(ValueError, match="cluster"):
        SlurmExecutor(tmp_path, cluster="pbs")
    with pytest.raises(ValueError, match="time_min"):
        SlurmExecutor(tmp_path, time_min=0)
    with pytest.raises(ValueError, match="executor='slurm'"):
        make_executor("local", slurm={"partition": "gpu"})


def test_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sweep.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.visible_gpus() == []
    assert sweep.visible_gpus(2) == ["0", "1"] and sweep.visible_gpus(["1"]) == ["1"]


def test_bad_kernel_and_bad_overrides_fail_fast(tmp_path):
    with pytest.raises(sweep.SweepError, match=r"kernel 'no-such-kernel' not found.*ipykernel install --user --name no-such-kernel"):
        with jobs.project_kernel("no-such-kernel"):
            pass
    assert sweep._parse_overrides(["batch_size=4", "augment=false"]) == {"batch_size": 4, "augment": False}
    with pytest.raises(ParamError, match="batch_sizze"):
        sweep._parse_overrides(["batch_sizze=4"])
    with pytest.raises(ParamError, match="expected key=value"):
        sweep._parse_overrides(["batch_size"])
    # what the sweep itself sets per run cannot be silently replaced by a --set
    for item, hint in (("data_dir=/elsewhere", "use --data"), ("backbone=resnet18", "use --backbones"),
                       ("out_dir=x", "use --out")):
        with pytest.raises(ParamError, match=f"sweep sets .*{hint}"):
            sweep._parse_overrides([item])


@pytest.mark.parametrize("recipe, says", [
    ("out_dir: elsewhere\n", "out_dir: the sweep sets out_dir for every run"),
    ("folds: 3\nfold: 1\n", "fold: the sweep sets fold for every run"),
    ("per_backbone:\n  test_convnext:\n    data_dir: elsewhere\n",
     "per_backbone.test_convnext.data_dir: the sweep sets data_dir"),
    ("per_backbone:\n  test_convnext:\n    out_dir: elsewhere\n", "per_backbone.test_convnext.out_dir"),
    ("data_dir: ''\n", "data_dir: got '', expected a dataset folder"),
])
def test_a_recipe_key_the_sweep_would_replace_is_refused_before_anything_is_written(tmp_path, recipe, says):
    file = tmp_path / "recipe.yaml"
    file.write_text(recipe)
    with pytest.raises(ParamError, match=says) as err:
        sweep.run_sweep(None, ["test_convnext"], params_file=file, out_dir=tmp_path / "sw",
                        reports_dir=tmp_path / "rep", compare=False)
    assert str(file) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_sweep_is_never_written_into_a_run_or_a_tune(tmp_path):
    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=24, size=32, seed=0)
    for name, mark, held in (("run", "params.yaml", "holds a run"), ("tune", "tune.json", "holds a tune")):
        (tmp_path / name).mkdir()
        (tmp_path / name / mark).write_text("{}")
        with pytest.raises(sweep.SweepError, match=f"out_dir \\(--out\\) .*{name} {held}.*, not a sweep"):
            sweep.run_sweep(data, ["test_convnext"], out_dir=tmp_path / name, reports_dir=tmp_path / "rep",
                            compare=False)
        assert [p.name for p in (tmp_path / name).iterdir()] == [mark]
    assert not (tmp_path / "rep").exists()


def test_the_recipes_data_dir_is_the_sweeps_dataset_when_no_data_is_given(tmp_path):
    """As `tongue-nb train -f recipe` reads it: the recipe's dataset, not the synthetic set in its place."""
    (tmp_path / "mine").mkdir()
    file = tmp_path / "recipe.yaml"
    file.write_text(f"data_dir: {tmp_path / 'mine'}\n")
    with pytest.raises(sweep.SweepError, match=f"data_dir {tmp_path / 'mine'} has no labels.csv"):
        sweep.run_sweep(None, ["test_convnext"], params_file=file, out_dir=tmp_path / "sw",
                        reports_dir=tmp_path / "rep", compare=False)
    assert not (tmp_path / "sw").exists()


def test_skip_only_completed_runs(tmp_path):
    assert not sweep.is_completed(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "final_metrics_fixed": {}}))
    assert not sweep.is_completed(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"final_metrics_fixed": {"combined_score": 0.5}}))
    assert sweep.is_completed(tmp_path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from tongue_nb.data.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("sweepdata") / "syn", n=40, size=48, seed=0)


# Issue 4's done-when, in the default suite: ~85 s + ~45 s for the rerun on 2 busy cores.
def test_real_sweep_two_backbones_and_a_failure(tmp_path, tiny_data):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 1\nstage2_epochs: 1\n"
                      "num_threads: 1\nearly_stopping_patience: 0\n")
    out, reports = tmp_path / "sweep", tmp_path / "reports"
    t0 = time.perf_counter()
    result = sweep.run_sweep(tiny_data, ["test_convnext", "test_vit", "no_such_net"], params_file=recipe, out_dir=out,
                             reports_dir=reports, compare=False, ensemble_k=2)
    first = time.perf_counter() - t0
    assert not result.ok
    status = {r.backbone: r.status for r in result.runs}
    assert status == {"test_convnext": "completed", "test_vit": "completed", "no_such_net": "failed"}, result.describe()
    assert not result.errors, result.errors  # 04 and 05 ran for the sweep
    for name in ("test_convnext", "test_vit"):
        assert (reports / f"03_train-{name}.html").exists() and (reports / f"04_error_analysis-{name}.html").exists()
    assert (reports / "03_train-no_such_net.html").exists()  # the partial notebook is rendered
    failures = json.loads((out / "failures.json").read_text())
    assert [f["backbone"] for f in failures] == ["no_such_net"] and failures[0]["cell_index"] is not None
    assert (out / "runs" / "no_such_net" / "failure.json").exists()
    index = (reports / "index.html").read_text()
    assert "no_such_net" in index and failures[0]["error_type"] in index and "05_report.html" in index
    assert "04_error_analysis-test_vit.html" in index
    assert f"--selection {out.resolve() / 'selection.json'}" in index  # how to apply the saved per-task selection
    final = (reports / "05_report.html").read_text()
    assert "ensemble(top 2)" in final and "no_such_net" in final
    table = run_table(load_sweep(out))
    assert set(table["backbone"]) == {"test_convnext", "test_vit", "classical-baseline"}
    # the classical baseline is scored on the trained runs' own test images
    test_ids = [set(pd.read_csv(out / "runs" / name / "predictions.csv").query("split == 'test'")["id"])
                for name in ("classical-baseline", "test_convnext")]
    assert test_ids[0] == test_ids[1] and test_ids[0]

    # Started again: finished runs are skipped, the failed one is tried again; this time with the
    # model comparison (a tiny budget), whose unknown backbone gets an error row, not a sweep error,
    # and the training jobs submitted through submitit's local backend (the Slurm executor's path).
    # Its error analysis page was deleted: the analysis is made again, as a job of the same executor.
    (reports / "04_error_analysis-test_convnext.html").unlink()
    t0 = time.perf_counter()
    again = sweep.run_sweep(tiny_data, ["test_convnext", "no_such_net"], params_file=recipe, out_dir=out,
                            reports_dir=reports, compare=True, compare_steps=4,
                            compare_options={"image_size": 32, "batch_size": 4, "isolate": False, "num_threads": 1},
                            executor="slurm", slurm={"cluster": "local", "gpus_per_job": 0, "cpus_per_job": 1,
                                                     "time_min": 10})
    # submitit keeps a folder per job: the failed training, then the error analysis
    assert len([d for d in (out / "slurm").iterdir() if d.name.isdigit()]) == 2
    assert {r.backbone: r.status for r in again.runs} == {"test_convnext": "skipped", "no_such_net": "failed"}
    assert not again.ok and not again.errors, again.errors
    assert again.runs[0].error_analysis == str(reports / "04_error_analysis-test_convnext.html")  # made again
    assert again.comparison and again.comparison.exists() and "02_model_comparison.html" in (reports / "index.html").read_text()
    print(f"sweep: first {first:.1f} s, rerun {time.perf_counter() - t0:.1f} s")


def test_sweep_over_seeds_keeps_one_split_and_reports_the_spread(tmp_path, tiny_data):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 0\nstage2_epochs: 1\n"
                      "num_threads: 1\nseed: 5\nseeds: [0, 1]\n")
    out, reports = tmp_path / "sweep", tmp_path / "reports"
    result = sweep.run_sweep(tiny_data, ["test_convnext"], params_file=recipe, out_dir=out, reports_dir=reports,
                             compare=False, ensemble_k=0, baseline=False, seeds=sweep.recipe_seeds(recipe))
    assert result.ok and [r.backbone for r in result.runs] == ["test_convnext-seed0", "test_convnext-seed1"]
    summaries = [json.loads((out / "runs" / f"test_convnext-seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert [s["seed"] for s in summaries] == [0, 1] and {s["split_seed"] for s in summaries} == {5}
    splits = [pd.read_csv(out / "runs" / f"test_convnext-seed{k}" / "split.csv") for k in (0, 1)]
    assert splits[0].equals(splits[1])  # one split: the seeds differ in initialisation and order only
    spread = seed_table(load_sweep(out))
    assert list(spread["backbone"]) == ["test_convnext"] and spread.loc[0, "n"] == 2
    assert spread.loc[0, "min"] <= spread.loc[0, "mean"] <= spread.loc[0, "max"]
    assert "Seed spread" in (reports / "05_report.html").read_text()
    with pytest.raises(ParamError, match="--seeds"):
        sweep.run_sweep(tiny_data, ["test_convnext"], overrides=["seed=3"], seeds=[0, 1], out_dir=tmp_path / "x",
                        reports_dir=tmp_path / "r")
    with pytest.raises(ParamError, match="each seed once"):
        sweep.run_sweep(tiny_data, ["test_convnext"], seeds=[1, 1], out_dir=tmp_path / "x", reports_dir=tmp_path / "r")


def test_a_sweep_started_again_with_other_settings_is_refused_before_writing(tmp_path, tiny_data):
    """A sweep started again keeps its finished runs; with another --set, recipe or dataset they would be reported
    as trained with the new settings, so the sweep is refused, naming the run and the values, and writes nothing."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 0\nstage2_epochs: 1\n"
                      "num_threads: 1\n")
    out, reports = tmp_path / "sweep", tmp_path / "reports"
    kw = dict(params_file=recipe, out_dir=out, reports_dir=reports, compare=False, ensemble_k=0)
    assert sweep.run_sweep(tiny_data, ["test_convnext"], **kw).ok
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(sweep.SweepError, match=r"runs/test_convnext finished with other parameters than this sweep "
                                               r"gives it \(batch_size: run 8, now 4; stage2_epochs: run 1, now 2\)"):
        sweep.run_sweep(tiny_data, ["test_convnext"], overrides=["stage2_epochs=2", "batch_size=4"], **kw)
    recipe.write_text(recipe.read_text().replace("batch_size: 8", "batch_size: 4"))
    with pytest.raises(sweep.SweepError, match=r"test_convnext finished with other parameters.*batch_size: run 8, now 4"):
        sweep.run_sweep(tiny_data, ["test_convnext"], **kw)
    with pytest.raises(sweep.SweepError, match=r"classical-baseline finished with other parameters than this sweep "
                                               r"gives it \(split_seed: run 0, now 7\)"):  # test_vit: not trained yet
        sweep.run_sweep(tiny_data, ["test_vit"], overrides=["split_seed=7"], **kw)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("recipe, seeds, says", [
    ("seed: 7\nsplit_seed: 3\n", [0], r"seed 7: the sweep's seeds \(\[0\]\) set each run's seed"),
    ("per_backbone:\n  test_convnext: {seed: 7}\n", [0, 1], r"per_backbone\.test_convnext\.seed 7"),
    ("per_backbone:\n  test_convnext: {split_seed: 5}\n", None, r"per_backbone\.test_convnext\.split_seed: the sweep "
     r"compares its backbones \(and the baseline\) on one split"),
    ("per_backbone:\n  test_vit: {val_fraction: 0.3}\n", None, r"per_backbone\.test_vit\.val_fraction"),
])
def test_a_sweep_refuses_recipe_seeds_and_split_values_it_would_replace(tmp_path, tiny_data, recipe, seeds, says):
    """With --seeds each run's seed is one of them and the split's is the recipe's general one: a recipe seed that
    would be used nowhere, or a per_backbone value of the shared split, is refused before anything is written."""
    file = tmp_path / "r.yaml"
    file.write_text("pretrained: false\nimage_size: 32\n" + recipe)
    with pytest.raises(ParamError, match=says):
        sweep.run_sweep(tiny_data, ["test_convnext", "test_vit"], params_file=file, seeds=seeds,
                        out_dir=tmp_path / "sweep", reports_dir=tmp_path / "reports", compare=False)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "reports").exists()


def test_a_sweep_names_its_tracking_experiment_unless_the_recipe_does_for_that_backbone(tmp_path):
    file = tmp_path / "r.yaml"
    file.write_text("per_backbone:\n  test_convnext: {tracking_experiment: mine}\n")
    assert sweep._tracking_experiment(file, {}, 0, tmp_path / "sw", "test_convnext") == {}
    assert sweep._tracking_experiment(file, {}, 0, tmp_path / "sw", "test_vit") == {"tracking_experiment": "sw"}
    assert sweep._tracking_experiment(file, {"tracking_experiment": "x"}, 0, tmp_path / "sw", "test_vit") == {}


def test_the_sweeps_data_review_and_screen_see_the_recipes_tasks_and_split(tmp_path):
    """01 reviews, and 02 screens, the task schema and split seed the runs train with (before: the dataset's own
    tasks.yaml and seed 0, whatever the recipe said)."""
    file = tmp_path / "r.yaml"
    file.write_text("tasks: /x/tasks2.yaml\nseed: 4\nsplit_seed: 3\non_problem: drop\nimage_size: 64\n")
    review = sweep._review_parameters(tmp_path / "data", file, {}, 0)
    assert review == {"data_dir": str(tmp_path / "data"), "tasks": "/x/tasks2.yaml", "seed": 3}
    screen = sweep._screen_settings(file, {"split_seed": 5}, 0)
    assert (screen["tasks"], screen["seed"], screen["on_problem"], screen["image_size"]) == ("/x/tasks2.yaml", 5, "drop", 64)


def test_sweep_keywords_it_could_not_honour_are_refused(tmp_path, tiny_data):
    with pytest.raises(sweep.SweepError, match=r"compare_options steps=50 and compare_steps=10 disagree"):
        sweep.run_sweep(tiny_data, ["test_convnext"], compare_options={"steps": 50}, out_dir=tmp_path / "s",
                        reports_dir=tmp_path / "r")
    with pytest.raises(sweep.SweepError, match=r"gpus \['1'\] with executor 'local'"):
        sweep.run_sweep(tiny_data, ["test_convnext"], gpus=["1"], executor="local", out_dir=tmp_path / "s",
                        reports_dir=tmp_path / "r")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_a_resumed_sweep_refits_a_baseline_that_keeps_no_model(tmp_path, tiny_data):
    """A baseline finished before baselines kept their model is fitted again (its selection must be appliable);
    one that keeps its model is left as it is."""
    run_dir = tmp_path / "runs" / sweep.BASELINE_RUN
    extra = {"image_size": 32, "num_threads": 1}
    sweep._baseline(tiny_data, None, extra, run_dir, sweep.SweepResult(tmp_path, tmp_path / "reports"))
    model, legacy = run_dir / RunFolder.BASELINE_MODEL, run_dir / RunFolder.LEGACY_BASELINE_MODEL
    assert sweep.is_completed(run_dir) and model.is_file()
    stamp = model.stat().st_mtime_ns
    sweep._baseline(tiny_data, None, extra, run_dir, sweep.SweepResult(tmp_path, tmp_path / "reports"))
    assert model.stat().st_mtime_ns == stamp  # finished and complete: kept
    model.unlink()  # as a baseline folder from before this version
    sweep._baseline(tiny_data, None, extra, run_dir, sweep.SweepResult(tmp_path, tmp_path / "reports"))
    assert model.is_file()
    model.unlink()  # as a folder whose baseline kept a pickled model: refitted, the pickle (never read) removed
    legacy.write_bytes(b"an earlier version's pickle")
    sweep._baseline(tiny_data, None, extra, run_dir, sweep.SweepResult(tmp_path, tmp_path / "reports"))
    assert model.is_file() and not legacy.exists()
    from tongue_nb.pipeline.predict import Predictor

    assert Predictor.from_runs([run_dir]).baselines  # now applicable to new photos


def test_the_cost_screen_measures_the_recipes_training_setting(tmp_path):
    """A sweep's 02 screen runs at the recipe's image size, batch, crop, device and threads (0 px: 224); options
    given to the sweep win over them."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("image_size: 48\nbatch_size: 4\ncrop: crop_blank\nnum_threads: 1\n")
    assert sweep._screen_settings(recipe, {"batch_size": 6}, 0) == {
        "image_size": 48, "batch_size": 6, "crop": "crop_blank", "device": "auto", "num_threads": 1, "tasks": "",
        "seed": 0, "on_problem": "error"}
    assert sweep._screen_settings(None, {"folds": 3}, 3)["image_size"] == 224
