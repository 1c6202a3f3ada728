"""Predictions shown to a person (notebook 06): a gallery of photos with their answers, class-activation maps,
and an upload box that scores dropped photos. The predictions themselves come from pipeline/predict.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from tongue_nb.data.images import read_image, read_mask
from tongue_nb.data.tasks import TaskSchema
from tongue_nb.fonts import use_cjk_fonts
from tongue_nb.pipeline.predict import Predictor, Selection, apply, predict_table

use_cjk_fonts()


def _summary_lines(schema: TaskSchema, rec: dict[str, Any]) -> list[str]:
    """'task: answer (p)' per task for one output row (a dict)."""
    lines = []
    for t in schema:
        if t.kind == "multiclass":
            answer = rec.get(f"pred:{t.name}", "")
            lines.append(f"{t.name}: {answer} ({float(rec[f'p:{t.name}:{answer}']):.2f})" if answer else f"{t.name}: -")
        else:
            said = [label for label in t.labels if str(rec.get(f"pred:{t.name}:{label}", "")) in ("1", "1.0")]
            lines.append(f"{t.name}: {', '.join(said) or 'none'}")
    return lines


def photo_gallery(pred: "Predictor | Selection", photos: pd.DataFrame, table: pd.DataFrame, segmenter: Any = None,
                  k: int = 12, columns: int = 4) -> Any:
    """The first k photos with their mask outlined (given or predicted) and each task's answer."""
    from tongue_nb.analysis.plots import image_grid

    rows = list(zip(photos.head(k).itertuples(index=False), table.head(k).to_dict("records")))
    fig, axes = image_grid(len(rows), columns, cell=(3.0, 3.6))
    if not rows:
        axes[0].text(0.5, 0.5, "no photos", ha="center")
    for ax, (photo, rec) in zip(axes, rows):
        if rec["error"]:
            ax.text(0.5, 0.5, f"{rec['id']}\n{rec['error']}", ha="center", va="center", fontsize=7, wrap=True)
            continue
        img = read_image(photo.image)
        ax.imshow(img)
        mask = None
        if photo.mask:
            mask = read_mask(photo.mask, img.shape[:2])
        elif segmenter is not None:
            mask = segmenter.predict([img])[0]
        if mask is not None:
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{rec['id']} (mask: {rec['mask_source']})\n" + "\n".join(_summary_lines(pred.schema, rec)), fontsize=7)
    return fig


def explain_grid(pred: "Predictor | Selection", photos: pd.DataFrame, segmenter: Any = None, k: int = 4) -> Any:
    """Class-activation overlays of each task's answer for the first k photos (a row per photo), or None when
    the models cannot be explained (`Predictor.can_explain`: one network run alone) or k is 0."""
    import tempfile

    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    if not isinstance(pred, Predictor) or not pred.can_explain or k <= 0:
        return None
    names = pred.schema.names
    with tempfile.TemporaryDirectory() as tmp:
        predict_table(pred, photos.head(k), segmenter=segmenter, explain_dir=tmp)
        pngs = sorted(Path(tmp).glob("*.png"))
        rows = max(1, -(-len(pngs) // len(names)))
        fig = Figure(figsize=(2.2 * len(names), 2.4 * rows), layout="constrained")
        axes = fig.subplots(rows, len(names), squeeze=False).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, png in zip(axes, pngs):
            ax.imshow(mpimg.imread(png))
            ax.set_title(png.stem.split("-", 1)[1], fontsize=7)
    return fig


def upload_box(pred: "Predictor | Selection", segmenter: Any = None) -> Any:
    """An ipywidgets box: drop tongue photos in, see each with its mask and answers (None without ipywidgets)."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    import tempfile

    from tongue_nb.analysis.plots import figure_png

    upload = widgets.FileUpload(accept="image/*", multiple=True, description="tongue photos")
    image = widgets.Image(format="png")
    status = widgets.Label("drop or pick photos: each is scored with the run's preprocessing")

    def show(*_: object) -> None:
        files = list(upload.value)
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, f in enumerate(files):
                path = Path(tmp) / f"{i:03d}-{Path(f['name']).name}"
                path.write_bytes(bytes(f["content"]))
                paths.append(path)
            photos = pd.DataFrame({"id": [Path(f["name"]).name for f in files], "image": [str(p) for p in paths],
                                   "mask": ""})
            table = apply(pred, photos, segmenter=segmenter)
            image.value = figure_png(photo_gallery(pred, photos, table, segmenter, k=len(files)))
        failed = int((table["error"] != "").sum())
        status.value = f"{len(table) - failed} of {len(table)} photos scored" + (f"; {failed} failed" if failed else "")

    upload.observe(show, "value")
    return widgets.VBox([upload, status, image])

