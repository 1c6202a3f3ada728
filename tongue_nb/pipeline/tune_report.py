"""A tune's outputs: best.yaml (the recipe with the best values) and report.html (trials, history, importances).

`tune.show_study(folder)` shows the same in a notebook. Works on any Optuna study of `tongue-nb tune` (the trials'
user attributes `run_dir` and `val_score` link the run folders and give a pruned trial's score).
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure

from tongue_nb.analysis.index_page import PAGE_CSS
from tongue_nb.analysis.plots import figure_png
from tongue_nb.train.params import ParamError, load_params

# Left out of best.yaml: the data, where runs go, the run control and where the logs go are the command's (sweep
# --data, --out, --folds; the machine's tracking default). Every other value of the trial is pinned.
NOT_IN_RECIPE = ("data_dir", "out_dir", "experiment_name", "resume", "resume_changed_data", "cache_dir", "folds",
                 "fold", "progress", "tracking", "tracking_uri", "tracking_experiment")
# Left out too: a sweep's --seeds gives each run its own seed (a recipe's would be replaced); best.yaml pins the
# trial's split with split_seed instead and names the trial's seed in its header.
SEED_KEYS = ("seed",)


def trial_params(folder: Path, trial: Any) -> tuple[Path, dict[str, Any]]:
    """The values a trial's run trained with: its run folder's params.yaml (fold 0's with folds), as the trainer
    resolved them (image_size 0 as the model's size). A missing or damaged file is a RunFileError naming it."""
    from tongue_nb import runfiles

    run = Path(folder) / trial.user_attrs.get("run_dir", f"trials/trial-{trial.number}")
    file = run / "params.yaml"
    return file, runfiles.read_yaml(file, "the trial's run parameters (params.yaml written by tongue_nb)",
                                    keys=("backbone", "seed", "split_seed"))


def best_values(used: dict[str, Any]) -> dict[str, Any]:
    """best.yaml's values from a trial's params.yaml: every training value (a default-equal one too, so that files
    layered under best.yaml, such as a sweep's params/<backbone>.yaml, change none), less NOT_IN_RECIPE and the
    seed; split_seed as the split the trial trained on."""
    values = {k: v for k, v in used.items() if k not in NOT_IN_RECIPE and k not in SEED_KEYS}
    values["split_seed"] = used["split_seed"] if used["split_seed"] >= 0 else used["seed"]
    return values


def write_best(path: Path, best: Any, folder: Path, study: str, folds: int = 0) -> Path:
    """best.yaml: the best trial's own values (`trial_params`, `best_values`), ready for `sweep -f` and `train -f`.

    Raises RunFileError when the trial's params.yaml cannot be read, ParamError when its values are not a recipe.
    """
    from tongue_nb.runio import atomic_write_text

    file, used = trial_params(folder, best)
    values = best_values(used)
    try:
        load_params(files=(), **values)  # the file is a valid recipe (the tune's own checks)
    except ParamError as exc:
        raise ParamError(f"{file}: not a recipe for best.yaml ({exc})") from None
    cv = f"; tuned with {folds}-fold cross-validation (sweep --folds {folds})" if folds else ""
    seed = used["seed"]
    head = (f"# tongue-nb tune, study {study}: trial {best.number}, validation combined score {best.value:.4f}{cv}\n"
            f"# tuned: {', '.join(sorted(best.params))}\n"
            f"# Every training value of the trial ({file.relative_to(folder) if file.is_relative_to(folder) else file})"
            " is pinned, so files layered under this\n# one (a sweep's params/<backbone>.yaml) change none. Left out: "
            "the data, output and run control\n# (data_dir, out_dir, folds, tracking, ...) and seed, which a sweep's "
            f"--seeds replaces: the trial's seed was {seed}\n# (sweep --seeds {seed} or train --set seed={seed} "
            "repeats the trial). split_seed is the trial's split.\n")
    return atomic_write_text(path, head + yaml.safe_dump(values, sort_keys=False))


def trials_table(study: Any) -> pd.DataFrame:
    """One row per trial: number, state, origin (the recipe as given, or the search), the tuned values, score
    (pruned: the run's own), seconds, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else float("nan")
        score = t.value if t.value is not None else t.user_attrs.get("val_score", float("nan"))
        rows.append({"number": t.number, "state": t.state.name.lower(),
                     "origin": "recipe" if t.user_attrs.get("recipe") else "search", **t.params, "score": score,
                     "seconds": seconds, "retry_of": t.system_attrs.get("failed_trial"),
                     "run_dir": t.user_attrs.get("run_dir", "")})
    return pd.DataFrame(rows)


def history_figure(study: Any) -> Figure:
    """Each finished trial's validation score by trial number, and the best so far."""
    table = trials_table(study)
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    for state, style in (("complete", "o"), ("pruned", "x")):
        rows = table[table["state"] == state] if len(table) else table
        if len(rows):
            ax.plot(rows["number"], rows["score"], style, label=state)
    done = table[table["state"] == "complete"].sort_values("number") if len(table) else table
    if len(done):
        ax.step(done["number"], done["score"].cummax(), where="post", color="0.3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation combined score")
    ax.set_title("optimisation history")
    if ax.get_legend_handles_labels()[0]:  # failed or running trials only: nothing to label
        ax.legend(loc="lower right")
    return fig


def importances(study: Any) -> tuple[dict[str, float], str]:
    """Parameter importances (optuna.importance) and a note; empty with the reason when there are too few trials."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s): importances need at least 2"
    try:
        return dict(optuna.importance.get_param_importances(study)), \
            f"Optuna's default evaluator over {len(complete)} complete trials (few trials: a rough guide)"
    except (RuntimeError, ValueError) as exc:
        return {}, f"no importances: {exc}"


def importance_figure(values: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.5 + 0.4 * max(1, len(values))), layout="constrained")
    ax = fig.subplots()
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel("importance")
    return fig


def _img(fig: Figure) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(figure_png(fig)).decode()}">'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else html.escape(str(value))


def write_report(study: Any, folder: Path, best_yaml: Path | None = None) -> Path:
    """<tune>/report.html: best trial, trials table with links to their run folders, history, importances."""
    from tongue_nb.runio import atomic_write_text

    table = trials_table(study)
    title = f"tune {study.study_name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    done = table[table["state"] == "complete"] if len(table) else table
    if len(done):
        best = done.loc[done["score"].idxmax()]
        parts.append(f"<p>Best: trial {int(best['number'])}, validation combined score {best['score']:.4f} "
                     f"(<a href='{html.escape(str(best['run_dir']))}'>run folder</a>)"
                     + (f"; recipe <a href='{best_yaml.name}'>{best_yaml.name}</a> (tongue-nb sweep -f)"
                        if best_yaml else "") + ". Scores are validation scores; test is never used.</p>")
    else:
        parts.append("<p class='fail'>No complete trial yet.</p>")
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    parts.append(f"<h2>Trials ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'})</h2><table><tr>")
    columns = [c for c in table.columns if c != "run_dir"]
    parts.append("".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th>run folder</th></tr>")
    for _, row in table.iterrows():
        link = f"<a href='{html.escape(row['run_dir'])}'>{html.escape(row['run_dir'])}</a>" if row["run_dir"] else ""
        parts.append("<tr>" + "".join(f"<td>{_cell(row[c])}</td>" for c in columns) + f"<td>{link}</td></tr>")
    parts += ["</table>", "<h2>Optimisation history</h2>", _img(history_figure(study))]
    values, note = importances(study)
    parts += ["<h2>Parameter importances</h2>", f"<p class='muted'>{html.escape(note)}</p>"]
    if values:
        parts.append(_img(importance_figure(values)))
    parts.append("</body></html>")
    return atomic_write_text(folder / "report.html", "\n".join(parts))


__all__ = ["write_best", "trial_params", "best_values", "NOT_IN_RECIPE", "write_report", "trials_table", "history_figure", "importances", "importance_figure"]
