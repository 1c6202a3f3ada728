"""Tests of the data review functions and of notebooks/01_data_review.ipynb run end to end."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tongue_nb import load_labels
from tongue_nb.analysis import review
from tongue_nb.data.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 synthetic images, plus hand-made problems: a duplicate, a conflicting row, a missing file."""
    root = make_synthetic(tmp_path_factory.mktemp("rev") / "d", n=40, size=64, seed=5, missing=0.1)
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    shutil.copy(root / table.loc[0, "image"], root / "images/copy_of_0.jpg")
    extra = [dict(table.loc[0], image="images/copy_of_0.jpg", group="pX"),                       # duplicate
             dict(table.loc[1], image="images/gone.jpg", mask=""),                                 # missing file
             dict(table.loc[2], image="images/copy_of_2.jpg", coat="greasy;rotten")]               # conflict
    shutil.copy(root / table.loc[2, "image"], root / "images/copy_of_2.jpg")
    pd.concat([table, pd.DataFrame(extra)]).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def labels(data):
    return review.load_dataset(data)


def test_class_counts_match_the_csv(labels, data):
    counts = review.class_counts(labels).set_index(["task", "label"])
    table = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    coat = table["coat"][~table["coat"].str.contains(";") & (table["coat"] != "")]
    for cls, n in coat.value_counts().items():
        assert counts.loc[("coat", cls), "count"] == n
    assert counts.loc[("coat", "greasy"), "labelled"] == len(coat)
    spots = table["shape"].str.split(";").apply(lambda parts: "spots" in parts)
    assert counts.loc[("shape", "spots"), "count"] == spots.sum()


def test_missing_summary_patterns_and_matrix(labels):
    summary = review.missing_summary(labels).set_index("task")
    # 10% of 40 synthetic cells per task are empty; the conflicting coat cell is reported as missing too.
    assert summary.loc["shape", "missing"] == 4 and summary.loc["coat", "missing"] == 5
    patterns = review.missing_patterns(labels)
    assert patterns["samples"].sum() == len(labels)
    assert patterns.set_index("missing tasks").loc["(none)", "samples"] == len(labels) - (
        (labels.targets["coat"] < 0) | np.isnan(labels.targets["shape"]).any(1)).sum()
    fig = review.plot_missing_matrix(labels)
    assert isinstance(fig, Figure) and fig.axes[0].images[0].get_array().shape == (len(labels), 2)


def test_class_imbalance_ratio(labels):
    imb = review.class_imbalance(labels).set_index("task")
    coat = np.bincount(labels.targets["coat"][labels.targets["coat"] >= 0], minlength=3)
    assert imb.loc["coat", "ratio"] == pytest.approx(coat.max() / coat.min())
    assert imb.loc["coat", "majority"] == "greasy"


def test_problems_table_lists_conflict_and_missing_file(labels):
    problems = review.problems_table(labels)
    assert list(problems.columns) == ["row", "image", "column", "problem"]
    assert set(problems["image"]) == {"images/gone.jpg", "images/copy_of_2.jpg"}
    assert problems.set_index("image").loc["images/copy_of_2.jpg", "column"] == "coat"
    assert review.problems_table(load_labels(labels.root, on_problem="drop")).shape[0] == 2


def test_duplicates_by_content(labels):
    dups = review.duplicates(labels)
    assert len(dups) == 2 and set(dups["n"]) == {2}
    first = dups[dups["images"].str.contains("copy_of_0")].iloc[0]
    assert bool(first["labels_agree"]) and not bool(first["same_group"])
    second = dups[dups["images"].str.contains("copy_of_2")].iloc[0]
    assert not bool(second["labels_agree"])  # the conflicting copy lost its coat label


def test_image_sizes_from_headers(labels, data, tmp_path):
    sizes = review.image_sizes(labels)
    ok = sizes[sizes["error"] == ""]
    assert len(sizes) == len(labels) and (ok[["width", "height"]] == 64).all().all()
    assert sizes.loc[sizes["image"] == "images/gone.jpg", "error"].str.contains("FileNotFound").all()
    assert ok["mask_matches"].all()
    summary = review.image_size_summary(sizes)
    assert summary["images"].sum() == len(ok)
    assert isinstance(review.plot_image_sizes(sizes), Figure)
    # EXIF orientation 6 (rotated 90 degrees) swaps the reported width and height.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif)
    assert review._header_size(tmp_path / "rot.jpg")[:2] == (20, 40)


def test_samples_of_and_grids(labels):
    spots = review.samples_of(labels, "shape", "spots")
    none = review.samples_of(labels, "shape", "none")
    assert (labels.targets["shape"][spots, 0] == 1).all()
    assert (np.nansum(labels.targets["shape"][none], 1) == 0).all() and not set(spots) & set(none)
    with pytest.raises(KeyError, match="no class 'purple'"):
        review.samples_of(labels, "coat", "purple")
    fig = review.sample_grid(labels, "shape", per_class=3, thumb=48)
    assert len(fig.axes) == 4 * 3  # spots, cracks, teethmarks, none
    assert any(ax.collections for ax in fig.axes)  # mask contours drawn
    page = review.class_page(labels, "coat", "greasy", page=0, per_page=4, cols=4, thumb=32)
    assert sum(bool(ax.images) for ax in page.axes) == min(4, len(review.samples_of(labels, "coat", "greasy")))
    with pytest.raises(ValueError, match="page must be in"):
        review.class_page(labels, "coat", "greasy", page=99)


def test_browser_pages_and_switches_task(labels, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    widget = review.browser(labels, task="coat", per_page=4, thumb=32)
    assert isinstance(shown[0], Figure)  # the static first page
    task_box, label_box, prev_btn, next_btn, info = widget.children[0].children
    n = len(review.samples_of(labels, "coat", label_box.value))
    assert info.value == f"page 1 / {-(-n // 4)}"
    image = widget.children[1]
    first = bytes(image.value)
    assert first[:4] == b"\x89PNG"
    next_btn.click()
    assert info.value.startswith("page 2 /") and bytes(image.value)[:4] == b"\x89PNG" and bytes(image.value) != first
    prev_btn.click()
    prev_btn.click()  # wraps around to the last page
    assert info.value == f"page {-(-n // 4)} / {-(-n // 4)}"
    task_box.value = "shape"
    assert list(label_box.options) == ["spots", "cracks", "teethmarks", "none"] and info.value.startswith("page 1 /")


def test_split_statistics(labels):
    stats = review.split_statistics(labels, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert set(stats["split"]) >= {"train", "val", "test"}
    coat = stats[(stats["task"] == "coat") & (stats["label"] == "greasy")].set_index("split")["count"]
    assert coat[["train", "val", "test"]].sum() == review.class_counts(labels).set_index(
        ["task", "label"]).loc[("coat", "greasy"), "count"]


def test_notebook_runs_end_to_end(tmp_path):
    """papermill runs the notebook on a tiny synthetic set; the output shows figures and no error."""
    import papermill as pm
    data = make_synthetic(tmp_path / "d", n=40, size=64, seed=1)
    out = tmp_path / "01_data_review.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks/01_data_review.ipynb"), str(out), kernel_name="python3",
                        parameters={"data_dir": str(data), "samples_per_class": 3, "thumb_size": 48},
                        cwd=str(ROOT), progress_bar=False)
    import nbformat

    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs >= 6  # class counts, missing matrix, image sizes, a sample grid per task (2), browser page
    assert any("text/html" in o.get("data", {}) for o in outputs)  # tables


def test_stored_notebook_has_no_outputs_and_a_parameters_cell():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks/01_data_review.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for line in params[0].source.splitlines():
        assert ": " in line.split("=")[0] and "  # " in line, line  # typed and commented
    # papermill must understand every line (it skips lines with a second '='), so --help-notebook documents them.
    import papermill as pm

    found = pm.inspect_notebook(str(ROOT / "notebooks/01_data_review.ipynb"))
    assert set(found) == {line.split(":")[0] for line in params[0].source.splitlines()}
    assert all(p["help"] and p["inferred_type_name"] != "None" for p in found.values())


@pytest.mark.parametrize("call, message", [
    (lambda labels: review.sample_grid(labels, labels.schema.names[0], per_class=-1), "per_class: got -1"),
    (lambda labels: review.sample_grid(labels, labels.schema.names[0], thumb=0), "thumb: got 0"),
    (lambda labels: review.class_page(labels, labels.schema.names[0], "x", per_page=0), "per_page: got 0"),
    (lambda labels: review.split_statistics(labels, seed=-1), r"seed \(of the split\): got -1, expected an integer >= 0"),
])
def test_review_functions_name_a_bad_option(labels, call, message):
    with pytest.raises(ValueError, match=message):
        call(labels)
