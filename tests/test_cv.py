"""Cross-validated sweeps: fold runs, fold ensembles, the corrected t-test, resume, and predict with a fold ensemble."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from tongue_nb.analysis import cv
from tongue_nb.analysis.runs import load_sweep
from tongue_nb.analysis.selection import leave_one_fold_out, per_task_selection
from tongue_nb.pipeline import sweep
from tongue_nb.pipeline.cli import main as cli
from tongue_nb.train.params import ParamError


def _t_sf(t: float, df: int) -> float:
    """Survival function of Student's t by numerical integration of its density (independent of scipy)."""
    x = np.linspace(t, 200.0, 400001)
    dens = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    return float(np.trapezoid(dens, x))


def test_corrected_resampled_ttest_worked_example():
    # Five folds: the differences 0.02, 0.03, 0.01, 0.04, 0.00 have mean 0.02 and variance 0.00025 (sd 0.01581).
    # K-fold: n_val / n_train = 1/4, so the variance of the mean is (1/5 + 1/4) * 0.00025 = 1.125e-4,
    # se = 0.010607, t = 1.8856 on 4 degrees of freedom.
    res = cv.corrected_ttest([0.02, 0.03, 0.01, 0.04, 0.00], 0.25)
    assert res["mean"] == pytest.approx(0.02)
    assert res["sd"] == pytest.approx(math.sqrt(0.00025))
    assert res["se"] == pytest.approx(math.sqrt(0.45 * 0.00025))
    assert res["t"] == pytest.approx(1.885618, rel=1e-5) and res["df"] == 4
    assert res["p_value"] == pytest.approx(2 * _t_sf(1.885618, 4), abs=1e-4)
    assert 0.12 < res["p_value"] < 0.14  # the plain t-test (se 0.00707, t 2.83) would claim p 0.048
    half = 2.776445 * res["se"]  # t(0.975, 4)
    assert res["low"] == pytest.approx(0.02 - half, rel=1e-4) and res["high"] == pytest.approx(0.02 + half, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        cv.corrected_ttest([0.1], 0.25)
    for alpha in (0, 1.5, -0.05):  # an interval level outside (0, 1) would come back inverted or empty
        with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
            cv.corrected_ttest([0.1, 0.2], 0.25, alpha=alpha)
    assert cv.corrected_ttest([0.02, float("nan"), 0.01, 0.04], 0.25)["n"] == 3  # a fold without a score, counted


RECIPE = ("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 0\nstage2_epochs: 1\nnum_threads: 1\n"
          "early_stopping_patience: 0\nfolds: 3\n")


@pytest.fixture(scope="module")
def cv_sweep(tmp_path_factory):
    from tongue_nb.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("cv")
    data = make_synthetic(root / "syn", n=48, size=48, seed=2)
    recipe = root / "cv.yaml"
    recipe.write_text(RECIPE)
    out, reports = root / "sweep", root / "reports"
    result = sweep.run_sweep(data, ["test_convnext"], params_file=recipe, out_dir=out, reports_dir=reports,
                             compare=False, ensemble_k=0, workers=2)  # folds and analyses side by side
    return {"data": data, "recipe": recipe, "out": out, "reports": reports, "result": result}


def test_a_cross_validated_sweep_trains_every_fold_and_gathers_fold_ensembles(cv_sweep):
    out, result = cv_sweep["out"], cv_sweep["result"]
    assert result.ok, result.describe()
    assert [r.backbone for r in result.runs] == [f"test_convnext-fold{k}" for k in range(3)]
    assert {p.name for p in (out / "runs").iterdir()} >= {f"classical-baseline-fold{k}" for k in range(3)}
    splits = [pd.read_csv(out / "runs" / f"test_convnext-fold{k}" / "split.csv") for k in range(3)]
    test = [set(s.loc[s["split"] == "test", "id"]) for s in splits]
    assert test[0] == test[1] == test[2]  # one test split, set aside
    vals = [set(s.loc[s["split"] == "val", "id"]) for s in splits]
    everyone = set(splits[0]["id"]) - test[0]
    assert sorted(len(v) for v in vals) and set().union(*vals) == everyone and sum(map(len, vals)) == len(everyone)
    # the fold ensemble: every non-test image out-of-fold exactly once, test = the mean of the K models
    ens = out / "cv" / "test_convnext"
    assert cv.is_fold_ensemble(ens) and [p.name for p in cv.fold_members(ens)] == [f"test_convnext-fold{k}" for k in range(3)]
    pred = pd.read_csv(ens / "predictions.csv")
    oof = pred[pred["split"] == "val"]
    assert set(oof["id"]) == everyone and oof["id"].is_unique
    col = "p:coat:greasy"
    members = [pd.read_csv(out / "runs" / f"test_convnext-fold{k}" / "predictions.csv") for k in range(3)]
    for k, m in enumerate(members):  # the out-of-fold rows are each fold model's own validation answers
        mine = m[m["split"] == "val"].set_index("id")[col]
        assert np.allclose(oof.set_index("id").loc[mine.index, col], mine, atol=1e-6)
        assert (oof.set_index("id").loc[mine.index, "fold"] == k).all()
    mean = np.mean([m[m["split"] == "test"].set_index("id")[col].sort_index() for m in members], axis=0)
    assert np.allclose(pred[pred["split"] == "test"].set_index("id")[col].sort_index(), mean, atol=1e-6)
    summary = json.loads((ens / "summary.json").read_text())
    assert summary["kind"] == "fold_ensemble" and len(summary["cv"]["per_fold"]) == 3
    # the out-of-fold estimates decide each fold at thresholds tuned on the other two folds, never on its own rows
    from tongue_nb.analysis.metrics import primary_scores, tune_thresholds
    from tongue_nb.analysis.runs import _probs, _targets, load_run

    run = load_run(ens)
    probs, targets, fold = _probs(run.schema, oof), _targets(run.schema, oof), oof["fold"].to_numpy()
    for rec in summary["cv"]["per_fold"]:
        k, mine = rec["fold"], oof["fold"].to_numpy() == rec["fold"]
        thr = tune_thresholds(run.schema, {t: p[~mine] for t, p in probs.items()},
                              {t: y[~mine] for t, y in targets.items()})
        own = primary_scores(run.schema, {t: p[mine] for t, p in probs.items()},
                             {t: y[mine] for t, y in targets.items()}, thr)
        assert rec["combined"] == pytest.approx(own["__combined__"]) and rec["n_val"] == mine.sum()
    assert set(summary["cv"]["cross_fitted"]["tasks"]) == set(run.schema.names) and len(set(fold)) == 3


def test_reports_of_a_cross_validated_sweep(cv_sweep):
    out, reports = cv_sweep["out"], cv_sweep["reports"]
    s = load_sweep(out)
    assert s.cv and set(s.runs) == {"test_convnext", "classical-baseline"}
    table = cv.cv_table(s)
    assert set(table["backbone"]) == {"test_convnext", "classical-baseline"} and (table["folds"] == 3).all()
    assert table.iloc[0]["vs_best"] == "(best)" and table.iloc[1]["p_value"] is not None
    assert "Cross-validated winner" in cv.cv_verdict(table)
    points = cv.fold_scores(s)
    assert len(points) == 6 and set(points["fold"]) == {0, 1, 2}
    for rule in ("best", "simplest"):
        sel = per_task_selection(s, 0, rule)
        assert set(sel["choice"]) == set(s.runs["test_convnext"].schema.names)
        assert set(leave_one_fold_out(s, 0, rule)["mean"]) == set(sel["choice"])
    # candidates are compared on cross-fitted out-of-fold scores; cross_fit=False scores at the pooled thresholds
    crossed = s.runs["test_convnext"].summary["cv"]["cross_fitted"]["tasks"]
    pooled = s.runs["test_convnext"].summary["val_metrics_thresholded"]["tasks"]
    alone = dataclasses.replace(s, runs={"test_convnext": s.runs["test_convnext"]})  # the network the only candidate
    for cross_fit, expected in ((True, crossed), (False, {t: m["primary"] for t, m in pooled.items()})):
        sel = per_task_selection(alone, 0, "best", cross_fit=cross_fit)
        assert {c["source"] for c in sel["choice"].values()} == {"test_convnext"}
        assert {t: c["val"] for t, c in sel["choice"].items()} == pytest.approx(expected, nan_ok=True)
    assert leave_one_fold_out(s, 0, "simplest", cross_fit=False)["cross_fit"] is False
    for choose in (per_task_selection, leave_one_fold_out):  # both check their options, each named
        for kwargs, says in (({"rule": "bogus"}, "rule: got 'bogus'"), ({"cross_fit": "no"}, "cross_fit: got 'no'"),
                             ({"ensemble_k": -1}, "ensemble_k: got -1")):
            with pytest.raises(ValueError, match=says):
                choose(s, **kwargs)
    page = (reports / "05_report.html").read_text()
    assert "Cross-validation" in page and "corrected resampled t-test" in page
    assert "combined_mean" in page and "oof_combined" in page  # the CV table itself, not only its figure
    for k in range(3):
        assert (reports / f"03_train-test_convnext-fold{k}.html").exists()
    assert (reports / "04_error_analysis-test_convnext.html").exists()
    index = (reports / "index.html").read_text()
    assert "03_train-test_convnext-fold2.html" in index and "folds" in index


def test_predict_and_export_with_a_fold_ensemble(cv_sweep, tmp_path, capsys):
    out, data = cv_sweep["out"], cv_sweep["data"]
    ens = out / "cv" / "test_convnext"
    saved = pd.read_csv(ens / "predictions.csv").query("split == 'test'").set_index("id")
    labels = pd.read_csv(data / "labels.csv").set_index("image").loc[saved.index]
    photos = tmp_path / "photos.csv"
    pd.DataFrame({"image": [str(data / i) for i in saved.index], "mask": [str(data / m) for m in labels["mask"]],
                  "id": saved.index}).to_csv(photos, index=False)
    assert cli(["predict", "--run", str(ens), "--images", str(photos), "--out", str(tmp_path / "p.csv")]) == 0
    got = pd.read_csv(tmp_path / "p.csv").set_index("id").loc[saved.index]
    cols = [c for c in saved.columns if c.startswith("p:")]
    assert np.allclose(got[cols].to_numpy(float), saved[cols].to_numpy(float), atol=2e-5)  # the K models' mean
    # notebook 06 takes the fold ensemble as one run too
    from tongue_nb.pipeline import jobs

    with jobs.project_kernel() as kernel:
        jobs.execute_notebook(sweep.NOTEBOOKS / "06_predict.ipynb", tmp_path / "06.ipynb",
                              {"runs": str(ens), "images": str(photos), "out_csv": str(tmp_path / "nb.csv"),
                               "n_gallery": 2}, kernel, sweep.PROJECT_ROOT)
    from_nb = pd.read_csv(tmp_path / "nb.csv").set_index("id").loc[saved.index]
    assert np.allclose(from_nb[cols].to_numpy(float), got[cols].to_numpy(float), atol=1e-6)
    assert cli(["export", "--run", str(ens), "--out", str(tmp_path / "m.onnx")]) == 0
    from tongue_nb.model.export import onnx_metadata

    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["members"] == "3" or meta["members"] == 3
    assert meta["thresholds"] == json.loads((ens / "summary.json").read_text())["final_metrics_thresholded"]["thresholds"]


def test_a_half_finished_cross_validated_sweep_resumes(cv_sweep, tmp_path):
    src = cv_sweep["out"]
    out = tmp_path / "sweep"
    shutil.copytree(src, out, symlinks=True)
    (out / ".lock").unlink(missing_ok=True)
    shutil.rmtree(out / "runs" / "test_convnext-fold1")  # as if the sweep died before this fold
    shutil.rmtree(out / "cv")
    before = {k: (out / "runs" / f"test_convnext-fold{k}" / "summary.json").stat().st_mtime_ns for k in (0, 2)}
    again = sweep.run_sweep(cv_sweep["data"], ["test_convnext"], params_file=cv_sweep["recipe"], out_dir=out,
                            reports_dir=tmp_path / "reports", compare=False, ensemble_k=0)
    assert again.ok, again.describe()
    assert {r.backbone: r.status for r in again.runs} == {"test_convnext-fold0": "skipped",
                                                           "test_convnext-fold1": "completed",
                                                           "test_convnext-fold2": "skipped"}
    assert before == {k: (out / "runs" / f"test_convnext-fold{k}" / "summary.json").stat().st_mtime_ns for k in (0, 2)}
    assert cv.is_fold_ensemble(out / "cv" / "test_convnext")


def test_fold_options_are_checked_before_anything_runs(tmp_path, cv_sweep):
    with pytest.raises(ParamError, match="folds"):
        sweep.run_sweep(cv_sweep["data"], ["test_convnext"], folds=1, out_dir=tmp_path / "a", reports_dir=tmp_path / "r")
    with pytest.raises(ParamError, match="the sweep trains every fold"):
        sweep.run_sweep(cv_sweep["data"], ["test_convnext"], overrides=["fold=1"], folds=3, out_dir=tmp_path / "b",
                        reports_dir=tmp_path / "r")
    # more folds than the data has patients outside the test split: refused once, up front, naming the data
    # (it used to plan K baseline fits and K runs per backbone, each failing on its own)
    with pytest.raises(ParamError, match=r"folds: 500 folds need at least 500 groups .*\(data .*syn"):
        sweep.run_sweep(cv_sweep["data"], ["test_convnext"], folds=500, out_dir=tmp_path / "c", reports_dir=tmp_path / "r")
    with pytest.raises(ParamError, match=r"seed 1\)"):
        sweep.run_sweep(cv_sweep["data"], ["test_convnext"], folds=40, seeds=[1], out_dir=tmp_path / "c",
                        reports_dir=tmp_path / "r")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "r"))


def test_folds_and_overrides_are_checked_with_the_recipe_not_alone(tmp_path, cv_sweep, monkeypatch):
    # `--folds K` and `--set folds=K` reach the runs (each override was once checked as if it were the whole recipe,
    # and a lone folds=3 looked like a run without its fold); what depends on several parameters is checked on the
    # recipe and the overrides together, before the sweep writes anything.
    seen = []
    monkeypatch.setattr(sweep, "_sweep", lambda *a, **kw: seen.append((a[3], kw["folds"])) or
                        sweep.SweepResult(a[4], a[5]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("test_fraction: 0.05\nstage1_epochs: 0\n")
    assert cli(["sweep", "--data", str(cv_sweep["data"]), "--backbones", "test_convnext", "--folds", "3",
                "--no-compare", "--out", str(tmp_path / "a"), "--reports", str(tmp_path / "ra")]) == 0
    sweep.run_sweep(cv_sweep["data"], ["test_convnext"], params_file=recipe, overrides=["folds=2", "val_fraction=0.9"],
                    compare=False, out_dir=tmp_path / "b", reports_dir=tmp_path / "rb")
    assert seen == [({"folds": 3}, 3), ({"folds": 2, "val_fraction": 0.9}, 2)]
    for overrides, match in ((["stage2_epochs=0"], "stage1_epochs \\+ stage2_epochs"),
                             (["val_fraction=0.95"], "val_fraction \\+ test_fraction"),
                             (["val_fraction=2"], "override 'val_fraction=2'.*< 1")):
        with pytest.raises(ParamError, match=match):
            sweep.run_sweep(cv_sweep["data"], ["test_convnext"], params_file=recipe, overrides=overrides,
                            compare=False, out_dir=tmp_path / "c", reports_dir=tmp_path / "rc")
    with pytest.raises(ParamError, match="--folds 3 and --set folds=5"):
        sweep.run_sweep(cv_sweep["data"], ["test_convnext"], overrides=["folds=5"], folds=3, compare=False,
                        out_dir=tmp_path / "c", reports_dir=tmp_path / "rc")
    assert not (tmp_path / "c").exists() and not (tmp_path / "rc").exists() and len(seen) == 2


def test_the_plan_of_a_cross_validated_sweep_over_seeds(tmp_path):
    assert sweep._plan(["a"], None, 0) == [("a", None, None)]
    assert sweep._plan(["a"], [0, 1], 2) == [("a-seed0-fold0", 0, 0), ("a-seed0-fold1", 0, 1),
                                            ("a-seed1-fold0", 1, 0), ("a-seed1-fold1", 1, 1)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("folds: 4\n")
    assert sweep._sweep_folds({}, recipe) == 4 and sweep._sweep_folds({"folds": 2}, recipe) == 2
    recipe.write_text("folds: two\n")
    with pytest.raises(ParamError, match="key folds"):
        sweep._sweep_folds({}, recipe)
    assert cv.fold_label("convnext_tiny-seed1-fold3") == ("convnext_tiny-seed1", 3) and cv.fold_label("x") is None


def test_a_fold_ensemble_is_never_written_over_a_run_or_a_dataset(cv_sweep, tmp_path):
    """write_fold_ensemble(members, out) with `out` a member overwrote its summary, predictions and params (the
    run was lost); with `out` the dataset it replaced the dataset's tasks.yaml."""
    out, data = cv_sweep["out"], cv_sweep["data"]
    members = sorted((out / "runs").glob("test_convnext-fold*"))
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    before = {p: p.read_bytes() for folder in (*members, copy) for p in folder.rglob("*") if p.is_file()}
    for target, says in ((members[0], "is the member run"), (members[1] / "cv", "is inside run"),
                         (out / "runs", "is around run"), (out / "runs" / "classical-baseline-fold0", "holds another run"),
                         (copy, "is in the dataset"), (copy / "ensembles", "is in the dataset")):
        with pytest.raises(ValueError, match=says):
            cv.write_fold_ensemble(members, target)
    assert {p: p.read_bytes() for folder in (*members, copy) for p in folder.rglob("*") if p.is_file()} == before
    assert not (members[1] / "cv").exists() and not (copy / "ensembles").exists()
    assert cv.write_fold_ensemble(members, tmp_path / "mine")["cv"]["folds"] == 3  # a folder of its own is fine
