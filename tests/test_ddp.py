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


def _torchrun(tmp_path: Path, script_text: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a training script as two gloo processes under torchrun on a tiny synthetic set."""
    data = make_synthetic(tmp_path / "data", n=40, size=48, seed=4)
    script = tmp_path / "ddp_script.py"
    script.write_text(script_text)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(data), str(run)], capture_output=True, text=True, env=env, timeout=240,
                          cwd=tmp_path)
    return proc, run


def test_torchrun_two_gloo_processes(tmp_path):
    proc, run = _torchrun(tmp_path, SCRIPT)
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


OOM_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from tongue_nb.train.fit_state import Callback
from tongue_nb.train.params import load_params
from tongue_nb.train.trainer import TrainingError, train

class OomOnRank1(Callback):
    # Rank 1 runs out of memory in its first stage-2 forward pass (a simulated CUDA OOM).
    def on_stage_start(self, fit, stage):
        if os.environ["RANK"] == "1" and stage.number == 2:
            def forward(x):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            fit.model.forward = forward

try:
    train(load_params(backbone="test_convnext", data_dir=sys.argv[1], out_dir=sys.argv[2], image_size=32,
                      pretrained=False, batch_size=8, stage1_epochs=1, stage2_epochs=1, progress=False,
                      num_threads=1, device="cpu"), callbacks=[OomOnRank1()])
except TrainingError as exc:
    with open(sys.argv[2] + ".rank" + os.environ["RANK"], "w") as f:
        f.write(str(exc))
    raise
"""


def test_out_of_memory_under_ddp_stops_with_a_clear_error_not_a_retry(tmp_path):
    """Under DDP the ranks cannot agree on a new batch split mid-step: the retry is off and the OOM rank says why."""
    proc, run = _torchrun(tmp_path, OOM_SCRIPT)
    assert proc.returncode != 0  # torchrun stops the job when one rank fails (no hang, no silent retry)
    message = (tmp_path / "run.rank1").read_text()
    assert "CUDA out of memory at epoch 2" in message and "off under DDP" in message, message
    assert "smaller batch_size" in message
    assert not (run / "summary.json").exists()
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1]  # stage 1 was kept
