"""Child process of test_faults_training: train from a params file with one fault injected, then SIGKILL itself.

    python tests/fault_child.py MODE EPOCH PARAMS_YAML [WAIT_DIR]

MODE:
- mid-epoch: one optimizer step into epoch EPOCH (torch's global optimizer step hook), the process kills itself;
- mid-checkpoint: while checkpoints/last.pt of epoch EPOCH is being written, only the first half of the
  bytes reach the temporary file, then the process kills itself (runio's torch.save call is wrapped);
- timer: the process kills itself after EPOCH milliseconds of training (a kill at a random moment);
- none: no fault.
With WAIT_DIR, after epoch 1 the child writes WAIT_DIR/holding and waits for WAIT_DIR/go, so that the test can
try a second run into the same folder while this one holds it.
Nothing here changes the package: the faults come from outside, as a kill would.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from tongue_nb.train.params import load_params
from tongue_nb.train.trainer import train


def die() -> None:
    """SIGKILL this process: no cleanup handler, no finally block runs."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    """Run one training with the fault named by argv."""
    mode, number, params_file = argv[0], int(argv[1]), argv[2]
    wait_dir = Path(argv[3]) if len(argv) > 3 else None
    finished = {"epoch": 0, "steps": 0}

    def on_epoch_end(row: dict) -> None:
        finished["epoch"] = int(row["epoch"])
        if wait_dir is not None and finished["epoch"] == 1:
            (wait_dir / "holding").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not (wait_dir / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    if mode == "mid-epoch":
        def after_step(optimizer, args, kwargs) -> None:
            if finished["epoch"] == number - 1:
                finished["steps"] += 1
                if finished["steps"] == 1:
                    die()

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(after_step)
    elif mode == "mid-checkpoint":
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            progress = obj.get("progress") if isinstance(obj, dict) else None
            if isinstance(progress, dict) and progress.get("epoch") == number:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = half_save
    elif mode == "timer":
        threading.Timer(number / 1000.0, die).start()
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode!r}")
    train(load_params(files=[params_file]), on_epoch_end=on_epoch_end)
    print("finished without a kill")
    os._exit(0)  # a pending timer thread must not fire after a finished run


if __name__ == "__main__":
    main(sys.argv[1:])
