"""Metrics against scikit-learn on random data with missing labels; thresholds; bootstrap."""
import json
import time

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, precision_score,
                             recall_score, roc_auc_score)

from tongue_nb.analysis import metrics
from tongue_nb.analysis.metrics import bootstrap_ci, combined_score, compute_metrics, paired_bootstrap_diff, tune_thresholds
from tongue_nb.data.tasks import Task, TaskSchema

SCHEMA = TaskSchema((
    Task("shape", "multilabel", ("spots", "cracks", "teethmarks"), 0.5),
    Task("coat", "multiclass", ("greasy", "rotten", "nospecialgreasy", "rare"), 0.3),
    Task("fissure", "binary", ("fissure",), 0.2),
))


def random_data(n: int, seed: int, missing: float = 0.2):
    """Random probabilities and targets (with missing labels) in the contract's encodings."""
    rng = np.random.default_rng(seed)
    shape_t = (rng.random((n, 3)) < [0.3, 0.5, 0.1]).astype(np.float32)
    shape_t[rng.random((n, 3)) < missing] = np.nan
    coat_t = rng.choice(4, size=n, p=[0.5, 0.3, 0.18, 0.02]).astype(np.int64)
    coat_t[rng.random(n) < missing] = -1
    fis_t = (rng.random((n, 1)) < 0.4).astype(np.float32)
    fis_t[rng.random((n, 1)) < missing] = np.nan
    # Probabilities loosely correlated with the truth, rounded so that ties occur (AUROC tie handling).
    shape_p = np.clip(0.35 * np.nan_to_num(shape_t) + 0.65 * rng.random((n, 3)), 0, 1).round(2)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[np.maximum(coat_t, 0)]
    coat_p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    fis_p = np.clip(0.3 * np.nan_to_num(fis_t) + 0.7 * rng.random((n, 1)), 0, 1).round(2)
    return ({"shape": shape_p, "coat": coat_p, "fissure": fis_p},
            {"shape": shape_t, "coat": coat_t, "fissure": fis_t})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_sklearn_with_missing_labels(seed):
    probs, targets = random_data(300, seed)
    thresholds = {"shape": [0.3, 0.5, 0.62], "fissure": [0.45]}
    res = compute_metrics(SCHEMA, probs, targets, thresholds=thresholds)
    kw = {"zero_division": 0}
    # multilabel: per label on its labelled rows
    macro = []
    for j, label in enumerate(SCHEMA["shape"].labels):
        m = ~np.isnan(targets["shape"][:, j])
        y, p = targets["shape"][m, j].astype(int), probs["shape"][m, j]
        pred = (p >= thresholds["shape"][j]).astype(int)
        got = res["tasks"]["shape"]["per_label"][label]
        assert got["f1"] == pytest.approx(f1_score(y, pred, **kw))
        assert got["precision"] == pytest.approx(precision_score(y, pred, **kw))
        assert got["recall"] == pytest.approx(recall_score(y, pred, **kw))
        assert got["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert got["support"] == y.sum() and got["n"] == m.sum()
        macro.append(f1_score(y, pred, **kw))
    assert res["tasks"]["shape"]["macro_f1"] == pytest.approx(np.mean(macro))
    assert res["tasks"]["shape"]["primary"] == res["tasks"]["shape"]["macro_f1"]
    # multiclass: labelled rows only, argmax
    m = targets["coat"] >= 0
    y, pred = targets["coat"][m], probs["coat"][m].argmax(axis=1)
    got = res["tasks"]["coat"]
    assert got["n"] == m.sum()
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", **kw))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()
    per_class = f1_score(y, pred, average=None, labels=[0, 1, 2, 3], **kw)
    for i, name in enumerate(SCHEMA["coat"].labels):
        if got["per_class_f1"][name] is not None:
            assert got["per_class_f1"][name] == pytest.approx(per_class[i])
    # binary
    m = ~np.isnan(targets["fissure"][:, 0])
    y, p = targets["fissure"][m, 0].astype(int), probs["fissure"][m, 0]
    pred = (p >= 0.45).astype(int)
    got = res["tasks"]["fissure"]
    assert got["f1"] == pytest.approx(f1_score(y, pred, **kw)) and got["primary"] == got["f1"]
    assert got["precision"] == pytest.approx(precision_score(y, pred, **kw))
    assert got["recall"] == pytest.approx(recall_score(y, pred, **kw))
    assert got["auroc"] == pytest.approx(roc_auc_score(y, p))
    # combined: the schema's weights
    expected = (0.5 * res["tasks"]["shape"]["primary"] + 0.3 * res["tasks"]["coat"]["primary"]
                + 0.2 * res["tasks"]["fissure"]["primary"])
    assert res["combined_score"] == pytest.approx(expected)
    json.dumps(res)  # the summary writer needs plain JSON types


def test_multiclass_absent_class_and_zero_division_follow_sklearn():
    # Class 3 ("rare") is neither in the truth nor predicted: left out of macro F1, as sklearn does.
    schema = TaskSchema((SCHEMA["coat"],))
    y = np.array([0, 0, 1, 2, 1, -1])
    p = np.eye(4)[[0, 1, 1, 1, 1, 3]] * 0.7 + 0.075
    res = compute_metrics(schema, {"coat": p}, {"coat": y})["tasks"]["coat"]
    m = y >= 0
    assert res["macro_f1"] == pytest.approx(f1_score(y[m], p[m].argmax(1), average="macro", zero_division=0))
    assert res["per_class_f1"]["rare"] is None
    assert res["per_class_f1"]["nospecialgreasy"] == 0.0  # in the truth, never predicted


def test_missing_everything_and_single_class_auroc():
    probs, targets = random_data(40, 3)
    targets["fissure"][:] = np.nan  # no labelled sample: left out of the combined score
    targets["shape"][:, 1] = 0.0  # one class only: AUROC undefined
    res = compute_metrics(SCHEMA, probs, targets)
    assert res["tasks"]["fissure"]["primary"] is None and res["tasks"]["fissure"]["n"] == 0
    assert res["tasks"]["shape"]["per_label"]["cracks"]["auroc"] is None
    t = res["tasks"]
    assert res["combined_score"] == pytest.approx((0.5 * t["shape"]["primary"] + 0.3 * t["coat"]["primary"]) / 0.8)
    assert combined_score(SCHEMA, res) == pytest.approx(res["combined_score"])
    assert combined_score(SCHEMA, {"shape": 1.0, "coat": 0.0, "fissure": None}) == pytest.approx(0.5 / 0.8)


def test_bad_inputs_name_the_task():
    probs, targets = random_data(20, 0)
    with pytest.raises(ValueError, match="coat.*shape"):
        compute_metrics(SCHEMA, {**probs, "coat": probs["coat"][:, :3]}, targets)
    with pytest.raises(ValueError, match="fissure.*0, 1 or NaN"):
        compute_metrics(SCHEMA, probs, {**targets, "fissure": np.full((20, 1), 2.0)})
    with pytest.raises(ValueError, match="rows"):
        compute_metrics(SCHEMA, {**probs, "coat": probs["coat"][:10]}, targets)
    with pytest.raises(KeyError, match="fissure"):
        compute_metrics(SCHEMA, {k: v for k, v in probs.items() if k != "fissure"}, targets)
    with pytest.raises(ValueError, match=r"thresholds\['shape'\]"):
        compute_metrics(SCHEMA, probs, targets, thresholds={"shape": [0.5]})


def test_tune_thresholds_maximises_f1_with_ties_to_half():
    probs, targets = random_data(200, 5)
    thr = tune_thresholds(SCHEMA, probs, targets)
    assert set(thr) == {"shape", "fissure"} and len(thr["shape"]) == 3
    grid = metrics.DEFAULT_GRID
    for j in range(3):
        m = ~np.isnan(targets["shape"][:, j])
        y, p = targets["shape"][m, j].astype(int), probs["shape"][m, j]
        f1s = np.array([f1_score(y, (p >= g).astype(int), zero_division=0) for g in grid])
        best = grid[np.isclose(f1s, f1s.max())]
        assert thr["shape"][j] == pytest.approx(best[np.argmin(np.abs(best - 0.5))])
    # Perfectly separable at any threshold between 0.3 and 0.7: the tie goes to 0.5.
    one = TaskSchema((Task("fissure", "binary", ("fissure",)),))
    p = np.array([[0.2], [0.3], [0.7], [0.9], [0.1]])
    t = np.array([[0], [0], [1], [1], [np.nan]], dtype=np.float32)
    assert tune_thresholds(one, {"fissure": p}, {"fissure": t}) == {"fissure": [0.5]}
    # No positives at all: every threshold gives F1 = 0, keep 0.5.
    assert tune_thresholds(one, {"fissure": p}, {"fissure": np.zeros((5, 1), np.float32)}) == {"fissure": [0.5]}


def test_bootstrap_arithmetic_equals_compute_metrics_on_resamples():
    # The vectorised bootstrap scores a resample from summed indicator counts; it must agree with
    # compute_metrics run on the explicitly resampled rows.
    probs, targets = random_data(120, 7)
    thresholds = {"shape": [0.4, 0.5, 0.6], "fissure": [0.5]}
    ind, spans = metrics._indicator_matrix(SCHEMA, probs, targets, thresholds)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, 120, 120)
        w = np.bincount(idx, minlength=120).astype(np.float32)
        fast = metrics._scores(SCHEMA, (w[None] @ ind).astype(np.float64), spans)
        slow = compute_metrics(SCHEMA, {k: v[idx] for k, v in probs.items()},
                               {k: v[idx] for k, v in targets.items()}, thresholds)
        for name in SCHEMA.names:
            assert fast[name][0] == pytest.approx(slow["tasks"][name]["primary"])
        assert fast["__combined__"][0] == pytest.approx(slow["combined_score"])


def test_primary_scores_are_compute_metrics_primaries():
    probs, targets = random_data(90, 3)
    thresholds = {"shape": [0.3, 0.5, 0.7], "fissure": [0.6]}
    for thr in (None, thresholds):
        fast = metrics.primary_scores(SCHEMA, probs, targets, thr)
        slow = compute_metrics(SCHEMA, probs, targets, thr)
        assert set(fast) == set(SCHEMA.names) | {"__combined__"}
        for name in SCHEMA.names:
            assert fast[name] == pytest.approx(slow["tasks"][name]["primary"])
        assert fast["__combined__"] == pytest.approx(slow["combined_score"])


def test_bootstrap_ci_is_fast_deterministic_and_brackets_the_estimate():
    probs, targets = random_data(1000, 11)
    t0 = time.perf_counter()
    ci = bootstrap_ci(SCHEMA, probs, targets, n_boot=1000, seed=3)
    took = time.perf_counter() - t0
    assert took < 5.0, f"1000 bootstraps on 1000 samples took {took:.2f}s"
    full = compute_metrics(SCHEMA, probs, targets)
    assert ci["combined_score"]["estimate"] == pytest.approx(full["combined_score"])
    for name in SCHEMA.names:
        e = ci["tasks"][name]
        assert e["estimate"] == pytest.approx(full["tasks"][name]["primary"])
        assert e["low"] < e["estimate"] < e["high"]
        assert 0.005 < e["high"] - e["low"] < 0.3
    c = ci["combined_score"]
    assert c["low"] < c["estimate"] < c["high"]
    assert bootstrap_ci(SCHEMA, probs, targets, n_boot=50, seed=3) == bootstrap_ci(SCHEMA, probs, targets,
                                                                                    n_boot=50, seed=3)
    # Fewer samples -> wider interval (about sqrt(10) here).
    small = bootstrap_ci(SCHEMA, {k: v[:100] for k, v in probs.items()}, {k: v[:100] for k, v in targets.items()},
                         n_boot=300)
    assert small["combined_score"]["high"] - small["combined_score"]["low"] > 1.5 * (c["high"] - c["low"])
    json.dumps(ci)


def test_paired_bootstrap_diff():
    probs, targets = random_data(400, 13)
    same = paired_bootstrap_diff(SCHEMA, probs, probs, targets, n_boot=200)
    assert same["combined_score"]["estimate"] == 0.0
    assert same["combined_score"]["low"] == 0.0 and same["combined_score"]["high"] == 0.0
    # Model b: the truth for coat (perfect), same as a elsewhere -> b clearly better on coat only.
    perfect = dict(probs)
    perfect["coat"] = np.eye(4)[np.maximum(targets["coat"], 0)]
    d = paired_bootstrap_diff(SCHEMA, probs, perfect, targets, n_boot=300, seed=1)
    a = compute_metrics(SCHEMA, probs, targets)
    b = compute_metrics(SCHEMA, perfect, targets)
    assert d["tasks"]["coat"]["estimate"] == pytest.approx(a["tasks"]["coat"]["primary"] - b["tasks"]["coat"]["primary"])
    assert d["tasks"]["coat"]["high"] < 0 and d["tasks"]["coat"]["p_value"] < 0.01
    assert d["tasks"]["coat"]["prob_a_better"] == 0.0
    assert d["tasks"]["shape"]["estimate"] == 0.0 and d["tasks"]["shape"]["p_value"] == 1.0
    assert d["combined_score"]["estimate"] == pytest.approx(a["combined_score"] - b["combined_score"])
    # Paired intervals are narrower than the difference of two independent ones would suggest.
    noisy = {k: np.clip(v + np.random.default_rng(2).normal(0, 0.05, v.shape), 0, 1) for k, v in probs.items()}
    pd_ = paired_bootstrap_diff(SCHEMA, probs, noisy, targets, n_boot=300)
    ci = bootstrap_ci(SCHEMA, probs, targets, n_boot=300)
    assert (pd_["combined_score"]["high"] - pd_["combined_score"]["low"]) < (ci["combined_score"]["high"]
                                                                          - ci["combined_score"]["low"])


def test_predict_helper_matches_thresholds():
    probs, _ = random_data(30, 4)
    pred = metrics.predict(SCHEMA, probs, {"shape": [0.2, 0.5, 0.9]})
    assert pred["shape"].dtype == np.int8 and pred["shape"].shape == (30, 3)
    assert np.array_equal(pred["shape"][:, 2], (probs["shape"][:, 2] >= 0.9).astype(np.int8))
    assert np.array_equal(pred["fissure"][:, 0], (probs["fissure"][:, 0] >= 0.5).astype(np.int8))
    assert np.array_equal(pred["coat"], probs["coat"].argmax(1))


def test_chance_references_match_simulated_constant_and_random_answers():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    schema = TaskSchema([Task("c", "multiclass", ("a", "b", "c")), Task("m", "multilabel", ("x", "y")),
                         Task("b", "binary", ("b",))])
    n = 40000
    yc = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    ym = (rng.random((n, 2)) < [0.2, 0.7]).astype(np.float32)
    yb = (rng.random((n, 1)) < 0.1).astype(np.float32)
    yc[:10] = -1
    ym[:10, 0] = np.nan  # missing labels stay out
    ref = metrics.chance_references(schema, {"c": yc, "m": ym, "b": yb})
    const, rand = ref["constant answer"]["tasks"], ref["random guess"]["tasks"]
    ok = yc >= 0
    assert const["c"] == pytest.approx(f1_score(yc[ok], np.zeros(ok.sum(), int), average="macro"))
    assert rand["c"] == pytest.approx(f1_score(yc[ok], rng.integers(0, 3, ok.sum()), average="macro"), abs=0.01)
    lab = ~np.isnan(ym[:, 0])
    want = np.mean([f1_score(ym[lab, 0], np.ones(lab.sum())), f1_score(ym[:, 1], np.ones(n))])
    assert const["m"] == pytest.approx(want)
    assert rand["b"] == pytest.approx(f1_score(yb[:, 0], rng.random(n) < yb.mean()), abs=0.01)
    assert ref["constant answer"]["combined_score"] == pytest.approx(np.mean(list(const.values())))
    # a model that answers "yes" to everyone scores exactly the constant reference
    always = metrics.compute_metrics(schema, {"c": np.tile([1.0, 0, 0], (n, 1)), "m": np.ones((n, 2)),
                                              "b": np.ones((n, 1))}, {"c": yc, "m": ym, "b": yb})
    assert always["combined_score"] == pytest.approx(ref["constant answer"]["combined_score"])


def test_constant_decisions_flags_one_answer_for_everyone():
    schema = TaskSchema([Task("c", "multiclass", ("a", "b")), Task("m", "multilabel", ("x", "y"))])
    probs = {"c": np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]), "m": np.array([[0.2, 0.9], [0.3, 0.1], [0.4, 0.8]])}
    flags = metrics.constant_decisions(schema, probs, {"m": [0.1, 0.5]})
    assert {(f["task"], f["label"], f["answer"]) for f in flags} == {("c", "(argmax)", "a"), ("m", "x", "yes")}
    assert metrics.constant_decisions(schema, probs, {"m": [0.25, 0.5]}) == [flags[0]]


def test_multiclass_classification_report_matches_scikit_learn():
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    rng = np.random.default_rng(4)
    schema = TaskSchema([Task("c", "multiclass", ("a", "b", "c")), Task("m", "multilabel", ("x", "y"))])
    n = 300
    y = rng.integers(0, 3, n)
    p = rng.dirichlet(np.ones(3), n) + np.eye(3)[y] * 0.5
    p /= p.sum(1, keepdims=True)
    ym = (rng.random((n, 2)) < 0.4).astype(np.float32)
    pm = np.clip(ym * 0.3 + rng.random((n, 2)) * 0.7, 0, 1)
    m = compute_metrics(schema, {"c": p, "m": pm}, {"c": y, "m": ym})
    c = m["tasks"]["c"]
    prec, rec, _, sup = precision_recall_fscore_support(y, p.argmax(1), labels=[0, 1, 2], zero_division=0)
    for i, name in enumerate(("a", "b", "c")):
        assert c["per_class_precision"][name] == pytest.approx(prec[i])
        assert c["per_class_recall"][name] == pytest.approx(rec[i])
        assert c["per_class_support"][name] == sup[i]
        assert c["per_class_auroc"][name] == pytest.approx(roc_auc_score(y == i, p[:, i]))
        assert c["per_class_ap"][name] == pytest.approx(average_precision_score(y == i, p[:, i]))
    assert m["tasks"]["m"]["per_label"]["y"]["ap"] == pytest.approx(average_precision_score(ym[:, 1], pm[:, 1]))


def test_cross_fitted_scores_decide_each_fold_at_thresholds_tuned_on_the_others():
    one = TaskSchema((Task("fissure", "binary", ("fissure",), 1.0),))
    # Fold 0's two positives sit at 0.35 and 0.45, fold 1's at 0.75 and 0.85; every negative below 0.3.
    # Tuned on fold 1 alone the threshold lands above 0.45 and misses both of fold 0's positives; tuned on fold 0
    # alone it lands at or below 0.35 and catches both of fold 1's. Pooled: tp 2, fn 2, fp 0 -> F1 = 4/6.
    p = np.array([0.35, 0.45, 0.1, 0.2, 0.75, 0.85, 0.1, 0.25])[:, None]
    t = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=np.float32)[:, None]
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    res = metrics.cross_fitted_scores(one, {"fissure": p}, {"fissure": t}, fold)
    assert res["per_fold"][0]["tasks"]["fissure"] == pytest.approx(0.0)
    assert res["per_fold"][1]["tasks"]["fissure"] == pytest.approx(1.0)
    assert res["tasks"]["fissure"] == pytest.approx(4 / 6) and res["combined"] == pytest.approx(4 / 6)
    assert res["per_fold"][0]["n"] == 4
    # thresholds tuned on all rows and scored on them grade themselves: a perfect 1.0
    assert metrics.primary_scores(one, {"fissure": p}, {"fissure": t}, tune_thresholds(one, {"fissure": p},
                                                                                     {"fissure": t}))["fissure"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_fitted_scores_match_scikit_learn_on_the_pooled_decisions(seed):
    probs, targets = random_data(300, seed)
    fold = np.random.default_rng(seed).integers(0, 3, 300)
    res = metrics.cross_fitted_scores(SCHEMA, probs, targets, fold)
    decided = {"shape": np.zeros((300, 3), bool), "fissure": np.zeros((300, 1), bool)}
    for k in range(3):
        m = fold == k
        thr = tune_thresholds(SCHEMA, {n: v[~m] for n, v in probs.items()}, {n: v[~m] for n, v in targets.items()})
        for name in decided:
            decided[name][m] = probs[name][m] >= np.asarray(thr[name])[None, :]
    shape = [f1_score(targets["shape"][~np.isnan(targets["shape"][:, j]), j],
                      decided["shape"][~np.isnan(targets["shape"][:, j]), j]) for j in range(3)]
    assert res["tasks"]["shape"] == pytest.approx(np.mean(shape))
    lab = ~np.isnan(targets["fissure"][:, 0])
    assert res["tasks"]["fissure"] == pytest.approx(f1_score(targets["fissure"][lab, 0], decided["fissure"][lab, 0]))
    # multiclass decides by argmax: no threshold, so the same as scoring all rows at once
    assert res["tasks"]["coat"] == pytest.approx(compute_metrics(SCHEMA, probs, targets)["tasks"]["coat"]["primary"])
    with pytest.raises(ValueError, match="at least two folds"):
        metrics.cross_fitted_scores(SCHEMA, probs, targets, np.zeros(300, int))
    with pytest.raises(ValueError, match="fold numbers for 300 rows"):
        metrics.cross_fitted_scores(SCHEMA, probs, targets, fold[:10])
