"""Experiment tracking, read back with the trackers' own readers: TensorBoard's EventAccumulator, MLflow's client."""
import json
import logging
import shutil

import pytest

from tongue_nb.analysis.metrics import REPORTED
from tongue_nb.data.synth import make_synthetic
from tongue_nb.pipeline import sweep as sweep_mod
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.train import tracking
from tongue_nb.train.params import ParamError, load_params
from tongue_nb.train.trainer import TrainingError, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", n=48, size=48, seed=2)


def tiny(data, out_dir, **kw):
    values = dict(backbone="test_convnext", data_dir=str(data), out_dir=str(out_dir), image_size=32, pretrained=False,
                  batch_size=8, stage1_epochs=1, stage2_epochs=1, progress=False, warmup_epochs=0.0, num_threads=1)
    return load_params(**{**values, **kw})


class Stop(Exception):
    pass


def interrupted_then_resumed(params, stop_after: int, rewind_to: int = 0) -> dict:
    """Train until epoch `stop_after` ends (an exception from the epoch hook: a kill after that epoch), optionally
    put back the last.pt of epoch `rewind_to` (a kill before the later epochs' checkpoint was written), resume."""
    run = params.out_dir
    last = f"{run}/checkpoints/last.pt"

    def hook(row):
        if row["epoch"] == rewind_to:
            shutil.copy(last, f"{run}/last-{rewind_to}.pt")
        if row["epoch"] == stop_after:
            raise Stop

    with pytest.raises(Stop):
        train(params, on_epoch_end=hook)
    if rewind_to:
        shutil.copy(f"{run}/last-{rewind_to}.pt", last)
    return train(load_params(**{**params.as_dict(), "resume": True}))


def test_tensorboard_events_read_back_once_per_epoch_across_a_resume(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    # Epochs 1-2 written, then the run resumes from epoch 1's checkpoint: epoch 2 is written again and must count once.
    summary = interrupted_then_resumed(tiny(data, run, stage2_epochs=2, tracking="tensorboard"), 2, rewind_to=1)
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    task = summary["final_metrics_fixed"]["tasks"].keys().__iter__().__next__()
    for tag in ("loss/train", "loss/val", "val/combined", f"val/{task}/{REPORTED[0][0]}", "lr/head_decay",
                "time/epoch_seconds", "time/train_samples_per_s"):
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3], tag
    assert [e.step for e in ea.Scalars("lr/backbone_decay")] == [2, 3]  # stage 2 trains the backbone
    assert ea.Scalars("test/thresholded/combined")[0].value == pytest.approx(
        summary["final_metrics_thresholded"]["combined_score"])
    assert set(tags["images"]) == {"test/confusion_matrices", "test/roc_pr_curves"}
    assert [e.step for e in ea.Images("test/roc_pr_curves")] == [3]
    assert "params/text_summary" in tags["tensors"] and len(ea.Tensors("params/text_summary")) == 1  # not on resume
    assert b"backbone: test_convnext" in ea.Tensors("params/text_summary")[0].tensor_proto.string_val[0]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(ea.PluginTagToContent("hparams"))


def test_mlflow_runs_of_one_folder_are_one_experiment_and_resume_their_run(data, tmp_path):
    from mlflow.tracking import MlflowClient

    parent = tmp_path / "sweep-a" / "runs"
    first = train(tiny(data, parent / "one", tracking="mlflow"))
    second = tiny(data, parent / "two", tracking="mlflow")
    with pytest.raises(Stop):
        train(second, on_epoch_end=lambda row: (_ for _ in ()).throw(Stop()))
    run_id = json.loads((parent / "two" / tracking.MLFLOW_RUN_FILE).read_text())["run_id"]
    train(load_params(**{**second.as_dict(), "resume": True}))
    record = json.loads((parent / "two" / tracking.MLFLOW_RUN_FILE).read_text())
    assert record["run_id"] == run_id  # the resumed run goes on in the same MLflow run
    assert record["tracking_uri"] == f"sqlite:///{parent.resolve()}/mlruns/mlflow.db"

    client = MlflowClient(record["tracking_uri"])
    experiment = client.get_experiment_by_name("runs")  # no sweep: the parent folder's name
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"one", "two"}
    run = found["two"]
    assert run.info.status == "FINISHED" and run.data.params["backbone"] == "test_convnext"
    assert run.data.params["stage2_epochs"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "time/train_samples_per_s")] == [1, 2]
    assert found["one"].data.metrics["test/fixed/combined"] == pytest.approx(
        first["final_metrics_fixed"]["combined_score"])
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "params.yaml", "history.csv", "checkpoints", "figures"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.safetensors"]
    assert {a.path for a in client.list_artifacts(run_id, "figures")} == {"figures/confusion_matrices.png",
                                                                          "figures/roc_pr_curves.png"}
    html = tmp_path / "03_train-two.html"
    html.write_text("<html>the run's page</html>")
    tracking.attach_report(parent / "two", html)  # what a sweep does once it has rendered the page
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/03_train-two.html"]


def test_a_sweep_names_one_experiment_for_its_runs(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage1_epochs: 1\n")
    extra = sweep_mod._parse_overrides(["tracking=mlflow"])
    assert sweep_mod._tracking_experiment(recipe, extra, 0, tmp_path / "sweep-x", "test_convnext") == {"tracking_experiment": "sweep-x"}
    named = sweep_mod._parse_overrides(["tracking_experiment=mine"])
    assert sweep_mod._tracking_experiment(recipe, named, 0, tmp_path / "sweep-x", "test_convnext") == {}
    recipe.write_text("tracking_experiment: lab\n")
    assert sweep_mod._tracking_experiment(recipe, extra, 0, tmp_path / "sweep-x", "test_convnext") == {}
    assert sweep_mod._parse_overrides(["tracking=none"]) == {"tracking": "none"}


def test_none_writes_nothing_and_a_failing_tracker_never_costs_the_run(data, tmp_path, monkeypatch, caplog):
    train(tiny(data, tmp_path / "quiet" / "run", stage2_epochs=0, tracking="none"))
    assert sorted(p.name for p in (tmp_path / "quiet").iterdir()) == ["run"]
    assert not (tmp_path / "quiet" / "run" / "tensorboard").exists()
    assert not (tmp_path / "quiet" / "run" / tracking.MLFLOW_RUN_FILE).exists()

    def broken(self, step, scalars):
        raise OSError("disk gone")

    monkeypatch.setattr(tracking.TensorBoardTracker, "epoch", broken)
    with caplog.at_level(logging.WARNING, logger="tongue_nb.train.tracking"):
        summary = train(tiny(data, tmp_path / "broken", stage2_epochs=2, tracking="tensorboard"))
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "tongue_nb.train.tracking"]
    assert len(warnings) == 1 and "disk gone" in warnings[0] and "training goes on" in warnings[0]


def test_bad_tracking_value_and_unreachable_server_are_one_line(data, tmp_path, capsys):
    with pytest.raises(ParamError) as bad:
        load_params(tracking="wandb")
    assert str(bad.value) == "parameter tracking: got 'wandb', expected one of ['tensorboard', 'mlflow', 'none']"
    argv = ["train", "--backbone", "test_convnext", "--out", str(tmp_path / "cli"), "--set", "tracking=wandb"]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

    run = tmp_path / "run"
    no_server = r"^parameter tracking_uri: no MLflow server answers at http://127\.0\.0\.1:9 \("
    with pytest.raises(TrainingError, match=no_server):
        train(tiny(data, run, tracking="mlflow", tracking_uri="http://127.0.0.1:9"))
    assert not (run / "checkpoints").exists() and not (run / "params.yaml").exists()  # stopped before training


def test_the_environment_sets_only_the_default(monkeypatch):
    monkeypatch.setenv("TONGUE_NB_TRACKING", "mlflow")
    assert load_params().tracking == "mlflow"
    assert load_params(overrides=["tracking=tensorboard"]).tracking == "tensorboard"
    monkeypatch.delenv("TONGUE_NB_TRACKING")
    assert load_params().tracking == "tensorboard"
