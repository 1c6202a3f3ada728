"""Data review: the tables and figures that notebooks/01_data_review.ipynb shows, one function per cell.

Every function takes a `Labels` (from `load_dataset` or `labels.load_labels`) and returns a pandas
DataFrame or a matplotlib Figure. Figures are built with `matplotlib.figure.Figure`, not pyplot, so
that a notebook shows each one exactly once and nothing accumulates in pyplot's global state.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image

from tongue_nb.analysis.runs import check_count
from tongue_nb.data.images import ImageError, read_image, read_mask
from tongue_nb.paths import file_sha256
from tongue_nb.analysis.plots import figure_png
from tongue_nb.data.splits import make_split, split_stats
from tongue_nb.data.labels import Labels, load_labels
from tongue_nb.data.tasks import Task, load_schema

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def load_dataset(data_dir: str | Path = "", tasks: str | Path = "", n_synthetic: int = 300,
                 image_size: int = 128, seed: int = 0) -> Labels:
    """Load a dataset for review (problems reported, not raised); an empty data_dir uses the built-in synthetic set."""
    if not str(data_dir):
        from tongue_nb.data.synth import ensure_synthetic

        data_dir = ensure_synthetic(n=n_synthetic, size=image_size, seed=seed)
    root = Path(data_dir)
    schema = load_schema(Path(tasks) if str(tasks) else root / "tasks.yaml")
    # "report": the review must show conflicts and missing files rather than stop at the first.
    return load_labels(root, schema, on_problem="report")


def _task_labels(task: Task) -> list[str]:
    """Names of the rows a task contributes to count tables (binary: the positive label and its negation)."""
    return [task.labels[0], f"not {task.labels[0]}"] if task.kind == "binary" else list(task.labels)


def _label_counts(task: Task, target: np.ndarray) -> tuple[list[int], int]:
    """Per label count and number of labelled samples for one task."""
    if task.kind == "multiclass":
        have = target >= 0
        return np.bincount(target[have], minlength=len(task.labels)).tolist(), int(have.sum())
    have = ~np.isnan(target).all(axis=1)
    pos = np.nansum(target[have], axis=0).astype(int).tolist()
    if task.kind == "binary":
        return [pos[0], int(have.sum()) - pos[0]], int(have.sum())
    return pos, int(have.sum())


def overview(labels: Labels) -> pd.DataFrame:
    """One-row-per-fact summary: samples, groups, masks, preset splits, tasks."""
    t = labels.table
    facts = {
        "dataset": str(labels.root),
        "samples": len(t),
        "groups (patients)": t["group"].nunique(),
        "with mask": int((t["mask"] != "").sum()),
        "preset split": ", ".join(f"{k}={v}" for k, v in t["split"].replace("", "none").value_counts().items()),
        "tasks": ", ".join(f"{task.name} ({task.kind}, {len(task.labels)})" for task in labels.schema),
        "problems": len(labels.problems),
    }
    return pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=pd.Index(list(facts), name="fact"))


def class_counts(labels: Labels) -> pd.DataFrame:
    """Samples per task and class (multilabel: positives per label); fraction is of the task's labelled samples."""
    rows = []
    for task in labels.schema:
        counts, labelled = _label_counts(task, labels.targets[task.name])
        for name, count in zip(_task_labels(task), counts):
            rows.append(dict(task=task.name, kind=task.kind, label=name, count=count, labelled=labelled,
                             fraction=count / labelled if labelled else float("nan")))
    return pd.DataFrame(rows, columns=["task", "kind", "label", "count", "labelled", "fraction"])


def plot_class_counts(labels: Labels) -> Figure:
    """Bar chart of class counts, one panel per task."""
    counts = class_counts(labels)
    n = len(labels.schema)
    fig = Figure(figsize=(3.2 * n, 2.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, task in zip(axes, labels.schema):
        part = counts[counts["task"] == task.name]
        ax.bar(part["label"], part["count"], color="#c0504d")
        ax.set_title(f"{task.name} ({task.kind})")
        ax.tick_params(axis="x", rotation=45)
        ax.set_ylabel("samples")
    return fig


def _labelled_matrix(labels: Labels) -> np.ndarray:
    """Boolean [N, T]: sample has a label for the task (multilabel: every label of it given)."""
    cols = []
    for task in labels.schema:
        target = labels.targets[task.name]
        cols.append(target >= 0 if task.kind == "multiclass" else ~np.isnan(target).any(axis=1))
    return np.stack(cols, axis=1) if cols else np.zeros((len(labels), 0), bool)


def missing_summary(labels: Labels) -> pd.DataFrame:
    """Per task: labelled and missing sample counts and the missing fraction."""
    have = _labelled_matrix(labels)
    n = len(labels)
    return pd.DataFrame({"task": labels.schema.names, "labelled": have.sum(0), "missing": n - have.sum(0),
                         "missing_fraction": (n - have.sum(0)) / max(n, 1)})


def missing_patterns(labels: Labels) -> pd.DataFrame:
    """How many samples share each combination of missing tasks (most common first)."""
    have = _labelled_matrix(labels)
    names = np.array(labels.schema.names)
    keys = ["(none)" if row.all() else ", ".join(names[~row]) for row in have]
    out = pd.Series(keys).value_counts().rename_axis("missing tasks").reset_index(name="samples")
    out["fraction"] = out["samples"] / max(len(labels), 1)
    return out


def plot_missing_matrix(labels: Labels, max_rows: int = 3000) -> Figure:
    """Image of samples x tasks: blue = labelled, yellow = missing (rows in table order, subsampled past max_rows)."""
    have = _labelled_matrix(labels)
    rows = np.arange(len(have))
    if len(rows) > max_rows:  # an image taller than the screen shows nothing more
        rows = np.linspace(0, len(have) - 1, max_rows).astype(int)
    fig = Figure(figsize=(1.2 + 1.1 * have.shape[1], 4.5), layout="constrained")
    ax = fig.subplots()
    cmap = ListedColormap(["#f4d03f", "#4f81bd"])  # missing: yellow, labelled: blue
    ax.imshow(have[rows].astype(float), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(have.shape[1]), [f"{n}\n{m} missing" for n, m in
                                         zip(labels.schema.names, len(have) - have.sum(0))])
    ax.set_ylabel("sample (table order)")
    ax.set_title(f"labelled (blue) vs missing (yellow), {len(have)} samples")
    return fig


def class_imbalance(labels: Labels) -> pd.DataFrame:
    """Per task: majority and minority class, their counts and majority/minority ratio (inf: a class is absent)."""
    rows = []
    counts = class_counts(labels)
    for task in labels.schema:
        part = counts[counts["task"] == task.name].reset_index(drop=True)
        major, minor = part.loc[part["count"].idxmax()], part.loc[part["count"].idxmin()]
        ratio = major["count"] / minor["count"] if minor["count"] else float("inf")
        rows.append(dict(task=task.name, kind=task.kind, labelled=int(part["labelled"].iloc[0]),
                         majority=major["label"], majority_count=int(major["count"]),
                         minority=minor["label"], minority_count=int(minor["count"]), ratio=float(ratio)))
    return pd.DataFrame(rows)


def problems_table(labels: Labels) -> pd.DataFrame:
    """Conflicting rows and image/mask files that cannot be opened, as load_labels(on_problem="report") found them."""
    cols = ["row", "image", "column", "problem"]
    if labels.problems is None or labels.problems.empty:
        return pd.DataFrame(columns=cols)
    return labels.problems[cols].reset_index(drop=True)


def split_statistics(labels: Labels, seed: int = 0, val_fraction: float = 0.15,
                     test_fraction: float = 0.15) -> pd.DataFrame:
    """Per split, task and class: sample counts and missing labels, for the split training would make."""
    split = make_split(labels.table, labels.targets, labels.schema, seed=seed, val_fraction=val_fraction,
                       test_fraction=test_fraction)
    return split_stats(labels.table, labels.targets, labels.schema, split)


def _header_size(path: Path) -> tuple[int, int, str, str]:
    """(width, height, format, mode) from the file header without decoding pixels; EXIF rotation applied."""
    with Image.open(path) as img:
        w, h = img.size
        try:
            if img.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                w, h = h, w
        except Exception:  # a broken EXIF block must not stop the review; the size is still right
            pass
        return w, h, img.format or "", img.mode


def image_sizes(labels: Labels) -> pd.DataFrame:
    """Per sample: image width/height/format/mode/bytes read from headers, mask size and whether it matches."""
    rows = []
    for rel, mrel in zip(labels.table["image"], labels.table["mask"]):
        row: dict[str, Any] = dict(image=rel, width=np.nan, height=np.nan, format="", mode="", bytes=np.nan,
                                   mask_width=np.nan, mask_height=np.nan, error="")
        path = labels.root / rel
        try:
            row["width"], row["height"], row["format"], row["mode"] = _header_size(path)
            row["bytes"] = path.stat().st_size
            if mrel:
                row["mask_width"], row["mask_height"], _, _ = _header_size(labels.root / mrel)
        except (OSError, SyntaxError, ValueError) as exc:  # unreadable file: listed, not fatal, in a review
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    out = pd.DataFrame(rows)
    out["mask_matches"] = (out["mask_width"].isna() | ((out["mask_width"] == out["width"])
                                                       & (out["mask_height"] == out["height"])))
    return out


def image_size_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Counts per (width, height, format, mode), most common first, from image_sizes()."""
    ok = sizes[sizes["error"] == ""]
    return (ok.groupby(["width", "height", "format", "mode"]).size().rename("images")
            .sort_values(ascending=False).reset_index())


def plot_image_sizes(sizes: pd.DataFrame) -> Figure:
    """Scatter of image width vs height (point area = number of images) and a histogram of file sizes."""
    ok = sizes[sizes["error"] == ""]
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    grouped = ok.groupby(["width", "height"]).size().reset_index(name="n")
    ax1.scatter(grouped["width"], grouped["height"], s=20 + 200 * grouped["n"] / max(grouped["n"].max(), 1),
                alpha=0.6, color="#4f81bd")
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title(f"image sizes ({len(grouped)} distinct)")
    ax2.hist(ok["bytes"] / 1024, bins=30, color="#9bbb59")
    ax2.set_xlabel("file size (KiB)")
    ax2.set_title("file sizes")
    return fig


def samples_of(labels: Labels, task: str, label: str) -> np.ndarray:
    """Row indices of the samples that carry `label` for `task` (multilabel/binary: positives; "none": no label set)."""
    t = labels.schema[task]
    target = labels.targets[task]
    if t.kind == "multiclass":
        if label not in t.labels:
            raise KeyError(f"task {task!r} has no class {label!r}; classes are {list(t.labels)}")
        return np.flatnonzero(target == t.labels.index(label))
    have = ~np.isnan(target).all(axis=1)
    if label in ("none", f"not {t.labels[0]}"):
        return np.flatnonzero(have & (np.nan_to_num(target, nan=0.0).sum(axis=1) == 0))
    if label not in t.labels:
        raise KeyError(f"task {task!r} has no label {label!r}; labels are {list(t.labels)} or 'none'")
    return np.flatnonzero(target[:, t.labels.index(label)] == 1)


def browse_choices(labels: Labels, task: str) -> list[str]:
    """The classes (or labels plus 'none') one can page through for a task."""
    t = labels.schema[task]
    if t.kind == "multiclass":
        return list(t.labels)
    return list(t.labels) + (["none"] if t.kind == "multilabel" else [f"not {t.labels[0]}"])


def _thumbnail(labels: Labels, row: int, thumb: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A small RGB copy of sample `row` and its mask at the same size (None when it has none)."""
    rel, mrel = labels.table["image"].iloc[row], labels.table["mask"].iloc[row]
    img = read_image(labels.root / rel)
    h, w = img.shape[:2]
    scale = thumb / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    mask = None
    if mrel:
        m = read_mask(labels.root / mrel, expected_hw=(h, w))
        mask = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) / 255.0
    return small, mask


def _draw_row(axes: Sequence, labels: Labels, rows: Sequence[int], thumb: int) -> None:
    """Fill a row of axes with thumbnails, the mask outlined in a contour."""
    for ax in axes:
        ax.set_axis_off()
    for ax, r in zip(axes, rows):
        try:
            img, mask = _thumbnail(labels, int(r), thumb)
        except (ImageError, OSError) as exc:  # a broken file shows as a note in its cell, the grid goes on
            ax.text(0.5, 0.5, f"unreadable\n{type(exc).__name__}", ha="center", va="center", fontsize=7)
            continue
        ax.imshow(img)
        if mask is not None and mask.min() < 0.5 < mask.max():
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(Path(labels.table["image"].iloc[int(r)]).name, fontsize=6)


def sample_grid(labels: Labels, task: str, per_class: int = 6, thumb: int = 96, seed: int = 0) -> Figure:
    """A row of random samples per class (multilabel: per label, plus 'none') with the tongue mask outlined."""
    per_class, thumb = check_count("per_class", per_class, 1), check_count("thumb", thumb, 16)
    choices = browse_choices(labels, task)
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.25 * per_class + 1.2, 1.35 * len(choices)), layout="constrained")
    axes = fig.subplots(len(choices), per_class, squeeze=False)
    for ax_row, label in zip(axes, choices):
        idx = samples_of(labels, task, label)
        pick = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)) if len(idx) else []
        _draw_row(ax_row, labels, pick, thumb)
        ax_row[0].text(-0.08, 0.5, f"{label}\n(n={len(idx)})", transform=ax_row[0].transAxes, ha="right",
                       va="center", fontsize=8)
    fig.suptitle(f"{task}: random samples per {'class' if labels.schema[task].kind == 'multiclass' else 'label'}")
    return fig


def class_page(labels: Labels, task: str, label: str, page: int = 0, per_page: int = 12, cols: int = 6,
               thumb: int = 96) -> Figure:
    """One page of the samples of a task's class, in table order (what the browser shows)."""
    page, per_page = check_count("page", page), check_count("per_page", per_page, 1)
    cols, thumb = check_count("cols", cols, 1), check_count("thumb", thumb, 16)
    idx = samples_of(labels, task, label)
    n_pages = max(1, -(-len(idx) // per_page))
    if not 0 <= page < n_pages:
        raise ValueError(f"page must be in 0..{n_pages - 1} for {task}={label} ({len(idx)} samples), got {page}")
    shown = idx[page * per_page:(page + 1) * per_page]
    n_rows = max(1, -(-per_page // cols))
    fig = Figure(figsize=(1.3 * cols, 1.4 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for r in range(n_rows):
        _draw_row(axes[r], labels, shown[r * cols:(r + 1) * cols], thumb)
    fig.suptitle(f"{task} = {label}: page {page + 1}/{n_pages} ({len(idx)} samples)")
    return fig


def duplicates(labels: Labels) -> pd.DataFrame:
    """Groups of byte-identical image files (SHA-256), with whether their labels and patient groups agree."""
    hashes: dict[str, list[int]] = {}
    for i, rel in enumerate(labels.table["image"]):
        try:
            hashes.setdefault(file_sha256(labels.root / rel), []).append(i)
        except OSError:
            continue  # missing files are in problems_table already
    rows = []
    for digest, idx in hashes.items():
        if len(idx) < 2:
            continue
        agree = all(_same_rows(labels.targets[t], idx) for t in labels.schema.names)
        rows.append(dict(hash=digest[:16], n=len(idx), images=", ".join(labels.table["image"].iloc[idx]),
                         rows=", ".join(str(r) for r in labels.table["row"].iloc[idx]),
                         labels_agree=agree, same_group=labels.table["group"].iloc[idx].nunique() == 1))
    return pd.DataFrame(rows, columns=["hash", "n", "images", "rows", "labels_agree", "same_group"])


def _same_rows(target: np.ndarray, idx: list[int]) -> bool:
    sub = target[idx]
    return bool(np.array_equal(sub, np.broadcast_to(sub[:1], sub.shape), equal_nan=sub.dtype.kind == "f"))


def browser(labels: Labels, task: str | None = None, per_page: int = 12, cols: int = 6, thumb: int = 96,
            static: bool = True):
    """An ipywidgets image browser (task/class dropdowns, prev/next pages); also displays a static first page.

    The static page is what an exported HTML report shows: widget state is not saved by
    papermill/nbconvert, so the widget alone would render as text there.
    """
    import ipywidgets as widgets
    from IPython.display import display

    per_page, cols = check_count("per_page", per_page, 1), check_count("cols", cols, 1)
    thumb = check_count("thumb", thumb, 16)
    task = task or labels.schema.names[0]
    first_label = browse_choices(labels, task)[0]
    if static:
        display(class_page(labels, task, first_label, 0, per_page, cols, thumb))

    task_box = widgets.Dropdown(options=labels.schema.names, value=task, description="task")
    label_box = widgets.Dropdown(options=browse_choices(labels, task), value=first_label, description="class")
    prev_btn, next_btn = widgets.Button(description="< prev"), widgets.Button(description="next >")
    info = widgets.Label()
    # An Image widget whose value is replaced: display() inside an Output widget has hung
    # papermill/nbclient executions of this cell.
    image = widgets.Image(format="png")
    state = {"page": 0}

    def n_pages() -> int:
        return max(1, -(-len(samples_of(labels, task_box.value, label_box.value)) // per_page))

    def redraw(*_: Any) -> None:
        state["page"] = min(state["page"], n_pages() - 1)
        info.value = f"page {state['page'] + 1} / {n_pages()}"
        image.value = figure_png(class_page(labels, task_box.value, label_box.value, state["page"], per_page, cols, thumb))

    def on_task(change: dict) -> None:
        label_box.options = browse_choices(labels, change["new"])  # also resets the value -> redraw
        state["page"] = 0
        redraw()

    def on_label(_: dict) -> None:
        state["page"] = 0
        redraw()

    def step(delta: int) -> None:
        state["page"] = (state["page"] + delta) % n_pages()
        redraw()

    task_box.observe(on_task, names="value")
    label_box.observe(on_label, names="value")
    prev_btn.on_click(lambda _: step(-1))
    next_btn.on_click(lambda _: step(+1))
    redraw()
    return widgets.VBox([widgets.HBox([task_box, label_box, prev_btn, next_btn, info]), image])
