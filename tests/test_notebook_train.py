"""notebooks/03_train.ipynb: its parameters cell follows TrainParams, and papermill writes the trainer's run folder."""
import dataclasses
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from tongue_nb.train.params import NOTEBOOK_EXTRA, TrainParams, load_params, notebook_parameters_source
from tongue_nb.data.synth import make_synthetic
from tongue_nb.train.trainer import train

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_train.ipynb"


def test_parameters_cell_matches_trainparams_and_notebook_has_no_outputs():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    # Regenerate with tongue_nb.train.params.sync_notebook_parameters("notebooks/03_train.ipynb") after changing TrainParams.
    assert cells[0].source == notebook_parameters_source(NOTEBOOK_EXTRA)
    namespace: dict = {}
    exec(cells[0].source, namespace)
    for f in dataclasses.fields(TrainParams):
        assert namespace[f.name] == f.default, f.name
    assert namespace["params_file"] == ""
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_papermill_run_equals_trainer_run(tmp_path):
    import papermill as pm
    data = make_synthetic(tmp_path / "data", n=48, size=48, seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage1_epochs: 1\nstage2_epochs: 1\nbatch_size: 8\n")
    values = dict(backbone="test_convnext", data_dir=str(data), image_size=32, pretrained=False, num_threads=1)
    out_nb = tmp_path / "out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
                        parameters={**values, "out_dir": str(tmp_path / "nb_run"), "params_file": str(recipe)})
    summary_cli = train(load_params(files=[recipe], out_dir=str(tmp_path / "cli_run"), progress=False, **values))
    nb_run, cli_run = tmp_path / "nb_run", tmp_path / "cli_run"
    assert _files(nb_run) == _files(cli_run)
    summary_nb = json.loads((nb_run / "summary.json").read_text())
    # Same data, seed and threads: the notebook and the direct call train the very same model.
    assert summary_nb["final_metrics_fixed"] == summary_cli["final_metrics_fixed"]
    assert summary_nb["final_metrics_thresholded"] == summary_cli["final_metrics_thresholded"]
    p_nb = yaml.safe_load((nb_run / "params.yaml").read_text())
    p_cli = yaml.safe_load((cli_run / "params.yaml").read_text())
    for key in ("out_dir", "experiment_name", "progress"):
        p_nb.pop(key), p_cli.pop(key)
    assert p_nb == p_cli and p_nb["stage2_epochs"] == 1  # the recipe file was applied in the notebook
    executed = nbformat.read(str(out_nb), as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "it/s]" not in text  # no progress bars in papermill output
    assert "image/png" in text  # curves and confusion matrices were drawn


def test_papermill_documents_every_parameter():
    import papermill as pm
    found = pm.inspect_notebook(str(NOTEBOOK))
    expected = {f.name: f for f in dataclasses.fields(TrainParams)}
    assert set(found) == set(expected) | {"params_file"}
    for name, f in expected.items():
        assert found[name]["inferred_type_name"] == f.type and found[name]["help"], name


def _resolve_cells_only(tmp_path: Path) -> Path:
    """03_train's own cells up to the one that resolves the parameters (no training): quick to run."""
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    upto = next(i for i, c in enumerate(nb.cells) if "params_from_namespace(" in c.source)
    nb.cells = nb.cells[:upto + 1] + [nbformat.v4.new_code_cell("import json\nprint(json.dumps(params.as_dict()))")]
    path = tmp_path / "03_resolve.ipynb"
    nbformat.write(nb, str(path))
    return path


def _papermill_params(tmp_path: Path, parameters: dict, name: str = "out") -> dict:
    """The parameters 03_train's resolve cell gives under papermill (printed by one extra cell)."""
    import papermill as pm
    out_nb = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(_resolve_cells_only(tmp_path)), str(out_nb), parameters=parameters,
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    last = nbformat.read(str(out_nb), as_version=4).cells[-1]
    return json.loads("".join(o.text for o in last.outputs if o.output_type == "stream" and o.name == "stdout"))


def test_papermill_value_equal_to_the_default_still_beats_the_recipe(tmp_path):
    # Issue 14: `-p batch_size 32` (32 is the default) with a recipe saying 16 used to train with 16.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 16\naugment: false\nstage1_epochs: 2\n")
    got = _papermill_params(tmp_path, {"params_file": str(recipe), "batch_size": 32, "augment": True})
    expected = load_params(files=[recipe], overrides=["batch_size=32", "augment=true"]).as_dict()
    assert got["batch_size"] == 32 and got["augment"] is True and got["stage1_epochs"] == 2
    assert got == expected  # papermill and the command line give the same parameters


def test_sweep_overrides_reach_the_run_like_the_command_line(tmp_path):
    from tongue_nb.pipeline import sweep
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 16\naugment: false\n")
    overrides = ["batch_size=32", "augment=true"]
    parameters = sweep.train_notebook_parameters("test_convnext", tmp_path / "data", tmp_path / "run", recipe,
                                                 sweep._parse_overrides(overrides))
    got = _papermill_params(tmp_path, parameters)
    cli = load_params(files=[recipe], overrides=overrides, backbone="test_convnext", data_dir=str(tmp_path / "data"),
                      out_dir=str(tmp_path / "run"), progress=False).as_dict()
    assert got == cli and got["batch_size"] == 32 and got["augment"] is True


def test_unknown_papermill_parameter_stops_the_notebook_naming_it(tmp_path):
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError) as info:
        _papermill_params(tmp_path, {"backbon": "swin_base"})
    assert info.value.ename == "ParamError"
    assert "unknown notebook parameter 'backbon'" in info.value.evalue and "did you mean backbone" in info.value.evalue


def test_papermill_empty_data_dir_is_refused(tmp_path):
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError) as info:
        _papermill_params(tmp_path, {"data_dir": ""})  # `-p data_dir "$DATA"` with DATA unset
    assert info.value.ename == "ParamError" and "notebook parameter data_dir: got ''" in info.value.evalue


def test_sweep_layers_the_backbones_own_file_then_the_recipe_then_the_users_values(tmp_path):
    from tongue_nb.pipeline import sweep
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("stage2_epochs: 30\nprecision: bf16\n")
    files = sweep.recipe_files("convnext_large", recipe)
    assert [f.name for f in files] == ["convnext_large.yaml", "gpu.yaml"]
    parameters = sweep.train_notebook_parameters("convnext_large", tmp_path / "data", tmp_path / "run", files,
                                                 sweep._parse_overrides(["batch_size=4"]))
    got = _papermill_params(tmp_path, parameters)
    own = load_params(files=[sweep.PARAMS_DIR / "convnext_large.yaml"])
    assert got["stage2_lr_backbone"] == own.stage2_lr_backbone == 2e-5  # the backbone's own learning rates kept
    assert got["drop_rate"] == own.drop_rate
    assert got["stage2_epochs"] == 30 and got["precision"] == "bf16"  # the recipe over the backbone's file
    assert got["batch_size"] == 4  # the user's value over both
    assert sweep.recipe_files("resnet18", recipe) == [recipe.resolve()]  # no file of its own: the recipe alone


def test_a_recipes_progress_is_not_replaced_by_the_sweeps_default(tmp_path):
    """The sweep turns progress bars off in its notebooks unless the recipe (or --set) asks for them."""
    from tongue_nb.pipeline import sweep
    plain, asks = tmp_path / "plain.yaml", tmp_path / "asks.yaml"
    plain.write_text("batch_size: 16\n")
    asks.write_text("batch_size: 16\nprogress: true\n")
    assert sweep.train_notebook_parameters("test_convnext", tmp_path, tmp_path / "run", plain, {})["progress"] is False
    parameters = sweep.train_notebook_parameters("test_convnext", tmp_path, tmp_path / "run", asks, {})
    assert "progress" not in parameters
    assert _papermill_params(tmp_path, parameters)["progress"] is True
    assert sweep.train_notebook_parameters("test_convnext", tmp_path, tmp_path / "run", plain,
                                           {"progress": True})["progress"] is True
