"""Test-time flip averaging: does scoring each photo and its mirror image, and averaging, help a trained network?

For each split given as NET_RUN,BASELINE_RUN (trained on the same split), the network's val and test photos are
predicted twice from their files (tongue_nb.pipeline.predict, the run's own preprocessing): as they are, and as
the mean of the photo and its horizontal mirror. Both versions are scored alone and in the per-task selection
(network, baseline, their mean; chosen on val, reported on test), exactly as the comparison scores runs. The
decision rule is the project's: adopt only what is better on validation.

    .venv/bin/python bench/flip_tta.py --split E/s0/cpu-recipe,E/s0/baseline --split E/s1/cpu-recipe,E/s1/baseline \
        --threads 2 --out bench/results/flip-tta.json
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tongue_nb.analysis import metrics  # noqa: E402
from tongue_nb.analysis.combine import rank_per_task, score_candidates  # noqa: E402
from tongue_nb.analysis.runs import load_run  # noqa: E402
from tongue_nb.data.labels import load_labels  # noqa: E402
from tongue_nb.pipeline.predict import Predictor, predict_table  # noqa: E402
from tongue_nb.runio import predictions_table  # noqa: E402


class MirrorMean(torch.nn.Module):
    """A network whose logits are the mean of those for the photo and for its left-right mirror image."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.mean, self.std, self.input_size = net, net.mean, net.std, net.input_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.net(x), self.net(x.flip(3))
        return {k: (a[k] + b[k]) / 2 for k in a}


def repredict(run: Path, out: Path, mirror: bool) -> Path:
    """A copy of the run folder whose predictions.csv is predicted again from the photo files."""
    params = yaml.safe_load((run / "params.yaml").read_text())
    labels = load_labels(params["data_dir"])
    split = pd.read_csv(run / "split.csv", keep_default_na=False)
    pred = Predictor.from_runs([run])
    if mirror:
        pred.model = MirrorMean(pred.model).eval()
    root, tables = Path(labels.root), []
    for name in ("val", "test"):
        rows = np.flatnonzero(labels.table["id"].isin(set(split.loc[split["split"] == name, "id"])).to_numpy())
        photos = pd.DataFrame({"id": labels.table["id"].iloc[rows].to_numpy(),
                               "image": [str(root / p) for p in labels.table["image"].iloc[rows]],
                               "mask": [str(root / p) for p in labels.table["mask"].iloc[rows]]})
        table = predict_table(pred, photos, workers=1)
        if (table["error"] != "").any():
            raise SystemExit(f"{run}: {int((table['error'] != '').sum())} {name} photos could not be read")
        probs = {t.name: table[[f"p:{t.name}:{lab}" for lab in t.labels]].to_numpy(float) for t in labels.schema}
        tables.append(predictions_table(labels.schema, labels.table.iloc[rows], probs,
                                        {k: v[rows] for k, v in labels.targets.items()}, pred.thresholds, name))
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "predictions.csv"))
    pd.concat(tables, ignore_index=True).to_csv(out / "predictions.csv", index=False)
    return out


def one_split(net: Path, baseline: Path, work: Path) -> dict:
    runs = {"plain": load_run(repredict(net, work / "plain", False)),
            "mirror": load_run(repredict(net, work / "mirror", True)), "baseline": load_run(baseline)}
    schema = runs["plain"].schema
    cands = {"plain": [runs["plain"]], "mirror": [runs["mirror"]], "baseline": [runs["baseline"]],
             "plain+baseline": [runs["plain"], runs["baseline"]], "mirror+baseline": [runs["mirror"], runs["baseline"]]}
    scores = score_candidates(schema, cands)
    out: dict = {"net": str(net), "baseline": str(baseline), "candidates": {
        n: {"val": {t: m["primary"] for t, m in v["val"]["tasks"].items()}, "val_combined": v["val"]["combined_score"],
            "test": {t: m["primary"] for t, m in v["test"]["tasks"].items()}, "test_combined": v["test"]["combined_score"]}
        for n, v in scores.items()}}
    for version in ("plain", "mirror"):
        pool = [version, "baseline", f"{version}+baseline"]
        ranked = rank_per_task(schema, {n: scores[n]["val"] for n in pool})
        choice = {t: r[0] for t, r in ranked.items()}
        test = {t: scores[c]["test"]["tasks"][t]["primary"] for t, c in choice.items()}
        out[f"selection_{version}"] = {"choice": choice, "test": test,
                                       "test_combined": metrics.combined_score(schema, test)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", action="append", required=True, metavar="NET_RUN,BASELINE_RUN",
                   help="a network run and the baseline run of the same split; repeat per split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "flip-tta.json")
    args = p.parse_args(argv)
    common.setup_logging()
    torch.set_num_threads(args.threads)
    splits = []
    for pair in args.split:
        net, baseline = (Path(x) for x in pair.split(","))
        with tempfile.TemporaryDirectory() as tmp:
            splits.append(one_split(net, baseline, Path(tmp)))
    mean = lambda key, version: float(np.mean([s["candidates"][version][key] for s in splits]))  # noqa: E731
    res = {"machine": common.machine_info(), "splits": splits,
           "mean": {v: {"val_combined": mean("val_combined", v), "test_combined": mean("test_combined", v),
                        "selection_test_combined": float(np.mean([s[f"selection_{v}"]["test_combined"] for s in splits])),
                        "selection_test": {t: float(np.mean([s[f"selection_{v}"]["test"][t] for s in splits]))
                                           for t in splits[0][f"selection_{v}"]["test"]}}
                    for v in ("plain", "mirror")}}
    for v, m in res["mean"].items():
        print(f"{v:6s} network val {m['val_combined']:.4f} test {m['test_combined']:.4f}; per-task selection test "
              f"{m['selection_test_combined']:.4f} " + " ".join(f"{t} {x:.3f}" for t, x in m["selection_test"].items()))
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
