"""Error analysis of one run: the errors per sample and task, the worst ones, error rates by split or
group, and their galleries (images, class-activation maps, an interactive browser).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tongue_nb.analysis.plots import figure_png, image_grid
from tongue_nb.analysis.runs import PREDICTIONS_EXPECTED, RunData, check_count, split_rows
from tongue_nb.data.files import relative_path
from tongue_nb.data.tasks import Task
from tongue_nb.runfiles import RunFileError

log = logging.getLogger(__name__)


def sample_errors(run: RunData, thresholded: bool = True) -> pd.DataFrame:
    """One row per (sample, task) with a label: true, predicted, the probability given to the truth, wrong or not."""
    rows = []
    preds = run.predictions
    for t in run.schema:
        if t.kind == "multiclass":
            true = preds[f"true:{t.name}"]
            keep = (true != "").to_numpy()
            p = preds[[f"p:{t.name}:{c}" for c in t.labels]].to_numpy(float)
            idx = np.array([t.labels.index(v) if v in t.labels else 0 for v in true])
            p_true = p[np.arange(len(preds)), idx]
            part = pd.DataFrame({"task": t.name, "true": true, "pred": preds[f"pred:{t.name}"], "p_true": p_true})
        else:
            kind = "pred_t" if thresholded and f"pred_t:{t.name}:{t.labels[0]}" in preds else "pred"
            y = preds[[f"true:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            yhat = preds[[f"{kind}:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            p = preds[[f"p:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            keep = np.isfinite(y).any(axis=1)
            y0 = np.nan_to_num(y)
            # The probability given to the truth, label by label; the sample's score is its worst label.
            p_true = np.where(np.isfinite(y), np.where(y0 == 1, p, 1 - p), 1.0).min(axis=1)
            names = np.array(t.labels)
            fmt = lambda m: [";".join(names[r == 1]) or "none" for r in m]  # noqa: E731
            wrong_rows = np.where(np.isfinite(y), y0 != yhat, False).any(axis=1)
            part = pd.DataFrame({"task": t.name, "true": fmt(y0 * np.isfinite(y)), "pred": fmt(np.nan_to_num(yhat)),
                                 "p_true": p_true, "wrong": wrong_rows})
        part.insert(0, "id", preds["id"].to_numpy())
        for col in ("split", "image", "group"):
            part[col] = preds[col].to_numpy()
        if "wrong" not in part:
            part["wrong"] = part["true"] != part["pred"]
        rows.append(part[keep])
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def worst_errors(run: RunData, k: int = 12, split: str | None = "test", task: str | None = None,
                 offset: int = 0) -> pd.DataFrame:
    """The k most confident mistakes (lowest probability given to the true label), optionally of one task."""
    k, offset = check_count("k", k), check_count("offset", offset)
    if task:
        run.schema[task]  # an unknown task is named (KeyError listing the schema's), not an empty table
    errors = sample_errors(run)
    errors = errors[errors["wrong"]]
    if split:
        errors = split_rows(errors, split)
    if task:
        errors = errors[errors["task"] == task]
    return errors.sort_values("p_true", kind="stable").iloc[offset:offset + k].reset_index(drop=True)


def errors_by(run: RunData, by: str = "split") -> pd.DataFrame:
    """Error rate per task and per split or group."""
    if by not in ("split", "group"):
        raise ValueError(f"errors_by: by must be 'split' or 'group', got {by!r}")
    errors = sample_errors(run)
    table = errors.groupby([by, "task"])["wrong"].agg(errors="sum", n="count").reset_index()
    table["error_rate"] = table["errors"] / table["n"]
    return table.sort_values([by, "task"] if by == "split" else ["error_rate", "n"], ascending=by == "split").reset_index(drop=True)


def _data_dir(run: RunData, data_dir: str | Path | None) -> Path | None:
    # The summary holds the resolved folder (the synthetic set's path when params said '').
    for value in (data_dir, run.summary.get("data_dir"), run.params.get("data_dir")):
        if value not in (None, ""):
            return Path(value)
    return None


def _mask_map(root: Path) -> dict[str, str]:
    """image -> mask path from the dataset's labels.csv, read by the checked labels reader (a damaged table, or a
    path leaving the folder, is a LabelError naming the file and line); empty when there is no labels.csv."""
    from tongue_nb.data.labels import load_image_masks

    if not (root / "labels.csv").exists():
        return {}
    return load_image_masks(root)


def _inside(run: RunData, rel: str) -> str:
    """A sample's image path as the reports open it: relative to the dataset folder and inside it (load_run refuses
    others; a RunData built elsewhere is held to the same rule), else a RunFileError naming predictions.csv."""
    _, problem = relative_path(str(rel))
    if problem:
        raise RunFileError(run.path / "predictions.csv", f"column 'image': {problem}", PREDICTIONS_EXPECTED)
    return str(rel)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def error_gallery(run: RunData, k: int = 12, data_dir: str | Path | None = None, split: str | None = "test",
                  columns: int = 4, task: str | None = None, offset: int = 0) -> Figure:
    """The worst errors as an image grid: mask outlined, true vs predicted and the probability of the truth."""
    worst = worst_errors(run, k, split, task, offset)
    root = _data_dir(run, data_dir)
    fig, axes = image_grid(len(worst), columns)
    if not len(worst):
        axes[0].text(0.5, 0.5, "no errors on this split", ha="center")
        return fig
    masks = _mask_map(root) if root else {}
    for ax, (_, err) in zip(axes, worst.iterrows()):
        title = f"{err['task']}: true {err['true']}\npred {err['pred']} (p_true {err['p_true']:.2f})"
        image_path = root / _inside(run, err["image"]) if root else None
        if image_path is None or not image_path.exists():
            ax.text(0.5, 0.5, f"{err['image']}\n(image not found: set data_dir)", ha="center", va="center", fontsize=7)
        else:
            ax.imshow(_read_rgb(image_path))
            mask = masks.get(err["image"], "")
            if mask and (root / mask).exists():
                from PIL import Image

                with Image.open(root / mask) as m:
                    # JPEG masks are not pure 0/255: threshold before drawing the outline.
                    ax.contour(np.asarray(m.convert("L")) > 127, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(title, fontsize=7)
    return fig


def _mapped_index(task: Task, pred: str, true: str) -> int:
    """Which class / label's evidence to map: the model's answer (multiclass), or for binary and
    multilabel the first label where the answer and the truth differ, else the first answered label."""
    if task.kind == "multiclass":
        return task.labels.index(pred) if pred in task.labels else 0
    said, truth = set(pred.split(";")), set(true.split(";"))
    for j, label in enumerate(task.labels):
        if (label in said) != (label in truth):
            return j
    return next((j for j, label in enumerate(task.labels) if label in said), 0)


def cam_gallery(run: RunData, task: str, k: int = 6, per_class: int = 1, data_dir: str | Path | None = None,
                split: str = "test", columns: int = 4) -> Figure:
    """Class-activation maps (Grad-CAM, tongue_nb.analysis.explain) over a task's k worst errors and `per_class`
    confident correct answers per true class, on the images as the model saw them (crop, size).

    Each panel maps the evidence for the model's own answer, so a reader sees whether it looked at
    the tongue body, the coat, or the background. A fold ensemble (cross-validation) is mapped through its first
    fold's model, as the figure's title says: an average of K maps would show no one model's evidence.
    """
    from tongue_nb.analysis.cv import fold_members, is_fold_ensemble
    from tongue_nb.data.images import read_sample
    from tongue_nb.analysis.explain import class_activation_maps, overlay
    from tongue_nb.model.backbones import load_run_model
    from tongue_nb.model.run_params import read_run_params
    from tongue_nb.model.baseline import is_baseline_run

    t = run.schema[task]
    k, per_class = check_count("k", k), check_count("per_class", per_class)
    errors = split_rows(sample_errors(run), split)
    errors = errors[errors["task"] == task]
    worst = errors[errors["wrong"]].sort_values("p_true", kind="stable").head(k)
    right = (errors[~errors["wrong"]].sort_values("p_true", ascending=False, kind="stable")
             .groupby("true", sort=True).head(per_class))
    chosen = pd.concat([worst.assign(kind="error"), right.assign(kind="correct")], ignore_index=True)
    root = _data_dir(run, data_dir)
    fig, axes = image_grid(len(chosen), columns, cell=(2.8, 3.1))
    model_dir = fold_members(run.path)[0] if is_fold_ensemble(run.path) else run.path
    weights = model_dir / "checkpoints" / "best.safetensors"
    problem = ("none found" if not len(chosen) else "images not found: set data_dir" if root is None
               else "the classical baseline has no network to map (its answers come from colour statistics)"
               if is_baseline_run(model_dir)
               else f"no model checkpoint ({weights.relative_to(model_dir)}) in this run folder" if not weights.is_file()
               else "")
    if problem:
        axes[0].text(0.5, 0.5, problem, ha="center")
        return fig
    if model_dir != run.path:
        fig.suptitle(f"maps of {model_dir.name}, one of the fold ensemble's models", fontsize=9)
    model = load_run_model(model_dir)
    masks = _mask_map(root)
    params = read_run_params(model_dir)  # checked: a bad crop_margin is named in params.yaml, not on each photo
    crop, margin = str(params.get("crop", "crop")), float(params.get("crop_margin", 0.1))
    images = np.stack([read_sample(_inside(run, r["image"]), masks.get(r["image"], ""), [(model.input_size, crop, margin)],
                                   root=root).pixels[0] for _, r in chosen.iterrows()])
    targets = [_mapped_index(t, str(r["pred"]), str(r["true"])) for _, r in chosen.iterrows()]
    cams = class_activation_maps(model, images, task, targets, model.mean, model.std)
    for ax, (_, r), img, cam, j in zip(axes, chosen.iterrows(), images, cams, targets):
        ax.imshow(overlay(img, cam))
        colour = "crimson" if r["kind"] == "error" else "darkgreen"
        ax.set_title(f"{r['kind']}: true {r['true']}\npred {r['pred']}; map: {t.labels[j]}", fontsize=7, color=colour)
    return fig


def error_browser(run: RunData, data_dir: str | Path | None = None, split: str | None = "test") -> Any:
    """An ipywidgets browser over the errors (pick a task, page through); None when ipywidgets is unavailable."""
    try:
        import ipywidgets as widgets
    except ImportError:
        log.info("ipywidgets not installed: use error_gallery for a static view")
        return None
    errors = sample_errors(run)
    errors = split_rows(errors, split) if split else errors
    errors = errors[errors["wrong"]]
    per_page = 8
    task = widgets.Dropdown(options=run.schema.names, description="task")
    page = widgets.IntSlider(min=0, max=0, description="page")
    # An Image widget whose value is replaced: display() inside an Output widget has hung
    # papermill/nbclient executions of this cell.
    image = widgets.Image(format="png")

    def show(*_: object) -> None:
        page.max = max((int((errors["task"] == task.value).sum()) - 1) // per_page, 0)
        image.value = figure_png(error_gallery(run, per_page, data_dir, split, task=task.value,
                                               offset=page.value * per_page))

    task.observe(show, "value")
    page.observe(show, "value")
    show()
    return widgets.VBox([widgets.HBox([task, page]), image])
