"""The benchmark scripts (bench/): throughput loops, the CLI's last line, L1 agreement, ablation reading.

They run on a tiny database written here in the TonguExpert layout (a few dozen 48 px photos with
masks), with timm's `test_*` models, so the real benchmark code paths run in seconds.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import throughput  # noqa: E402

from tongue_nb.data.labels import Labels, load_labels  # noqa: E402
from tongue_nb.data.tasks import Task, TaskSchema  # noqa: E402

L2_HEADER = ["SID", "coating_label", "tai_label", "zhi_label", "fissure_label", "tooth_mk_label"]
L1_HEADER = ["SID", "labels_tai", "labels_zhi", "labels_fissure", "labels_tooth_mk"]


def _fake_db(root: Path, n: int = 30, size: int = 48, seed: int = 0) -> Path:
    """A TonguExpert-layout database with n random photos, elliptic masks, L1 and L2 label files."""
    rng = np.random.default_rng(seed)
    db = root / "TonguExpertDatabase"
    for sub in ("Phenotypes", "TongueImage/Raw", "TongueImage/Mask"):
        (db / sub).mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    l2, l1 = ["\t".join(L2_HEADER)], ["\t".join(L1_HEADER)]
    for i in range(n):
        sid = f"TE{i:07d}"
        photo = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(photo).save(db / "TongueImage/Raw" / f"{sid}.jpg")
        mask = (((yy - size / 2) / (size / 3)) ** 2 + ((xx - size / 2) / (size / 4)) ** 2 <= 1).astype(np.uint8) * 255
        Image.fromarray(mask).save(db / "TongueImage/Mask" / f"{sid}.jpg")
        # Cycle the classes so that every split can hold each of them.
        l2.append("\t".join([sid, ("non_greasy", "greasy", "greasy_thick")[i % 3],
                             ("white", "light_yellow", "yellow")[i % 3], ("light", "regular", "dark")[(i + 1) % 3],
                             ("NaN", "light", "severe")[i % 3], ("NaN", "light", "severe")[(i + 2) % 3]]))
        if i % 2 == 0:
            l1.append("\t".join([sid, ("white", "light_yellow", "yellow")[i % 3], "NA",
                                 ("light", "severe")[(i // 2) % 2], "NA"]))
    (db / "Phenotypes/L2_Labels_Predict.txt").write_text("\n".join(l2) + "\n")
    (db / "Phenotypes/L1_Labels_Manual.txt").write_text("\n".join(l1) + "\n")
    return db


@pytest.fixture(scope="module")
def fake_db(tmp_path_factory) -> Path:
    return _fake_db(tmp_path_factory.mktemp("tonguexpert"))


def test_throughput_cli_prints_ratios_and_writes_json(fake_db, tmp_path, capsys):
    out = tmp_path / "tp.json"
    res = throughput.main(["--backbone", "test_convnext", "--image-size", "32", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--repeats", "2", "--threads", "1", "--data", str(fake_db),
                           "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out), "--profile", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"train_ratio=\d+\.\d{3} eval_ratio=\d+\.\d{3}", lines[-1]), lines[-1]
    # the profile splits the end-to-end step by the loop's scopes
    shares = res["profile"]["shares"]
    assert {"step:forward", "step:backward", "step:optimizer", "step:loss"} <= set(shares)
    assert 0.99 <= sum(shares.values()) <= 1.01 and any(line.startswith("profile of 2") for line in lines)
    saved = pd.read_json(out, typ="series")
    for part in ("train", "eval"):
        mo, e2e = res[part]["model_only_samples_per_s"], res[part]["end_to_end_samples_per_s"]
        assert mo > 0 and e2e > 0 and res[part]["ratio"] == pytest.approx(e2e / mo)
        assert len(res[part]["blocks"]) == 2 and res[part]["data_path_only_samples_per_s"] > 0
        assert saved[part]["ratio"] == pytest.approx(res[part]["ratio"])
    # end-to-end really went through the real loop: 2 blocks x 2 steps x 4 samples
    assert res["steps"] == 2 and res["batch_size"] == 4 and res["n_images"] == 30


def test_model_only_train_takes_real_optimizer_steps():
    from tongue_nb.model.losses import MultiTaskLoss
    from tongue_nb.model.backbones import MultiTaskBackbone
    from tongue_nb.train.trainer import make_optimizer

    schema = TaskSchema((Task("coat", "multiclass", ("a", "b", "c")), Task("shape", "multilabel", ("x", "y"))))
    torch.manual_seed(0)
    model = MultiTaskBackbone("test_resnet", schema, pretrained=False, freeze_backbone=False, image_size=32)
    opt, _ = make_optimizer(model, 1e-3, 1e-3, 0.0, 10, 0)
    before = [p.detach().clone() for p in model.parameters()]
    samples, seconds = throughput.model_only_train(model, MultiTaskLoss(schema), opt, schema, batch_size=3,
                                                   image_size=32, steps=2, device=torch.device("cpu"))
    assert samples == 6 and seconds > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    t = throughput.random_targets(schema, 5, torch.Generator().manual_seed(0))
    assert t["coat"].dtype == torch.int64 and t["coat"].shape == (5,) and int(t["coat"].max()) < 3
    assert t["shape"].dtype == torch.float32 and t["shape"].shape == (5, 2)


def test_bad_arguments_are_refused(fake_db, tmp_path):
    labels = load_labels(throughput.common.ensure_import(fake_db, "predicted", tmp_path / "work"))
    with pytest.raises(ValueError, match="steps"):
        throughput.measure_throughput(labels, "test_convnext", 32, 4, steps=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="precision"):
        throughput.measure_throughput(labels, "test_convnext", 32, 4, precision="int8", cache_dir=tmp_path / "c")
    with pytest.raises(SystemExit, match="--data"):
        throughput.common.ensure_import(tmp_path / "nowhere", "predicted", tmp_path / "work")


def test_l1_agreement_counts_only_manually_labelled_images():
    schema = TaskSchema((Task("fissure", "multiclass", ("light", "severe")),))
    table = pd.DataFrame({"id": ["a", "b", "c", "d"]})
    l1 = Labels(root=Path("."), schema=schema, table=table,
                targets={"fissure": np.array([0, 1, -1, 1])}, problems=pd.DataFrame())
    ids = ["a", "b", "c", "d", "e"]           # "e" has no L1 row, "c" no L1 label
    pred = ["light", "absent", "severe", "severe", "light"]  # "absent" is not an L1 class: a disagreement
    out = quality.l1_agreement(ids, {"fissure": pred}, l1)["fissure"]
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    # light: tp 1 -> F1 1; severe: tp 1, fn 1 -> F1 2/3; macro = 5/6
    assert out["macro_f1"] == pytest.approx(5 / 6)


def test_ablation_result_reads_the_best_validation_epoch(tmp_path):
    run = tmp_path / "ablation-no_crop"
    run.mkdir()
    (run / "params.yaml").write_text("backbone: resnet18\nimage_size: 64\ncrop: none\nstage2_lr_backbone: 0.001\n"
                                     "ema_decay: 0.999\nprecision: bf16\nchannels_last: true\n")
    pd.DataFrame({"epoch": [1, 2, 3], "val_combined": [0.3, 0.6, 0.5], "val_coat_primary": [0.2, 0.7, 0.9],
                  "seconds": [10.0, 10.0, 10.0], "train_samples_per_s": [5.0, 6.0, 7.0]}).to_csv(
        run / "history.csv", index=False)
    res = quality.ablation_result(run)
    assert res["best_epoch"] == 2 and res["val_combined"] == 0.6 and res["val_tasks"] == {"coat": 0.7}
    assert res["settings"]["crop"] == "none" and res["train_seconds"] == 30.0
    text = quality.render_markdown({"ablations": {"no_crop": res}})
    assert ("| no_crop | resnet18 64px none, lr 0.001, class weights None, augment None, ema_decay 0.999, bf16, "
            "channels_last | 3 x all | 0.600 | 0.700 |") in text
    # task weights: the run's own (weighted) score, with the plain task mean beside it
    (run / "params.yaml").write_text("backbone: resnet18\ntask_weights: coat=2\naugment_strength: 2.0\n")
    pd.DataFrame({"epoch": [1], "val_combined": [0.5], "val_coat_primary": [0.6], "val_shape_primary": [0.3],
                  "seconds": [10.0], "train_samples_per_s": [5.0]}).to_csv(run / "history.csv", index=False)
    res = quality.ablation_result(run)
    assert res["val_task_mean"] == pytest.approx(0.45)
    text = quality.render_markdown({"ablations": {"no_crop": res}})
    assert "task_weights coat=2, augment_strength 2.0 | 1 x all | 0.500 (task mean 0.450) | 0.600 | 0.300 |" in text
    assert quality.ablation_result(tmp_path / "absent") is None
    with pytest.raises(SystemExit, match="unknown ablation"):
        quality.ablation_params(None, "bogus", 1, tmp_path)


@pytest.mark.slow
def test_cache_build_and_peak_rss_mode(fake_db, tmp_path, capsys):
    out = tmp_path / "rss.json"
    res = throughput.main(["--backbone", "test_convnext", "--batch-size", "4", "--threads", "1", "--data",
                           str(fake_db), "--work-dir", str(tmp_path / "work"), "--cache-build", "--skip-ratio",
                           "--rss-size", "32", "--rss-steps", "2", "--out", str(out)])
    assert res["cache_build"]["n_images"] == 30 and res["cache_build"]["seconds"] > 0
    rss = res["peak_rss"]
    # Both children ran and reported their own peak (VmHWM) and the real run its file-backed share.
    assert rss["peak_rss_mb"] > 100 and rss["model_only_peak_rss_mb"] > 100
    assert rss["child"]["eval_samples"] > 0 and "RssFile" in rss["child"]["proc"]
    assert "peak RSS" in capsys.readouterr().out and out.is_file()


def test_summarise_seeds_gives_mean_range_and_wins(tmp_path, capsys):
    import json

    def result(seed, rec, base):
        return {"main": {"seed": seed, "test_macro_f1": {"coat": rec}, "test_combined": rec},
                "baseline": {"test_macro_f1": {"coat": base}, "test_combined": base}}

    files = []
    for seed, rec, base in ((0, 0.6, 0.5), (1, 0.4, 0.5)):
        files.append(tmp_path / f"q{seed}.json")
        files[-1].write_text(json.dumps(result(seed, rec, base)))
    quality.main(["--summarise", *map(str, files)])
    out = capsys.readouterr().out
    assert "over 2 splits (seeds 0, 1)" in out
    assert "| coat | 0.500 (0.400-0.600) | 0.500 (0.500-0.500) | +0.000 | 1 of 2 |" in out
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(SystemExit, match="none of the files holds a main run"):
        quality.main(["--summarise", str(tmp_path / "empty.json")])


def test_colour_gap_compares_three_classifiers_on_the_same_split(tmp_path):
    import colour_gap

    from tongue_nb.data.tasks import Task, TaskSchema

    rng = np.random.default_rng(0)
    n = 1000
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    # Class = which of three bands feature 2 falls in: learnable by every classifier; a missing label stays out.
    y = np.digitize(feats[:, 2], [-0.5, 0.5]).astype(np.int64)
    y[:5] = -1
    schema = TaskSchema([Task("band", "multiclass", ("low", "mid", "high"))])
    split = np.array(["train"] * 700 + ["val"] * 150 + ["test"] * 150)
    res = colour_gap.compare_classifiers(feats, {"band": y}, schema, split, seed=0)
    assert set(res) == {"boosting", "logistic", "mlp"}
    for clf, tasks in res.items():
        assert set(tasks["band"]) == {"val", "test"}
        assert tasks["band"]["test"] > 0.8, (clf, tasks)
    # Shuffled labels: nothing to learn, so no classifier may look good.
    res = colour_gap.compare_classifiers(feats, {"band": rng.permutation(y)}, schema, split, seed=0)
    assert all(tasks["band"]["test"] < 0.6 for tasks in res.values()), res


def test_colour_gap_cli_writes_tables_and_reads_out_a_trained_run(tmp_path, capsys):
    import json

    import colour_gap
    import common

    from tongue_nb.train import trainer
    from tongue_nb.train.params import load_params

    db = _fake_db(tmp_path / "db", n=60)
    data_dir = common.ensure_import(db, "predicted", tmp_path / "work")
    run = tmp_path / "run"
    trainer.train(load_params(backbone="test_convnext", data_dir=str(data_dir), out_dir=str(run), image_size=32,
                              crop="crop_blank", pretrained=False, batch_size=8, stage1_epochs=0, stage2_epochs=1,
                              max_steps_per_epoch=2, warmup_epochs=0.0, progress=False, num_threads=1, seed=3))
    out = tmp_path / "gap"
    colour_gap.main(["--data", str(db), "--work-dir", str(tmp_path / "work"), "--seeds", "0", "1",
                     "--image-size", "32", "--runs", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["per_seed"]) == {"0", "1"}
    tasks = {"coat_color", "body_color", "fissure", "tooth_mark", "coating"}
    for per_clf in saved["per_seed"].values():
        assert set(per_clf["boosting"]) == tasks
        assert all(0.0 <= v <= 1.0 for t in per_clf.values() for parts in t.values() for v in parts.values())
    readout = saved["runs"][str(run)]
    assert readout["seed"] == 3 and readout["feature_dim"] > 0
    assert set(readout["per_classifier"]) == {"boosting", "logistic", "mlp", "network heads"}
    # The heads' figures come from the checkpoint itself: they match the run's own test predictions.
    from sklearn.metrics import f1_score

    pred = pd.read_csv(run / "predictions.csv")
    test = pred[pred["split"] == "test"]
    for task in tasks:
        labels = sorted(set(pred[f"true:{task}"].dropna()) | set(pred[f"pred:{task}"].dropna()))
        want = f1_score(test[f"true:{task}"], test[f"pred:{task}"], average="macro", labels=labels, zero_division=0)
        assert readout["per_classifier"]["network heads"][task]["test"] == pytest.approx(want, abs=1e-9), task
    assert "| coat_color | " in printed and "network heads" in printed
    assert out.with_suffix(".md").read_text().strip() == printed.strip()
    with pytest.raises(SystemExit, match="not a finished training run"):
        colour_gap.main(["--data", str(db), "--work-dir", str(tmp_path / "work"), "--runs", str(tmp_path)])


def test_named_combinations_choose_per_task_on_validation():
    from tongue_nb.data.tasks import Task, TaskSchema

    rng = np.random.default_rng(0)
    schema = TaskSchema([Task("colour", "multiclass", ("a", "b", "c")), Task("crack", "binary", ("crack",))])
    n = 200
    targets = {s: {"colour": rng.integers(0, 3, n), "crack": rng.integers(0, 2, (n, 1)).astype(np.float32)}
               for s in ("val", "test")}

    def probs(split, good):  # sharp on the `good` task, noise on the other
        t = targets[split]
        colour = np.eye(3)[t["colour"]] * 0.8 + 0.1 if good == "colour" else rng.dirichlet(np.ones(3), n)
        crack = t["crack"] * 0.8 + 0.1 if good == "crack" else rng.random((n, 1))
        return {"colour": colour, "crack": crack}

    members = {"recipe": (probs("val", "crack"), probs("test", "crack")),
               "baseline": (probs("val", "colour"), probs("test", "colour"))}
    out = quality.combinations(schema, members, targets)
    sel = out["per-task selection"]
    assert sel["choice"]["crack"] in ("recipe", "recipe+baseline") and sel["choice"]["colour"] != "recipe"
    assert sel["test_macro_f1"]["colour"] > 0.9 and sel["test_macro_f1"]["crack"] > 0.9
    assert sel["test_combined"] == pytest.approx(np.mean(list(sel["test_macro_f1"].values())))
    from tongue_nb.analysis import metrics

    mean = {k: (members["recipe"][1][k] + members["baseline"][1][k]) / 2 for k in ("colour", "crack")}
    want = metrics.compute_metrics(schema, mean, targets["test"])["combined_score"]
    assert out["recipe+baseline"]["test_combined"] == pytest.approx(want)


def test_quality_main_fine_tunes_a_pretrained_recipe_and_writes_combinations(tmp_path, capsys):
    import json

    db = _fake_db(tmp_path / "db", n=60, size=48)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: tf_efficientnet_lite0\npretrained: true\nimage_size: 32\ncrop: crop_blank\n"
                      "batch_size: 8\nmax_steps_per_epoch: 2\nstage1_epochs: 1\nstage2_epochs: 1\n"
                      "warmup_epochs: 0\ndevice: cpu\n")
    out = tmp_path / "q"
    res = quality.main(["--recipe", str(recipe), "--data", str(db), "--work-dir", str(tmp_path / "work"),
                        "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--minutes", "0",
                        "--threads", "1", "--baseline-size", "32"])
    summary = json.loads((tmp_path / "runs" / "cpu-recipe" / "summary.json").read_text())
    assert summary["pretrained"]["kind"] == "package"  # the recipe's pretrained: true is kept
    assert res["recipe_name"] == "tf_efficientnet_lite0 32px pretrained"
    combos = json.loads(out.with_suffix(".json").read_text())["combinations"]
    tasks = set(res["main"]["test_macro_f1"])
    assert set(combos["per-task selection"]["choice"]) == tasks
    assert set(combos["per-task selection"]["choice"].values()) <= {"recipe", "baseline", "recipe+baseline"}
    assert 0 <= combos["recipe+baseline"]["test_combined"] <= 1
    assert "per-task selection" in capsys.readouterr().out


def test_segment_bench_trains_on_the_database_masks_and_writes_figures(tmp_path, capsys):
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import segment as seg_bench

    db = _fake_db(tmp_path / "db", n=30, size=48)
    out = tmp_path / "seg"
    res = seg_bench.main(["--data", str(db), "--work-dir", str(tmp_path / "work"), "--threads", "1", "--out", str(out),
                          "--set", "image_size=32", "--set", "epochs=1", "--set", "batch_size=8"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["counts"]["test"] > 0 and 0 <= saved["test"]["iou"] <= 1 and res["params"]["epochs"] == 1
    assert "| test |" in capsys.readouterr().out and out.with_suffix(".md").is_file()


def test_predict_speed_bench_times_model_only_and_end_to_end(tmp_path, capsys):
    import json

    from tongue_nb.train import trainer
    from tongue_nb.train.params import load_params
    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=30, size=48, seed=0)
    run = tmp_path / "run"
    trainer.train(load_params(backbone="test_convnext", data_dir=str(data), out_dir=str(run), image_size=32,
                              pretrained=False, batch_size=8, stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=1,
                              warmup_epochs=0.0, progress=False, num_threads=1))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import predict_speed

    res = predict_speed.main(["--run", str(run), "--images", str(data / "images"), "--n", "20", "--batch-size", "8",
                              "--threads", "1", "--out", str(tmp_path / "ps.json")])
    assert res["photos"] == 20 and res["failed"] == 0 and res["ratio"] > 0
    assert re.fullmatch(r"ratio=\d+\.\d{3}", capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "ps.json").read_text())["model_only_samples_per_s"] > 0


def test_combine_chooses_each_task_on_validation_over_every_average(tmp_path, capsys):
    import json as _json

    import combine
    from test_report import write_run

    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=24, size=32, seed=1)
    runs = {name: write_run(tmp_path / name, data, seed, skill, name)
            for name, seed, skill in (("a", 0, 0.9), ("b", 1, 0.2), ("c", 2, 0.5))}
    out = tmp_path / "combine.json"
    res = combine.main([arg for n, d in runs.items() for arg in ("--run", f"{n}={d}")] + ["--out", str(out)])
    assert len(res["candidates"]) == 7  # every non-empty subset of three runs
    for task, chosen in res["choice"].items():  # the choice is the best on validation, whatever test says
        best_val = max(np.nan_to_num(c["val"][task], nan=-1) for c in res["candidates"].values())
        assert res["candidates"][chosen]["val"][task] == best_val == res["val"][task]
        assert res["test"][task] == res["candidates"][chosen]["test"][task]
    assert _json.loads(out.read_text())["test_combined"] == pytest.approx(res["test_combined"])
    summary = combine.main(["--summarise", str(out), str(out)])
    assert len(summary["results"]) == 2 and "| combined |" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(BENCH.glob("quality_recipe*.yaml")), ids=lambda p: p.name)
def test_every_bench_recipe_loads_and_finds_its_pretrained_weights_offline(path, monkeypatch):
    """The recipe files RESULTS.md cites are valid parameter files; a pretrained one needs no download here."""
    from tongue_nb.model.backbones import resolve_backbone
    from tongue_nb.model.weights import locate_weights
    from tongue_nb.train.params import load_params

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params([path])
    if params.pretrained:
        source = locate_weights(resolve_backbone(params.backbone), params.pretrained_path or None)
        assert source.kind in ("file", "package", "cache"), f"{path.name}: {params.backbone} weights: {source.describe()}"


def test_flip_tta_cv_reevaluates_fold_runs_and_compares_out_of_fold_scores(tmp_path, monkeypatch, capsys):
    import json

    import flip_tta_cv

    from tongue_nb.analysis.cv import gather_fold_ensembles
    from tongue_nb.analysis.runs import load_sweep
    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.train import trainer
    from tongue_nb.train.params import load_params

    data = make_synthetic(tmp_path / "syn", n=36, size=40, seed=3)
    cv_dir = tmp_path / "cv"
    for k in range(2):
        out = cv_dir / "runs" / f"net-fold{k}"
        trainer.train(load_params(backbone="test_convnext", pretrained=False, image_size=32, batch_size=8,
                                  stage1_epochs=0, stage2_epochs=1, num_threads=1, data_dir=str(data), folds=2,
                                  fold=k, out_dir=str(out), experiment_name=out.name, progress=False,
                                  cache_dir=str(tmp_path / "cache")))
    with pytest.raises(SystemExit, match="no fold ensemble"):
        flip_tta_cv.main(["--out-dir", str(cv_dir), "--tta-dir", str(tmp_path / "x")])
    gather_fold_ensembles(cv_dir)
    # The flip is the mean of the logits of the batch and its mirror.
    model = flip_tta_cv.load_run_model(cv_dir / "runs" / "net-fold0")
    x = torch.randn(2, 3, 32, 32)
    flipped = flip_tta_cv.MirrorMean(model)(x)
    for name, logits in model(x).items():
        assert torch.allclose(flipped[name], (logits + model(x.flip(3))[name]) / 2, atol=1e-5)
    # Without the flip the re-evaluation reproduces each run's own predictions: same rows, loaders, thresholds.
    monkeypatch.setattr(flip_tta_cv, "MirrorMean", lambda m: m)
    res = flip_tta_cv.main(["--out-dir", str(cv_dir), "--tta-dir", str(tmp_path / "same"), "--threads", "1",
                          "--json", str(tmp_path / "same.json")])
    for k in range(2):
        mine = pd.read_csv(tmp_path / "same" / "runs" / f"net-fold{k}" / "predictions.csv")
        theirs = pd.read_csv(cv_dir / "runs" / f"net-fold{k}" / "predictions.csv")
        assert list(mine["id"]) == list(theirs["id"])
        p = [c for c in theirs.columns if c.startswith("p:")]
        assert np.allclose(mine[p].to_numpy(), theirs[p].to_numpy(), atol=1e-5)
        assert res["per_fold_val"][f"net-fold{k}"]["flip"] == pytest.approx(res["per_fold_val"][f"net-fold{k}"]["plain"])
    assert res["oof"]["flip"] == pytest.approx(res["oof"]["plain"])
    assert set(json.loads((tmp_path / "same.json").read_text())) == {"out_dir", "per_fold_val", "oof"}
    again = load_sweep(tmp_path / "same")
    assert again.cv and list(again.runs) == ["net"]  # the re-evaluated folds read as a fold ensemble
    with pytest.raises(SystemExit, match="fewer than two"):
        flip_tta_cv.main(["--out-dir", str(cv_dir), "--tta-dir", str(tmp_path / "x"), "--name", "other"])


def test_cv_report_gives_both_scorings_of_the_out_of_fold_rows(tmp_path, capsys):
    import json

    import cv as cv_bench

    from tongue_nb.analysis.cv import gather_fold_ensembles
    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.model.baseline import fit_baseline_run
    from tongue_nb.train import trainer
    from tongue_nb.train.params import load_params

    data = make_synthetic(tmp_path / "syn", n=45, size=40, seed=4)
    out_dir = tmp_path / "cv"
    for k in range(3):
        shared = dict(data_dir=str(data), folds=3, fold=k, progress=False, cache_dir=str(tmp_path / "cache"),
                      image_size=32, num_threads=1)
        net = out_dir / "runs" / f"net-fold{k}"
        trainer.train(load_params(backbone="test_convnext", pretrained=False, batch_size=8, stage1_epochs=0,
                                  stage2_epochs=1, out_dir=str(net), experiment_name=net.name, **shared))
        base = out_dir / "runs" / f"classical-baseline-fold{k}"
        fit_baseline_run(load_params(out_dir=str(base), experiment_name=base.name, **shared), base, max_iter=20)
    gather_fold_ensembles(out_dir)
    cv_bench.main(["report", "--out-dir", str(out_dir), "--json", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    crossed = json.loads((out_dir / "cv" / "net" / "summary.json").read_text())["cv"]["cross_fitted"]
    assert res["net"]["oof_cross_fitted"]["combined"] == pytest.approx(crossed["combined"])
    for key in ("selection", "selection_pooled"):  # candidates scored cross-fitted (the default) and pooled
        assert set(res[key]) == {"best", "simplest"}
        assert set(res[key]["simplest"]) == set(crossed["tasks"]) | {"combined"}
    assert res["rule_check"]["simplest"]["cross_fit"] is True and res["rule_check_pooled"]["best"]["cross_fit"] is False
    assert "packages" in res["machine"] and res["machine"]["packages"]["numpy"] == np.__version__
    assert "rule_check_pooled" in capsys.readouterr().out


def test_class_offsets_find_a_rare_class_that_argmax_never_predicts(tmp_path):
    """bench/class_offsets.py: macro-F1 as scikit-learn counts it, and cross-fitted offsets that recover a rare
    class whose probability the model understates (argmax never picks it)."""
    import class_offsets
    from sklearn.metrics import f1_score

    from tongue_nb.runio import RunFolder

    rng = np.random.default_rng(0)
    n, classes = 600, ["a", "b", "rare"]
    y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    p = np.full((n, 3), 0.1)
    p[np.arange(n), np.where(y == 2, 0, y)] = 0.55  # the rare class's rows look like class a, a little less sure
    p[y == 2, 2] = 0.35
    p /= p.sum(1, keepdims=True)
    pred = rng.integers(0, 3, n)
    assert class_offsets.macro_f1(y, pred, 3) == pytest.approx(f1_score(y, pred, average="macro"))
    rows = pd.DataFrame({"id": [f"i{i}" for i in range(n)], "split": "val", "fold": np.arange(n) % 4,
                         "true:t": [classes[c] for c in y], **{f"p:t:{c}": p[:, j] for j, c in enumerate(classes)}})
    folder = RunFolder(tmp_path / "cv" / "net")
    folder.path.mkdir(parents=True)
    folder.write_yaml(RunFolder.TASKS, TaskSchema((Task("t", "multiclass", tuple(classes)),)).as_dict())
    rows.to_csv(folder.file(RunFolder.PREDICTIONS), index=False)
    result = class_offsets.evaluate(folder.path)["tasks"]["t"]
    assert result["argmax"] == pytest.approx(f1_score(y, p.argmax(1), average="macro", labels=[0, 1, 2]))
    assert result["offsets"] > result["argmax"] + 0.1 and result["prior"] > result["argmax"]
