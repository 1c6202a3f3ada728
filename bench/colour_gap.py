"""Where the classical baseline's lead on the colour tasks comes from: classifier family or features?

The baseline (tongue_nb.model.baseline) feeds colour/texture statistics of the tongue region to gradient
boosting. This script keeps those features fixed and swaps the classifier for smooth ones (a
logistic regression and a one-hidden-layer MLP, both on standardised features), on the same
deterministic splits bench/quality.py uses, and prints per-task macro-F1 on val and test. If the
smooth classifiers land where the CNN does while boosting stays ahead, the gap lies in the
classifier family (axis-aligned thresholds on colour percentiles), not in what the network sees.
With `--runs`, the same three classifiers are also fitted on the pooled backbone features of trained
bench/quality runs (each on its own split), beside the network's own heads: whether boosting on
what the network learned does better than its linear heads.

    .venv/bin/python bench/colour_gap.py --seeds 0 1 2
    .venv/bin/python bench/colour_gap.py --seeds 0 1 2 --runs RUNS_SEED0/cpu-recipe RUNS_SEED1/cpu-recipe ...
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)
import quality  # noqa: E402  (bench/quality.py: a run's split and image cache, table cells)

from tongue_nb.model import baseline, features
from tongue_nb.data import cache
from tongue_nb.data import splits# noqa: E402
from tongue_nb.data.labels import load_labels  # noqa: E402

log = logging.getLogger("bench.colour_gap")
CLASSIFIERS = ("boosting", "logistic", "mlp")


def _classifier(name: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced"))
    if name == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier((128,), alpha=1e-3, max_iter=500, early_stopping=True,
                                                             random_state=seed))
    raise ValueError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")


def _macro_f1(y: np.ndarray, pred: np.ndarray, rows: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the labelled samples (y >= 0) among `rows` (a boolean mask)."""
    from sklearn.metrics import f1_score

    r = rows & (y >= 0)
    return float(f1_score(y[r], pred[r], average="macro", labels=range(n_classes), zero_division=0))


def compare_classifiers(features: np.ndarray, targets: dict[str, np.ndarray], schema, split: np.ndarray,
                        seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """{classifier: {task: {"val": macro-F1, "test": macro-F1}}} for the multiclass tasks of the schema."""
    tasks = [t for t in schema if t.kind == "multiclass"]
    skipped = [t.name for t in schema if t.kind != "multiclass"]
    if skipped:
        log.info("skipping non-multiclass tasks: %s", ", ".join(skipped))
    rows = {name: split == name for name in ("train", "val", "test")}
    out: dict[str, dict[str, dict[str, float]]] = {c: {t.name: {} for t in tasks} for c in CLASSIFIERS}

    # The baseline's own estimator, exactly as fit_baseline_run builds it; predicted for every row at once.
    est = baseline.ColourTextureBaseline(class_weight="balanced", random_state=seed)
    est.fit_features(features[rows["train"]], {k: v[rows["train"]] for k, v in targets.items()}, schema)
    probs = est.predict_proba_features(features)
    for t in tasks:
        y = targets[t.name]
        preds = {"boosting": probs[t.name].argmax(1)}
        fit_rows = rows["train"] & (y >= 0)
        for name in CLASSIFIERS[1:]:
            preds[name] = _classifier(name, seed).fit(features[fit_rows], y[fit_rows]).predict(features)
        for name, pred in preds.items():
            for part in ("val", "test"):
                out[name][t.name][part] = _macro_f1(y, pred, rows[part], len(t.labels))
    return out


def network_features(run_dir: Path, labels, batch_size: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pooled backbone features [N, D] of a trained run's best checkpoint (fp32, eval mode) for every
    sample, and its own heads' class predictions per multiclass task (argmax of the logits)."""
    import torch

    from tongue_nb.data.loader import BatchLoader
    from tongue_nb.model.backbones import load_run_model

    model = load_run_model(run_dir).eval()
    images = quality.run_images(run_dir, labels, model.input_size)
    loader = BatchLoader(images, labels.targets, None, np.arange(len(images)), batch_size, model.mean, model.std)
    feats, preds = [], {t.name: [] for t in labels.schema if t.kind == "multiclass"}
    with torch.no_grad():
        for batch in loader:  # not shuffled: rows in order
            f = model.backbone(batch.x).float()
            feats.append(f.numpy())
            for name in preds:
                preds[name].append(model.heads[name](f).argmax(1).numpy())
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


def run_readouts(run_dir: Path, labels) -> dict[str, Any]:
    """The network's heads and the three classifiers on a trained run's pooled features, on the run's split."""
    import yaml

    split = np.full(len(labels.table), "", dtype=object)
    for name, idx in quality.split_rows(run_dir, labels).items():
        split[idx] = name
    seed = int((yaml.safe_load((run_dir / "params.yaml").read_text()) or {}).get("seed", 0))
    feats, heads = network_features(run_dir, labels)
    res = compare_classifiers(feats, labels.targets, labels.schema, split, seed)
    res["network heads"] = {
        name: {part: _macro_f1(labels.targets[name], pred, split == part, len(labels.schema[name].labels))
               for part in ("val", "test")}
        for name, pred in heads.items()}
    return {"seed": seed, "feature_dim": int(feats.shape[1]), "per_classifier": res}


def _table(per_run: Sequence[dict[str, dict[str, dict[str, float]]]], columns: Sequence[str], part: str) -> list[str]:
    """Markdown rows: per task, mean (min-max) over the runs of each column's macro-F1 on `part`."""
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in per_run[0][columns[0]]:
        cells = []
        for c in columns:
            v = [r[c][task][part] for r in per_run]
            cells.append(quality.mean_range(v) if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    lines = [f"# bench/colour_gap: the baseline's features under three classifiers ({res['labels']} labels)", "",
             f"Date {res['machine']['date']}, features at {res['image_size']} px ({res['crop']}), "
             f"splits with seeds {', '.join(map(str, seeds))}, commit {res['machine']['commit']}.", "",
             "Macro-F1, mean over the splits (min-max): boosting = the baseline's own gradient boosting; "
             "logistic / mlp = smooth classifiers on the same standardised features.", ""]
    per_seed = [res["per_seed"][str(seed)] for seed in seeds]
    for part in ("val", "test"):
        lines += [f"## {part} split", "", *_table(per_seed, CLASSIFIERS, part), ""]
    runs = res.get("runs") or {}
    if runs:
        lines += ["## A trained network's pooled features under the same classifiers", "",
                  "Runs: " + ", ".join(f"`{d}` (seed {r['seed']}, {r['feature_dim']} features)" for d, r in runs.items())
                  + "; each on its own split. 'network heads' = the run's own linear heads.", ""]
        cols = ("network heads", *CLASSIFIERS)
        for part in ("val", "test"):
            lines += [f"### {part} split", "", *_table([r["per_classifier"] for r in runs.values()], cols, part), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=common.DEFAULT_DB, help="TonguExpertDatabase folder")
    p.add_argument("--work-dir", type=Path, default=None, help="where the import goes; default <cache>/bench")
    p.add_argument("--labels", choices=("predicted", "manual"), default="predicted")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (as bench/quality's seed)")
    p.add_argument("--image-size", type=int, default=96, help="feature image size (bench/quality's --baseline-size)")
    p.add_argument("--crop", default="crop_blank", help="mask use when caching (the baseline's default)")
    p.add_argument("--runs", type=Path, nargs="*", default=[],
                   help="trained run folders (e.g. bench/quality's <runs-dir>/cpu-recipe) whose pooled features "
                        "to read out as well")
    p.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads for the classifiers")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "colour_gap",
                   help="writes OUT.json and OUT.md")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    if args.image_size < 16:
        raise SystemExit(f"--image-size must be >= 16, got {args.image_size}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    from threadpoolctl import threadpool_limits

    for run in args.runs:
        if not (run / "params.yaml").is_file() or not (run / "split.csv").is_file():
            raise SystemExit(f"--runs {run}: not a finished training run (params.yaml / split.csv missing)")
    data_dir = common.ensure_import(args.data, args.labels, args.work_dir)
    labels = load_labels(data_dir)
    t0 = time.perf_counter()
    feats = features.extract_features(cache.build_cache(labels, args.image_size, crop=args.crop).images)
    log.info("features %s in %.1f s", feats.shape, time.perf_counter() - t0)
    per_seed = {}
    with threadpool_limits(limits=args.threads):
        for seed in args.seeds:
            split = np.asarray(splits.make_split(labels.table, labels.targets, labels.schema, seed=seed))
            per_seed[str(seed)] = compare_classifiers(feats, labels.targets, labels.schema, split, seed)
            log.info("seed %d done", seed)
        runs = {str(run): run_readouts(run, labels) for run in args.runs}
    res = {"machine": common.machine_info(), "labels": args.labels, "image_size": args.image_size,
           "crop": args.crop, "seeds": list(args.seeds), "per_seed": per_seed, "runs": runs}
    md = render_markdown(res)
    common.write_json(args.out.with_suffix(".json"), res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
