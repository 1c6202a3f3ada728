"""Deterministic, group-aware, multi-task stratified train/val/test split, and per-split label statistics."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import pandas as pd

from tongue_nb.checks import check_int

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _where(table: pd.DataFrame, i: int) -> str:
    """'line N' (labels.csv line) when the table knows it, else 'row N' (0-based position)."""
    if "row" in table.columns:
        return f"labels.csv line {int(table['row'].iloc[i])}"
    return f"row {i}"


def given_splits(table: pd.DataFrame) -> np.ndarray:
    """The table's `split` column normalised ('' = to be assigned), each value checked."""
    n = len(table)
    if "split" not in table.columns:
        return np.full(n, "", dtype=object)
    out = np.empty(n, dtype=object)
    for i, v in enumerate(table["split"]):
        s = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip().lower()
        if s not in ("",) + SPLITS:
            raise ValueError(f"{_where(table, i)}, column 'split': {v!r} is not one of {', '.join(SPLITS)} (or empty)")
        out[i] = s
    return out


def _groups(table: pd.DataFrame) -> np.ndarray:
    """Group id per row: the `group` column, else the sample id (each sample its own group)."""
    n = len(table)
    fallback = table["id"] if "id" in table.columns else (table["image"] if "image" in table.columns else None)
    base = [str(x) for x in fallback] if fallback is not None else [f"#{i}" for i in range(n)]
    if "group" not in table.columns:
        return np.asarray(base, dtype=object)
    out = []
    for g, b in zip(table["group"], base):
        empty = g is None or (isinstance(g, float) and np.isnan(g)) or str(g).strip() == ""
        out.append(b if empty else str(g).strip())
    return np.asarray(out, dtype=object)


def label_matrix(targets: Mapping[str, np.ndarray], schema) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Per-row 0/1 indicator [N, L] of every (task, label value) to stratify on; missing labels are all-zero.

    Multiclass: one column per class. Binary and multilabel: a positive and a negative column per
    label, so that a label that is nearly always present has its rare negatives spread too.
    """
    cols: list[np.ndarray] = []
    names: list[tuple[str, str]] = []
    for task in schema:
        y = np.asarray(targets[task.name])
        if task.kind == "multiclass":
            for j, lab in enumerate(task.labels):
                cols.append(y == j)
                names.append((task.name, lab))
        else:
            y = y.reshape(len(y), task.n_outputs)
            for j, lab in enumerate(task.labels):
                col = y[:, j]
                cols.append(col > 0.5)
                names.append((task.name, lab))
                cols.append(col <= 0.5)  # NaN compares False: missing stays out of both columns
                names.append((task.name, f"not {lab}"))
    n = len(next(iter(targets.values()))) if targets else 0
    mat = np.stack(cols, axis=1).astype(np.float64) if cols else np.zeros((n, 0))
    return mat, names


def _assign_groups(per_group: np.ndarray, sizes: np.ndarray, frac: np.ndarray, fixed: np.ndarray, seed: int,
                   at_least_one: tuple[int, ...] = ()) -> np.ndarray:
    """Assign each group to one of len(frac) bins by greedy iterative stratification; returns the bin per group.

    per_group: [G, L] label counts per group; sizes: [G] rows per group; frac: the bins' target fractions;
    fixed: [G] a bin already given (>= 0) or -1. Groups holding the rarest label values go first (larger groups
    before smaller), each to the bin furthest below its target count for the group's rarest label value, then
    for all its labels, then for its size. Bins in `at_least_one` aim for at least one example of every label
    value that has an example to spare for every active bin; the first bin takes the rest of those. The seed
    only breaks ties.
    """
    n_groups, n_labels = per_group.shape
    n_bins = len(frac)
    n = float(sizes.sum())
    group_bin = fixed.copy()
    totals = per_group.sum(axis=0)
    active = frac > 0
    desired = frac[:, None] * totals[None, :]
    enough = totals >= active.sum()
    for b in at_least_one:
        if active[b]:
            desired[b] = np.where(enough & (totals > 0), np.maximum(desired[b], 1.0), desired[b])
    if at_least_one:
        others = [b for b in range(1, n_bins)]
        desired[0] = np.maximum(totals - desired[others].sum(axis=0), 0.0)
    desired_size = frac * n

    current = np.zeros((n_bins, n_labels))
    cur_size = np.zeros(n_bins)
    for g in np.flatnonzero(group_bin >= 0):
        current[group_bin[g]] += per_group[g]
        cur_size[group_bin[g]] += sizes[g]

    rng = np.random.default_rng(seed)
    tiebreak = rng.random(n_groups)
    free = np.flatnonzero(group_bin < 0)
    has = per_group > 0
    rarity = np.where(has, totals[None, :], np.inf).min(axis=1) if n_labels else np.full(n_groups, np.inf)
    # lexsort: last key is primary -> rarest label first, then larger groups, then the seeded tiebreak
    order = free[np.lexsort((tiebreak[free], -sizes[free], rarity[free]))]
    bin_tiebreak = rng.random((n_groups, n_bins))
    safe_totals = np.maximum(totals, 1.0)
    for g in order:
        labs = np.flatnonzero(has[g])
        if labs.size:
            rarest = labs[np.argmin(totals[labs])]
            primary = desired[:, rarest] - current[:, rarest]
            secondary = ((desired[:, labs] - current[:, labs]) * per_group[g, labs] / safe_totals[labs]).sum(axis=1)
        else:
            primary = np.zeros(n_bins)
            secondary = np.zeros(n_bins)
        size_deficit = (desired_size - cur_size) / max(n, 1.0)
        keys = np.stack([bin_tiebreak[g], size_deficit, secondary, primary])
        keys[:, ~active] = -np.inf  # a bin with fraction 0 never receives anything
        best = np.lexsort(keys)[-1]  # the largest (primary, secondary, size deficit, random)
        group_bin[g] = best
        current[best] += per_group[g]
        cur_size[best] += sizes[g]
    return group_bin


def make_split(table: pd.DataFrame, targets: Mapping[str, np.ndarray], schema, seed: int = 0,
               val_fraction: float = 0.15, test_fraction: float = 0.15) -> np.ndarray:
    """Assign "train"/"val"/"test" per row: honours a given `split`, keeps each `group` whole, stratifies every task.

    Greedy iterative stratification over groups: groups holding the rarest label values go first (larger
    groups before smaller), each to the split furthest below its target count for the group's rarest
    label value, then for all its labels, then for its size. Val and test aim for at least one example of
    every label value that has enough examples. Deterministic for a seed (the seed only breaks ties).
    """
    check_int("seed (of the split)", seed, 0)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(f, (int, float)) and 0.0 <= f < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (the rest is train), got "
                         f"{val_fraction} + {test_fraction}")
    n = len(table)
    for name, arr in targets.items():
        if len(arr) != n:
            raise ValueError(f"targets[{name!r}] has {len(arr)} rows but the table has {n}")
    given = given_splits(table)
    groups = _groups(table)
    codes, uniques = pd.factorize(pd.Series(groups, dtype=object), sort=True)
    n_groups = len(uniques)

    # A group's split: the one given on any of its rows; two different given splits is a leak we refuse.
    group_split = np.full(n_groups, -1, dtype=np.int64)
    for i in np.flatnonzero(given != ""):
        s = SPLITS.index(given[i])
        g = codes[i]
        if group_split[g] not in (-1, s):
            other = next(j for j in np.flatnonzero(codes == g) if given[j] and given[j] != given[i])
            raise ValueError(f"group {uniques[g]!r} is given two splits: {given[other]!r} on {_where(table, other)} "
                             f"and {given[i]!r} on {_where(table, i)}; a group must stay in one split")
        group_split[g] = s

    y, _ = label_matrix(targets, schema)
    per_group = np.zeros((n_groups, y.shape[1]))
    np.add.at(per_group, codes, y)
    sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)
    frac = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    group_split = _assign_groups(per_group, sizes, frac, group_split, seed, at_least_one=(1, 2))

    out = np.asarray([SPLITS[s] for s in group_split[codes]], dtype=object)
    counts = {s: int((out == s).sum()) for s in SPLITS}
    log.info("split: %s (%d groups, %d rows given)", counts, n_groups, int((given != "").sum()))
    return out.astype(str)


def split_stats(table: pd.DataFrame, targets: Mapping[str, np.ndarray], schema, split) -> pd.DataFrame:
    """Per split, task and label: count of samples with it, samples missing it, samples labelled, fraction."""
    split = np.asarray(split, dtype=object)
    if len(split) != len(table):
        raise ValueError(f"split has {len(split)} entries but the table has {len(table)} rows")
    rows = []
    for s in SPLITS:
        sel = split == s
        for task in schema:
            y = np.asarray(targets[task.name])[sel]
            if task.kind == "multiclass":
                labelled = int((y >= 0).sum())
                for j, lab in enumerate(task.labels):
                    c = int((y == j).sum())
                    rows.append((s, task.name, lab, c, int(sel.sum()) - labelled, labelled))
            else:
                y = y.reshape(len(y), task.n_outputs)
                for j, lab in enumerate(task.labels):
                    col = y[:, j]
                    labelled = int((~np.isnan(col)).sum())
                    rows.append((s, task.name, lab, int((col > 0.5).sum()), int(np.isnan(col).sum()), labelled))
    df = pd.DataFrame(rows, columns=["split", "task", "label", "count", "missing", "labelled"])
    df["fraction"] = np.where(df["labelled"] > 0, df["count"] / df["labelled"].clip(lower=1), np.nan)
    return df


def make_folds(table: pd.DataFrame, targets: Mapping[str, np.ndarray], schema, split, folds: int,
               seed: int = 0) -> np.ndarray:
    """Cut the rows outside the test split into `folds` group-aware, stratified folds; returns the fold per row.

    The test rows of `split` (make_split's answer, or the given split column) are set aside untouched and
    get -1; every other row gets a fold 0..folds-1, with each `group` whole in one fold and every task's
    label values spread over the folds as evenly as the groups allow (the same greedy stratification as
    make_split, over equal fractions). A `fold` column of the table presets folds: its groups keep the fold
    given and the others are spread around them. Deterministic for a seed; a different seed repeats the cut
    differently (repeated cross-validation).
    """
    check_int("folds", folds, 2)
    check_int("seed (of the folds)", seed, 0)
    split = np.asarray(split, dtype=object)
    n = len(table)
    if len(split) != n:
        raise ValueError(f"split has {len(split)} entries but the table has {n} rows")
    pool = np.flatnonzero(split != "test")
    groups = _groups(table)
    codes, uniques = pd.factorize(pd.Series(groups[pool], dtype=object), sort=True)
    if len(uniques) < folds:
        raise ValueError(f"folds: {folds} folds need at least {folds} groups (patients) outside the test split; "
                         f"the data has {len(uniques)}")
    y, _ = label_matrix({k: np.asarray(v)[pool] for k, v in targets.items()}, schema)
    per_group = np.zeros((len(uniques), y.shape[1]))
    np.add.at(per_group, codes, y)
    sizes = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
    fixed = _preset_folds(table, split, folds, pool, codes, uniques)
    group_fold = _assign_groups(per_group, sizes, np.full(folds, 1.0 / folds), fixed, seed)
    out = np.full(n, -1, dtype=np.int64)
    out[pool] = group_fold[codes]
    per_fold = np.bincount(out[pool], minlength=folds)
    if (per_fold == 0).any():
        raise ValueError(f"folds: fold {int(np.argmin(per_fold))} has no rows (rows per fold {per_fold.tolist()}); "
                         "the preset fold column leaves no group to give it: preset every fold, or fewer folds")
    preset = int((fixed[codes] >= 0).sum())
    log.info("folds: %s rows per fold, %d test rows set aside%s", per_fold.tolist(), n - len(pool),
             f", {preset} rows in the fold labels.csv gives them" if preset else "")
    return out


def keep_preset_folds_out_of_test(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the groups that labels.csv gives a fold kept out of the test split: their rows without a
    given split take their group's given one, else train (under folds train and val are pooled alike). A group
    given a fold and the test split is refused, naming both lines."""
    given = given_splits(table)
    groups = _groups(table)
    preset = np.asarray(table["fold"]) >= 0
    group_split: dict[Any, int] = {}
    for i in np.flatnonzero(given != ""):
        group_split.setdefault(groups[i], i)
    fill = given.copy()
    for i in np.flatnonzero(preset):
        j = group_split.get(groups[i])
        if j is not None and given[j] == "test":
            raise ValueError(f"{_where(table, i)}, column 'fold': fold {int(table['fold'].iloc[i])} for group "
                             f"{groups[i]!r}, which {_where(table, j)} puts in the test split; the test split is set "
                             "aside from the folds (leave the fold empty, or the split not test)")
        if given[i] == "":
            fill[i] = given[j] if j is not None else "train"
    return table.assign(split=fill)


def _preset_folds(table: pd.DataFrame, split: np.ndarray, folds: int, pool: np.ndarray, codes: np.ndarray,
                  uniques: Any) -> np.ndarray:
    """Each pool group's preset fold from the table's `fold` column (-1: to be assigned), each value checked."""
    fixed = np.full(len(uniques), -1, dtype=np.int64)
    if "fold" not in table.columns:
        return fixed
    given = np.asarray(table["fold"], dtype=np.int64)
    for i in np.flatnonzero(given >= folds):
        raise ValueError(f"{_where(table, i)}, column 'fold': fold {given[i]} but folds is {folds} (folds 0 .. "
                         f"{folds - 1}); set folds to the data's number of folds")
    for i in np.flatnonzero((given >= 0) & (split == "test")):
        raise ValueError(f"{_where(table, i)}, column 'fold': fold {given[i]} on a test row; the test split is set "
                         "aside from the folds (leave its fold empty, or its split not test)")
    for pos, i in enumerate(pool):
        if given[i] < 0:
            continue
        g = codes[pos]
        if fixed[g] not in (-1, given[i]):
            other = next(pool[q] for q in np.flatnonzero(codes == g) if given[pool[q]] not in (-1, given[i]))
            raise ValueError(f"group {uniques[g]!r} is given two folds: {given[other]} on {_where(table, other)} and "
                             f"{given[i]} on {_where(table, i)}; a group must stay in one fold")
        fixed[g] = given[i]
    return fixed


def fold_split(split, fold_of_row: np.ndarray, fold: int) -> np.ndarray:
    """The train/val/test split of one cross-validation run: fold `fold` validates, the other folds train, the
    test rows stay test."""
    split = np.asarray(split, dtype=object)
    out = np.where(fold_of_row == fold, "val", "train").astype(object)
    out[split == "test"] = "test"
    return out.astype(str)


def check_train_weights(labels, train_rows: np.ndarray) -> None:
    """LabelError when every train row of `labels` (a tasks.Labels) has `weight` 0.

    Such a train split teaches nothing (no sample counts in the loss or the boosting), while the val and test
    rows, weighted, would still score the untrained model as if it were a result. `load_labels` already refuses
    a column of zeros; this is the same refusal for the train rows a run actually uses, so the trainer and the
    baseline call it with their train rows (after the split, and after unreadable images are left out).
    """
    from tongue_nb.data.labels import LabelError

    weights = labels.table["weight"].to_numpy(np.float64)[np.asarray(train_rows, dtype=np.int64)]
    if len(weights) and not (weights > 0).any():
        raise LabelError(f"{labels.root / 'labels.csv'}: column 'weight': all {len(weights)} rows of the train split "
                         "have weight 0, so no training sample would count; expected at least one train row with a "
                         "weight > 0 (an empty cell means 1): raise those weights or move weighted rows into train "
                         "(split column, split_seed)")
