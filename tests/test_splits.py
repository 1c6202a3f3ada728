"""splits.py: group-aware, deterministic, stratified over every task, honouring a given split column."""
import numpy as np
import pandas as pd
import pytest

from tongue_nb.data.splits import make_split, split_stats
from tongue_nb.data.tasks import Task, TaskSchema

SCHEMA = TaskSchema((
    Task("coat", "multiclass", ("white", "yellow", "grey")),
    Task("shape", "multilabel", ("spots", "cracks")),
    Task("teeth", "binary", ("teeth",)),
))


def _table(n_groups=300, seed=0, missing=0.1):
    """Patients with 1-5 photos each; labels mostly shared within a patient, imbalanced classes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    group = np.repeat([f"p{g:03d}" for g in range(n_groups)], sizes)
    n = len(group)
    coat_g = rng.choice(3, n_groups, p=[0.6, 0.3, 0.1])
    coat = np.repeat(coat_g, sizes).astype(np.int64)
    flip = rng.random(n) < 0.1  # some photos of one patient differ
    coat[flip] = rng.choice(3, flip.sum())
    coat[rng.random(n) < missing] = -1
    shape = (rng.random((n, 2)) < [0.3, 0.15]).astype(np.float32)
    shape[rng.random((n, 2)) < missing] = np.nan
    teeth = (rng.random((n, 1)) < 0.2).astype(np.float32)
    table = pd.DataFrame({"id": [f"img{i}.jpg" for i in range(n)], "group": group, "split": "",
                          "row": np.arange(n) + 2})
    return table, {"coat": coat, "shape": shape, "teeth": teeth}


def test_no_group_leak_and_sizes():
    table, targets = _table()
    split = make_split(table, targets, SCHEMA, seed=0)
    assert set(split) == {"train", "val", "test"}
    per_group = pd.Series(split).groupby(table["group"]).nunique()
    assert (per_group == 1).all()
    frac = pd.Series(split).value_counts(normalize=True)
    assert abs(frac["train"] - 0.70) < 0.03 and abs(frac["val"] - 0.15) < 0.03 and abs(frac["test"] - 0.15) < 0.03


def test_deterministic_for_seed():
    table, targets = _table()
    a = make_split(table, targets, SCHEMA, seed=3)
    b = make_split(table, targets, SCHEMA, seed=3)
    c = make_split(table, targets, SCHEMA, seed=4)
    assert (a == b).all()
    assert (a != c).any()
    perm = np.random.default_rng(1).permutation(len(table))
    shuffled_table = table.iloc[perm].reset_index(drop=True)
    shuffled = make_split(shuffled_table, {k: v[perm] for k, v in targets.items()}, SCHEMA, seed=3)
    # groups are processed in sorted order, so the row order of the table does not change the result
    assert (shuffled == a[perm]).all()


def test_stratified_over_every_task():
    table, targets = _table()
    split = make_split(table, targets, SCHEMA, seed=0)
    stats = split_stats(table, targets, SCHEMA, split)
    overall = split_stats(table, targets, SCHEMA, np.full(len(table), "train"))
    overall = overall[overall.split == "train"].set_index(["task", "label"])["fraction"]
    for s in ("val", "test"):
        part = stats[stats.split == s].set_index(["task", "label"])["fraction"]
        gap = (part - overall).abs()
        assert gap.max() < 0.05, f"{s}: class proportions far from overall:\n{gap}"


def test_stratification_beats_random_group_assignment():
    table, targets = _table(seed=2)
    split = make_split(table, targets, SCHEMA, seed=0)
    rng = np.random.default_rng(0)
    groups = table["group"].unique()
    rand_gap = []
    for _ in range(20):
        assign = dict(zip(groups, rng.choice(["train", "val", "test"], len(groups), p=[0.7, 0.15, 0.15])))
        rand_gap.append(_max_gap(table, targets, np.array([assign[g] for g in table["group"]])))
    assert _max_gap(table, targets, split) < np.median(rand_gap)


def _max_gap(table, targets, split):
    stats = split_stats(table, targets, SCHEMA, split)
    piv = stats.pivot_table(index=["task", "label"], columns="split", values="fraction")
    return float((piv[["val", "test"]].sub(piv["train"], axis=0)).abs().max().max())


def test_honours_given_split():
    table, targets = _table(n_groups=60)
    table.loc[table.group == "p000", "split"] = "test"
    table.loc[table.group == "p001", "split"] = "Val"  # case-insensitive
    first = table.index[table.group == "p002"][0]
    table.loc[first, "split"] = "train"  # one row of a group given: the whole group follows
    split = make_split(table, targets, SCHEMA, seed=0)
    assert (split[table.group == "p000"] == "test").all()
    assert (split[table.group == "p001"] == "val").all()
    assert (split[table.group == "p002"] == "train").all()


def test_given_split_errors_name_the_row():
    table, targets = _table(n_groups=10)
    table.loc[3, "split"] = "holdout"
    with pytest.raises(ValueError, match=r"line 5, column 'split': 'holdout' is not one of train, val, test"):
        make_split(table, targets, SCHEMA)
    table, targets = _table(n_groups=10)
    rows = table.index[table.group == table.group[table.group.duplicated()].iloc[0]]
    table.loc[rows[0], "split"] = "train"
    table.loc[rows[1], "split"] = "test"
    with pytest.raises(ValueError, match=r"group 'p\d+' is given two splits: 'train' on labels.csv line \d+ "
                                         r"and 'test' on labels.csv line \d+"):
        make_split(table, targets, SCHEMA)


def test_rare_class_reaches_val_and_test():
    table, targets = _table(n_groups=200, missing=0.0)
    coat = targets["coat"]
    coat[coat == 2] = 0
    # exactly three patients (one photo each is relabelled) carry the rare class
    for g in ("p010", "p020", "p030"):
        coat[np.flatnonzero(table.group == g)[0]] = 2
    split = make_split(table, targets, SCHEMA, seed=0)
    assert sorted(split[coat == 2]) == ["test", "train", "val"]


def test_ungrouped_rows_and_bad_fractions():
    table, targets = _table(n_groups=40)
    table = table.drop(columns=["group"])
    split = make_split(table, targets, SCHEMA, seed=0, val_fraction=0.2, test_fraction=0.0)
    assert set(split) == {"train", "val"}
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        make_split(table, targets, SCHEMA, val_fraction=1.5)
    with pytest.raises(ValueError, match="must be < 1"):
        make_split(table, targets, SCHEMA, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"targets\['coat'\] has 3 rows"):
        make_split(table, {"coat": np.zeros(3, np.int64)}, SCHEMA)


def test_split_stats_counts():
    table = pd.DataFrame({"id": list("abcd")})
    targets = {"coat": np.array([0, 1, -1, 1]), "shape": np.array([[1, 0], [np.nan, 1], [0, 0], [1, 1]], np.float32),
               "teeth": np.array([[1], [0], [np.nan], [1]], np.float32)}
    st = split_stats(table, targets, SCHEMA, np.array(["train", "train", "train", "val"]))
    assert list(st.columns[:5]) == ["split", "task", "label", "count", "missing"]
    row = st.set_index(["split", "task", "label"])
    assert row.loc[("train", "coat", "yellow"), "count"] == 1 and row.loc[("train", "coat", "white"), "missing"] == 1
    assert row.loc[("train", "shape", "spots"), "count"] == 1 and row.loc[("train", "shape", "spots"), "missing"] == 1
    assert row.loc[("val", "teeth", "teeth"), "count"] == 1
    assert row.loc[("test", "coat", "grey"), "count"] == 0
