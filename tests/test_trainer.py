"""The two-stage trainer on a tiny synthetic set: learning rates, stages, run folder, resume, NaN, OOM retry."""
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tongue_nb.data.loader import BatchLoader
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.model.backbones import MultiTaskBackbone, load_run_model
from tongue_nb.train.params import load_params
from tongue_nb.runio import RunLock, load_checkpoint, load_weights
from tongue_nb.data.synth import make_synthetic
from tongue_nb.data.tasks import default_schema
from tongue_nb.train.runtime import Runtime
from tongue_nb.train.fit import GROUP_NAMES
from tongue_nb.train.trainer import (NonFiniteLossError, TrainingError, WeightEMA, make_optimizer, train,
                               train_one_epoch, warmup_cosine)

TIMING_COLUMNS = ["seconds", "train_samples_per_s"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", n=64, size=48, seed=1)


def tiny(data_dir, out_dir, **kw):
    values = dict(backbone="test_convnext", data_dir=str(data_dir), out_dir=str(out_dir), image_size=32,
                  pretrained=False, batch_size=8, stage1_epochs=1, stage2_epochs=2, progress=False,
                  warmup_epochs=0.0, num_threads=1)
    values.update(kw)
    return load_params(**values)


def test_warmup_cosine_shape():
    assert [warmup_cosine(s, 2, 6) for s in range(2)] == [0.5, 1.0]
    assert warmup_cosine(2, 2, 6) == 1.0
    decay = [warmup_cosine(s, 2, 6) for s in range(2, 6)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] > 0
    assert warmup_cosine(0, 0, 4) == 1.0


def test_optimizer_holds_configured_lrs_per_stage():
    model = MultiTaskBackbone("test_convnext", default_schema(), pretrained=False, freeze_backbone=True)
    opt, sched = make_optimizer(model, 0.0, 3e-3, 0.05, steps=4, warmup_steps=0)
    assert {g["name"] for g in opt.param_groups} == {"head_decay", "head_no_decay"}  # stage 1: heads only
    assert all(g["lr"] == pytest.approx(3e-3) for g in opt.param_groups)
    model.unfreeze_backbone()
    opt, sched = make_optimizer(model, 1e-4, 1e-3, 0.05, steps=10, warmup_steps=2)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay"}
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0 and by_name["head_decay"]["weight_decay"] == 0.05
    seen = []
    for _ in range(10):
        seen.append({n: g["lr"] for n, g in zip(by_name, opt.param_groups)})
        opt.step()
        sched.step()
    assert seen[0]["backbone_decay"] == pytest.approx(0.5e-4) and seen[0]["head_decay"] == pytest.approx(0.5e-3)
    assert seen[1]["backbone_decay"] == pytest.approx(1e-4) and seen[1]["head_no_decay"] == pytest.approx(1e-3)
    assert seen[5]["head_decay"] == pytest.approx(1e-3 * warmup_cosine(5, 2, 10))


def test_layer_decay_scales_earlier_backbone_layers():
    model = MultiTaskBackbone("test_convnext", default_schema(), pretrained=False, freeze_backbone=False)
    depths = model.backbone_layer_depths()
    assert set(depths) == {n for n, _ in model.backbone.named_parameters()}
    last = max(depths.values())
    assert depths["stem.0.weight"] == 0 and last >= 4 and set(depths.values()) == set(range(last + 1))
    opt, _ = make_optimizer(model, 1e-3, 2e-3, 0.05, steps=10, warmup_steps=0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.backbone.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (last - depths[name])), name
    assert all(lr_of[id(p)] == pytest.approx(2e-3) for p in model.heads.parameters())
    assert len(lr_of) == sum(1 for p in model.parameters())  # every parameter in exactly one group
    names = {g["name"] for g in opt.param_groups}
    assert {"backbone_no_decay", "backbone_l00_decay"} <= names  # the last group keeps the plain name
    # decay 1 is the plain four groups; outside (0, 1] is refused by name
    plain, _ = make_optimizer(model, 1e-3, 2e-3, 0.05, steps=10, warmup_steps=0, layer_decay=1.0)
    assert {g["name"] for g in plain.param_groups} == set(GROUP_NAMES)
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="layer_decay"):
            model.param_groups(1e-3, 2e-3, 0.05, layer_decay=bad)


def test_layer_decay_refuses_a_backbone_without_layer_groups():
    # PiT is one of the few timm families without layer groups (no group_matcher)
    model = MultiTaskBackbone("pit_ti_224", default_schema(), pretrained=False, freeze_backbone=False)
    with pytest.raises(ValueError, match="'pit_ti_224'.*no timm group_matcher.*layer_decay: 1"):
        model.param_groups(1e-3, 2e-3, 0.05, layer_decay=0.8)
    assert {g["name"] for g in model.param_groups(1e-3, 2e-3, 0.05)} == set(GROUP_NAMES)  # off: no groups needed




def test_run_folder_summary_and_stage_lrs(data_dir, tmp_path):
    params = tiny(data_dir, tmp_path / "run", stage1_lr_head=2e-3, stage2_lr_backbone=1e-4, stage2_lr_head=7e-4)
    summary = train(params)
    run = tmp_path / "run"
    for name in ("params.yaml", "tasks.yaml", "history.csv", "summary.json", "predictions.csv", "split.csv",
                 "split_stats.csv", "checkpoints/best.safetensors", "checkpoints/meta.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists()
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary and on_disk["status"] == "completed"
    for key in ("experiment_name", "backbone", "timm_name", "params_m", "trainable_params_m", "image_size", "counts",
                "best_epoch", "best_val_combined", "final_metrics_fixed", "final_metrics_thresholded",
                "val_metrics_fixed", "timings", "train_samples_per_s", "eval_samples_per_s", "peak_memory_mb",
                "device", "torch_version", "timm_version"):
        assert key in summary, key
    assert summary["trainable_params_m"]["stage1"] < summary["trainable_params_m"]["stage2"] == summary["params_m"]
    assert set(summary["final_metrics_thresholded"]["thresholds"]) == {"shape"}
    assert summary["image_size"] == 32 and summary["counts"]["test"]["samples"] > 0

    hist = pd.read_csv(run / "history.csv")
    assert list(hist["stage"]) == [1, 2, 2] and list(hist["epoch"]) == [1, 2, 3]
    # The configured learning rates really reach the optimizer (the seed's defect): each group's lr at
    # the last step of an epoch is the configured value times the schedule factor.
    steps = summary["counts"]["train"]["samples"] // params.batch_size
    f1 = warmup_cosine(steps - 1, 0, steps)
    assert hist.loc[0, "lr_head_decay"] == pytest.approx(2e-3 * f1)
    assert math.isnan(hist.loc[0, "lr_backbone_decay"])
    f2 = warmup_cosine(steps - 1, 0, 2 * steps)
    assert hist.loc[1, "lr_backbone_decay"] == pytest.approx(1e-4 * f2)
    assert hist.loc[1, "lr_head_no_decay"] == pytest.approx(7e-4 * f2)

    preds = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert set(preds["split"]) == {"val", "test"}
    assert len(preds) == summary["counts"]["val"]["samples"] + summary["counts"]["test"]["samples"]
    for col in ("id", "image", "group", "p:shape:spots", "true:shape:spots", "pred_t:shape:spots", "p:coat:greasy",
                "true:coat", "pred:coat"):
        assert col in preds.columns

    # the best checkpoint is the unwrapped model and rebuilds through models.load_run_model
    state, meta = load_weights(run / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == summary["best_epoch"] and not any(k.startswith("module.") for k in state)
    assert isinstance(load_run_model(run), MultiTaskBackbone)

    with pytest.raises(TrainingError, match="already holds a run"):
        train(params)
    with RunLock(run):
        with pytest.raises(TrainingError, match="in use"):
            train(dataclasses.replace(params, resume=True))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ema_decay, layer_decay", [(0.0, 1.0), (0.9, 0.7)])
def test_resume_reaches_the_same_metrics(data_dir, tmp_path, ema_decay, layer_decay):
    full = train(tiny(data_dir, tmp_path / "full", drop_rate=0.2, ema_decay=ema_decay, layer_decay=layer_decay))

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise _Stop()

    params = tiny(data_dir, tmp_path / "cut", drop_rate=0.2, ema_decay=ema_decay, layer_decay=layer_decay)
    with pytest.raises(_Stop):
        train(params, on_epoch_end=stop_after_2)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert cut["progress"]["epoch"] == 2
    # mid stage 2: the optimizer saved for the resume, with one group pair per layer under layer decay
    groups = {g["name"] for g in cut["optim"]["optimizer"]["param_groups"]}
    assert ("backbone_l00_decay" in groups) == (layer_decay < 1) and "backbone_no_decay" in groups
    resumed = train(dataclasses.replace(params, resume=True))
    for key in ("final_metrics_fixed", "final_metrics_thresholded", "val_metrics_fixed", "best_epoch",
                "best_val_combined"):
        assert resumed[key] == full[key], key
    h_full = pd.read_csv(tmp_path / "full" / "history.csv").drop(columns=TIMING_COLUMNS)
    h_cut = pd.read_csv(tmp_path / "cut" / "history.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(h_full, h_cut)
    # The weights kept as best are the ones that earned the best val score (the average, with EMA on).
    assert full["val_metrics_fixed"]["combined_score"] == pytest.approx(full["best_val_combined"], abs=1e-6)
    last = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert ("ema" in last["callbacks"]) == (ema_decay > 0)  # the weight average is saved for resume iff on
    assert (h_full.query("stage == 2")["lr_backbone_no_decay"] > 0).all()  # the last layer group: the backbone rate


def test_cpu_bf16_channels_last_run(data_dir, tmp_path):
    # Recent x86 CPUs (AVX512-BF16 / AMX) train faster in bf16 with channels_last; both must work on CPU.
    summary = train(tiny(data_dir, tmp_path / "run", stage1_epochs=0, stage2_epochs=1, precision="bf16",
                         channels_last=True, device="cpu"))
    assert summary["precision"] == "bfloat16" and summary["channels_last"] is True
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert np.isfinite(hist[["train_loss", "val_loss", "val_combined"]].to_numpy()).all()


def test_cpu_bf16_support_is_read_from_cpuinfo(tmp_path):
    from tongue_nb.train.runtime import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_native_bf16(info) is False
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_has_native_bf16(info) is None
    assert cpu_has_native_bf16(tmp_path / "absent") is None


def test_weight_ema_follows_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert ema.current_decay() == pytest.approx(2 / 11)  # the ramp: min(decay, (1 + n) / (10 + n))
    model.train()
    model(torch.randn(8, 3))  # moves BatchNorm's running stats and its integer batch counter
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = 2 / 11
    now = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * start[k] + (1 - d) * now[k])
        else:
            assert torch.equal(v, now[k])  # num_batches_tracked is copied, not averaged
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5 and ema.updates == 21
    assert not any(p.requires_grad for p in ema.module.parameters())
    copy = WeightEMA(model, decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 21
    for a, b in zip(copy.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(model, decay=1.0)


def test_early_stopping_resets_per_stage(data_dir, tmp_path):
    # Learning rates so small that the validation score cannot move: every stage stops after
    # patience epochs, and stage 2 gets its own patience instead of inheriting stage 1's count.
    params = tiny(data_dir, tmp_path / "run", stage1_epochs=4, stage2_epochs=4, early_stopping_patience=1,
                  stage1_lr_head=1e-12, stage2_lr_backbone=1e-12, stage2_lr_head=1e-12, min_delta=0.01)
    summary = train(params)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(hist["stage"]) == [1, 1, 2, 2]
    assert summary["stopped_early"] == {"stage1": True, "stage2": True}
    assert summary["best_epoch"] == 1


def test_nan_loss_stops_with_epoch_step_task_and_keeps_best(data_dir, tmp_path):
    params = tiny(data_dir, tmp_path / "run", stage2_epochs=3, stage2_lr_backbone=1e12, stage2_lr_head=1e12,
                  grad_clip=0.0, early_stopping_patience=0)
    with pytest.raises(NonFiniteLossError) as err:
        train(params)
    msg = str(err.value)
    assert err.value.epoch >= 2 and err.value.stage == 2 and err.value.step >= 1
    assert f"epoch {err.value.epoch}" in msg and f"step {err.value.step}" in msg
    assert any(t in msg for t in ("shape", "coat"))
    _, meta = load_weights(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert meta["epoch"] < err.value.epoch and math.isfinite(meta["val_combined"])
    assert not (tmp_path / "run" / ".lock").exists()


def test_masked_labels_train_and_are_left_out_of_metrics(tmp_path):
    data = make_synthetic(tmp_path / "data", n=64, size=48, seed=2, missing=0.4)
    summary = train(tiny(data, tmp_path / "run", stage2_epochs=1))
    counts = summary["counts"]
    for split in ("train", "test"):
        assert 0 < counts[split]["labelled"]["coat"] < counts[split]["samples"]
    assert summary["final_metrics_fixed"]["tasks"]["coat"]["n"] == counts["test"]["labelled"]["coat"]
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert np.isfinite(hist[["train_loss", "train_loss_coat", "train_loss_shape", "val_loss"]].to_numpy()).all()
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv", keep_default_na=False)
    test = preds[preds["split"] == "test"]
    assert (test["true:coat"] == "").sum() == counts["test"]["samples"] - counts["test"]["labelled"]["coat"]


class _OomAbove(torch.nn.Module):
    """Wraps a model and raises CUDA OOM for batches larger than `limit` (an out-of-memory GPU, on CPU)."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.raised = model, limit, 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_oom_retry_halves_batch_and_keeps_effective_batch():
    schema = default_schema()
    rng = np.random.default_rng(0)
    n = 32
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    targets = {"shape": rng.integers(0, 2, (n, 3)).astype(np.float32), "coat": rng.integers(0, 3, n)}

    def run(limit):
        torch.manual_seed(0)
        model = MultiTaskBackbone("test_convnext", schema, pretrained=False, freeze_backbone=False)
        wrapped = _OomAbove(model, limit)
        opt, sched = make_optimizer(model, 1e-3, 1e-3, 0.0, steps=2, warmup_steps=0)
        loader = BatchLoader(images, targets, None, np.arange(n), 8, model.mean, model.std, shuffle=True,
                             seed=0, prefetch=False)
        stats = train_one_epoch(wrapped, loader, MultiTaskLoss(schema), opt, sched, Runtime(),
                                epoch=1, accumulation_steps=2)
        return model, stats, wrapped.raised

    ref, ref_stats, _ = run(limit=1000)
    got, stats, raised = run(limit=2)
    assert raised > 0 and stats.micro_split == 4 and ref_stats.micro_split == 1
    assert stats.optimizer_steps == ref_stats.optimizer_steps == 2
    assert stats.loss == pytest.approx(ref_stats.loss, rel=1e-4)
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def _chance_combined(schema, train_targets, test_targets, draws=20, seed=0):
    """The best of majority, all-positive and prior-stratified guessing per task, combined like the model's score."""
    from tongue_nb.analysis.metrics import compute_metrics

    rng = np.random.default_rng(seed)
    n = len(next(iter(test_targets.values())))
    best = {}
    for task in schema:
        y_train = train_targets[task.name]
        if task.kind == "multiclass":
            prior = np.bincount(y_train[y_train >= 0], minlength=task.n_outputs) / max(1, (y_train >= 0).sum())
            majority = np.tile(np.eye(task.n_outputs)[prior.argmax()], (n, 1))
            guesses = [majority] + [np.eye(task.n_outputs)[rng.choice(task.n_outputs, n, p=prior)]
                                    for _ in range(draws)]
        else:
            prior = np.nanmean(y_train, axis=0)
            guesses = [np.tile((prior >= 0.5).astype(float), (n, 1)), np.ones((n, task.n_outputs))]
            guesses += [(rng.random((n, task.n_outputs)) < prior).astype(float) for _ in range(draws)]
        scores = [compute_metrics(schema, {**{t.name: np.zeros((n, t.n_outputs)) for t in schema}, task.name: g},
                                  test_targets)["tasks"][task.name]["primary"] for g in guesses]
        stratified = float(np.mean(scores[-draws:]))
        best[task.name] = max(scores[:-draws] + [stratified])
    return schema.combined_score(best), best


def test_small_model_learns_synthetic_tongues_well_above_chance(tmp_path):
    """Issue 3's done-when: resnet18 from scratch on the synthetic set on CPU, in about a minute or two."""
    from tongue_nb.data.labels import load_labels

    data = make_synthetic(tmp_path / "data", n=500, size=128, seed=0)
    params = load_params(backbone="resnet18", data_dir=str(data), out_dir=str(tmp_path / "run"), image_size=64,
                         pretrained=False, batch_size=32, stage1_epochs=1, stage1_lr_head=3e-3, stage2_epochs=8,
                         stage2_lr_backbone=1e-3, stage2_lr_head=1e-3, warmup_epochs=0.5,
                         early_stopping_patience=0, progress=False)
    summary = train(params)
    labels = load_labels(data)
    split = pd.read_csv(tmp_path / "run" / "split.csv").set_index("id").loc[labels.table["id"], "split"].to_numpy()
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    chance, per_task = _chance_combined(labels.schema, {k: v[tr] for k, v in labels.targets.items()},
                                        {k: v[te] for k, v in labels.targets.items()})
    fixed = summary["final_metrics_fixed"]["combined_score"]
    tuned = summary["final_metrics_thresholded"]["combined_score"]
    print(f"chance {chance:.3f} {per_task}; model fixed {fixed:.3f}, thresholded {tuned:.3f}")
    assert fixed >= chance + 0.15 and tuned >= chance + 0.15


def test_task_weights_reach_the_loss_the_score_and_the_run_folder(data_dir, tmp_path):
    from tongue_nb.data.tasks import load_schema
    from tongue_nb.train.trainer import resolve_data

    params = tiny(data_dir, tmp_path / "run", task_weights="coat=3", stage1_epochs=0, stage2_epochs=1)
    schema = resolve_data(params)[1]
    assert schema["coat"].weight == 3.0 and schema["shape"].weight == default_schema()["shape"].weight
    train(params)
    run_schema = load_schema(tmp_path / "run" / "tasks.yaml")
    assert run_schema["coat"].weight == 3.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    primary = {t: m["primary"] for t, m in summary["final_metrics_fixed"]["tasks"].items()}
    assert summary["final_metrics_fixed"]["combined_score"] == pytest.approx(run_schema.combined_score(primary))
    with pytest.raises(Exception, match="parameter task_weights: unknown task\\(s\\) 'colour'"):
        resolve_data(tiny(data_dir, tmp_path / "bad", task_weights="colour=2"))


def test_augment_strength_scales_the_geometric_ranges(data_dir, tmp_path):
    from tongue_nb.data.loader import Augment
    from tongue_nb.train.trainer import _augment

    assert _augment(tiny(data_dir, tmp_path)) == Augment()  # strength 1: the loader's defaults
    strong = _augment(tiny(data_dir, tmp_path, augment_strength=2))
    assert (strong.rotate, strong.translate) == (20.0, 0.1) and strong.scale == pytest.approx((0.8, 1.2))
    flips_only = _augment(tiny(data_dir, tmp_path, augment_strength=0))
    assert flips_only.hflip == 0.5 and not flips_only.geometric
    assert _augment(tiny(data_dir, tmp_path, augment=False, augment_strength=3)) is False
