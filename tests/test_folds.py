"""The cross-validation cut: group-aware, stratified folds beside an untouched test split."""
import re

import numpy as np
import pandas as pd
import pytest

from tongue_nb.data import splits
from tongue_nb.data.tasks import Task, TaskSchema
from tongue_nb.train.params import ParamError, load_params


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n // 3, size=n)  # patients with one to several photos
    table = pd.DataFrame({"id": [f"img{i}.jpg" for i in range(n)], "image": [f"img{i}.jpg" for i in range(n)],
                          "group": [f"p{g}" for g in groups]})
    coat = rng.choice(3, size=n, p=[0.7, 0.25, 0.05]).astype(np.int64)
    coat[rng.random(n) < 0.2] = -1  # partly labelled
    fissure = (rng.random((n, 1)) < 0.1).astype(np.float32)
    fissure[rng.random(n) < 0.3] = np.nan
    schema = TaskSchema((Task("coat", "multiclass", ("white", "yellow", "grey")),
                         Task("fissure", "binary", ("fissure",))))
    return table, {"coat": coat, "fissure": fissure}, schema


def test_folds_keep_groups_whole_and_cover_every_non_test_row_once():
    table, targets, schema = _data()
    split = splits.make_split(table, targets, schema, seed=3)
    fold = splits.make_folds(table, targets, schema, split, 5, seed=3)
    test = split == "test"
    assert (fold[test] == -1).all()  # the test split is set aside untouched
    assert set(fold[~test]) == set(range(5))  # every other row in exactly one fold
    for _, rows in table.groupby("group").groups.items():
        assert len(set(fold[np.asarray(rows)])) == 1  # a patient never in two folds
    # each fold validates once: over the K runs every non-test row is out-of-fold exactly once
    seen = np.zeros(len(table), dtype=int)
    for k in range(5):
        run = splits.fold_split(split, fold, k)
        assert (run[test] == "test").all()
        seen += run == "val"
        assert set(np.flatnonzero(run == "val")).isdisjoint(np.flatnonzero(run == "train"))
    assert (seen[~test] == 1).all() and (seen[test] == 0).all()


def test_folds_are_balanced_and_stratified():
    table, targets, schema = _data(n=600, seed=1)
    split = splits.make_split(table, targets, schema, seed=0)
    fold = splits.make_folds(table, targets, schema, split, 4, seed=0)
    sizes = np.bincount(fold[fold >= 0], minlength=4)
    assert sizes.max() - sizes.min() <= 0.15 * sizes.mean()
    # every class of coat and both fissure values are spread over the folds near their share
    for cls in range(3):
        counts = np.bincount(fold[(fold >= 0) & (targets["coat"] == cls)], minlength=4)
        assert counts.min() >= 1 and counts.max() - counts.min() <= max(3, 0.35 * counts.mean())
    pos = np.bincount(fold[(fold >= 0) & (targets["fissure"][:, 0] == 1)], minlength=4)
    assert pos.min() >= 1 and pos.max() - pos.min() <= max(3, 0.35 * pos.mean())


def test_fold_cut_is_seeded():
    table, targets, schema = _data()
    split = splits.make_split(table, targets, schema, seed=0)
    a = splits.make_folds(table, targets, schema, split, 3, seed=0)
    assert (a == splits.make_folds(table, targets, schema, split, 3, seed=0)).all()
    assert (a != splits.make_folds(table, targets, schema, split, 3, seed=1)).any()  # repeated CV: another cut


def test_folds_need_enough_groups():
    table, targets, schema = _data(n=12)
    table["group"] = ["a", "b"] * 6
    split = np.array(["train"] * 12)
    with pytest.raises(ValueError, match="3 folds need at least 3 groups"):
        splits.make_folds(table, targets, schema, split, 3)
    with pytest.raises(ValueError, match="folds"):
        splits.make_folds(table, targets, schema, split, 1)


def test_fold_parameters_are_checked():
    assert load_params(folds=5, fold=4).fold == 4
    with pytest.raises(ParamError, match="folds: got 1"):
        load_params(folds=1)
    with pytest.raises(ParamError, match="expected 0 .. 4"):
        load_params(folds=5, fold=5)
    with pytest.raises(ParamError, match="sweep --folds 5"):
        load_params(folds=5)  # a single run trains one fold
    with pytest.raises(ParamError, match="a fold needs folds >= 2"):
        load_params(fold=0)


def test_a_given_split_keeps_its_test_rows_and_the_log_says_its_train_and_val_rows_go_into_the_folds(caplog):
    from types import SimpleNamespace

    from tongue_nb.train.trainer import run_split

    table, targets, schema = _data()
    groups = pd.factorize(table["group"])[0]
    table["split"] = np.where(groups % 5 == 0, "test", np.where(groups % 5 == 1, "val", "train"))
    labels = SimpleNamespace(table=table, targets=targets, schema=schema)
    with caplog.at_level("WARNING", logger="tongue_nb.train.trainer"):
        split = run_split(load_params(folds=3, fold=1), labels)
    n_train, n_val = int((table["split"] == "train").sum()), int((table["split"] == "val").sum())
    assert f"gives {n_train} train rows and {n_val} val rows; with folds=3 these rows are pooled" in caplog.text
    assert (split[table["split"] == "test"] == "test").all() and ((split == "test") == (table["split"] == "test")).all()
    with caplog.at_level("WARNING", logger="tongue_nb.train.trainer"):
        caplog.clear()
        run_split(load_params(), labels)  # without folds the given split is used as it is, nothing to say
    assert "pooled" not in caplog.text


def _preset(table: pd.DataFrame, every: int = 3) -> pd.DataFrame:
    """Preset the fold of every `every`-th patient (folds 0, 1, 2 in turn); the rest left to the cut."""
    number = pd.factorize(table["group"])[0]
    return table.assign(fold=np.where(number % every == 0, (number // every) % 3, -1), row=np.arange(len(table)) + 2)


def test_a_preset_fold_column_is_kept_and_the_other_patients_are_spread_around_it():
    table, targets, schema = _data(n=600)
    table = _preset(table)
    split = splits.make_split(splits.keep_preset_folds_out_of_test(table), targets, schema, seed=0)
    preset = table["fold"].to_numpy() >= 0
    assert (split[preset] != "test").all() and (split == "test").any()  # preset patients are never test
    fold = splits.make_folds(table, targets, schema, split, 3, seed=0)
    assert (fold[preset] == table["fold"].to_numpy()[preset]).all()
    sizes = np.bincount(fold[fold >= 0], minlength=3)
    assert sizes.max() - sizes.min() <= 0.15 * sizes.mean()
    for _, rows in table.groupby("group").groups.items():
        assert len(set(fold[np.asarray(rows)])) == 1


@pytest.mark.parametrize("change, says", [
    (lambda t, s: t.assign(fold=np.where(t["fold"] >= 0, 4, -1)), r"labels.csv line \d+, column 'fold': fold 4 but folds is 3"),
    (lambda t, s: t.assign(fold=np.where(s == "test", 1, t["fold"])), r"column 'fold': fold 1 on a test row"),
    (lambda t, s: t.assign(fold=np.where(np.arange(len(t)) == t.index[t["group"] == t["group"].iloc[0]][-1],
                                          (t["fold"].iloc[0] + 1) % 3, t["fold"])),
     r"group 'p\d+' is given two folds: \d on labels.csv line \d+ and \d on labels.csv line \d+"),
])
def test_a_preset_fold_that_cannot_be_kept_is_refused_naming_the_line(change, says):
    table, targets, schema = _data(n=600)
    first = table["group"].iloc[0]
    table = _preset(table).assign(fold=lambda t: np.where(t["group"] == first, 0, t["fold"]))
    while (table["group"] == first).sum() < 2:  # a patient with two photos, for the conflict case
        table.loc[table.index[1], "group"] = first
    split = splits.make_split(splits.keep_preset_folds_out_of_test(table), targets, schema, seed=0)
    with pytest.raises(ValueError, match=says):
        splits.make_folds(change(table, split), targets, schema, split, 3, seed=0)


def test_a_patient_given_a_fold_and_the_test_split_is_refused_naming_both_lines():
    table, _, _ = _data()
    table = _preset(table)
    group = table.loc[table["fold"] >= 0, "group"].iloc[0]
    rows = np.flatnonzero(table["group"] == group)
    table.loc[table.index[rows[0]], "split"] = "test"
    table.loc[table.index[rows], "fold"] = [-1] + [1] * (len(rows) - 1) if len(rows) > 1 else [1]
    with pytest.raises(ValueError, match=rf"column 'fold': fold 1 for group '{group}', which labels.csv line "
                                         rf"{rows[0] + 2} puts in the test split"):
        splits.keep_preset_folds_out_of_test(table)


def test_labels_csv_fold_column_is_read_checked_and_used_only_with_folds(tmp_path, caplog):
    from tongue_nb.data.labels import LabelError, load_labels
    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.train.trainer import run_split

    data = make_synthetic(tmp_path / "data", n=60, size=32, seed=0)
    raw = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    raw.assign(fold=["2" if i % 4 == 0 else "" for i in range(len(raw))]).to_csv(data / "labels.csv", index=False)
    labels = load_labels(data)
    assert (labels.table["fold"].to_numpy() == [2 if i % 4 == 0 else -1 for i in range(len(raw))]).all()
    with caplog.at_level("WARNING", logger="tongue_nb.train.trainer"):
        run_split(load_params(), labels)
    assert "fold column presets the fold of 15 rows; it is used with folds" in caplog.text
    split = run_split(load_params(folds=3, fold=2), labels)
    assert (split[labels.table["fold"].to_numpy() == 2] == "val").all()
    for bad in ("x", "1.5", "-1"):
        raw.assign(fold=[bad] + [""] * (len(raw) - 1)).to_csv(data / "labels.csv", index=False)
        with pytest.raises(LabelError, match=rf"labels.csv: line 2, column 'fold': '{re.escape(bad)}' is not a fold "
                                             r"number \(a whole number 0, 1, ... or empty\)"):
            load_labels(data)
