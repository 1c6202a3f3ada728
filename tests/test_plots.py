"""Run-level tables and figures: confusion matrices match scikit-learn, missing labels are left out."""
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from tongue_nb.analysis import plots
from tongue_nb.analysis.plots import confusion_matrices, plot_confusion_matrices, plot_history
from tongue_nb.data.tasks import default_schema


def _predictions(n=40, seed=0):
    rng = np.random.default_rng(seed)
    classes = ["greasy", "rotten", "nospecialgreasy"]
    rows = {"id": [f"i{k}" for k in range(n)], "split": ["test"] * (n - 5) + ["val"] * 5,
            "true:coat": [classes[k] if rng.random() > 0.2 else "" for k in rng.integers(0, 3, n)],
            "pred:coat": [classes[k] for k in rng.integers(0, 3, n)]}
    for lab in ("spots", "cracks", "teethmarks"):
        truth = rng.integers(0, 2, n).astype(object)
        truth[rng.random(n) < 0.2] = ""
        rows[f"true:shape:{lab}"] = truth
        rows[f"pred:shape:{lab}"] = rng.integers(0, 2, n)
        rows[f"pred_t:shape:{lab}"] = rng.integers(0, 2, n)
    return pd.DataFrame(rows)


def test_confusion_matrices_match_sklearn_and_skip_missing():
    preds = _predictions()
    mats = confusion_matrices(preds, default_schema(), "test", thresholded=True)
    test = preds[preds["split"] == "test"]
    keep = test["true:coat"] != ""
    labels = ["greasy", "rotten", "nospecialgreasy"]
    expected = confusion_matrix(test.loc[keep, "true:coat"], test.loc[keep, "pred:coat"], labels=labels)
    assert (mats["coat"].to_numpy() == expected).all()
    keep = test["true:shape:cracks"] != ""
    expected = confusion_matrix(test.loc[keep, "true:shape:cracks"].astype(int),
                                test.loc[keep, "pred_t:shape:cracks"], labels=[0, 1])
    assert (mats["shape:cracks"].to_numpy() == expected).all()
    assert len(plot_confusion_matrices(preds, default_schema()).axes) == 4


def test_history_figure_has_four_panels():
    hist = pd.DataFrame({"epoch": [1, 2, 3], "stage": [1, 2, 2], "train_loss": [1.0, 0.8, 0.7],
                         "val_loss": [1.1, 0.9, 0.8], "train_loss_shape": [0.5, 0.4, 0.3],
                         "train_loss_coat": [0.5, 0.4, 0.4], "val_shape_primary": [0.2, 0.4, 0.5],
                         "val_coat_primary": [0.3, 0.5, 0.4], "val_combined": [0.25, 0.45, 0.45],
                         "lr_head_decay": [1e-3, 1e-4, 5e-5], "lr_backbone_decay": [np.nan, 1e-5, 5e-6],
                         "best": [1, 1, 0]})
    fig = plot_history(hist, default_schema())
    assert len(fig.axes) == 4 and len(fig.axes[2].lines) >= 3


def test_details_table_is_a_classification_report_with_integer_support():
    from tongue_nb.analysis import metrics
    from tongue_nb.analysis.plots import details_table

    rng = np.random.default_rng(1)
    schema = default_schema()
    n = 60
    y = rng.integers(0, 3, n)
    ys = rng.integers(0, 2, (n, 3)).astype(np.float32)
    probs = {"coat": rng.dirichlet(np.ones(3), n), "shape": rng.random((n, 3))}
    m = metrics.compute_metrics(schema, probs, {"coat": y, "shape": ys})
    table = details_table({"final_metrics_thresholded": m})
    coat = table[table["task"] == "coat"]
    assert len(coat) == 3 and coat[["precision", "recall", "f1", "auroc", "ap"]].notna().all().all()
    assert str(table["support"].dtype) == "Int64" and int(coat["support"].sum()) == n


def test_overview_tables_round_numbers_and_list_only_changed_parameters():
    from tongue_nb.train.params import TrainParams
    from tongue_nb.analysis.plots import params_table, run_overview

    table = params_table(TrainParams(backbone="resnet18", batch_size=8, stage2_lr_head=3e-4))
    assert set(table.index) == {"backbone", "data_dir", "out_dir", "batch_size", "stage2_lr_head"}
    assert table.loc["stage2_lr_head", "value"] == "0.0003" and table.loc["batch_size", "default"] == 32
    overview = run_overview({"run_dir": "runs/x", "best_epoch": 3, "best_stage": 2, "best_val_combined": 0.123456789,
                             "timings": {"train_seconds": 90.0}, "pretrained": {"kind": "package", "detail": "pkg"}})
    assert overview.loc["best val combined score", "value"] == "0.1235"
    assert overview.loc["training time (min)", "value"] == "1.5" and overview.loc["initial weights", "value"] == "package pkg"


def test_an_empty_table_shows_as_a_note_not_a_quoted_string():
    note = plots.show(pd.DataFrame())
    assert note == "none found" and repr(note) == "none found"  # a str's repr would add quotes on the page
    assert note._repr_html_() == "<p><em>none found</em></p>"
    assert plots.show(None, empty="<no runs>")._repr_html_() == "<p><em>&lt;no runs&gt;</em></p>"


def test_names_from_the_users_files_show_as_text_not_as_html():
    """A label, task or image path from labels.csv / tasks.yaml reaches the report pages through these tables: it
    must show as text there, not run as HTML (a label '<img src=x onerror=...>' did)."""
    import json
    import re
    from pathlib import Path

    hostile = "<img src=x onerror=alert(1)>"
    table = pd.DataFrame({hostile: [hostile, "ok"], "n": [1.0, 2.5]}, index=[hostile, "<b>task</b>"])
    page = plots.show(table).to_html()
    assert "<img" not in page and "<b>task" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") == 3 and "&lt;b&gt;task&lt;/b&gt;" in page
    assert "2.500" in page  # numbers keep their format
    # The final report's Markdown verdicts carry task, backbone and folder names: each is escaped.
    notebook = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "05_report.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    calls = re.findall(r"Markdown\(f\"([^\"]*)\"", code)
    assert len(calls) == 3 and "+ escape(index_page.sweep_provenance(sweep))" in code
    for call in calls:
        for expr in re.findall(r"\{([^{}]+)\}", call):
            assert expr.startswith(("escape(", "len(")) or "'" in expr, expr
