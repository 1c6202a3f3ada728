"""Model comparison: identical budget, measured speed and memory, failing backbones, files, plots, notebook."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tongue_nb.pipeline import compare
from tongue_nb.pipeline.compare import (CompareError, CompareParams, compare_backbones, parse_backbones,
                                        recommendations)
from tongue_nb.train.params import ParamError


def screen(data_dir, backbones, out_dir=None, **values):
    """compare_backbones with its parameters given as keywords (CompareParams)."""
    return compare_backbones(CompareParams(data_dir=str(data_dir), **values), backbones, out_dir=out_dir)

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=4, warmup_steps=1, batch_size=4, image_size=32, eval_batches=2, infer_steps=2)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    from tongue_nb.data.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", n=48, size=32, seed=0)


def test_parse_backbones() -> None:
    assert parse_backbones("a, b,,a c") == ["a", "b", "c"]
    assert parse_backbones(["x", "y"]) == ["x", "y"]
    with pytest.raises(CompareError, match="backbones"):
        parse_backbones(" , ")


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(steps=3, warmup_steps=3), "warmup_steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(eval_batches=-1), "eval_batches"),
    (dict(crop="zoom"), "crop"),
])
def test_bad_arguments_name_the_parameter(synth_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ParamError, match=match):
        screen(synth_dir, ["test_convnext"], **kwargs)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="data_dir"):
        screen(tmp_path / "nope", ["test_convnext"])


def test_in_process_rows_files_and_failed_backbone(synth_dir: Path, tmp_path: Path) -> None:
    import torch

    from tongue_nb.model.backbones import MultiTaskBackbone
    from tongue_nb.data.tasks import load_schema

    df = screen(synth_dir, "test_convnext,no_such_net,test_convnext", out_dir=tmp_path, isolate=False, **FAST)
    assert list(df.columns) == compare.COLUMNS
    ok = df[df["error"] == ""]
    assert (ok["val_loss_se"].isna() | (ok["val_loss_se"] >= 0)).all()  # the spread of the val-loss reading
    assert list(df["backbone"]) == ["test_convnext", "no_such_net"]  # duplicates dropped, order kept
    ok, bad = df.iloc[0], df.iloc[1]
    assert ok["error"] == "" and "no_such_net" in bad["error"] and "convnext_tiny" in bad["error"]
    assert math.isnan(bad["val_loss"])
    expected = MultiTaskBackbone("test_convnext", load_schema(synth_dir / "tasks.yaml"), pretrained=False,
                                 freeze_backbone=False, image_size=32).params_m()
    assert ok["params_total_m"] == pytest.approx(expected["total"])
    assert ok["params_trainable_m"] == pytest.approx(expected["trainable"])
    for col in ("val_loss", "train_loss_first", "train_loss_last", "train_samples_per_s", "infer_samples_per_s"):
        assert np.isfinite(ok[col]) and ok[col] > 0, col
    assert ok["memory_method"].startswith("cpu_peak_rss_increase") and ok["peak_memory_mb"] >= 0
    assert ok["device"] == "cpu" and ok["steps"] == 4 and ok["image_size"] == 32

    back = compare.load_comparison(tmp_path)
    assert list(back["backbone"]) == ["test_convnext", "no_such_net"] and back.loc[1, "error"] == bad["error"]
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["recommendations"] == {"lowest_val_loss": "test_convnext", "fastest": "test_convnext",
                                       "largest": "test_convnext"}
    assert data["rows"][1]["val_loss"] is None and data["settings"]["steps"] == 4
    torch.set_num_threads(torch.get_num_threads())  # the comparison must not have changed it (num_threads=0)


def test_same_budget_gives_the_same_validation_loss(synth_dir: Path) -> None:
    """Same seed, same batches, same steps: a rerun reproduces the loss, a longer budget changes it."""
    a = screen(synth_dir, ["test_vit"], isolate=False, **FAST)
    b = screen(synth_dir, ["test_vit"], isolate=False, **FAST)
    c = screen(synth_dir, ["test_vit"], isolate=False, **(FAST | {"steps": 8}))
    assert a.loc[0, "error"] == "" and a.loc[0, "val_loss"] == pytest.approx(b.loc[0, "val_loss"], rel=1e-5)
    assert a.loc[0, "train_loss_first"] == pytest.approx(c.loc[0, "train_loss_first"], rel=1e-5)
    assert c.loc[0, "val_loss"] != pytest.approx(a.loc[0, "val_loss"], rel=1e-4)


def test_isolated_process_measures_peak_memory(synth_dir: Path) -> None:
    df = screen(synth_dir, ["test_convnext"], isolate=True, num_threads=1, **FAST)
    row = df.iloc[0]
    assert row["error"] == "", row["error"]
    assert row["memory_method"] == "cpu_peak_rss_increase"
    # The model, its gradients and AdamW state alone are > 3 x the fp32 weights.
    assert row["peak_memory_mb"] > 3 * row["params_total_m"] * 1e6 * 4 / 2 ** 20


def test_recommendations_skip_failed_and_missing_values() -> None:
    df = pd.DataFrame({
        "backbone": ["a", "b", "c", "d"],
        "val_loss": [0.5, 0.3, np.nan, 0.1],
        "train_samples_per_s": [100.0, 50.0, 10.0, 999.0],
        "params_total_m": [5.0, 20.0, 30.0, 99.0],
        "error": ["", "", "", "RuntimeError: OOM"],
    })
    assert recommendations(df) == {"lowest_val_loss": "b", "fastest": "a", "largest": "c"}
    assert recommendations(df.assign(error="x")) == {"lowest_val_loss": None, "fastest": None, "largest": None}


def test_plots_return_figures() -> None:
    from matplotlib.figure import Figure

    df = pd.DataFrame({"backbone": ["a", "b"], "params_total_m": [1.0, 80.0], "val_loss": [0.9, 0.7],
                       "train_samples_per_s": [50.0, 10.0], "infer_samples_per_s": [200.0, 40.0],
                       "steps": [4, 4], "batch_size": [4, 4], "device": ["cpu", "cpu"], "error": ["", ""]})
    fig = compare.plot_params_vs_loss(df)
    assert isinstance(fig, Figure) and fig.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in fig.axes[0].texts] == ["a", "b"]
    speed = compare.plot_speed(df)
    assert len(speed.axes[0].patches) == 4
    empty = compare.plot_speed(df.assign(error="boom"))
    assert "nothing to plot" in empty.axes[0].texts[0].get_text()
    one = compare.plot_params_vs_loss(df.head(1))  # no one-point scatter
    assert "nothing to compare" in one.axes[0].texts[0].get_text()


def test_notebook_runs_with_papermill(tmp_path: Path) -> None:
    import papermill as pm

    out_nb = tmp_path / "02_out.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "02_model_comparison.ipynb"), str(out_nb), kernel_name="python3", cwd=str(tmp_path),
        progress_bar=False,
        parameters=dict(data_dir="", backbones="test_convnext, test_vit, not_a_model", steps=3, warmup_steps=1,
                        batch_size=4, image_size=32, eval_batches=1, infer_steps=1, synth_n=40, isolate=False,
                        num_threads=1, out_dir=str(tmp_path / "cmp")))
    df = pd.read_csv(tmp_path / "cmp" / "comparison.csv", keep_default_na=False)
    assert list(df["backbone"]) == ["test_convnext", "test_vit", "not_a_model"]
    assert list(df["error"] == "") == [True, True, False] and "not_a_model" in df.loc[2, "error"]
    import nbformat

    nb = nbformat.read(out_nb, as_version=4)
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the two plots, each shown once
    # run again into the same folder: the synthetic set made the first time is reused (it was refused as
    # "already holds a dataset"), and the comparison is written anew
    pm.execute_notebook(
        str(ROOT / "notebooks" / "02_model_comparison.ipynb"), str(out_nb), kernel_name="python3", cwd=str(tmp_path),
        progress_bar=False,
        parameters=dict(data_dir="", backbones="test_vit", steps=2, warmup_steps=1, batch_size=4, image_size=32,
                        eval_batches=1, infer_steps=1, synth_n=40, isolate=False, num_threads=1,
                        out_dir=str(tmp_path / "cmp")))
    assert list(pd.read_csv(tmp_path / "cmp" / "comparison.csv")["backbone"]) == ["test_vit"]


def test_stored_notebook_has_no_outputs_and_a_typed_parameters_cell() -> None:
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "02_model_comparison.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    lines = [ln for ln in params[0].source.splitlines() if ln and not ln.startswith("#")]
    assert all(": " in ln.split("=")[0] and "#" in ln for ln in lines)  # `name: type = value  # comment`


def test_screen_table_marks_the_picks_and_leaves_failed_rows_out() -> None:
    from tongue_nb.pipeline.compare import screen_table

    df = pd.DataFrame({"backbone": ["a", "b", "c"], "params_total_m": [1.0, 2.0, 9.0], "val_loss": [0.9, 0.5, 0.7],
                       "train_samples_per_s": [30.0, 10.0, 20.0], "error": ["", "", "boom"]})
    table = screen_table(df)
    assert list(table["backbone"]) == ["a", "b"] and "parameters (M)" in table.columns
    assert dict(zip(table["backbone"], table["pick"])) == {"a": "fastest", "b": "lowest val loss, largest"}


def test_compare_params_take_the_shared_fields_of_a_training_recipe(synth_dir: Path) -> None:
    from tongue_nb.train.params import TrainParams

    recipe = TrainParams(data_dir=str(synth_dir), image_size=96, batch_size=16, seed=3, split_seed=7, crop="crop_blank",
                         pretrained=False, device="cpu", num_threads=1)
    p = CompareParams.from_recipe(recipe, steps=5, warmup_steps=1)
    assert (p.data_dir, p.image_size, p.batch_size, p.seed, p.crop, p.pretrained, p.device, p.num_threads) == (
        str(synth_dir), 96, 16, 7, "crop_blank", False, "cpu", 1)  # the runs' split seed: the same split
    assert p.steps == 5 and CompareParams.from_recipe(TrainParams(image_size=0)).image_size == 224
    with pytest.raises(ParamError, match="device"):
        CompareParams(device="gpu0")


def test_the_comparison_never_writes_into_a_run_or_sweep_folder(synth_dir: Path, tmp_path: Path) -> None:
    """02 with out_dir a training run's folder put comparison.csv/json among the run's records."""
    from tongue_nb.pipeline.compare import CompareError, CompareParams, compare_backbones

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(CompareError, match=r"parameter out_dir: .*run holds a run"):
        compare_backbones(CompareParams(data_dir=str(synth_dir), steps=2, warmup_steps=1), ["test_vit"], out_dir=run)
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]
