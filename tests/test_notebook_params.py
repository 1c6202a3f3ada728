"""The analysis notebooks' parameters: typed and checked before anything is read or written, names held to the cells."""
from __future__ import annotations

import ast
import dataclasses

import nbformat
import pytest

from tongue_nb.pipeline.compare import CompareParams
from tongue_nb.pipeline.notebook_params import (NOTEBOOK_PARAMS, ComparisonNotebookParams, DataReviewParams,
                                                ErrorAnalysisParams, PredictNotebookParams, ReportParams,
                                                TuneNotebookParams)
from tongue_nb.pipeline.sweep import NOTEBOOKS
from tongue_nb.train.params import ParamError


def _parameters_cell(stem: str) -> tuple[dict, str]:
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    k = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    values = {node.target.id: ast.literal_eval(node.value) for node in ast.parse(cells[k].source).body}
    return values, cells[k + 1].source


@pytest.mark.parametrize("stem", sorted(NOTEBOOK_PARAMS))
def test_each_notebook_checks_exactly_its_parameters_cell(stem):
    cls = NOTEBOOK_PARAMS[stem]
    values, first_cell = _parameters_cell(stem)
    assert sorted(values) == sorted(cls.names())
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    defaults.update({f.name: f.default for f in dataclasses.fields(CompareParams) if f.name in cls.shared})
    assert values == defaults  # the cell's defaults are the checker's
    assert f"{cls.__name__}.from_namespace(globals())" in first_cell  # checked before the notebook reads anything
    if stem in ("01_data_review", "02_model_comparison"):  # 04, 05 and 06 need a folder the user names
        cls.from_namespace(values)


@pytest.mark.parametrize("cls, given, message", [
    (DataReviewParams, {"per_page": 0}, "parameter per_page: got 0, expected a number >= 1"),
    (DataReviewParams, {"samples_per_class": -1}, "parameter samples_per_class"),
    (DataReviewParams, {"thumb_size": 0}, "parameter thumb_size"),
    (DataReviewParams, {"seed": -1}, "parameter seed"),
    (DataReviewParams, {"image_size": "big"}, "parameter image_size: got 'big'"),
    (ErrorAnalysisParams, {"run_dir": "r", "split": "train"}, r"parameter split: got 'train', expected one of \['val', 'test'\]"),
    (ErrorAnalysisParams, {"run_dir": "r", "n_worst": -1}, "parameter n_worst"),
    (ErrorAnalysisParams, {"run_dir": "r", "calibration_bins": 0}, "parameter calibration_bins"),
    (ErrorAnalysisParams, {}, "parameter run_dir"),
    (ReportParams, {"sweep_dir": "s", "n_boot": 0}, "parameter n_boot"),
    (ReportParams, {"sweep_dir": "s", "ensemble_k": -1}, "parameter ensemble_k"),
    (ReportParams, {"sweep_dir": "s", "seed": -1}, "parameter seed"),
    (ReportParams, {"sweep_dir": "s", "n_boot": 2.5}, "parameter n_boot"),
    (ReportParams, {}, "parameter sweep_dir"),
    (ReportParams, {"sweep_dir": "."}, r"sweep_dir: \. is not a sweep folder \(no sweep.json, no runs/\)"),
    (ErrorAnalysisParams, {"run_dir": "r", "data_dir": "nope"}, "parameter data_dir: nope is not a folder"),
    (ComparisonNotebookParams, {"synth_n": 0}, "parameter synth_n"),
    (ComparisonNotebookParams, {"out_dir": ""}, "parameter out_dir"),
    (PredictNotebookParams, {"runs": "r", "images": "i", "n_gallery": -1}, "parameter n_gallery: got -1"),
    (PredictNotebookParams, {"runs": "r", "images": "i", "explain": 5}, "parameter explain: got 5"),
    (PredictNotebookParams, {"runs": "r", "images": "i", "out_csv": "."}, "out_csv"),
    (PredictNotebookParams, {"images": "i"}, "one of the two"),
    (PredictNotebookParams, {"runs": "r", "selection": "s.json", "images": "i"}, "one of the two"),
    (PredictNotebookParams, {"runs": "r"}, "parameter images"),
    (TuneNotebookParams, {"tune_dir": " "}, "parameter tune_dir: expected a tune folder"),
])
def test_bad_values_are_named(cls, given, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ParamError, ValueError, FileExistsError), match=message):
        cls.from_namespace(given)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_a_mistyped_injected_name_is_refused_not_ignored():
    history = ["", "# Parameters\nn_bot = 50\nsweep_dir = 'x'\n"]  # what papermill -p n_bot 50 runs
    with pytest.raises(ParamError, match=r"unknown notebook parameter 'n_bot'.*did you mean n_boot"):
        ReportParams.from_namespace({"_ih": history, "sweep_dir": "x", "n_bot": 50})
    history = ["", "# Parameters\nsteps = 4\nPAPERMILL_INPUT_PATH = 'a'\n"]
    got = ComparisonNotebookParams.from_namespace({"_ih": history, "steps": 4})  # a shared (CompareParams) name
    assert got.synth_n == 120


def test_predict_notebook_output_default_is_the_working_folder():
    assert str(PredictNotebookParams(runs="r", images="/data/clinic photos").output) == "predictions-clinic photos.csv"
    assert str(PredictNotebookParams(runs="r", images="list.csv", out_csv="o.csv").output) == "o.csv"
    assert PredictNotebookParams(runs="a, b", images="i").run_list == ["a", "b"]


def test_the_report_notebook_refuses_a_mistyped_parameter_before_writing(tmp_path):
    import papermill

    from tongue_nb.pipeline import jobs, sweep

    (tmp_path / "sweep").mkdir()
    with jobs.project_kernel() as kernel:
        with pytest.raises(papermill.PapermillExecutionError, match="unknown notebook parameter 'n_bot'"):
            jobs.execute_notebook(NOTEBOOKS / "05_report.ipynb", tmp_path / "out.ipynb",
                                   {"sweep_dir": str(tmp_path / "sweep"), "n_bot": 50}, kernel, tmp_path)
    assert list((tmp_path / "sweep").iterdir()) == []
