"""Every notebook: stored without outputs, one typed and commented parameters cell that papermill reads whole."""
import ast
from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_all_seven_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_data_review", "02_model_comparison", "03_train",
                                           "04_error_analysis", "05_report", "06_predict", "07_tune"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_is_typed_commented_and_fully_documented(path):
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged 'parameters'"
    names = []
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: parameters are `name: type = value  # help`"
        names.append(node.target.id)
    for line in cells[0].source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}: parameter without a comment: {line}"
    # papermill skips a line whose comment holds '=': every parameter must reach --help-notebook.
    inspected = papermill.inspect_notebook(str(path))
    assert sorted(inspected) == sorted(names)
    assert all(inspected[n]["help"] for n in names)
