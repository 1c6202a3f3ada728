"""One notebook job of a sweep: the project's kernel, running a notebook with papermill, and the outcome record.

The sweep (pipeline/sweep.py) makes job dicts and the executors (pipeline/executors.py) run them, in this
process, one process per GPU (`python -m tongue_nb.pipeline.jobs --worker JOB.json RESULT.json`) or as Slurm
jobs; both import this module, which imports neither.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger(__name__)

KERNEL_NAME = "tongue-nb"  # the project's own Python as a kernel, with no kernelspec installed anywhere
# Messages of kernel-start races (two kernels picking the same ports, a slow first start):
# safe to retry because no cell has run yet.
_START_RACES = ("Kernel died before replying to kernel_info", "Address already in use", "Kernel didn't respond",
                "Kernel didn't respond in", "ZMQError")


class SweepError(RuntimeError):
    """The sweep as a whole cannot run (missing kernel, notebook, bad override, locked folder)."""


@dataclass
class RunOutcome:
    """What happened to one backbone's training run."""

    backbone: str
    run_dir: str
    notebook: str
    status: str = "pending"  # completed | skipped | failed
    error: dict | None = None
    report: str | None = None  # 03 HTML
    error_analysis: str | None = None  # 04 HTML
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the run finished (now or in an earlier sweep)."""
        return self.status in ("completed", "skipped")


# ----------------------------------------------------------------------------------------------
# kernel


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes a child process die (SIGKILL) when the process starting it dies, on Linux; None
    elsewhere. A sweep's kernels and worker processes must not outlive a sweep that is killed: an orphaned kernel
    would go on training and hold its run folder's lock against the sweep started again."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def arm() -> None:  # runs in the child between fork and exec
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


class ProjectKernelManager(AsyncKernelManager):
    """The kernel manager of every notebook a sweep runs: the kernel named KERNEL_NAME is this Python
    (sys.executable, the project's environment), given to papermill directly; any other name is looked up as
    Jupyter does. Nothing is written to a kernelspec folder and the environment (JUPYTER_PATH) is left alone,
    so a user-level `python3` spec that points at another Python cannot hijack the runs. Its kernels die with
    the process that started them (`die_with_parent`)."""

    @property
    def kernel_spec(self):  # type: ignore[override]
        if self._kernel_spec is None and self.kernel_name == KERNEL_NAME:
            from jupyter_client.kernelspec import KernelSpec

            self._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                           display_name=f"tongue_nb ({sys.executable})", language="python")
        return super().kernel_spec

    async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        arm = die_with_parent()  # the kernel dies with the process that runs the notebook
        if arm is not None:
            kw["preexec_fn"] = arm
        return cmd, kw


@contextlib.contextmanager
def project_kernel(kernel_name: str | None = None) -> Iterator[str]:
    """Yield the kernel name the sweep's notebooks run with: KERNEL_NAME (this Python) when none is given, else
    the given one, checked to exist."""
    if importlib.util.find_spec("ipykernel") is None:
        raise SweepError(f"ipykernel is not installed in {sys.executable}; install the project's environment "
                         "(`make venv`, or `pip install -e .` which pulls ipykernel) and run again")
    if kernel_name is not None and kernel_name != KERNEL_NAME:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        try:
            KernelSpecManager().get_kernel_spec(kernel_name)
        except NoSuchKernel:
            known = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "none"
            raise SweepError(f"Jupyter kernel {kernel_name!r} not found (installed: {known}); register it with "
                             f"`{sys.executable} -m ipykernel install --user --name {kernel_name}`, or leave the "
                             "kernel unset to use the project's environment") from None
    yield kernel_name or KERNEL_NAME


# ----------------------------------------------------------------------------------------------
# one notebook


def _failing_cell(notebook: Path) -> tuple[int | None, str]:
    """Index and source of the cell that failed or was running when the kernel died (papermill metadata)."""
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except (OSError, ValueError):
        return None, ""
    started = None
    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {}).get("papermill", {})
        if meta.get("status") in ("failed", "running"):
            return i, cell.get("source", "")
        if meta.get("start_time"):
            started = i
    # A dead kernel leaves no 'failed' mark: papermill closes the notebook with every cell 'completed',
    # so the culprit is the last cell that started.
    if started is not None:
        return started, nb.cells[started].get("source", "")
    return None, ""


def executed_ok(notebook: Path) -> bool:
    """True when a papermill-executed notebook exists and every code cell completed without an error output."""
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except (OSError, ValueError):
        return False
    code = [c for c in nb.cells if c.cell_type == "code"]
    return bool(code) and all(c.get("metadata", {}).get("papermill", {}).get("start_time")
                              and not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in code)


def failure_record(backbone: str, exc: BaseException, notebook: Path | None, stage: str = "train") -> dict:
    """A JSON-ready record of a failure: backbone, error type, message, failing cell index and source excerpt."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        error_type, message = exc.ename, str(exc.evalue)
        cell_index, source = exc.cell_index, exc.source or ""
    else:
        error_type = type(exc).__name__
        message = str(exc) or repr(exc)
        cell_index, source = _failing_cell(notebook) if notebook and notebook.exists() else (None, "")
    lines = source.strip().splitlines()
    excerpt = "\n".join(lines[:8]) + ("\n..." if len(lines) > 8 else "")
    return {"backbone": backbone, "stage": stage, "error_type": error_type, "message": message[:2000],
            "cell_index": cell_index, "cell_source": excerpt, "notebook": str(notebook) if notebook else None,
            "time": _dt.datetime.now().isoformat(timespec="seconds")}


def execute_notebook(input_nb: Path, output_nb: Path, parameters: dict, kernel_name: str, cwd: Path,
                     start_retries: int = 2, cell_timeout: float = 0) -> None:
    """Run a notebook with papermill, retrying kernel-start races; execution errors propagate.

    cell_timeout > 0: a cell still running after that many seconds stops the notebook (a hung run fails
    with a timeout instead of holding the sweep); 0: no limit.
    """
    import papermill as pm

    output_nb.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(start_retries + 1):
        try:
            pm.execute_notebook(str(input_nb), str(output_nb), parameters=parameters, kernel_name=kernel_name, language="python",
                                cwd=str(cwd), progress_bar=False, log_output=False, request_save_on_cell_execute=True,
                                execution_timeout=cell_timeout if cell_timeout and cell_timeout > 0 else None,
                                kernel_manager_class=ProjectKernelManager)
            return
        except RuntimeError as exc:
            # DeadKernelError is a RuntimeError too: only messages of a kernel that never started are retried.
            if attempt < start_retries and any(s in str(exc) for s in _START_RACES) and _failing_cell(output_nb)[0] is None:
                log.warning("kernel start failed for %s (%s); retry %d/%d", output_nb.name, exc, attempt + 1, start_retries)
                time.sleep(1.0 + 2.0 * attempt)
                continue
            raise


def run_job(job: dict) -> dict:
    """Execute one training notebook described by a job dict; return a RunOutcome as a dict (never raises)."""
    out = RunOutcome(job["backbone"], job["run_dir"], job["output_nb"])
    start = time.perf_counter()
    try:
        execute_notebook(Path(job["input_nb"]), Path(job["output_nb"]), job["parameters"], job["kernel_name"], Path(job["cwd"]),
                         cell_timeout=float(job.get("cell_timeout") or 0))
        out.status = "completed"
    except Exception as exc:  # every failure is recorded; the sweep goes on with the other backbones
        out.status = "failed"
        out.error = failure_record(job["backbone"], exc, Path(job["output_nb"]))
        log.error("run %s failed: %s: %s", job["backbone"], out.error["error_type"], out.error["message"].splitlines()[0] if out.error["message"] else "")
        log.debug("%s", traceback.format_exc())
    out.seconds = time.perf_counter() - start
    return asdict(out)


def _worker_main(argv: Sequence[str]) -> int:
    """`python -m tongue_nb.pipeline.jobs --worker JOB.json RESULT.json`: one run in its own process (one GPU)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m tongue_nb.pipeline.jobs --worker JOB.json RESULT.json (internal; use `tongue-nb sweep`)")
