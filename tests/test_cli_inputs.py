"""Issue 28, left from the last round: a train split weighted all zero, and `--out` below missing folders."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tongue_nb.data.synth import make_synthetic
from tongue_nb.pipeline.cli import main as cli_main

TINY = ["--backbone", "test_convnext", "--set", "pretrained=false", "--set", "stage1_epochs=0",
        "--set", "stage2_epochs=1", "--set", "max_steps_per_epoch=1", "--set", "image_size=32",
        "--set", "num_threads=1", "--set", "batch_size=8"]


@pytest.fixture(autouse=True)
def _one_openmp_thread():
    """HistGradientBoosting's OpenMP threads spin-wait: on a shared 2-core machine they slow down 10x."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("inputs") / "data", n=40, size=32, seed=0)


def _weighted_copy(data: Path, folder: Path, train_weight: str) -> Path:
    """The dataset with a split given per group (every fifth group val, the next test) and the train rows'
    weight set to `train_weight` (val and test rows weigh 1)."""
    import shutil

    shutil.copytree(data, folder)
    table = pd.read_csv(folder / "labels.csv", dtype=str, keep_default_na=False)
    group = pd.factorize(table["group"])[0] % 5
    table["split"] = ["val" if g == 0 else "test" if g == 1 else "train" for g in group]
    table["weight"] = [train_weight if s == "train" else "1" for s in table["split"]]
    table.to_csv(folder / "labels.csv", index=False)
    return folder


def test_a_train_split_weighted_all_zero_is_refused(data, tmp_path, capsys) -> None:
    """val and test weigh 1, every train row 0: `train` and `baseline` stop before writing, exit 2, one line."""
    zero = _weighted_copy(data, tmp_path / "zero", "0")
    n_train = int((pd.read_csv(zero / "labels.csv")["split"] == "train").sum())
    message = (f"{zero / 'labels.csv'}: column 'weight': all {n_train} rows of the train split have weight 0, "
               "so no training sample would count")
    for argv in (["train", "--data", str(zero), "--out", str(tmp_path / "net"), *TINY],
                 ["baseline", "--data", str(zero), "--out", str(tmp_path / "base"), "--set", "image_size=32"]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "net").exists() and not (tmp_path / "base").exists()

    some = _weighted_copy(data, tmp_path / "some", "0.5")  # any train weight > 0 is a usable split
    assert cli_main(["baseline", "--data", str(some), "--out", str(tmp_path / "base"), "--set", "image_size=32"]) == 0


def test_missing_parents_of_out_are_created(data, tmp_path) -> None:
    """Every writer creates the folders above its output, like `mkdir -p` (docs/reliability.md)."""
    net, base = tmp_path / "a" / "b" / "net", tmp_path / "c" / "d" / "base"
    assert cli_main(["train", "--data", str(data), "--out", str(net), *TINY]) == 0
    assert (net / "summary.json").is_file()
    assert cli_main(["baseline", "--data", str(data), "--out", str(base), "--set", "image_size=32"]) == 0
    assert (base / "summary.json").is_file()
    table = tmp_path / "e" / "f" / "photos.csv"
    assert cli_main(["predict", "--run", str(base), "--images", str(data / "images"), "--out", str(table)]) == 0
    assert len(pd.read_csv(table)) == 40
    onnx = tmp_path / "g" / "h" / "net.onnx"
    assert cli_main(["export", "--run", str(net), "--out", str(onnx)]) == 0 and onnx.is_file()
    synth = tmp_path / "i" / "j" / "synth"
    assert cli_main(["synth", str(synth), "--n", "6", "--size", "32"]) == 0 and (synth / "labels.csv").is_file()
