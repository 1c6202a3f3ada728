"""Masked multi-task loss against torch's reference losses; class weights from counts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from tongue_nb.model.losses import MultiTaskLoss, class_weights_from_targets
from tongue_nb.data.tasks import Task, TaskSchema

SCHEMA = TaskSchema((
    Task("shape", "multilabel", ("spots", "cracks", "teethmarks"), 0.5),
    Task("coat", "multiclass", ("greasy", "rotten", "nospecialgreasy"), 0.5),
    Task("fissure", "binary", ("fissure",)),
))


def batch(b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = {"shape": torch.randn(b, 3, generator=g), "coat": torch.randn(b, 3, generator=g),
              "fissure": torch.randn(b, 1, generator=g)}
    shape = (torch.rand(b, 3, generator=g) < 0.4).float()
    shape[torch.rand(b, 3, generator=g) < 0.3] = float("nan")
    coat = torch.randint(0, 3, (b,), generator=g)
    coat[torch.rand(b, generator=g) < 0.3] = -1
    fissure = (torch.rand(b, 1, generator=g) < 0.5).float()
    fissure[torch.rand(b, 1, generator=g) < 0.3] = float("nan")
    weight = torch.rand(b, generator=g) * 0.5 + 0.5
    return logits, {"shape": shape, "coat": coat, "fissure": fissure}, weight


def test_masked_weighted_loss_equals_reference_on_labelled_entries():
    logits, targets, w = batch()
    total, per = MultiTaskLoss(SCHEMA, task_weights={"fissure": 2.0})(logits, targets, w)
    # multiclass: weighted mean of CE over labelled rows
    m = targets["coat"] >= 0
    ce = F.cross_entropy(logits["coat"][m], targets["coat"][m], reduction="none")
    assert per["coat"].item() == pytest.approx(((w[m] * ce).sum() / w[m].sum()).item(), rel=1e-5)
    # multilabel: weighted mean of BCE over labelled (sample, label) entries
    m = ~torch.isnan(targets["shape"])
    bce = F.binary_cross_entropy_with_logits(logits["shape"], torch.nan_to_num(targets["shape"]), reduction="none")
    ww = w[:, None].expand_as(m)
    assert per["shape"].item() == pytest.approx(((ww * bce)[m].sum() / ww[m].sum()).item(), rel=1e-5)
    m = ~torch.isnan(targets["fissure"][:, 0])
    bce = F.binary_cross_entropy_with_logits(logits["fissure"][m, 0], targets["fissure"][m, 0], reduction="none")
    assert per["fissure"].item() == pytest.approx(((w[m] * bce).sum() / w[m].sum()).item(), rel=1e-5)
    assert total.item() == pytest.approx((per["shape"] + per["coat"] + 2.0 * per["fissure"]).item(), rel=1e-6)


def test_missing_labels_get_no_gradient_and_empty_task_is_zero():
    logits, targets, w = batch(8)
    targets["coat"][:] = -1  # no coat label in this batch
    targets["shape"][0] = float("nan")
    leaf = {k: v.clone().requires_grad_(True) for k, v in logits.items()}
    total, per = MultiTaskLoss(SCHEMA, focal_gamma=2.0, label_smoothing=0.1)(leaf, targets, w)
    assert per["coat"].item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert torch.all(leaf["coat"].grad == 0)
    assert torch.all(leaf["shape"].grad[0] == 0)
    assert torch.isfinite(leaf["shape"].grad).all() and leaf["shape"].grad[1:].abs().sum() > 0
    # Changing the logits of an unlabelled entry does not change the loss.
    other = {k: v.clone() for k, v in logits.items()}
    other["shape"][0] += 5.0
    other["coat"] += 3.0
    assert MultiTaskLoss(SCHEMA)(other, targets, w)[0].item() == pytest.approx(
        MultiTaskLoss(SCHEMA)(logits, targets, w)[0].item(), rel=1e-6)


def test_sample_weight_zero_drops_a_sample_and_default_is_uniform():
    logits, targets, _ = batch(10)
    w = torch.ones(10)
    w[3] = 0.0
    loss = MultiTaskLoss(SCHEMA)
    keep = [i for i in range(10) if i != 3]
    sub = loss({k: v[keep] for k, v in logits.items()}, {k: v[keep] for k, v in targets.items()}, None)[0]
    assert loss(logits, targets, w)[0].item() == pytest.approx(sub.item(), rel=1e-6)
    assert loss(logits, targets, None)[0].item() == pytest.approx(loss(logits, targets, torch.ones(10))[0].item())


def test_label_smoothing_matches_torch_and_sigmoid_formula():
    logits, targets, w = batch(12, seed=1)
    s = 0.2
    _, per = MultiTaskLoss(SCHEMA, label_smoothing=s)(logits, targets, None)
    m = targets["coat"] >= 0
    ref = F.cross_entropy(logits["coat"][m], targets["coat"][m], label_smoothing=s)
    assert per["coat"].item() == pytest.approx(ref.item(), rel=1e-5)
    m = ~torch.isnan(targets["fissure"])
    soft = targets["fissure"][m] * (1 - s) + s / 2
    ref = F.binary_cross_entropy_with_logits(logits["fissure"][m], soft)
    assert per["fissure"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_focal_loss_matches_torchvision_and_manual_multiclass():
    logits, targets, _ = batch(12, seed=2)
    _, per = MultiTaskLoss(SCHEMA, focal_gamma=2.0)(logits, targets, None)
    m = ~torch.isnan(targets["shape"])
    ref = sigmoid_focal_loss(logits["shape"][m], targets["shape"][m], alpha=-1, gamma=2.0, reduction="mean")
    assert per["shape"].item() == pytest.approx(ref.item(), rel=1e-5)
    m = targets["coat"] >= 0
    logp = F.log_softmax(logits["coat"][m], dim=1).gather(1, targets["coat"][m, None]).squeeze(1)
    ref = (-(1 - logp.exp()) ** 2 * logp).mean()
    assert per["coat"].item() == pytest.approx(ref.item(), rel=1e-5)
    # Focal down-weights easy examples: the loss is smaller than plain cross-entropy.
    _, plain = MultiTaskLoss(SCHEMA)(logits, targets, None)
    assert all(per[k] < plain[k] for k in per)


def test_class_weights_multiclass_and_pos_weight():
    logits, targets, w = batch(16, seed=3)
    cw = {"coat": torch.tensor([0.5, 2.0, 1.0]), "shape": torch.tensor([3.0, 1.0, 0.5])}
    _, per = MultiTaskLoss(SCHEMA, class_weights=cw)(logits, targets, w)
    m = targets["coat"] >= 0
    ce = F.cross_entropy(logits["coat"][m], targets["coat"][m], reduction="none") * cw["coat"][targets["coat"][m]]
    assert per["coat"].item() == pytest.approx(((w[m] * ce).sum() / w[m].sum()).item(), rel=1e-5)
    m = ~torch.isnan(targets["shape"])
    bce = F.binary_cross_entropy_with_logits(logits["shape"], torch.nan_to_num(targets["shape"]),
                                             pos_weight=cw["shape"], reduction="none")
    ww = w[:, None].expand_as(m)
    assert per["shape"].item() == pytest.approx(((ww * bce)[m].sum() / ww[m].sum()).item(), rel=1e-5)


def test_bad_arguments_raise_clear_errors():
    logits, targets, w = batch(4)
    with pytest.raises(ValueError, match=r"class_weights\['coat'\] must have shape \(3,\)"):
        MultiTaskLoss(SCHEMA, class_weights={"coat": [1.0, 2.0]})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        MultiTaskLoss(SCHEMA, task_weights={"nope": 1.0})
    with pytest.raises(ValueError, match="label_smoothing"):
        MultiTaskLoss(SCHEMA, label_smoothing=1.0)
    with pytest.raises(ValueError, match="focal_gamma"):
        MultiTaskLoss(SCHEMA, focal_gamma=-1)
    with pytest.raises(ValueError, match=r"logits of task 'coat' have shape \(4, 2\)"):
        MultiTaskLoss(SCHEMA)({**logits, "coat": logits["coat"][:, :2]}, targets, w)
    with pytest.raises(ValueError, match="task 'coat' has a class index >= 3"):
        MultiTaskLoss(SCHEMA)(logits, {**targets, "coat": torch.tensor([0, 1, 3, -1])}, w)
    with pytest.raises(KeyError, match="fissure"):
        MultiTaskLoss(SCHEMA)(logits, {k: v for k, v in targets.items() if k != "fissure"}, w)
    with pytest.raises(ValueError, match="sample_weight has 3 entries"):
        MultiTaskLoss(SCHEMA)(logits, targets, w[:3])


def test_class_weights_from_targets():
    coat = np.array([0] * 60 + [1] * 30 + [2] * 10 + [-1] * 50)
    shape = np.zeros((150, 3), np.float32)
    shape[:30, 0] = 1  # 30 pos / 120 neg (NaN rows below not counted)
    shape[:75, 1] = 1
    shape[120:, :] = np.nan
    targets = {"coat": coat, "shape": shape, "fissure": np.full((150, 1), np.nan, np.float32)}
    cw = class_weights_from_targets(SCHEMA, targets, mode="balanced")
    assert np.allclose(cw["coat"].numpy(), [100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    assert np.allclose(cw["shape"].numpy()[:2], [90 / 30, 45 / 75])
    assert cw["shape"][2].item() == 1.0 and cw["fissure"].tolist() == [1.0]  # no positives / no labels
    # Sample-average of multiclass weights is 1 in both modes; rarer class -> larger weight.
    eff = class_weights_from_targets(SCHEMA, targets, mode="effective", beta=0.99)
    for wts in (cw["coat"], eff["coat"]):
        assert (wts.numpy()[coat[coat >= 0]]).mean() == pytest.approx(1.0, rel=1e-5)
    assert eff["coat"][2] > eff["coat"][1] > eff["coat"][0]
    b = 0.99
    expected = (1 - b ** 90) / (1 - b ** 30)
    assert eff["shape"][0].item() == pytest.approx(expected, rel=1e-5)
    # indices restrict the counts (e.g. to the training split)
    sub = class_weights_from_targets(SCHEMA, targets, indices=np.arange(90), mode="balanced")
    # class 2 is absent from these rows: balanced over the two present classes, absent class -> 1
    assert np.allclose(sub["coat"].numpy(), [90 / (2 * 60), 90 / (2 * 30), 1.0])
    with pytest.raises(ValueError, match="mode"):
        class_weights_from_targets(SCHEMA, targets, mode="inverse")
    # The weights plug into the loss.
    logits, t, w = batch(8)
    total, _ = MultiTaskLoss(SCHEMA, class_weights=cw)(logits, t, w)
    assert math.isfinite(total.item())
