"""Report helpers on small hand-made run folders in the docs/internals.md format, and notebooks 04/05 through papermill."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tongue_nb.runfiles import RunFileError
from tongue_nb.analysis.combine import ensemble_metrics, ranked_on_val
from tongue_nb.analysis.selection import per_task_selection, save_selection
from tongue_nb.analysis.errors import cam_gallery, error_browser, error_gallery, errors_by, sample_errors, worst_errors
from tongue_nb.analysis.figures import (calibration_table, confusion_matrices, confusion_panels, history_columns,
                                        reliability_diagram, roc_pr_curves, task_bars, threshold_curves,
                                        training_curves)
from tongue_nb.analysis.index_page import index_rows, sweep_provenance, write_index
from tongue_nb.analysis.runs import arrays, load_run, load_sweep
from tongue_nb.analysis.stats import bootstrap_table, format_p, verdict
from tongue_nb.analysis.tables import (chance_rows, constant_flags, failures_table, per_label_table, ranking_table,
                                       run_row, run_table)
from tongue_nb.data.synth import make_synthetic
from tongue_nb.data.tasks import default_schema

SCHEMA = default_schema()
SHAPE = SCHEMA["shape"].labels
COAT = SCHEMA["coat"].labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data") / "syn", n=24, size=32, seed=1)


def write_run(run_dir: Path, data_dir: Path, seed: int, skill: float, backbone: str = "test_convnext") -> Path:
    """A run folder as the trainer writes it; `skill` mixes the truth into the probabilities."""
    rng = np.random.default_rng(seed)
    labels = pd.read_csv(data_dir / "labels.csv", dtype=str, keep_default_na=False)
    rows = labels.iloc[:20].reset_index(drop=True)
    split = np.array(["val"] * 10 + ["test"] * 10)
    table = pd.DataFrame({"id": rows["image"], "split": split, "image": rows["image"], "group": rows["group"]})
    for label in SHAPE:
        true = np.array([float(label in s.split(";")) for s in rows["shape"]])
        true[3] = np.nan  # one missing label
        p = np.clip(skill * np.nan_to_num(true) + (1 - skill) * rng.random(20), 0, 1)
        table[f"p:shape:{label}"] = p
        table[f"true:shape:{label}"] = pd.Series(true).map(lambda v: "" if np.isnan(v) else str(int(v)))
        table[f"pred:shape:{label}"] = (p >= 0.5).astype(int)
        table[f"pred_t:shape:{label}"] = (p >= 0.4).astype(int)
    onehot = np.array([[float(c == v) for c in COAT] for v in rows["coat"]])
    p = skill * onehot + (1 - skill) * rng.dirichlet(np.ones(3), 20)
    p /= p.sum(1, keepdims=True)
    for i, c in enumerate(COAT):
        table[f"p:coat:{c}"] = p[:, i]
    true = rows["coat"].copy()
    true[5] = ""
    table["true:coat"] = true
    table["pred:coat"] = [COAT[i] for i in p.argmax(1)]
    run_dir.mkdir(parents=True)
    table.to_csv(run_dir / "predictions.csv", index=False)
    SCHEMA.to_yaml(run_dir / "tasks.yaml")
    (run_dir / "params.yaml").write_text(yaml.safe_dump({"backbone": backbone, "data_dir": str(data_dir)}))
    pd.DataFrame({"epoch": [1, 2, 3], "stage": [1, 2, 2], "train_loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.8],
                  "val_combined_score": [0.3, 0.4 * skill + 0.2, 0.5 * skill + 0.2],
                  "val_shape_macro_f1": [0.3, 0.4, 0.5], "val_coat_macro_f1": [0.2, 0.3, 0.4]}).to_csv(run_dir / "history.csv", index=False)

    def block(c: float) -> dict:
        return {"combined_score": c, "tasks": {
            "shape": {"kind": "multilabel", "primary": c + 0.05, "n": 9, "macro_f1": c + 0.05,
                      "per_label": {lab: {"f1": c, "precision": c, "recall": c, "auroc": None, "support": 3} for lab in SHAPE}},
            "coat": {"kind": "multiclass", "primary": c - 0.05, "n": 9, "macro_f1": c - 0.05, "accuracy": c,
                     "balanced_accuracy": c, "per_class_f1": {k: c for k in COAT}, "confusion_matrix": [[1, 0, 0]] * 3}}}

    summary = {"experiment_name": f"run-{backbone}", "backbone": backbone, "params_m": 1.5, "best_epoch": 3,
               "final_metrics_fixed": block(0.4 * skill + 0.2), "final_metrics_thresholded": dict(block(0.5 * skill + 0.2), thresholds={"shape": [0.4, 0.4, 0.4]}),
               "timings": {"train_seconds": 12.5}, "train_samples_per_s": 33.0, "peak_memory_mb": 400}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_run(root / "runs" / "good", data_dir, 0, 0.9, "good")
    write_run(root / "runs" / "weak", data_dir, 1, 0.3, "weak")
    (root / "runs" / "broken").mkdir()  # a failed run: no summary
    (root / "failures.json").write_text(json.dumps([{"backbone": "broken", "stage": "train", "error_type": "ValueError",
                                                     "message": "unknown backbone 'broken'", "cell_index": 3, "cell_source": "model = ..."}]))
    return root


def test_load_run_reads_contract_files(sweep_dir):
    run = load_run(sweep_dir / "runs" / "good")
    assert run.schema == SCHEMA and run.params["backbone"] == "good" and len(run.history) == 3
    probs, targets, rows = arrays(run, "test")
    assert probs["shape"].shape == (10, 3) and probs["coat"].shape == (10, 3) and len(rows) == 10
    assert targets["coat"].dtype == np.int64 and targets["shape"].dtype == np.float32
    _, val_targets, _ = arrays(run, "val")
    assert np.isnan(val_targets["shape"][3]).all() and (targets["coat"] >= 0).all()  # missing rows stay missing
    assert arrays(run, "val")[1]["coat"][5] == -1


def test_load_run_errors_name_the_file(tmp_path, sweep_dir):
    with pytest.raises(RunFileError, match="summary.json: missing"):
        load_run(tmp_path)
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(sweep_dir / "runs" / "good", bad)
    table = pd.read_csv(bad / "predictions.csv", dtype=str, keep_default_na=False)
    table.loc[2, "p:coat:rotten"] = "oops"
    table.to_csv(bad / "predictions.csv", index=False)
    with pytest.raises(ValueError, match=r"predictions.csv: line 4, column 'p:coat:rotten'"):
        load_run(bad)
    table.drop(columns=["true:coat"]).to_csv(bad / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="true:coat"):
        load_run(bad)


def _edited_run(sweep_dir: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the weak run whose predictions.csv table `edit` changed (text cells)."""
    import shutil

    run = Path(shutil.copytree(sweep_dir / "runs" / "weak", tmp_path / name))
    table = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(run / "predictions.csv", index=False)
    return run


@pytest.mark.parametrize("column, value, problem", [
    ("image", "/etc/hostname", "absolute path '/etc/hostname'; paths must be relative to the dataset folder"),
    ("image", "../secret/x.png", "path '../secret/x.png' leaves the dataset folder"),
    ("image", "img/../../x.png", "path 'img/../../x.png' leaves the dataset folder"),
    ("mask", "/tmp/m.png", "absolute path '/tmp/m.png'")])
def test_predictions_image_paths_outside_the_dataset_are_refused(sweep_dir, tmp_path, column, value, problem):
    """The galleries (notebook 04) open each row's image and embed it in the report: a path that is absolute or
    leaves the dataset is refused as labels.csv's are, naming predictions.csv, the line and the column."""
    def edit(table):
        table[column] = table.get(column, table["image"])
        table.loc[2, column] = value

    run = _edited_run(sweep_dir, tmp_path, "outside", edit)
    with pytest.raises(RunFileError, match=rf"predictions\.csv: line 4, column '{column}': {problem}"):
        load_run(run)


def test_galleries_refuse_an_image_path_leaving_the_dataset_in_a_run_built_in_memory(sweep_dir, tmp_path):
    from tongue_nb.data.images import ImageError, read_sample

    run = load_run(sweep_dir / "runs" / "weak")
    run.predictions["image"] = str(tmp_path / "secret.png")
    with pytest.raises(RunFileError, match=r"predictions\.csv: column 'image': absolute path"):
        error_gallery(run, 4, split=None)
    with pytest.raises(ImageError, match=r"image path '\.\./x\.png' leaves the dataset folder"):
        read_sample("../x.png", "", [(16, "none", 0.1)], root=tmp_path)


def test_galleries_name_a_damaged_labels_table(sweep_dir, data_dir, tmp_path):
    """The masks come from the dataset's labels.csv, read by the checked labels reader: a damaged table or a mask
    path leaving the folder is one line naming the file (no pandas ParserError)."""
    import shutil

    from tongue_nb.data.labels import LabelError

    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    run = load_run(sweep_dir / "runs" / "weak")
    with (data / "labels.csv").open("a") as fh:
        fh.write('img/x.png,"unclosed\n')
    with pytest.raises(LabelError, match=r"labels\.csv: cannot parse as CSV"):
        error_gallery(run, 4, data_dir=data)
    text = (data_dir / "labels.csv").read_text().splitlines()
    header = text[0].split(",")
    assert "mask" in header
    cells = text[1].split(",")
    cells[header.index("mask")] = "../../outside.png"
    (data / "labels.csv").write_text("\n".join([text[0], ",".join(cells)] + text[2:]) + "\n")
    with pytest.raises(LabelError, match=r"labels\.csv: line 2, column 'mask': path '\.\./\.\./outside\.png' leaves"):
        error_gallery(run, 4, data_dir=data)


@pytest.mark.parametrize("value, problem", [("7", "is not a probability"), ("-3", "is not a probability"),
                                            ("inf", "is not a probability"), ("-inf", "is not a probability"),
                                            ("nan", "is not a number")])
def test_probabilities_out_of_range_are_refused(sweep_dir, tmp_path, value, problem):
    """A probability outside [0, 1] would silently change every metric (inf: a sklearn traceback)."""
    def edit(table):
        table.loc[5, "p:shape:teethmarks"] = value

    run = _edited_run(sweep_dir, tmp_path, "range", edit)
    with pytest.raises(RunFileError, match=rf"predictions\.csv: line 7, column 'p:shape:teethmarks': '{value}' {problem}"):
        load_run(run)
    run = _edited_run(sweep_dir, tmp_path, "range01", lambda t: t.__setitem__("true:shape:teethmarks", "2"))
    with pytest.raises(RunFileError, match=r"column 'true:shape:teethmarks': '2' is not 0 or 1"):
        load_run(run)


def test_sweep_tables(sweep_dir):
    sweep = load_sweep(sweep_dir)
    assert sorted(sweep.runs) == ["good", "weak"]
    table = run_table(sweep)
    assert list(table["run"]) == ["good", "weak"]  # best first
    row = table.iloc[0]
    assert row["combined_thresholded"] == pytest.approx(0.65) and row["train_time_s"] == 12.5
    assert row["coat_thresholded"] == pytest.approx(0.60) and row["peak_memory_mb"] == 400
    fails = failures_table(sweep)
    assert list(fails["backbone"]) == ["broken"] and "unknown backbone" in fails["message"][0]
    labels = per_label_table(sweep.runs["good"])
    assert set(labels["task"]) == {"shape", "coat"} and len(labels) == 6


def test_error_tables(sweep_dir):
    run = load_run(sweep_dir / "runs" / "weak")
    errors = sample_errors(run)
    # each task has one row with no label at all (row 3 for shape, row 5 for coat): left out
    assert (errors["task"] == "coat").sum() == 19 and (errors["task"] == "shape").sum() == 19
    coat = errors[errors["task"] == "coat"]
    assert (coat["wrong"] == (coat["true"] != coat["pred"])).all()
    worst = worst_errors(run, 5)
    assert len(worst) <= 5 and worst["wrong"].all() and (worst["split"] == "test").all()
    assert worst["p_true"].is_monotonic_increasing
    by_split = errors_by(run, "split")
    assert set(by_split["split"]) == {"val", "test"} and (by_split["error_rate"].between(0, 1)).all()
    assert by_split["n"].sum() == len(errors)
    with pytest.raises(ValueError, match="by must be"):
        errors_by(run, "colour")
    cal = calibration_table(run)
    assert set(cal["task"]) == {"shape", "coat"} and cal["confidence"].between(0, 1).all()


def test_confusion_panels_count_labelled_rows(sweep_dir):
    run = load_run(sweep_dir / "runs" / "good")
    panels = dict((title, m) for title, _, m in confusion_panels(run, "val"))
    assert panels["coat"].sum() == 9  # 10 val rows, one missing coat label
    assert panels["shape: spots"].sum() == 9 and panels["shape: spots"].shape == (2, 2)


def test_figures(sweep_dir, data_dir):
    sweep = load_sweep(sweep_dir)
    run = sweep.runs["good"]
    table = run_table(sweep)
    for fig in (task_bars(table, SCHEMA), training_curves(sweep), confusion_matrices(run),
                threshold_curves(run), reliability_diagram(run), error_gallery(run, 4)):
        assert len(fig.axes) >= 1
    assert history_columns(run.history, SCHEMA) == ["val_combined_score", "val_shape_macro_f1", "val_coat_macro_f1"]
    gallery = error_gallery(load_run(sweep_dir / "runs" / "weak"), 4)
    assert any(ax.images for ax in gallery.axes)  # images read from data_dir in params.yaml


def test_cam_gallery_of_the_baseline_says_it_has_no_network(sweep_dir, tmp_path):
    import json
    import shutil

    base = tmp_path / "classical-baseline"
    shutil.copytree(sweep_dir / "runs" / "weak", base)
    summary = json.loads((base / "summary.json").read_text())
    (base / "summary.json").write_text(json.dumps({**summary, "kind": "baseline", "backbone": "classical-baseline"}))
    fig = cam_gallery(load_run(base), "coat", k=2)
    assert "no network to map" in fig.axes[0].texts[0].get_text()


def test_error_browser_pages_through_errors(sweep_dir):
    run = load_run(sweep_dir / "runs" / "weak")
    browser = error_browser(run, split="test")
    task, image = browser.children[0].children[0], browser.children[1]
    first = bytes(image.value)
    assert task.value == "shape" and first[:4] == b"\x89PNG"
    task.value = "coat"
    assert bytes(image.value)[:4] == b"\x89PNG" and bytes(image.value) != first


def test_index_lists_runs_and_failures(tmp_path):
    (tmp_path / "03_train-a.html").write_text("x")
    path = write_index(tmp_path, [{"backbone": "a", "combined_thresholded": 0.5, "report": tmp_path / "03_train-a.html"}],
                              [{"backbone": "zzz", "error_type": "ValueError", "message": "unknown <backbone>", "cell_index": 4}])
    text = path.read_text()
    assert 'href="03_train-a.html"' in text and "0.500" in text
    assert "zzz" in text and "unknown &lt;backbone&gt;" in text and "cell 4" in text
    assert "http" not in text  # self-contained: no external resources
    assert "--selection" not in text
    (tmp_path / "selection.json").write_text("{}")
    text = write_index(tmp_path, [], [], selection=tmp_path / "selection.json").read_text()
    assert f"tongue-nb predict --selection {tmp_path / 'selection.json'} --images PHOTOS" in text


def test_ensemble_and_bootstrap(sweep_dir):
    sweep = load_sweep(sweep_dir)
    ens = ensemble_metrics(sweep, 2)
    assert ens["members"] == ["good", "weak"] and ens["n_test"] == 10
    assert 0 <= ens["thresholded"]["combined_score"] <= 1
    table = run_table(sweep, ensemble_k=2)
    assert len(table) == 3 and table["run"].str.startswith("ensemble").any()
    boot = bootstrap_table(sweep, n_boot=200)
    good, weak = boot.set_index("run").loc["good"], boot.set_index("run").loc["weak"]
    assert good["combined_lo"] <= good["combined_hi"] and good["vs_best"] == "(best)"
    assert weak["vs_best"] == "good" and weak["diff_lo"] <= weak["diff"] <= weak["diff_hi"]
    from tongue_nb.analysis import metrics

    scores = {}
    for name in ("good", "weak"):
        probs, targets, _ = arrays(sweep.runs[name], "test")
        scores[name] = metrics.compute_metrics(SCHEMA, probs, targets, thresholds={"shape": [0.4] * 3})["combined_score"]
    assert good["combined"] == pytest.approx(scores["good"]) and weak["diff"] == pytest.approx(scores["weak"] - scores["good"])


def test_notebook_05_through_papermill(sweep_dir, tmp_path):
    from tongue_nb.pipeline import jobs, sweep

    out_nb = tmp_path / "05.ipynb"
    with jobs.project_kernel() as kernel:
        jobs.execute_notebook(sweep.NOTEBOOKS / "05_report.ipynb", out_nb,
                               {"sweep_dir": str(sweep_dir), "ensemble_k": 2, "n_boot": 100}, kernel, sweep.PROJECT_ROOT)
    html = sweep.render_html(out_nb, tmp_path / "05.html").read_text()
    assert html.count("data:image/png;base64") >= 2 and "ensemble(top 2)" in html
    assert "unknown backbone" in html and "vs_best" in html


def test_notebook_04_through_papermill(sweep_dir, tmp_path):
    from tongue_nb.pipeline import jobs, sweep

    out_nb = tmp_path / "04.ipynb"
    with jobs.project_kernel() as kernel:
        jobs.execute_notebook(sweep.NOTEBOOKS / "04_error_analysis.ipynb", out_nb,
                               {"run_dir": str(sweep_dir / "runs" / "weak"), "n_worst": 4}, kernel, sweep.PROJECT_ROOT)
    html = sweep.render_html(out_nb, tmp_path / "04.html").read_text()
    assert html.count("data:image/png;base64") >= 5  # confusion, thresholds, calibration, gallery figures embedded
    assert "runs.load_run" not in html  # code hidden (--no-input)


def test_per_task_selection_chooses_on_validation_per_task(sweep_dir, tmp_path):
    import shutil

    from tongue_nb.analysis import metrics

    root = tmp_path / "sel"
    rng = np.random.default_rng(3)
    for name, spoil in (("a", "coat"), ("b", "shape")):  # a is good at shape only, b at coat only
        shutil.copytree(sweep_dir / "runs" / "good", root / "runs" / name)
        table = pd.read_csv(root / "runs" / name / "predictions.csv", dtype=str, keep_default_na=False)
        labels = SHAPE if spoil == "shape" else COAT
        noise = rng.dirichlet(np.ones(len(labels)), len(table))
        for i, label in enumerate(labels):
            table[f"p:{spoil}:{label}"] = noise[:, i]
        table.to_csv(root / "runs" / name / "predictions.csv", index=False)
    sweep = load_sweep(root)
    sel = per_task_selection(sweep, ensemble_k=0)
    assert sel["choice"]["shape"]["source"] == "a" and sel["choice"]["coat"]["source"] == "b"
    for task, name in (("shape", "a"), ("coat", "b")):
        run = sweep.runs[name]
        val_p, val_t, _ = arrays(run, "val")
        test_p, test_t, _ = arrays(run, "test")
        thr = metrics.tune_thresholds(SCHEMA, val_p, val_t)
        want = metrics.compute_metrics(SCHEMA, test_p, test_t, thresholds=thr)["tasks"][task]["primary"]
        assert sel["choice"][task]["test"] == pytest.approx(want)
        assert sel["row"][f"{task}_thresholded"] == pytest.approx(want)
    assert sel["row"]["combined_thresholded"] == pytest.approx(
        metrics.combined_score(SCHEMA, {t: sel["choice"][t]["test"] for t in ("shape", "coat")}))
    # the row joins the run table under its own name, and the choices are saved for later use
    table = run_table(sweep, ensemble_k=2, selection=True)
    assert "per-task selection" in set(table["run"]) and len(table) == 4
    saved = json.loads(save_selection(sel, tmp_path / "selection.json").read_text())
    # the runs relative to the file: predict finds them from any working folder, and in a sweep moved as a whole
    assert saved["runs_relative_to"] == "file" and saved["tasks"]["coat"]["source"] == "b"
    assert (tmp_path / saved["tasks"]["coat"]["runs"][0]).resolve() == (root / "runs" / "b").resolve()


def test_chance_rows_flags_and_verdict(sweep_dir, tmp_path):
    import shutil

    from tongue_nb.analysis import metrics

    sweep = load_sweep(sweep_dir)
    good = sweep.runs["good"]
    rows = {r["run"]: r for r in chance_rows(good)}
    _, targets, _ = arrays(good, "test")
    ref = metrics.chance_references(SCHEMA, targets)
    assert rows["chance: constant answer"]["combined_thresholded"] == pytest.approx(ref["constant answer"]["combined_score"])
    table = run_table(sweep, chance=True)
    assert {"chance: constant answer", "chance: random guess"} <= set(table["run"])
    # a run that says "yes" to every shape label on val is flagged, label by label
    root = tmp_path / "s"
    shutil.copytree(sweep_dir / "runs" / "good", root / "runs" / "yes")
    pred = pd.read_csv(root / "runs" / "yes" / "predictions.csv", dtype=str, keep_default_na=False)
    for label in SHAPE:
        pred[f"p:shape:{label}"] = "0.9"
    pred.to_csv(root / "runs" / "yes" / "predictions.csv", index=False)
    flags = constant_flags(load_run(root / "runs" / "yes"))
    assert list(flags["label"]) == list(SHAPE) and set(flags["answer"]) == {"yes"}
    assert run_row(load_run(root / "runs" / "yes"))["one_answer_labels"] == 3
    assert run_row(good)["one_answer_labels"] == 0
    boot = bootstrap_table(sweep, n_boot=200)
    text = verdict(sweep, boot, n_boot=200)
    assert text.startswith("Best single run on the combined test score") and "good" in text and "ahead of weak" in text
    assert "10 test images" in text and "constant answer" in text
    assert format_p(0.0, 1000) == "< 0.001" and format_p(0.0421) == "0.042"


def test_index_rows_match_the_final_report_and_say_where_data_came_from(sweep_dir, data_dir, tmp_path):
    import shutil

    root = tmp_path / "sw"
    shutil.copytree(sweep_dir, root)
    (root / "sweep.json").write_text(json.dumps({"data_dir": str(data_dir), "params_file": "params/smoke.yaml",
                                                 "started": "2026-11-30T10:00:00"}))
    sweep = load_sweep(root)
    rows = {r["backbone"]: r for r in index_rows(sweep, ensemble_k=2, n_boot=200)}
    table = run_table(sweep, 2, selection=True, chance=True)
    assert set(rows) == set(table["run"])  # one count, one ranking on both pages
    assert rows["good"]["kind"] == "run" and rows["chance: constant answer"]["kind"] == "reference"
    assert rows["per-task selection"]["kind"] == "combination" and rows["ensemble(top 2)"]["kind"] == "combination"
    lo, hi = rows["good"]["ci"]
    assert 0 <= lo <= hi <= 1  # (the hand-made summaries carry made-up scores, so no comparison here)
    text = sweep_provenance(sweep)
    assert str(data_dir) in text and "params/smoke.yaml" in text and "2026-11-30" in text
    path = write_index(tmp_path / "rep", list(rows.values()), [], provenance=text)
    page = path.read_text()
    assert "per-task selection" in page and "chance: random guess" in page and f"{lo:.3f}-{hi:.3f}" in page
    assert "params/smoke.yaml" in page


def test_rendered_pages_say_what_they_are_link_back_and_hide_logs(tmp_path):
    import re

    import nbformat

    from tongue_nb.pipeline.render import page_title, render_html

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Train one backbone\n\nTwo stages."), nbformat.v4.new_code_cell("x")]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stderr", text="21:00:01 INFO tongue_nb: epoch 1\n"),
                           nbformat.v4.new_output("stream", name="stdout", text="a printed result\n")]
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    html = render_html(tmp_path / "n.ipynb", tmp_path / "03_train-resnet18.html").read_text()
    assert re.search(r"<title>(.*?)</title>", html).group(1) == "resnet18 - training"
    assert re.search(r"<h1[^>]*>resnet18 - training", html) and 'href="index.html"' in html
    assert "INFO tongue_nb" not in html and "a printed result" in html
    assert page_title("reports/05_report.html") == "final report"
    assert page_title("04_error_analysis-tf_efficientnet_lite0.html") == "tf_efficientnet_lite0 - error analysis"


def test_rendered_figures_carry_alternative_text_naming_their_section(tmp_path, caplog):
    import base64
    import io

    import nbformat
    from bs4 import BeautifulSoup
    from PIL import Image

    from tongue_nb.pipeline.render import render_html

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Report\n\n## Per-task **F1** by [fold](#f)"),
                nbformat.v4.new_code_cell("x"), nbformat.v4.new_code_cell("y")]
    nb.cells[1].outputs = [nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"},
                                                  metadata={"image/png": {"width": 400}})]
    nb.cells[2].outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    with caplog.at_level("WARNING"):
        page = render_html(tmp_path / "n.ipynb", tmp_path / "05_report.html").read_text()
    assert "Alternative text is missing" not in caplog.text
    images = BeautifulSoup(page, "html.parser").select("img")
    assert [i["alt"] for i in images] == [f"Figure {k} of section 'Per-task F1 by fold' (final report)" for k in (1, 2)]
    assert {i["src"] for i in images} == {f"data:image/png;base64,{png}"} and images[0]["width"] == "400"


def test_roc_pr_curves_one_panel_pair_per_task_with_scores_in_the_legend(sweep_dir):
    from sklearn.metrics import roc_auc_score

    run = load_run(sweep_dir / "runs" / "good")
    fig = roc_pr_curves(run)
    assert len(fig.axes) == 4  # (ROC, PR) x (shape, coat)
    roc = fig.axes[0]
    assert roc.get_xlabel() == "false positive rate" and roc.get_title().startswith("shape: ROC")
    probs, targets, _ = arrays(run, "test")
    keep = np.isfinite(targets["shape"][:, 0])
    want = roc_auc_score(targets["shape"][keep, 0], probs["shape"][keep, 0])
    labels = [t.get_text() for t in roc.get_legend().get_texts()]
    assert f"{SHAPE[0]} ({want:.2f})" in labels


def test_task_bars_carry_the_bootstrap_intervals(sweep_dir):
    sweep = load_sweep(sweep_dir)
    table = run_table(sweep, chance=True)
    boot = bootstrap_table(sweep, n_boot=100)
    fig = task_bars(table, SCHEMA, boot=boot)
    ax = fig.axes[0]
    assert "95% interval" in ax.get_title() and ax.get_ylabel()
    assert any(len(c.get_segments()) == len(table) for c in ax.collections)  # one error bar per row


def test_ranking_table_gives_auroc_and_ap_per_task(sweep_dir):
    from sklearn.metrics import roc_auc_score

    sweep = load_sweep(sweep_dir)
    table = ranking_table(sweep).set_index("run")
    run = sweep.runs["good"]
    probs, targets, _ = arrays(run, "test")
    keep = targets["coat"] >= 0
    want = np.mean([roc_auc_score(targets["coat"][keep] == i, probs["coat"][keep, i]) for i in range(3)])
    assert table.loc["good", "coat AUROC"] == pytest.approx(want)
    assert table.loc["good", "shape AUROC"] > table.loc["weak", "shape AUROC"]


def test_ensemble_members_are_chosen_on_validation_never_on_test(tmp_path, data_dir):
    """A run best on test but worst on validation stays out of the ensemble: test is scored, never used to choose."""
    root = tmp_path / "sweep"
    for name, seed, skill, val in (("a", 0, 0.3, 0.9), ("b", 1, 0.9, 0.2), ("c", 2, 0.6, 0.7)):
        run = write_run(root / "runs" / name, data_dir, seed, skill, name)
        s = json.loads((run / "summary.json").read_text())
        s["val_metrics_thresholded"] = {"combined_score": val, "tasks": {}}
        (run / "summary.json").write_text(json.dumps(s))
    sweep = load_sweep(root)
    assert [r.path.name for r in ranked_on_val(list(sweep.runs.values()))] == ["a", "c", "b"]
    assert ensemble_metrics(sweep, 2)["members"] == ["a", "c"]  # b has the best test score
    assert per_task_selection(sweep, ensemble_k=2)["table"] is not None


@pytest.mark.parametrize("call, message", [
    (lambda run, sweep: worst_errors(run, -1), "k: got -1, expected an integer >= 0"),
    (lambda run, sweep: worst_errors(run, 3, split="train"), "split 'train': expected one of val, test"),
    (lambda run, sweep: worst_errors(run, 3, task="nope"), "no task 'nope'"),
    (lambda run, sweep: error_gallery(run, -2), "k: got -2"),
    (lambda run, sweep: confusion_matrices(run, "bogus"), "split 'bogus'"),
    (lambda run, sweep: reliability_diagram(run, "test", 0), "bins: got 0, expected an integer >= 2"),
    (lambda run, sweep: roc_pr_curves(run, "tset"), "split 'tset'"),
    (lambda run, sweep: cam_gallery(run, run.schema.names[0], k=-1), "k: got -1"),
    (lambda run, sweep: bootstrap_table(sweep, n_boot=10, seed=-1), r"seed \(of the bootstrap\): got -1, expected an integer >= 0"),
    (lambda run, sweep: bootstrap_table(sweep, n_boot=2.5), "n_boot: got 2.5, expected an integer >= 1"),
    (lambda run, sweep: run_table(sweep, -1), "ensemble_k: got -1"),
    (lambda run, sweep: per_task_selection(sweep, -2), "ensemble_k: got -2"),
    (lambda run, sweep: ensemble_metrics(sweep, -1), "k: got -1"),
])
def test_report_functions_name_a_bad_option_instead_of_returning_a_wrong_table(sweep_dir, call, message):
    """Called from Python (not only the notebooks): a negative count showed all rows but the last, an unknown
    split or task an empty table, a negative seed reached numpy."""
    sweep = load_sweep(sweep_dir)
    with pytest.raises((ValueError, KeyError), match=message):
        call(next(iter(sweep.runs.values())), sweep)
