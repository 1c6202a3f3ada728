"""The command line: subcommands reach the package functions; no --data means the built-in synthetic set."""
import json

import pytest

from tongue_nb.pipeline import cli
from tongue_nb.data.synth import make_synthetic


def test_synth_then_compare_with_a_failing_backbone(tmp_path, capsys):
    data = tmp_path / "syn"
    assert cli.main(["synth", str(data), "--n", "30", "--size", "48", "--seed", "3"]) == 0
    assert (data / "labels.csv").exists() and (data / "tasks.yaml").exists()
    code = cli.main(["compare", "--data", str(data), "--backbones", "test_convnext", "no_such_net", "--steps", "3",
                     "--warmup-steps", "1", "--image-size", "32", "--batch-size", "4", "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 1  # one backbone failed: its row holds the error, the command says so
    assert "no_such_net" in out and "unknown backbone" in out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["recommendations"]["lowest_val_loss"] == "test_convnext"


def test_baseline_without_data_uses_the_synthetic_set(tmp_path, capsys):
    assert cli.main(["baseline", "--out", str(tmp_path / "bl"), "--image-size", "32"]) == 0
    assert "test combined score" in capsys.readouterr().out
    summary = json.loads((tmp_path / "bl" / "summary.json").read_text())
    assert summary["backbone"] == "classical-baseline" and summary["counts"]["test"]["samples"] > 0


@pytest.mark.parametrize("argv, message", [
    (["synth", "OUT", "--n", "0"], "n"),
    (["import-tonguexpert", "/no/such/db", "OUT"], "/no/such/db"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tongue-nb {argv[0]}: error:") and message in err


@pytest.mark.parametrize("argv", [
    ["train", "--data", "", "--backbone", "test_convnext", "--out", "OUT"],
    ["train", "--data", "  ", "--backbone", "test_convnext", "--out", "OUT", "--resume"],
    ["sweep", "--data", "", "--backbones", "test_convnext", "--out", "OUT"],
    ["compare", "--data", "", "--backbones", "test_convnext", "--out", "OUT"],
    ["baseline", "--data", "", "--out", "OUT"],
], ids=["train", "train-blank-resume", "sweep", "compare", "baseline"])
def test_empty_data_is_refused_not_the_synthetic_set(tmp_path, capsys, monkeypatch, argv):
    # `--data "$DATA"` with DATA unset: only an absent --data means the built-in synthetic set.
    import tongue_nb.data.synth

    def no_synthetic(*args, **kwargs):
        raise AssertionError("the synthetic set was used")

    monkeypatch.setattr(tongue_nb.data.synth, "ensure_synthetic", no_synthetic)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tongue-nb {argv[0]}: error: --data: got ")
    assert "leave --data out to use the built-in synthetic set" in err
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_an_empty_data_dir_from_python(tmp_path):
    from tongue_nb.pipeline import sweep

    with pytest.raises(sweep.SweepError, match=r"data_dir \(--data\) is '', expected a dataset folder"):
        sweep.run_sweep("", ["test_convnext"], out_dir=tmp_path / "s", reports_dir=tmp_path / "r", compare=False)
    assert not (tmp_path / "s").exists()


def test_module_entry_point_matches_console_script():
    parser = cli.build_parser()
    assert {"synth", "import-tonguexpert", "train", "compare", "baseline", "sweep"} <= set(
        parser._subparsers._group_actions[0].choices)


def test_sweep_folders_are_checked_before_anything_is_written(tmp_path):
    from tongue_nb.paths import FolderError
    from tongue_nb.pipeline.sweep import SweepError, run_sweep
    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=12, size=32, seed=0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FolderError, match=r"reports_dir \(--reports\)"):
        run_sweep(str(data), ["test_convnext"], out_dir=tmp_path / "sweep", reports_dir=tmp_path / "afile" / "rep")
    assert not (tmp_path / "sweep").exists()  # refused before the sweep folder was made
    with pytest.raises(SweepError, match="inside the dataset"):
        run_sweep(str(data), ["test_convnext"], out_dir=data / "sweep", reports_dir=tmp_path / "rep")
    assert not (data / "sweep").exists() and not (tmp_path / "rep").exists()


def test_bad_executor_options_are_refused_before_anything_is_written(tmp_path, capsys):
    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=12, size=32, seed=0)
    base = ["sweep", "--data", str(data), "--backbones", "test_convnext", "--out", str(tmp_path / "sweep"),
            "--reports", str(tmp_path / "rep")]
    for extra, expected in ((["--slurm-partition", "gpu"], "add --executor slurm"),
                            (["--executor", "slurm", "--slurm-option", "account"], "expected KEY=VALUE"),
                            (["--executor", "slurm", "--slurm-time-min", "0"], "time_min")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "sweep").exists() and not (tmp_path / "rep").exists()


def test_train_takes_the_recipes_backbone_and_refuses_none(tmp_path, capsys):
    data = make_synthetic(tmp_path / "syn", n=24, size=32, seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone: test_convnext\npretrained: false\nimage_size: 32\nstage1_epochs: 0\nstage2_epochs: 1\n"
                      "num_threads: 1\nbatch_size: 8\n")
    assert cli.main(["train", "--data", str(data), "-f", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert "backbone: test_convnext" in (tmp_path / "run" / "params.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no backbone given" in err and "--backbone" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()
