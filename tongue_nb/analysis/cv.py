"""Cross-validation: fold ensembles, out-of-fold scores, the corrected resampled t-test and the per-fold figure.

A cross-validated sweep trains each backbone K times (run folders `<name>-fold<k>`, fold k validating, the
other folds training, one test split set aside). `write_fold_ensemble` gathers the K runs into one folder
that reads like a run (kind `fold_ensemble`):

- `predictions.csv`: the out-of-fold rows as the `val` split (every non-test image predicted by the one model
  that did not train on it, with a `fold` column) and the K models' mean probabilities on the test split;
- `summary.json`: thresholds tuned on all out-of-fold rows, the test metrics of the fold ensemble with them,
  and a `cv` block with each fold's scores on its own out-of-fold rows and their pool (`cross_fitted`), each
  fold's rows decided at thresholds tuned on the other folds' rows (tuned and scored on the same rows, a
  threshold fitted to a few dozen positives of a rare label grades itself);
- `ensemble.json`: the member run folders, relative to it (what `tongue-nb predict --run` and `export` load).

So the reports' run machinery (tables, bootstrap, ensembles, per-task selection) applies to fold ensembles
unchanged, with validation meaning out-of-fold; this module adds the statistics across folds.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tongue_nb.analysis.runs import RunData, SweepData, _probs, _targets, load_run, split_rows
from tongue_nb.data.tasks import TaskSchema
from tongue_nb import runfiles
from tongue_nb.fonts import use_cjk_fonts
from tongue_nb.runfiles import RunFileError

FOLD_RUN = re.compile(r"^(?P<label>.+)-fold(?P<fold>\d+)$")
ENSEMBLE_FILE = "ensemble.json"
KIND = "fold_ensemble"
use_cjk_fonts()


def fold_label(run_name: str) -> tuple[str, int] | None:
    """('convnext_tiny-seed1', 3) for the run folder name 'convnext_tiny-seed1-fold3'; None for another name."""
    m = FOLD_RUN.match(run_name)
    return (m["label"], int(m["fold"])) if m else None


def is_fold_ensemble(folder: str | Path) -> bool:
    """True when the folder has an ensemble.json (only `write_fold_ensemble` leaves one); `fold_members` reads it,
    so a damaged one is named there rather than the folder taken for an ordinary run."""
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def fold_members(folder: str | Path) -> list[Path]:
    """The member run folders of a fold ensemble, in fold order; a missing or damaged ensemble.json, or a member
    that is missing, unfinished or not the fold its place says (fold k of the same K), is a RunFileError naming
    the file."""
    folder = Path(folder)
    file = folder / ENSEMBLE_FILE
    expected = (f"kind {KIND!r}, folds K >= 2 and a list of the K member run folders in fold order "
                "(fold 0 first; JSON)")
    data = runfiles.read_json(file, expected, keys=("kind", "folds", "members"))
    members, k = data["members"], data["folds"]
    if data["kind"] != KIND or not isinstance(members, list) or not all(isinstance(m, str) for m in members) \
            or isinstance(k, bool) or not isinstance(k, int) or k < 2 or len(members) != k:
        raise RunFileError(file, f"kind {data['kind']!r}, folds {k!r} with members {members!r}", expected)
    stamps = data.get("summaries")
    if stamps is not None and (not isinstance(stamps, list) or len(stamps) != k
                               or not all(isinstance(s, str) for s in stamps)):
        raise RunFileError(file, f"summaries {stamps!r}", f"{expected}, with one summary fingerprint per member")
    paths = [(folder / m).resolve() for m in members]
    for i, p in enumerate(paths):
        if not (p / "summary.json").is_file():
            raise RunFileError(file, f"member run folder {p} is missing or unfinished (no summary.json)", expected)
        summary = runfiles.read_json(p / "summary.json", "a run summary (JSON)")
        got = (summary.get("fold"), summary.get("folds"))
        if got != (i, k):
            raise RunFileError(file, f"member {i} ({p}) is fold {got[0]!r} of {got[1]!r} folds, not fold {i} of {k}",
                               expected)
        if stamps is not None and _fingerprint(p) != stamps[i]:
            raise RunFileError(file, f"member {i} ({p}) changed after the fold ensemble was gathered (its "
                               "summary.json is not the one gathered: trained again?), so the ensemble's thresholds "
                               "and scores are not its own", "members as gathered: gather the fold ensemble again "
                               "(a sweep started again with the same arguments does it, or cv.write_fold_ensemble)")
    return paths


def _fingerprint(run_dir: Path) -> str:
    """The SHA-256 of a member's summary.json: training writes it anew, so a member trained again after gathering
    is told apart from the one whose out-of-fold rows the fold ensemble's thresholds were tuned on."""
    import hashlib

    return hashlib.sha256((Path(run_dir) / "summary.json").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# gathering the folds


def _check_members(runs: Sequence[RunData]) -> int:
    """The number of folds K; every member is one distinct fold of one K-fold cut on one schema and test split."""
    folds = {int(r.summary.get("folds") or 0) for r in runs}
    seen = sorted(int(r.summary.get("fold", -1)) for r in runs)
    names = [r.path.name for r in runs]
    if len(folds) != 1 or next(iter(folds)) < 2:
        raise ValueError(f"fold ensemble of {names}: the runs are not cross-validation runs of one K (folds {folds})")
    k = folds.pop()
    if seen != list(range(k)):
        raise ValueError(f"fold ensemble of {names}: expected folds 0..{k - 1} once each, got {seen}")
    schema = runs[0].schema
    test = set(split_rows(runs[0].predictions, "test")["id"])
    for r in runs[1:]:
        if r.schema != schema:
            raise ValueError(f"fold ensemble: {r.path.name} was trained on other tasks than {runs[0].path.name}")
        if set(split_rows(r.predictions, "test")["id"]) != test:
            raise ValueError(f"fold ensemble: {r.path.name} has another test split than {runs[0].path.name}")
    val = [set(split_rows(r.predictions, "val")["id"]) for r in runs]
    if sum(len(v) for v in val) != len(set().union(*val)):
        raise ValueError(f"fold ensemble of {names}: an image validates in two folds; the runs come from different "
                         "fold cuts (seed or folds changed between them)")
    return k


def _primary(metrics: dict, task: str | None = None) -> float:
    value = metrics.get("combined_score") if task is None else (metrics["tasks"].get(task) or {}).get("primary")
    return float(value) if value is not None else float("nan")


def _fold_record(schema: TaskSchema, run: RunData, cross_fitted: dict) -> dict:
    """One fold's scores on its own out-of-fold rows: at thresholds tuned on the other folds' out-of-fold rows
    (`metrics.cross_fitted_scores`), and at the fixed 0.5."""
    from tongue_nb.analysis import metrics

    rows = split_rows(run.predictions, "val")
    fixed = metrics.compute_metrics(schema, _probs(schema, rows), _targets(schema, rows))
    fold = int(run.summary["fold"])
    tuned = cross_fitted["per_fold"][fold]
    counts = run.summary.get("counts") or {}
    return {"fold": fold, "run": run.path.name, "n_val": len(rows),
            "n_train": int((counts.get("train") or {}).get("samples") or 0),
            "combined": _number(tuned["combined"]), "combined_fixed": _primary(fixed),
            "tasks": {t.name: _number(tuned["tasks"][t.name]) for t in schema},
            "tasks_fixed": {t.name: _primary(fixed, t.name) for t in schema}}


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _check_out(members: Sequence[str | Path], out: str | Path) -> None:
    """The fold ensemble's folder may be new or a fold ensemble's, never a member, inside one or around one, nor
    another run's folder: writing there would overwrite that run's files."""
    target = Path(out).resolve()
    for m in members:
        member = Path(m).resolve()
        where = ("the member" if target == member else "inside" if member in target.parents
                 else "around" if target in member.parents else None)
        if where:
            raise ValueError(f"write_fold_ensemble: out {out} is {where} run {m}; its files would overwrite or mix "
                             "with the run's: choose a folder of its own (the sweep uses <sweep>/cv/<backbone>)")
    from tongue_nb.paths import dataset_around
    from tongue_nb.runio import held_by_another

    held = held_by_another(target, ENSEMBLE_FILE)
    if held:
        raise ValueError(f"write_fold_ensemble: out {out} holds another run ({held}, without ensemble.json); "
                         "choose an empty folder or an earlier fold ensemble's")
    data = target if (target / "labels.csv").is_file() else dataset_around(target)
    if data is not None:
        raise ValueError(f"write_fold_ensemble: out {out} is in the dataset {data} (it holds labels.csv); a "
                         "fold ensemble is never written into a dataset: choose a folder outside it")


def write_fold_ensemble(members: Sequence[str | Path], out: str | Path) -> dict:
    """Gather the K fold runs of one backbone into the fold-ensemble folder `out`; returns its summary.

    Thresholds are tuned on the out-of-fold predictions of all K folds (K times the images of one validation
    split) and applied to the fold ensemble's test probabilities (the mean of the K models'). The out-of-fold
    scores that estimate how well it does (each fold's, and `cv.cross_fitted` pooled over them) decide each fold's
    rows at thresholds tuned on the other folds, so that no row grades thresholds fitted to it.
    """
    from tongue_nb.analysis import metrics
    from tongue_nb.analysis.combine import mean_probs
    from tongue_nb.runio import RunFolder, atomic_write_json, predictions_table

    _check_out(members, out)
    runs = sorted((load_run(m) for m in members), key=lambda r: int(r.summary.get("fold", -1)))
    k = _check_members(runs)
    schema = runs[0].schema
    oof = pd.concat([split_rows(r.predictions, "val").assign(fold=int(r.summary["fold"])) for r in runs],
                    ignore_index=True)
    oof_p, oof_t = _probs(schema, oof), _targets(schema, oof)
    thresholds = metrics.tune_thresholds(schema, oof_p, oof_t)
    test_p, test_t, test_ids = mean_probs(runs, "test")
    test_rows = split_rows(runs[0].predictions, "test").set_index("id").loc[test_ids].reset_index()
    out = Path(out)
    folder = RunFolder(out)
    out.mkdir(parents=True, exist_ok=True)
    val_table = predictions_table(schema, oof, oof_p, oof_t, thresholds, "val")
    val_table["fold"] = oof["fold"].to_numpy()
    test_table = predictions_table(schema, test_rows, test_p, test_t, thresholds, "test")
    folder.write_predictions([val_table, test_table])
    first = runs[0].summary
    params = dict(runs[0].params, fold=-1, out_dir=str(out), experiment_name=out.name)
    folder.write_yaml(RunFolder.PARAMS, params)
    folder.write_yaml(RunFolder.TASKS, schema.as_dict())
    tuned = metrics.compute_metrics(schema, test_p, test_t, thresholds=thresholds)
    tuned["thresholds"] = thresholds
    cross_fitted = metrics.cross_fitted_scores(schema, oof_p, oof_t, oof["fold"].to_numpy())
    per_fold = [_fold_record(schema, r, cross_fitted) for r in runs]

    def total(key: str) -> float:
        return float(sum((r.summary.get("timings") or {}).get(key) or 0.0 for r in runs))

    summary = {
        "experiment_name": out.name, "status": "completed", "kind": KIND,
        "backbone": first.get("backbone"), "timm_name": first.get("timm_name"), "params_m": first.get("params_m"),
        "pretrained": first.get("pretrained"), "image_size": first.get("image_size"),
        "counts": {"val": {"samples": len(oof)}, "test": {"samples": len(test_ids)}},
        "best_epoch": None, "seed": first.get("seed"), "split_seed": first.get("split_seed"),
        "folds": k, "fold": -1,
        "val_metrics_fixed": metrics.compute_metrics(schema, oof_p, oof_t),
        "val_metrics_thresholded": metrics.compute_metrics(schema, oof_p, oof_t, thresholds=thresholds),
        "final_metrics_fixed": metrics.compute_metrics(schema, test_p, test_t),
        "final_metrics_thresholded": tuned,
        "timings": {"total_seconds": total("total_seconds"), "train_seconds": total("train_seconds")},
        "train_samples_per_s": None, "eval_samples_per_s": None,
        "cv": {"folds": k, "members": [r.path.name for r in runs], "per_fold": per_fold,
               "cross_fitted": {"combined": cross_fitted["combined"], "tasks": cross_fitted["tasks"]}},
    }
    atomic_write_json(out / ENSEMBLE_FILE, {"kind": KIND, "folds": k,
                                            "members": [_relative(r.path, out) for r in runs],
                                            "summaries": [_fingerprint(r.path) for r in runs]})
    folder.write_summary(summary)
    return summary


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def gather_fold_ensembles(sweep_dir: str | Path) -> dict[str, Path]:
    """Write `<sweep>/cv/<label>` for every label whose K fold runs under `<sweep>/runs` all finished.

    Returns label -> folder; a label with a missing or failed fold gets no folder (and loses a stale one), so a
    report never shows a fold ensemble with fewer folds than it claims.
    """
    from tongue_nb.runio import RunFolder

    sweep_dir = Path(sweep_dir)
    groups: dict[str, list[Path]] = {}
    for run_dir in sorted((sweep_dir / "runs").glob("*-fold*")):
        parsed = fold_label(run_dir.name)
        if parsed:
            groups.setdefault(parsed[0], []).append(run_dir)
    written: dict[str, Path] = {}
    for label, dirs in groups.items():
        out = sweep_dir / "cv" / label
        done = [d for d in dirs if RunFolder(d).is_completed()]
        folds = {int(RunFolder(d).read_summary().get("folds") or 0) for d in done}
        if not (len(done) == len(dirs) and len(folds) == 1 and len(done) == next(iter(folds))):
            if (out / ENSEMBLE_FILE).exists():
                (out / ENSEMBLE_FILE).unlink()
                (out / "summary.json").unlink(missing_ok=True)
            continue
        write_fold_ensemble(done, out)
        written[label] = out
    return written


# ----------------------------------------------------------------------------------------------
# statistics across folds


def fold_scores(sweep: SweepData, view: str = "thresholded") -> pd.DataFrame:
    """One row per fold ensemble and fold: run, backbone, seed, fold, n_train, n_val, combined and task scores."""
    rows = []
    for name, run in sweep.runs.items():
        cv = run.summary.get("cv")
        if not cv:
            continue
        for f in cv["per_fold"]:
            tasks = f["tasks"] if view == "thresholded" else f["tasks_fixed"]
            rows.append({"run": name, "backbone": str(run.summary.get("backbone")),
                         "seed": run.summary.get("seed"), "fold": f["fold"], "n_train": f["n_train"],
                         "n_val": f["n_val"],
                         "combined": f["combined"] if view == "thresholded" else f["combined_fixed"], **tasks})
    return pd.DataFrame(rows)


def corrected_ttest(diffs: Sequence[float], test_train_ratio: float, alpha: float = 0.05) -> dict[str, float]:
    """Nadeau and Bengio's corrected resampled t-test of paired per-fold differences.

    The J differences come from J train/validation cuts that share training images, so their plain variance
    understates the spread of the mean; the correction inflates the variance of the mean from s^2/J to
    (1/J + n_val/n_train) s^2 (`test_train_ratio` = n_val/n_train, 1/(K-1) for K-fold). Returns mean, sd, se,
    t, df, the two-sided p-value, the (1-alpha) interval of the mean difference and n, the differences used: a
    NaN difference (a fold without a score for the task) is left out and n says so.
    """
    from scipy import stats

    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"corrected_ttest: alpha must be between 0 and 1 (0.05: a 95% interval), got {alpha!r}")
    d = np.asarray(diffs, dtype=np.float64)
    d = d[~np.isnan(d)]
    j = len(d)
    if j < 2:
        raise ValueError(f"corrected_ttest: needs at least 2 paired differences, got {j}")
    if not (test_train_ratio > 0 and math.isfinite(test_train_ratio)):
        raise ValueError(f"corrected_ttest: test_train_ratio must be > 0, got {test_train_ratio!r}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = math.sqrt((1.0 / j + test_train_ratio) * sd ** 2)
    df = j - 1
    q = float(stats.t.ppf(1 - alpha / 2, df))
    if se == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df))
    return {"mean": mean, "sd": sd, "se": se, "t": t, "df": df, "p_value": p, "low": mean - q * se,
            "high": mean + q * se, "n": j}


def cv_table(sweep: SweepData, view: str = "thresholded") -> pd.DataFrame:
    """Per backbone (its seeds' folds pooled): folds, the combined and per-task mean and sd over folds, the
    pooled out-of-fold combined score, the fold ensemble's test score, and the difference to the backbone with
    the best mean combined score with the corrected resampled t-test (p and 95% interval), paired by seed and fold.
    """
    scores = fold_scores(sweep, view)
    if not len(scores):
        return pd.DataFrame()
    schema = next(iter(sweep.runs.values())).schema
    keys = ["combined"] + schema.names
    means = scores.groupby("backbone")["combined"].mean().sort_values(ascending=False)
    best = means.index[0]
    ref = scores[scores["backbone"] == best].set_index(["seed", "fold"])
    rows = []
    for backbone in means.index:
        mine = scores[scores["backbone"] == backbone]
        row: dict[str, Any] = {"backbone": backbone, "folds": len(mine),
                               "seeds": mine["seed"].nunique()}
        for key in keys:
            row[f"{key}_mean"], row[f"{key}_sd"] = float(mine[key].mean()), float(mine[key].std(ddof=1))
        runs = [sweep.runs[r] for r in mine["run"].unique()]
        view_key = "val_metrics_thresholded" if view == "thresholded" else "val_metrics_fixed"
        final_key = "final_metrics_thresholded" if view == "thresholded" else "final_metrics_fixed"
        row["oof_combined"] = float(np.mean([_oof_score(r.summary, view_key) for r in runs]))
        row["test_combined"] = float(np.mean([_primary(r.summary[final_key]) for r in runs]))
        row.update(_against(mine.set_index(["seed", "fold"]), ref, backbone == best, best))
        rows.append(row)
    return pd.DataFrame(rows)


def _oof_score(summary: dict, view_key: str) -> float:
    """The pooled out-of-fold combined score: cross-fitted (thresholds from the other folds) in the thresholded
    view, at the fixed 0.5 in the fixed view."""
    crossed = (summary.get("cv") or {}).get("cross_fitted")
    if view_key == "val_metrics_thresholded" and crossed:
        return _number(crossed.get("combined"))
    return _primary(summary[view_key])


def _against(mine: pd.DataFrame, ref: pd.DataFrame, is_best: bool, best: str) -> dict[str, Any]:
    """The corrected t-test of mine - best over the (seed, fold) pairs both have with the same validation size."""
    if is_best:
        return {"vs_best": "(best)", "diff": 0.0, "diff_lo": 0.0, "diff_hi": 0.0, "p_value": None}
    shared = mine.index.intersection(ref.index)
    same = [i for i in shared if mine.loc[i, "n_val"] == ref.loc[i, "n_val"]]
    if len(same) < 2:
        return {"vs_best": best, "diff": float("nan"), "diff_lo": float("nan"), "diff_hi": float("nan"),
                "p_value": None}
    diffs = [mine.loc[i, "combined"] - ref.loc[i, "combined"] for i in same]
    ratio = float(np.mean([mine.loc[i, "n_val"] / max(mine.loc[i, "n_train"], 1) for i in same]))
    t = corrected_ttest(diffs, ratio)
    return {"vs_best": best, "diff": t["mean"], "diff_lo": t["low"], "diff_hi": t["high"], "p_value": t["p_value"]}


def cv_verdict(table: pd.DataFrame) -> str:
    """One paragraph: the cross-validated winner, its mean and sd over folds, its lead over the next and whether
    the corrected t-test tells them apart, and the winner's fold-ensemble test score."""
    if table is None or not len(table):
        return "No cross-validated runs: nothing to compare across folds."
    best = table.iloc[0]
    text = (f"Cross-validated winner (combined macro-F1 over {int(best['folds'])} folds, each fold's images "
            f"decided at thresholds tuned on the other folds): {best['backbone']}, {best['combined_mean']:.3f} +- {best['combined_sd']:.3f} (sd "
            f"over folds); its fold ensemble scores {best['test_combined']:.3f} on the test split")
    if len(table) > 1:
        nxt = table.iloc[1]
        lead = -float(nxt["diff"])
        if math.isnan(lead):
            text += f"; {nxt['backbone']} was cut into other folds, so the two cannot be paired"
        else:
            sig = nxt["p_value"] is not None and nxt["p_value"] < 0.05
            text += (f"; {lead:.3f} ahead of {nxt['backbone']} (corrected resampled t-test: 95% CI "
                     f"{-float(nxt['diff_hi']):.3f} to {-float(nxt['diff_lo']):.3f}, p {nxt['p_value']:.3f}): "
                     + ("the lead is distinguishable from fold noise" if sig else
                        "not distinguishable from fold-to-fold noise"))
    return text + "."


def fold_points(sweep: SweepData, view: str = "thresholded") -> Figure:
    """Each backbone's per-fold scores as points (combined and per task), its mean as a bar, so the spread
    across folds shows at a glance."""
    scores = fold_scores(sweep, view)
    schema = next(iter(sweep.runs.values())).schema if sweep.runs else None
    keys = ["combined"] + (schema.names if schema is not None else [])
    order = list(scores.groupby("backbone")["combined"].mean().sort_values(ascending=False).index) if len(scores) else []
    fig = Figure(figsize=(max(3.0, 0.55 * len(order) + 1.5) * len(keys), 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, key in zip(axes, keys):
        for i, backbone in enumerate(order):
            values = scores.loc[scores["backbone"] == backbone, key].to_numpy(np.float64)
            ax.bar(i, np.nanmean(values), color="#4C72B0", alpha=0.35, width=0.7)
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=16, color="#1f3b66", zorder=3)
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("macro-F1 per fold (out-of-fold)")
    return fig
