"""Where a sweep's training jobs run: in this process, one worker process per local GPU, or on a Slurm cluster.

Every executor takes the same job dicts (one training notebook each, `jobs.run_job`) and returns one outcome
dict per job, in order, never raising for a failed job: the sweep renders, reports and indexes the outcomes
the same way whichever executor ran them.

- `LocalExecutor`: one job after another in this process (CPU, or one GPU).
- `PoolExecutor`: jobs side by side, one worker process per slot: per GPU id, each seeing only its GPU
  (CUDA_VISIBLE_DEVICES), or per share of the CPU cores (`--workers N` on a machine without GPUs).
- `SlurmExecutor`: one Slurm job per training notebook through submitit, with partition, GPUs per job, time
  limit and extra sbatch options; a job that is pre-empted or reaches its time limit is requeued and resumes
  from its run folder's last checkpoint. ``cluster="local"`` sends the same submissions to submitit's local
  backend (jobs as local processes): how the tests run it, and a dry run before a cluster.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from tongue_nb.checks import check_int
from tongue_nb.pipeline.jobs import RunOutcome, die_with_parent, failure_record, run_job

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs training jobs (dicts made by the sweep) and returns their outcomes (RunOutcome dicts), in order."""

    def run(self, jobs: list[dict]) -> list[dict]: ...


def _failed(job: dict, exc: BaseException) -> dict:
    out = RunOutcome(job["backbone"], job["run_dir"], job["output_nb"], status="failed")
    out.error = failure_record(job["backbone"], exc, Path(job["output_nb"]))
    return asdict(out)


def _announced(job: dict, where: str, run: Any) -> dict:
    """Run a job, logging its start and its outcome (a worker's own output is not shown)."""
    log.info("%s %s%s", job.get("task", "training"), job["backbone"], where)
    result = run()
    log.info("%s %s in %.0f s", job["backbone"], result.get("status"), result.get("seconds") or 0)
    return result


class LocalExecutor:
    """Jobs one after another in this process."""

    def run(self, jobs: list[dict]) -> list[dict]:
        return [_announced(job, "", lambda job=job: run_job(job)) for job in jobs]


def _run_job_in_subprocess(job: dict, device: str, threads: int = 0) -> dict:
    """Run a job in its own Python process that sees one GPU, or none for device "" (kernels inherit the process
    environment); `threads` > 0 sets its CPU thread count (OMP_NUM_THREADS: torch's and OpenMP's default)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="tongue-nb-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "tongue_nb.pipeline.jobs", "--worker", str(job_file),
                               str(result_file)], env=env, cwd=job["cwd"], capture_output=True, text=True,
                              preexec_fn=die_with_parent())  # a killed sweep takes its workers with it
        if result_file.exists():
            return json.loads(result_file.read_text())
        return _failed(job, RuntimeError(f"sweep worker exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}"))


@dataclass
class PoolExecutor:
    """One worker process per slot at a time; each job sees only its slot's GPU ("": no GPU, a CPU job).

    A GPU id given twice runs two jobs on that GPU at once. `threads` > 0 is each job's CPU thread count: a
    CPU pool of N workers gives each its share of the cores, so that N jobs do not oversubscribe them (a
    recipe's own num_threads still wins inside its run)."""

    devices: Sequence[str]
    threads: int = 0

    def run(self, jobs: list[dict]) -> list[dict]:
        free: queue.Queue[str] = queue.Queue()
        for d in self.devices:
            free.put(d)
        results: dict[int, dict] = {}

        def worker(i: int, job: dict) -> None:
            device = free.get()
            try:
                threads = f"{self.threads} thread{'s' * (self.threads > 1)}" if self.threads else "default threads"
                where = f" on GPU {device}" if device else f" in a CPU worker ({threads})"
                results[i] = _announced(job, where, lambda: _run_job_in_subprocess(job, device, self.threads))
            finally:
                free.put(device)

        threads = []
        for i, job in enumerate(jobs):
            t = threading.Thread(target=worker, args=(i, job), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.5)  # staggered starts make kernel port races rarer (they are retried anyway)
        for t in threads:
            t.join()
        return [results[i] for i in range(len(jobs))]


class _SlurmJob:
    """The submitted callable: one notebook (a training or an error analysis); on pre-emption or time-out it
    requeues itself, a training to resume from its last checkpoint."""

    def __init__(self, job: dict) -> None:
        self.job = job

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return run_job(self.job)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit before a requeue: the next attempt resumes from the run folder's last.pt."""
        import submitit

        job = dict(self.job)
        training = "task" not in job  # an error analysis reads the run folder; it has nothing to resume
        if training and (Path(job["run_dir"]) / "checkpoints" / "last.pt").exists():
            job["parameters"] = dict(job["parameters"], resume=True)
        return submitit.helpers.DelayedSubmission(_SlurmJob(job))


@dataclass
class SlurmExecutor:
    """One Slurm job per notebook (training, then error analysis) through submitit (https://github.com/facebookincubator/submitit).

    `folder` keeps submitit's pickles and each job's logs (it must be on a file system the compute nodes
    share); `partition`, `gpus_per_job`, `cpus_per_job`, `mem_gb` and `time_min` are the sbatch resources;
    `sbatch` adds any other option (e.g. {"account": "lab", "qos": "high", "constraint": "a100"});
    `max_requeues` bounds the requeues after pre-emption or time-out. `cluster` "slurm", or "local" for
    submitit's local backend.
    """

    folder: str | Path
    partition: str = ""
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: float = 0
    time_min: int = 240
    sbatch: dict[str, Any] = field(default_factory=dict)
    max_requeues: int = 3
    cluster: str = "slurm"

    def __post_init__(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise ValueError(f"SlurmExecutor: cluster must be 'slurm' or 'local', got {self.cluster!r}")
        for name in ("gpus_per_job", "cpus_per_job", "time_min", "max_requeues"):
            v, low = getattr(self, name), (0 if name in ("gpus_per_job", "max_requeues") else 1)
            check_int(f"SlurmExecutor: {name}", v, low)

    def _executor(self) -> Any:
        try:
            import submitit
        except ImportError as exc:  # pragma: no cover - submitit is a dependency
            raise RuntimeError("the Slurm executor needs submitit: pip install submitit") from exc
        ex = submitit.AutoExecutor(folder=str(Path(self.folder) / "%j"), cluster=self.cluster,
                                   slurm_max_num_timeout=self.max_requeues,
                                   local_max_num_timeout=self.max_requeues)
        params: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus_per_job,
                                  "gpus_per_node": self.gpus_per_job, "tasks_per_node": 1, "nodes": 1,
                                  "name": "tongue-nb"}
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.cluster == "slurm":
            if self.partition:
                params["slurm_partition"] = self.partition
            if self.sbatch:
                params["slurm_additional_parameters"] = dict(self.sbatch)
        ex.update_parameters(**params)
        return ex

    def run(self, jobs: list[dict]) -> list[dict]:
        if not jobs:
            return []
        ex = self._executor()
        submitted = []
        for job in jobs:
            try:
                submitted.append(ex.submit(_SlurmJob(job)))
                log.info("submitted %s %s as %s job %s", job.get("task", "training"), job["backbone"], self.cluster,
                         submitted[-1].job_id)
            except Exception as exc:  # noqa: BLE001 - a refused submission is that job's failure
                submitted.append(exc)
        outcomes = []
        for job, sub in zip(jobs, submitted):
            if isinstance(sub, BaseException):
                outcomes.append(_failed(job, sub))
                continue
            try:
                outcomes.append(sub.result())
            except Exception as exc:  # noqa: BLE001 - died without a result (killed, OOM, node failure)
                outcomes.append(_failed(job, RuntimeError(f"{self.cluster} job {sub.job_id} failed: {exc}")))
        return outcomes


def _cores() -> int:
    """CPU cores this process may use: its affinity mask where the OS keeps one (a container's or a Slurm job's
    share), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def make_executor(kind: str = "auto", gpus: Sequence[str] | None = None, slurm: dict | None = None,
                  folder: str | Path | None = None, workers: int | None = None) -> Executor:
    """'auto' (one worker per GPU when there are several, else in-process), 'local', 'gpus' or 'slurm'.

    `workers` N runs N training jobs side by side: with GPUs, the N workers take the GPUs in turn (N above
    the GPU count shares them); without, each worker is a CPU process with cores/N threads. None: one per
    GPU, or one in-process job at a time without GPUs."""
    if workers is not None:
        check_int("workers (--workers)", workers, 1)
    if kind == "slurm":
        if workers is not None:
            raise ValueError(f"workers={workers} (--workers) is for jobs on this machine; with executor 'slurm' "
                             "the cluster runs the jobs side by side as it has room")
        opts = dict(slurm or {})
        opts.setdefault("folder", str(Path(folder or ".") / "slurm"))
        return SlurmExecutor(**opts)
    if slurm:
        raise ValueError(f"Slurm options given ({sorted(slurm)}) but executor is {kind!r}; use executor='slurm'")
    if kind == "local":
        if workers not in (None, 1):
            raise ValueError(f"workers={workers} (--workers) but executor 'local' runs one job after another in "
                             "this process; use executor 'auto' (or 'gpus') for jobs side by side")
        return LocalExecutor()
    if kind in ("auto", "gpus"):
        devices = list(gpus or [])
        if kind == "gpus" and not devices:
            raise ValueError("executor 'gpus': no GPU visible (CUDA_VISIBLE_DEVICES, torch.cuda.device_count())")
        if devices:
            n = workers or len(devices)
            return PoolExecutor([devices[i % len(devices)] for i in range(n)]) if n > 1 or kind == "gpus" \
                else LocalExecutor()
        if workers and workers > 1:
            return PoolExecutor([""] * workers, threads=max(1, _cores() // workers))
        return LocalExecutor()
    raise ValueError(f"executor must be one of auto, local, gpus, slurm; got {kind!r}")
