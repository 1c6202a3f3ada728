"""Accuracy on real tongue photos: a CPU recipe trained from scratch against the classical baseline (issue 5).

Imports TonguExpert with the predicted (L2) labels, splits it with a fixed seed (the trainer's
tongue_nb.data.splits split), trains the recipe (`--recipe`, from scratch) with `tongue_nb.train.trainer.train`,
fits `tongue_nb.model.baseline` on the same train split, and prints per-task macro-F1 on the TEST split for
both, plus their agreement with the manual L1 labels on the test images that have them (and the L2
labels' own agreement with L1 as a reference). Short ablation runs (`--ablations`) change one lever
each (crop, resolution, class weighting, augmentation) and are compared on the VALIDATION split only:
the recipe is chosen there, never on test.

    .venv/bin/python bench/quality.py --recipe bench/quality_recipe.yaml --minutes 30 --threads 1 --baseline-size 96
    .venv/bin/python bench/quality.py --only ablations --ablations all --ablation-epochs 2 --threads 1
    .venv/bin/python bench/quality.py --skip-train      # re-evaluate the existing runs, rewrite the report
    .venv/bin/python bench/quality.py --summarise bench/results/quality.json bench/results/quality-seed1.json
                                                        # per-task mean and range over seeds (splits)

Outputs: <out>.json and <out>.md (default bench/results/quality.*); run folders under --runs-dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)

from tongue_nb.model import baseline as baseline_mod# noqa: E402
from tongue_nb.data import cache as cache_mod# noqa: E402
from tongue_nb.analysis import metrics as metrics_mod# noqa: E402
from tongue_nb.train import trainer# noqa: E402
from tongue_nb.data.loader import BatchLoader  # noqa: E402
from tongue_nb.model.backbones import load_run_model  # noqa: E402
from tongue_nb.train.params import TrainParams, load_params  # noqa: E402
from tongue_nb.data.labels import Labels, load_labels  # noqa: E402
from tongue_nb.data.tasks import TaskSchema  # noqa: E402

log = logging.getLogger("bench.quality")

DEFAULT_RECIPE = common.ROOT / "bench" / "quality_recipe.yaml"
# One lever changed per ablation, everything else as in the recipe (at the shorter ablation budget).
ABLATIONS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no_crop": {"crop": "none"},
    "crop_blank": {"crop": "crop_blank"},
    "size_64": {"image_size": 64},
    "size_128": {"image_size": 128},
    "no_class_weighting": {"class_weighting": "none"},
    "no_augment": {"augment": False},
    "convnext_atto": {"backbone": "convnext_atto"},
}


# The recipe settings recorded with every run's figures.
SETTING_KEYS = ("backbone", "image_size", "crop", "stage2_epochs", "max_steps_per_epoch", "batch_size",
                "stage2_lr_backbone", "stage2_lr_head", "class_weighting", "task_weights", "augment",
                "augment_strength", "drop_rate", "label_smoothing", "ema_decay", "layer_decay", "precision",
                "channels_last")


class BudgetExceeded(RuntimeError):
    """Raised from the epoch callback once the time budget is spent (the run folder stays consistent)."""


# --------------------------------------------------------------------------- training and evaluation


def train_recipe(params: TrainParams, minutes: float) -> dict[str, Any]:
    """Train per `params` into params.out_dir (fresh), stopping after the epoch that exceeds `minutes`."""
    out = Path(params.out_dir)
    if out.exists():
        if not (out / "params.yaml").is_file():
            raise SystemExit(f"{out} exists and is not a tongue_nb run folder; refusing to delete it")
        shutil.rmtree(out)  # a fresh run: the trainer refuses a folder that already holds one
    t0 = time.perf_counter()

    def budget(row: Mapping[str, Any]) -> None:
        elapsed = time.perf_counter() - t0
        log.info("epoch %s done at %.1f min: val combined %.4f", row["epoch"], elapsed / 60, row["val_combined"])
        if minutes > 0 and elapsed > minutes * 60:
            raise BudgetExceeded(f"time budget of {minutes} min spent after epoch {row['epoch']}")

    stopped = False
    try:
        trainer.train(params, on_epoch_end=budget)
    except BudgetExceeded as exc:
        log.warning("%s: evaluating the best checkpoint so far", exc)
        stopped = True
    return {"seconds": time.perf_counter() - t0, "stopped_by_budget": stopped}


def run_images(run_dir: Path, labels: Labels, image_size: int, cache_dir: str | None = None) -> np.ndarray:
    """The image cache [N, S, S, 3] a run trained on: its params.yaml's crop and margin at `image_size`."""
    import yaml

    params = yaml.safe_load((run_dir / "params.yaml").read_text()) or {}
    return cache_mod.build_cache(labels, image_size, crop=params.get("crop", "crop"),
                                 margin=float(params.get("crop_margin", 0.1)), cache_dir=cache_dir).images


def evaluate_run(run_dir: Path, labels: Labels, rows: Mapping[str, np.ndarray], cache_dir: str | None = None,
                 batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Probabilities of a run's best checkpoint on each split in `rows` (split name -> row indices)."""
    model = load_run_model(run_dir).eval()
    images = run_images(run_dir, labels, model.input_size, cache_dir)
    out = {}
    for name, idx in rows.items():
        loader = BatchLoader(images, labels.targets, None, idx, batch_size, model.mean, model.std)
        probs, _, _ = trainer.evaluate(model, loader, labels.schema)
        # evaluate returns rows in ascending index order: keep `rows` sorted so they line up.
        out[name] = probs
    return out


def split_rows(run_dir: Path, labels: Labels) -> dict[str, np.ndarray]:
    """Sorted row indices of each split, from the split.csv a run folder holds."""
    split = pd.read_csv(run_dir / "split.csv", keep_default_na=False)
    where = dict(zip(split["id"], split["split"]))
    ids = labels.table["id"].to_numpy()
    col = np.array([where.get(i, "") for i in ids], dtype=object)
    return {name: np.flatnonzero(col == name) for name in ("train", "val", "test")}


def class_predictions(schema: TaskSchema, probs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Argmax class names per multiclass task (the `fixed` view)."""
    out = {}
    for task in schema:
        if task.kind != "multiclass":
            continue
        out[task.name] = np.asarray(task.labels, dtype=object)[np.asarray(probs[task.name]).argmax(axis=1)]
    return out


def baseline_probs(run_dir: Path, schema: TaskSchema, ids: Sequence[str], split: str = "test"
                   ) -> dict[str, np.ndarray]:
    """Per-task probabilities of a baseline run for `ids` (in that order), from its predictions.csv."""
    pred = pd.read_csv(run_dir / "predictions.csv", keep_default_na=False)
    pred = pred[pred["split"] == split].set_index("id")
    missing = [i for i in ids if i not in pred.index]
    if missing:
        raise ValueError(f"{run_dir / 'predictions.csv'}: {len(missing)} {split} id(s) absent, first {missing[0]!r}; "
                         "the baseline and the recipe must use the same split")
    pred = pred.loc[list(ids)]
    return {t.name: pred[[f"p:{t.name}:{c}" for c in t.labels]].to_numpy(np.float32) for t in schema}


# --------------------------------------------------------------------------- named combinations


def combinations(schema: TaskSchema, members: Mapping[str, tuple[Mapping, Mapping]],
                 targets: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Named combinations of the recipe and the baseline, each its own row, never the plain network.

    'recipe+baseline': the mean of their probabilities; 'per-task selection': for each task the one
    of recipe, baseline and recipe+baseline with the best validation macro-F1 (combine.rank_per_task),
    scored on test. members: name -> (val probs, test probs) on the same rows as targets["val"/"test"].
    """
    from tongue_nb.analysis.combine import rank_per_task

    cands = dict(members)
    (rv, rt), (bv, bt) = members["recipe"], members["baseline"]
    cands["recipe+baseline"] = ({k: (rv[k] + bv[k]) / 2 for k in rv}, {k: (rt[k] + bt[k]) / 2 for k in rt})
    scored = {name: {s: metrics_mod.compute_metrics(schema, p, targets[s]) for s, p in zip(("val", "test"), pair)}
              for name, pair in cands.items()}

    def per_task(m: Mapping[str, Any]) -> dict[str, float]:
        return {k: v["primary"] for k, v in m["tasks"].items()}

    out: dict[str, Any] = {}
    for name in ("recipe+baseline",):
        out[name] = {"val_macro_f1": per_task(scored[name]["val"]), "val_combined": scored[name]["val"]["combined_score"],
                     "test_macro_f1": per_task(scored[name]["test"]),
                     "test_combined": scored[name]["test"]["combined_score"]}
    ranked = rank_per_task(schema, {n: v["val"] for n, v in scored.items()})
    choice = {t: r[0] for t, r in ranked.items()}
    test = {t: scored[c]["test"]["tasks"][t]["primary"] for t, c in choice.items()}
    val = {t: scored[c]["val"]["tasks"][t]["primary"] for t, c in choice.items()}
    out["per-task selection"] = {"choice": choice, "val_macro_f1": val, "test_macro_f1": test,
                                 "val_combined": metrics_mod.combined_score(schema, val),
                                 "test_combined": metrics_mod.combined_score(schema, test)}
    return out


# --------------------------------------------------------------------------- agreement with the manual labels


def l1_agreement(ids: Sequence[str], predictions: Mapping[str, Sequence[str]], l1: Labels) -> dict[str, dict]:
    """Per L1 task: n, accuracy and macro-F1 (over L1's classes) of predicted class names vs the manual labels.

    Only images in `ids` with a manual label for that task count; a prediction of a class L1 does not
    use (e.g. `none` fissures, which L1 leaves unannotated) counts as a disagreement.
    """
    from sklearn.metrics import f1_score

    pos = {i: k for k, i in enumerate(l1.table["id"].to_numpy())}
    out: dict[str, dict] = {}
    for task in l1.schema:
        if task.name not in predictions or task.kind != "multiclass":
            continue
        pred = np.asarray(predictions[task.name], dtype=object)
        if len(pred) != len(ids):
            raise ValueError(f"predictions[{task.name!r}] has {len(pred)} entries for {len(ids)} ids")
        truth, guess = [], []
        for i, p in zip(ids, pred):
            k = pos.get(i)
            if k is None or l1.targets[task.name][k] < 0:
                continue
            truth.append(task.labels[l1.targets[task.name][k]])
            guess.append(p)
        n = len(truth)
        if n == 0:
            out[task.name] = {"n": 0, "accuracy": None, "macro_f1": None}
            continue
        acc = float(np.mean(np.asarray(truth, dtype=object) == np.asarray(guess, dtype=object)))
        f1 = float(f1_score(truth, guess, labels=list(task.labels), average="macro", zero_division=0))
        out[task.name] = {"n": n, "accuracy": acc, "macro_f1": f1}
    return out


# --------------------------------------------------------------------------- ablations (validation split only)


def ablation_params(base: TrainParams, name: str, epochs: int, runs_dir: Path, steps: int = 0) -> TrainParams:
    """The recipe with one lever changed and a shorter schedule (epochs x steps), into runs_dir/ablation-<name>."""
    if name not in ABLATIONS:
        raise SystemExit(f"--ablations: unknown ablation {name!r}; choose from {', '.join(ABLATIONS)} or 'all'")
    import dataclasses

    return dataclasses.replace(base, stage2_epochs=epochs, max_steps_per_epoch=steps,
                               out_dir=str(runs_dir / f"ablation-{name}"), experiment_name=f"ablation-{name}",
                               **ABLATIONS[name])


def ablation_result(run_dir: Path) -> dict[str, Any] | None:
    """Best-epoch validation scores of a (possibly budget-stopped) ablation run, from its history.csv."""
    hist = run_dir / "history.csv"
    if not hist.is_file():
        return None
    df = pd.read_csv(hist)
    if df.empty:
        return None
    best = df.loc[df["val_combined"].idxmax()]
    tasks = {c[len("val_"):-len("_primary")]: float(best[c]) for c in df.columns
             if c.startswith("val_") and c.endswith("_primary")}
    import yaml

    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    # With task_weights the run's combined score is weighted; the plain task mean compares across runs.
    return {"val_combined": float(best["val_combined"]), "val_tasks": tasks, "best_epoch": int(best["epoch"]),
            "val_task_mean": float(np.mean(list(tasks.values()))) if tasks else float("nan"),
            "epochs_run": int(df["epoch"].max()), "train_seconds": float(df["seconds"].sum()),
            "train_samples_per_s": float(df["train_samples_per_s"].mean()),
            "settings": {k: params.get(k) for k in SETTING_KEYS}}


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def mean_range(values: Sequence[float]) -> str:
    """'mean (min-max)' of figures from several splits or runs."""
    return f"{_fmt(float(np.mean(values)))} ({_fmt(min(values))}-{_fmt(max(values))})"


def render_markdown(res: Mapping[str, Any]) -> str:
    """The figures as Markdown tables (also printed)."""
    lines = [f"# bench/quality: {res.get('recipe_name', 'CPU recipe')} vs classical baseline (TonguExpert, L2)", ""]
    m = res.get("machine", {})
    lines += [f"Date {m.get('date')}, {m.get('cpu_count')} CPU(s) ({m.get('host_cpu')}), "
              f"load {m.get('load_avg_1_5_15')}, torch {m.get('torch')}, timm {m.get('timm')}, "
              f"commit {m.get('commit')}.", ""]
    main, base = res.get("main"), res.get("baseline") or {}
    if main:
        stopped = " (stopped by the time budget)" if main["train"].get("stopped_by_budget") else ""
        c = main["counts"]
        lines += [f"Split (seed {main['seed']}): train {c['train']}, val {c['val']}, test {c['test']} images. "
                  f"Recipe: `{main['settings']}`; trained {main['train']['seconds'] / 60:.1f} min{stopped}.", "",
                  "## Test split, macro-F1 per task (L2 labels)", "",
                  "| task | CPU recipe | baseline | difference |", "|---|---|---|---|"]
        rows = [(task, v, base.get("test_macro_f1", {}).get(task)) for task, v in main["test_macro_f1"].items()]
        rows.append(("**combined**", main["test_combined"], base.get("test_combined")))
        for task, v, b in rows:
            lines.append(f"| {task} | {_fmt(v)} | {_fmt(b)} | {_fmt(None if b is None else v - b)} |")
        for name, combo in (res.get("combinations") or {}).items():
            chosen = combo.get("choice")
            lines.append(f"| *{name}* | {_fmt(combo['test_combined'])} (combined) | | "
                         + (f"chosen on val: {', '.join(f'{t}: {c}' for t, c in chosen.items())}" if chosen
                            else "mean of the two models' probabilities") + " |")
        lines += ["", f"Validation combined: CPU recipe {_fmt(main.get('val_combined'))}, "
                  f"baseline {_fmt(base.get('val_combined'))} (features at {base.get('image_size', '?')} px).", ""]
    agree = res.get("l1_agreement")
    if agree:
        lines += ["## Agreement with the manual (L1) labels on test images that have them", "",
                  "accuracy / macro-F1 over L1's classes; L2 = the database's predicted labels (reference).", "",
                  "| task | n | CPU recipe | baseline | L2 labels |", "|---|---|---|---|---|"]
        for task, v in agree["cpu_recipe"].items():
            b, r = agree["baseline"].get(task, {}), agree["l2_labels"].get(task, {})
            lines.append(f"| {task} | {v['n']} | {_fmt(v['accuracy'])} / {_fmt(v['macro_f1'])} | "
                         f"{_fmt(b.get('accuracy'))} / {_fmt(b.get('macro_f1'))} | "
                         f"{_fmt(r.get('accuracy'))} / {_fmt(r.get('macro_f1'))} |")
        lines.append("")
    abl = res.get("ablations")
    if abl:
        tasks = sorted({t for a in abl.values() for t in a["val_tasks"]})
        lines += ["## Ablations (validation split, shorter budget, one lever each)", "",
                  "| run | settings | epochs x steps | val combined | " + " | ".join(tasks) + " | samples/s |",
                  "|---|---|---|---|" + "---|" * len(tasks) + "---|"]
        for name, a in abl.items():
            # The settings the run really had (the recipe may have changed since it was trained).
            st = a.get("settings", {})
            setting = (f"{st.get('backbone')} {st.get('image_size')}px {st.get('crop')}, "
                       f"lr {st.get('stage2_lr_backbone')}, class weights {st.get('class_weighting')}, "
                       f"augment {st.get('augment')}")
            extras = [f"{k} {st[k]}" for k in ("label_smoothing", "ema_decay", "task_weights") if st.get(k)]
            extras += [f"layer_decay {st['layer_decay']}"] if st.get("layer_decay") not in (None, 1.0) else []
            extras += [f"augment_strength {st['augment_strength']}"] if st.get("augment_strength") not in (None, 1.0) else []
            extras += [f"{st['precision']}"] if st.get("precision") not in (None, "auto", "fp32") else []
            extras += ["channels_last"] if st.get("channels_last") else []
            setting += "".join(f", {e}" for e in extras)
            cells = " | ".join(_fmt(a["val_tasks"].get(t)) for t in tasks)
            score = _fmt(a["val_combined"])
            if st.get("task_weights"):  # weighted by the run's task weights: give the plain mean beside it
                score += f" (task mean {_fmt(a.get('val_task_mean'))})"
            lines.append(f"| {name} | {setting} | {a['epochs_run']} x {st.get('max_steps_per_epoch') or 'all'} | "
                         f"{score} | {cells} | {a['train_samples_per_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def summarise_seeds(results: Sequence[Mapping[str, Any]], against: Sequence[Mapping[str, Any]] = ()) -> str:
    """Per-task test macro-F1 over several main runs (other seeds/splits): mean and range, and wins.

    Columns: the recipe, its named combinations with the baseline (when recorded), the `against`
    recipe's runs on the same seeds (e.g. the from-scratch v5), and the baseline.
    """
    mains = [(r["main"], r["baseline"], r.get("combinations") or {}) for r in results
             if r.get("main") and r.get("baseline")]
    if not mains:
        raise SystemExit("--summarise: none of the files holds a main run with its baseline")
    seeds = [m["seed"] for m, _, _ in mains]
    other = {r["main"]["seed"]: r["main"] for r in against if r.get("main")}
    if against and sorted(other) != sorted(seeds):
        raise SystemExit(f"--against: seeds {sorted(other)} differ from the recipe's {sorted(seeds)}")
    combo_names = [n for n in (mains[0][2] or {}) if all(n in c for _, _, c in mains)]
    tasks = list(mains[0][0]["test_macro_f1"])
    against_name = str(against[0].get("recipe_name", "against")) if other else ""
    head = ["task", str(results[0].get("recipe_name", "recipe"))] + combo_names + ([against_name] if other else []) + ["baseline", "recipe - baseline",
                                                                              "recipe ahead"]
    lines = [f"# bench/quality over {len(mains)} splits (seeds {', '.join(map(str, seeds))}): test macro-F1", "",
             "mean (min-max); 'recipe ahead' counts the splits where the recipe beats the baseline.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def col(task: str, get) -> list[float]:
        key = "test_combined" if task == "combined" else None
        return [get(i)[key] if key else get(i)["test_macro_f1"][task] for i in range(len(mains))]

    for task in tasks + ["combined"]:
        rec = col(task, lambda i: mains[i][0])
        bas = col(task, lambda i: mains[i][1])
        cells = [mean_range(rec)] + [mean_range(col(task, lambda i, n=n: mains[i][2][n])) for n in combo_names]
        if other:
            cells.append(mean_range(col(task, lambda i: other[seeds[i]])))
        ahead = sum(r > b for r, b in zip(rec, bas))
        name = "**combined**" if task == "combined" else task
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_range(bas)} | "
                     f"{float(np.mean(rec) - np.mean(bas)):+.3f} | {ahead} of {len(mains)} |")
    if "per-task selection" in combo_names:
        lines += ["", "Per-task selection's choices (made on validation), per seed: "
                  + "; ".join(f"seed {m['seed']}: " + ", ".join(f"{t} {c}" for t, c in
                                                                 combos["per-task selection"]["choice"].items())
                              for m, _, combos in mains)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="TrainParams YAML of the CPU recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe parameter (repeatable)")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget of the main training run (0 = none)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "quality", help="output prefix (.json, .md)")
    p.add_argument("--runs-dir", type=Path, default=None, help="run folders; default <cache>/bench/quality-runs")
    p.add_argument("--data", type=Path, default=common.DEFAULT_DB, help="TonguExpertDatabase folder")
    p.add_argument("--work-dir", type=Path, default=None, help="where the imports go; default <cache>/bench")
    p.add_argument("--threads", type=int, default=1, help="torch / boosting CPU threads")
    p.add_argument("--baseline-size", type=int, default=0,
                   help="image size of the baseline's colour/texture features; 0 = the recipe's size")
    p.add_argument("--skip-train", action="store_true", help="re-evaluate the existing runs instead of training")
    p.add_argument("--only", choices=("all", "main", "ablations"), default="main",
                   help="main: recipe + baseline; ablations: only the ablation runs; all: both")
    p.add_argument("--ablations", nargs="*", default=[], help=f"ablation names ({', '.join(ABLATIONS)}) or 'all'")
    p.add_argument("--ablation-epochs", type=int, default=2, help="epochs of each ablation run")
    p.add_argument("--ablation-steps", type=int, default=0, help="micro-steps per ablation epoch (0 = all)")
    p.add_argument("--ablation-minutes", type=float, default=0.0, help="time cap per ablation run (0 = none)")
    p.add_argument("--summarise", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only print per-task mean and range over these result files (one per seed) and exit")
    p.add_argument("--against", type=Path, nargs="*", default=[], metavar="JSON",
                   help="with --summarise: another recipe's result files on the same seeds, as a column")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train/evaluate per the options, print the tables, write <out>.json and <out>.md."""
    args = build_parser().parse_args(argv)
    if args.summarise:
        text = summarise_seeds([json.loads(Path(f).read_text()) for f in args.summarise],
                               [json.loads(Path(f).read_text()) for f in args.against])
        print(text)
        return {"summary": text}
    common.setup_logging(args.verbose)
    torch.set_num_threads(max(1, args.threads))
    runs_dir = args.runs_dir or common.default_work_dir() / "quality-runs"
    data_dir = common.ensure_import(args.data, "predicted", args.work_dir)
    l1_dir = common.ensure_import(args.data, "manual", args.work_dir)
    base = load_params(files=[args.recipe], overrides=args.overrides, data_dir=str(data_dir),
                       out_dir=str(runs_dir / "cpu-recipe"), experiment_name="cpu-recipe",
                       progress=False, num_threads=max(1, args.threads), device="cpu")
    labels = load_labels(data_dir)
    out_json = args.out.with_suffix(".json")
    previous = {}
    if out_json.is_file():
        previous = json.loads(out_json.read_text())
    res: dict[str, Any] = {"machine": common.machine_info(), "recipe_file": str(args.recipe),
                           "recipe_name": f"{base.backbone} {base.image_size or ''}px "
                                          + ("pretrained" if base.pretrained else "from scratch"),
                           "data_dir": str(data_dir)}
    for key in ("main", "baseline", "l1_agreement"):
        if key in previous:
            res[key] = previous[key]

    if args.only in ("main", "all"):
        res.update(run_main(args, base, labels, l1_dir, runs_dir))
    names = list(ABLATIONS) if args.ablations == ["all"] else list(args.ablations)
    if args.only in ("ablations", "all") and not args.skip_train:
        for name in names:
            params = ablation_params(base, name, args.ablation_epochs, runs_dir, args.ablation_steps)
            log.info("ablation %s: %s", name, ABLATIONS[name] or "(recipe at the ablation budget)")
            train_recipe(params, args.ablation_minutes)
    # Every finished ablation run is reported, so separate processes can train them in parallel.
    res["ablations"] = {n: r for n in ABLATIONS if (r := ablation_result(runs_dir / f"ablation-{n}")) is not None}
    text = render_markdown(res)
    print(text)
    common.write_json(out_json, res)
    args.out.with_suffix(".md").write_text(text + "\n")
    log.info("wrote %s and %s", out_json, args.out.with_suffix(".md"))
    return res


def run_main(args: argparse.Namespace, base: TrainParams, labels: Labels, l1_dir: Path, runs_dir: Path
             ) -> dict[str, Any]:
    """Train (unless --skip-train) the recipe and the baseline; test metrics and L1 agreement of both."""
    run_dir = Path(base.out_dir)
    base_dir = runs_dir / "baseline"
    train_info = {"seconds": float("nan"), "stopped_by_budget": None}
    prev: dict[str, Any] = {}
    if args.out.with_suffix(".json").is_file():
        prev = json.loads(args.out.with_suffix(".json").read_text())
    if not args.skip_train:
        log.info("training the CPU recipe into %s (budget %.0f min)", run_dir, args.minutes)
        train_info = train_recipe(base, args.minutes)
    elif not (run_dir / "checkpoints" / "best.safetensors").is_file():
        raise SystemExit(f"--skip-train: {run_dir} holds no trained run (checkpoints/best.safetensors)")
    else:
        train_info = prev.get("main", {}).get("train", train_info)
    if not args.skip_train or not (base_dir / "summary.json").is_file():
        log.info("fitting the classical baseline into %s", base_dir)
        t0 = time.perf_counter()
        # Same seed and split fractions as the recipe: the same train/val/test images.
        # --baseline-size keeps the baseline's features fixed when the recipe's resolution changes,
        # so a cheaper recipe is never compared against a baseline weakened by the same change.
        b_size = args.baseline_size or base.image_size or 128
        baseline_mod.fit_baseline_run(dataclasses.replace(base, data_dir=str(labels.root), image_size=b_size,
                                                          num_threads=args.threads), base_dir, crop="crop_blank")
        base_seconds = time.perf_counter() - t0
    else:
        base_seconds = prev.get("baseline", {}).get("fit_seconds")

    schema = labels.schema
    rows = split_rows(run_dir, labels)
    probs = evaluate_run(run_dir, labels, {"val": rows["val"], "test": rows["test"]}, base.cache_dir or None)
    targets = {s: {k: v[rows[s]] for k, v in labels.targets.items()} for s in ("val", "test")}
    test_m = metrics_mod.compute_metrics(schema, probs["test"], targets["test"])
    val_m = metrics_mod.compute_metrics(schema, probs["val"], targets["val"])
    test_ids = labels.table["id"].to_numpy()[rows["test"]]
    val_ids = labels.table["id"].to_numpy()[rows["val"]]
    b_test = baseline_probs(base_dir, schema, test_ids, "test")
    b_val = baseline_probs(base_dir, schema, val_ids, "val")
    b_test_m = metrics_mod.compute_metrics(schema, b_test, targets["test"])
    b_val_m = metrics_mod.compute_metrics(schema, b_val, targets["val"])

    l1 = load_labels(l1_dir)
    l2_names = {t.name: np.asarray([t.labels[k] if k >= 0 else "" for k in targets["test"][t.name]], dtype=object)
                for t in schema if t.kind == "multiclass"}
    agreement = {"cpu_recipe": l1_agreement(test_ids, class_predictions(schema, probs["test"]), l1),
                 "baseline": l1_agreement(test_ids, class_predictions(schema, b_test), l1),
                 "l2_labels": l1_agreement(test_ids, l2_names, l1)}

    def per_task(m: Mapping[str, Any]) -> dict[str, float]:
        return {k: v["primary"] for k, v in m["tasks"].items()}

    combos = combinations(schema, {"recipe": (probs["val"], probs["test"]), "baseline": (b_val, b_test)}, targets)
    settings = {k: getattr(base, k) for k in SETTING_KEYS}
    return {
        "main": {"run_dir": str(run_dir), "seed": base.seed, "settings": settings, "train": train_info,
                 "counts": {s: int(len(r)) for s, r in rows.items()},
                 "test_macro_f1": per_task(test_m), "test_combined": test_m["combined_score"],
                 "val_macro_f1": per_task(val_m), "val_combined": val_m["combined_score"],
                 "test_accuracy": {k: v.get("accuracy") for k, v in test_m["tasks"].items()}},
        "baseline": {"run_dir": str(base_dir), "test_macro_f1": per_task(b_test_m),
                     "image_size": args.baseline_size or base.image_size or 128,
                     "test_combined": b_test_m["combined_score"], "val_macro_f1": per_task(b_val_m),
                     "val_combined": b_val_m["combined_score"], "fit_seconds": base_seconds,
                     "test_accuracy": {k: v.get("accuracy") for k, v in b_test_m["tasks"].items()}},
        "l1_agreement": agreement,
        "combinations": combos,
        "beats_baseline_on_every_task": all(test_m["tasks"][t]["primary"] > b_test_m["tasks"][t]["primary"]
                                            for t in schema.names),
    }


if __name__ == "__main__":
    main()
