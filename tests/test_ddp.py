"""The trainer under torchrun: two CPU processes (gloo), sharded data, gathered metrics, rank 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tongue_nb.data.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from tongue_nb.train.params import load_params
from tongue_nb.train.trainer import train
summary = train(load_params(backbone="test_convnext", data_dir=sys.argv[1], out_dir=sys.argv[2], image_size=32,
                            pretrained=False, batch_size=8, stage1_epochs=1, stage2_epochs=1, progress=False,
                            num_threads=1, device="cpu"))
# One file per rank: both ranks share stdout, where their lines can interleave.
with open(sys.argv[2] + ".rank" + os.environ["RANK"], "w") as f:
    f.write(f"RANK_DONE {summary['world_size']} {summary['final_metrics_fixed']['combined_score']!r}")
"""


def test_torchrun_two_gloo_processes(tmp_path):
    data = make_synthetic(tmp_path / "data", n=40, size=48, seed=4)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(data), str(run)], capture_output=True, text=True, env=env, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [(tmp_path / f"run.rank{r}").read_text().split() for r in (0, 1)]
    assert len(done) == 2 and {d[1] for d in done} == {"2"}, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every rank computed metrics over all ranks' predictions
    assert done[0][2] == done[1][2], proc.stdout[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    preds = pd.read_csv(run / "predictions.csv")
    split = pd.read_csv(run / "split.csv")
    for name in ("val", "test"):
        expected = set(split.loc[split["split"] == name, "id"])
        got = preds.loc[preds["split"] == name, "id"]
        assert set(got) == expected and got.is_unique  # gathered from both ranks, DDP padding dropped
    assert len(pd.read_csv(run / "history.csv")) == 2
    assert not (run / ".lock").exists()
